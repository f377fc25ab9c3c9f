"""SFT data: the three JSONL formats, the assistant-only loss mask (token by token on known templates
and against transformers' return_assistant_tokens_mask), truncation, bad input named by file and
line, and the bundled chatterbot corpus."""

import io
import json
import re
import sys
import tarfile
from pathlib import Path

import pytest

from pocketlm import data
from pocketlm.conversations import (DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, Conversation, conversation_source,
                                    encode_conversation, read_conversations, training_template)
from pocketlm.data import DataError
from pocketlm.errors import ConfigError, NotFoundError, TokenizerError
from pocketlm.tokenizer import Tokenizer

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>")
# Llama 3's layout: a bos, headers, trimmed content, <|eot_id|> ending every turn, no newline after it
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TEMPLATES = {"chatml": DEFAULT_CHAT_TEMPLATE, "llama3": LLAMA3}
SMOLLM2_TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"

# the same exchange in each format, then a longer one with a system turn
LINES = {
    "messages": {"messages": [{"role": "user", "content": "Name a colour."},
                              {"role": "assistant", "content": "Blue, the sky's."}]},
    "alpaca": {"instruction": "Name a colour", "input": "of the sky.", "output": "Blue, the sky's."},
    "sharegpt": {"conversations": [{"from": "human", "value": "Name a colour."},
                                   {"from": "gpt", "value": "Blue, the sky's."}]},
}
MULTI_TURN = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there!"},
              {"role": "assistant", "content": "Hello. ✨"}, {"role": "user", "content": "And the answer?"},
              {"role": "assistant", "content": " It is 42.\n"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    text = "the user asks and the assistant answers, briefly and kindly: blue, the sky's colour. " * 60
    tokenizer = Tokenizer.train_from_iterator([text], vocab_size=320, special_tokens=SPECIALS,
                                              bos_token="<|begin_of_text|>", eos_token="<|endoftext|>")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(folder):
    return Tokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder)


def _write(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _expected(tokenizer, segments):
    """ids and labels built piece by piece: (text, learned) segments tokenized one at a time."""
    ids, labels = [], []
    for text, learned in segments:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if learned else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _chatml_segments(messages, default_system=None):
    segments = [(f"<|im_start|>system\n{default_system}<|im_end|>\n", False)] if default_system else []
    for m in messages:
        if m["role"] == "assistant":
            segments += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            segments.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    return segments


def test_three_formats_read_alike_and_mask_token_by_token(tmp_path, tokenizer):
    path = _write(tmp_path / "chat.jsonl", [LINES["messages"], "", LINES["alpaca"], "  ", LINES["sharegpt"],
                                            {"messages": MULTI_TURN}])
    conversations = read_conversations(path)
    assert [c.where for c in conversations] == [f"{path}:{n}" for n in (1, 3, 5, 6)]
    exchange = LINES["messages"]["messages"]
    assert conversations[0].messages == conversations[2].messages == exchange
    # Alpaca: the input follows the instruction after a blank line
    assert conversations[1].messages == [{"role": "user", "content": "Name a colour\n\nof the sky."}, exchange[1]]
    assert conversations[3].messages == MULTI_TURN
    for conversation in conversations:
        encoded = encode_conversation(tokenizer, conversation.messages, DEFAULT_CHAT_TEMPLATE, None)
        assert (encoded.input_ids, encoded.labels) == _expected(tokenizer, _chatml_segments(conversation.messages))
        assert not encoded.truncated and encoded.has_targets


def test_llama3_layout_token_by_token(tokenizer):
    encoded = encode_conversation(tokenizer, MULTI_TURN, LLAMA3, None)
    segments = [("<|begin_of_text|>", False)]
    for m in MULTI_TURN:
        header = (f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False)
        segments += [header, (m["content"].strip() + "<|eot_id|>", m["role"] == "assistant")]
    assert (encoded.input_ids, encoded.labels) == _expected(tokenizer, segments)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", [*LINES, "multi-turn"])
def test_mask_matches_transformers_generation_tags(tmp_path, tokenizer, reference, name, conversation):
    if conversation == "multi-turn":
        messages = MULTI_TURN
    else:
        messages = read_conversations(_write(tmp_path / "one.jsonl", [LINES[conversation]]))[0].messages
    expected = reference.apply_chat_template(messages, chat_template=TEMPLATES[name], tokenize=True,
                                             return_dict=True, return_assistant_tokens_mask=True)
    encoded = encode_conversation(tokenizer, messages, TEMPLATES[name], None)
    assert encoded.input_ids == expected["input_ids"]
    assert [int(label != IGNORE_INDEX) for label in encoded.labels] == expected["assistant_masks"]
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(encoded.labels, encoded.input_ids))
    # the mask comes from rendering prefixes, not from the tags: a template without them gives the same
    untagged = re.sub(r"{% (end)?generation %}", "", TEMPLATES[name])
    assert encode_conversation(tokenizer, messages, untagged, None) == encoded


def test_real_smollm2_template_and_tokenizer(smollm2_gguf, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from pocketlm.gguf import GGUFFile, tokenizer_from_gguf

    with GGUFFile(smollm2_gguf) as f:
        tokenizer = tokenizer_from_gguf(f)
    template = training_template(tokenizer)
    assert template == tokenizer.chat_template and SMOLLM2_TURN in template  # its own, not the default
    messages = MULTI_TURN[1:]  # no system turn: the template writes its default one, never learned
    encoded = encode_conversation(tokenizer, messages, template, None)
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert (encoded.input_ids, encoded.labels) == _expected(tokenizer, _chatml_segments(messages, system))
    # and transformers agrees once the same template marks its assistant text with generation tags
    tagged = template.replace(SMOLLM2_TURN, "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
                              "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
                              "{{ '\n' }}{% else %}" + SMOLLM2_TURN + "{% endif %}")
    tokenizer.save_pretrained(tmp_path)
    expected = PreTrainedTokenizerFast.from_pretrained(tmp_path).apply_chat_template(
        messages, chat_template=tagged, return_dict=True, return_assistant_tokens_mask=True)
    assert encoded.input_ids == expected["input_ids"]
    assert [int(label != IGNORE_INDEX) for label in encoded.labels] == expected["assistant_masks"]


def test_truncation_cuts_from_the_right(tokenizer):
    full = encode_conversation(tokenizer, MULTI_TURN, DEFAULT_CHAT_TEMPLATE, None)
    assert encode_conversation(tokenizer, MULTI_TURN, DEFAULT_CHAT_TEMPLATE, len(full.input_ids)) == full
    cut = encode_conversation(tokenizer, MULTI_TURN, DEFAULT_CHAT_TEMPLATE, len(full.input_ids) - 3)
    assert cut.truncated and cut.has_targets
    assert (cut.input_ids, cut.labels) == (full.input_ids[:-3], full.labels[:-3])
    first_answer = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    prompt_only = encode_conversation(tokenizer, MULTI_TURN, DEFAULT_CHAT_TEMPLATE, first_answer)
    assert prompt_only.truncated and not prompt_only.has_targets  # nothing left to learn: detectable
    with pytest.raises(ConfigError, match="max_length"):
        encode_conversation(tokenizer, MULTI_TURN, DEFAULT_CHAT_TEMPLATE, 0)


def test_templates_whose_answers_cannot_be_located(tokenizer):
    # history rendered unlike the last turn (as templates that drop earlier reasoning do)
    drops_history = DEFAULT_CHAT_TEMPLATE.replace("message['content'] + '<|im_end|>' }}",
                                                  "(message['content'] if loop.last else '…') + '<|im_end|>' }}")
    with pytest.raises(TokenizerError, match="differently once later turns follow"):
        encode_conversation(tokenizer, MULTI_TURN, drops_history, None)
    silent = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(TokenizerError, match="does not write assistant turn 2"):
        encode_conversation(tokenizer, MULTI_TURN, silent, None)


def test_training_template_falls_back_to_chatml(tokenizer):
    assert tokenizer.chat_template is None and training_template(tokenizer) == DEFAULT_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(MULTI_TURN[:2], chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n" \
                   "<|im_start|>assistant\n"


GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"text": "hello"}, "unknown conversation format .*'text'"),
    ({"messages": "hello"}, "'messages' must be a non-empty list"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": 3}]}, "turn 0 of 'messages' must be an object with a string 'content'"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "turn 0 of 'messages' has role 'bot'; use one of system, user"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
     "turn 1 of 'conversations' has from 'robot'; use one of .*human, gpt"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \n"}]},
     r"turn 1 \(assistant\) is empty"),
    ({"instruction": "", "output": "a"}, r"turn 0 \(user\) is empty"),
    ({"instruction": "q", "input": 7, "output": "a"}, "the Alpaca field 'input' must be a string"),
    ({"instruction": "q", "output": ["a"]}, "the Alpaca field 'output' must be a string"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
     "the conversation opens with an assistant turn"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:3: {message}"):
        read_conversations(path)


def test_bad_files(tmp_path):
    for content in ("", "\n  \n"):
        with pytest.raises(DataError, match="holds no conversations"):
            read_conversations(_write(tmp_path / "empty.jsonl", [content]))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(GOOD).encode() + b"\n{\"text\": \"caf\xe9\"}\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_conversations(latin)
    with pytest.raises(NotFoundError, match="chatterbot"):
        read_conversations(tmp_path / "missing.jsonl")
    assert conversation_source("alpaca") is None


# --- the chatterbot corpus -------------------------------------------------------------------------

def _fake_sdist(files: dict[str, str]):
    def download(package, sha256, into):
        archive = Path(into) / "chatterbot_corpus-1.3.3.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for name, text in files.items():
                info = tarfile.TarInfo(f"chatterbot_corpus-1.3.3/chatterbot_corpus/data/{name}")
                info.size = len(text.encode())
                tar.addfile(info, io.BytesIO(text.encode()))
        return archive
    return download


def test_chatterbot_conversion_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    topic = ("categories:\n- t\nconversations:\n- - Hi\n  - Hello\n  - How are you?\n"
             "- A question? - 'no list'\n  - '22'\n- - Who?\n  - 'Me: yes'\n")
    monkeypatch.setattr(data, "download_sdist", _fake_sdist({"english/t.yml": topic,
                                                             "deutsch/d.yml": "conversations:\n- - Hallo\n  - Hi\n"}))
    conversations = read_conversations("chatterbot")
    pairs = [(c.messages[0]["content"], c.messages[1]["content"]) for c in conversations]
    assert pairs == [("Hi", "Hello"), ("Hello", "How are you?"), ("Who?", "Me: yes")]
    assert all([m["role"] for m in c.messages] == ["user", "assistant"] for c in conversations)
    assert "1 malformed" in (tmp_path / "home" / "data" / "chatterbot-corpus-1.3.3" / "COMPLETE").read_text()


def test_chatterbot_needs_pyyaml(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now fails
    with pytest.raises(ConfigError, match="pip install pyyaml"):
        conversation_source("chatterbot")
    assert not (tmp_path / "home" / "data").exists()


def test_chatterbot_corpus_from_the_real_sdist(tmp_path, monkeypatch):
    """Downloads chatterbot-corpus==1.3.3 from PyPI (280 KB), as the sentiment set does."""
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    path = conversation_source("chatterbot")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    # 21 topic files, 2,026 conversations of which one (in trivia.yml) lost its list marker and
    # parses as a single string; the 2,025 others hold 2,306 consecutive turn pairs
    assert len({r["topic"] for r in records}) == 21
    assert len({(r["topic"], r["conversation"]) for r in records}) == 2025
    assert len(records) == 2306
    conversations = read_conversations("chatterbot")
    assert [c.messages for c in conversations] == [r["messages"] for r in records]
    assert Conversation([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}],
                        f"{path}:{1 + next(i for i, r in enumerate(records) if r['topic'] == 'greetings')}") \
        in conversations
    monkeypatch.setattr(data, "download_sdist", None)  # fetched once: COMPLETE is there
    assert conversation_source("chatterbot") == path
