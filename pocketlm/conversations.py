"""Chat data for instruction tuning (SFT): conversations read from JSONL, and their encoding into
token ids with labels that make the loss cover only what the assistant says.

A `.jsonl` file holds one conversation per line (blank lines skipped), in any of three formats,
told apart line by line:

    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", ...}, {"role": "assistant", ...}]}
    {"instruction": "Name a colour.", "input": "", "output": "Blue."}                  (Alpaca)
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}  (ShareGPT)

Alpaca's user turn is the instruction, followed by a blank line and the input when there is one.
Every problem (bad JSON, an unknown format or role, empty text, no assistant turn) is a DataError
naming the file and line. `chatterbot` names the bundled set wherever a file goes.

The loss mask comes from the chat template itself, so it works for any template, with or without
`{% generation %}` tags: the text of assistant turn i is what rendering messages[:i+1] adds to
rendering messages[:i] with the generation prompt. That text is the answer and the template's
end-of-turn mark (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`), which the model must learn to
write in order to stop; whitespace the template writes after the mark (ChatML's newline) is left
out, as the `{% generation %}` tags of published ChatML templates leave it out.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketlm import data
from pocketlm.chat import render_chat
from pocketlm.data import DataError
from pocketlm.errors import ConfigError, NotFoundError, TokenizerError
from pocketlm.labelled import _jsonl_rows

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label of a token the loss skips, as in torch's cross_entropy
ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {**ROLES, "human": "user", "gpt": "assistant"}

# ChatML, for bases without a template of their own. The generation tags change nothing here (the
# mask is found by rendering prefixes); they let transformers' return_assistant_tokens_mask work
# on the saved tokenizer too.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATTERBOT = "chatterbot"
CHATTERBOT_PACKAGE = "chatterbot-corpus==1.3.3"
CHATTERBOT_SHA256 = "615b5c4c605154f60ae51d03ed918ed92e9d32bc2b144b759bbc64ecdbe18481"  # its sdist
CHATTERBOT_DATA = "chatterbot_corpus/data/english/"


# --- reading conversations -----------------------------------------------------------------------

@dataclass
class Conversation:
    messages: list[dict[str, str]]  # {"role": "system" | "user" | "assistant", "content": str}
    where: str  # "path:line", for error messages


def read_conversations(path: str | os.PathLike) -> list[Conversation]:
    """The conversations of a JSONL file (or of a source name such as `chatterbot`), in file order."""
    path = _resolve(path)
    conversations = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, row in _jsonl_rows(f, path):
                where = f"{path}:{number}"
                conversations.append(Conversation(_checked(_messages(row, where), where), where))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8 first") from None
    if not conversations:
        raise DataError(f"{path} holds no conversations; give one JSON object per line")
    return conversations


def _resolve(path: str | os.PathLike) -> Path:
    if not Path(path).exists():
        source = conversation_source(str(path))
        if source is not None:
            return source
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"conversation file not found: {path} (give a .jsonl file, or '{CHATTERBOT}')")
    return path


def _messages(row: dict, where: str) -> list[dict[str, str]]:
    """The row's turns as messages, in whichever of the three formats it is written."""
    if "messages" in row:
        return _turns(row["messages"], "messages", "role", "content", ROLES, where)
    if "conversations" in row:
        return _turns(row["conversations"], "conversations", "from", "value", SHAREGPT_ROLES, where)
    if "instruction" in row and "output" in row:
        fields = {name: row.get(name) for name in ("instruction", "input", "output")}
        for name, value in fields.items():
            if not isinstance(value, str) and not (name == "input" and value is None):
                raise DataError(f"{where}: the Alpaca field {name!r} must be a string, got {type(value).__name__}")
        prompt = fields["instruction"] + (f"\n\n{fields['input']}" if (fields["input"] or "").strip() else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields["output"]}]
    raise DataError(f"{where}: unknown conversation format (keys: {', '.join(map(repr, row)) or 'none'}); "
                    "expected 'messages' (OpenAI), 'conversations' (ShareGPT) or 'instruction' + 'output' (Alpaca)")


def _turns(turns: Any, field: str, role_key: str, text_key: str, roles: dict[str, str],
           where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {field!r} must be a non-empty list of {{{role_key!r}, {text_key!r}}} objects, "
                        f"got {turns!r:.60}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise DataError(f"{where}: turn {i} of {field!r} must be an object with a string {text_key!r}, "
                            f"got {turn!r:.80}")
        role = turn.get(role_key)
        if role not in roles:
            raise DataError(f"{where}: turn {i} of {field!r} has {role_key} {role!r:.40}; use one of "
                            f"{', '.join(roles)}")
        messages.append({"role": roles[role], "content": turn[text_key]})
    return messages


def _checked(messages: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    for i, message in enumerate(messages):
        if not message["content"].strip():
            raise DataError(f"{where}: turn {i} ({message['role']}) is empty; give it text or remove it")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation opens with an assistant turn; a user (or system) turn "
                        "must come first, to be what the assistant answers")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so nothing to learn from; add the answer")
    return messages


# --- encoding with the loss mask -----------------------------------------------------------------

def training_template(tokenizer) -> str:
    """The template conversations are rendered with: the tokenizer's own, else ChatML."""
    return tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]  # input_ids on assistant tokens, IGNORE_INDEX elsewhere (not shifted)
    truncated: bool

    @property
    def has_targets(self) -> bool:
        """False when truncation cut off every assistant token: nothing left to learn from."""
        return any(label != IGNORE_INDEX for label in self.labels)


def encode_conversation(tokenizer, messages: list[dict[str, str]], template: str,
                        max_length: int | None) -> EncodedConversation:
    """Token ids of the rendered conversation, labelled on the assistant's text (each answer and
    its end-of-turn mark), cut to max_length tokens from the right."""
    if max_length is not None and max_length < 1:
        raise ConfigError(f"max_length must be at least 1, got {max_length}")
    text, spans = assistant_spans(tokenizer, messages, template)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    # a token belongs to the answer when any of its characters does: the model has to write it
    labels = [token if any(start < e and s < end for s, e in spans) else IGNORE_INDEX
              for token, (start, end) in zip(ids, encoding["offset_mapping"])]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return EncodedConversation(ids, labels, truncated)


def assistant_spans(tokenizer, messages: list[dict[str, str]], template: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) character span of each assistant turn in it."""
    def render(turns, prompt):
        return render_chat(template, turns, add_generation_prompt=prompt, **tokenizer.special_tokens_map)

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ConfigError("a conversation cannot open with an assistant turn: there is no prompt before it")
        prompt, through = render(messages[:i], True), render(messages[:i + 1], False)
        if not (through.startswith(prompt) and text.startswith(through)):
            raise TokenizerError(f"the chat template renders turn {i} differently once later turns follow "
                                 "(some templates drop earlier reasoning), so its answer cannot be located; "
                                 "split the conversation into one example per answer")
        start, end = len(prompt), len(through.rstrip())
        if message["content"].strip() not in text[start:end]:
            raise TokenizerError(f"the chat template does not write assistant turn {i} after its generation "
                                 "prompt, so its answer cannot be located; use a template that does")
        spans.append((start, end))
    return text, spans


# --- the chatterbot set --------------------------------------------------------------------------

def conversation_source(name: str) -> Path | None:
    """The JSONL file of a bundled conversation set, fetched once into $POCKETLM_HOME/data; None
    when `name` names none. `chatterbot`: the English corpus of chatterbot-corpus 1.3.3 (BSD),
    each consecutive pair of turns of its conversations one user → assistant example."""
    if name != CHATTERBOT:
        return None
    from pocketlm.registry import home

    folder = home() / "data" / "chatterbot-corpus-1.3.3"
    if not (folder / "COMPLETE").is_file():
        _fetch_chatterbot(folder)
    return folder / "chatterbot.jsonl"


def _fetch_chatterbot(folder: Path) -> None:
    try:
        import yaml
    except ImportError:
        raise ConfigError("reading the chatterbot corpus needs PyYAML: pip install pyyaml") from None
    log.info("fetching the chatterbot corpus from PyPI (%s, once) ...", CHATTERBOT_PACKAGE)
    with tempfile.TemporaryDirectory() as tmp:
        archive = data.download_sdist(CHATTERBOT_PACKAGE, CHATTERBOT_SHA256, tmp)
        with tarfile.open(archive) as tar:
            files = sorted((m for m in tar.getmembers() if m.isfile() and _is_corpus_file(m.name)), key=lambda m: m.name)
            if not files:
                raise DataError(f"{archive.name} holds no {CHATTERBOT_DATA}*.yml files")
            examples, skipped = [], 0
            for member in files:
                topic = Path(member.name).stem
                for index, turns in enumerate(yaml.safe_load(tar.extractfile(member).read())["conversations"]):
                    if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, str) for t in turns):
                        skipped += 1  # trivia.yml has one entry whose missing "- " made it a single string
                        continue
                    examples += [{"messages": [{"role": "user", "content": question},
                                               {"role": "assistant", "content": answer}],
                                  "topic": topic, "conversation": index}
                                 for question, answer in zip(turns, turns[1:])]
    if skipped:
        log.info("chatterbot: left out %d malformed conversation(s)", skipped)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".chatterbot-"))
    try:
        with open(staging / "chatterbot.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(example, ensure_ascii=False) + "\n" for example in examples)
        (staging / "COMPLETE").write_text(f"{CHATTERBOT_PACKAGE} sha256 {CHATTERBOT_SHA256}\n"
                                          f"{len(examples)} turn pairs, {skipped} malformed conversations left out\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _is_corpus_file(name: str) -> bool:
    # the sdist's members sit under "chatterbot_corpus-1.3.3/"; only English, no subfolders
    inner = name.partition("/")[2]
    return inner.startswith(CHATTERBOT_DATA) and inner.endswith(".yml") and "/" not in inner[len(CHATTERBOT_DATA):]
