"""Instruction tasks (pocketlm.tasks) and their pipelines and CLI verbs: summarization, translation,
question answering with offsets into the context, code; long texts split to fit the window."""

import pytest

from conftest import TINY, randomize
from pocketlm import AutoModelForCausalLM, ConfigError, ModelConfig, pipeline, tasks
from pocketlm.api import AutoTokenizer
from pocketlm.cli import main
from pocketlm.errors import ContextLengthError
from pocketlm.generate import Generator
from test_pipelines import folders  # noqa: F401  (the tiny GPT-2 with a chat template, as a fixture)

EIFFEL = ("The Eiffel Tower was completed in 1889. It was designed by the engineering company of Gustave Eiffel. "
          "It stands in Paris, on the Champ de Mars.")


class Words:  # a tokenizer that counts words
    def encode(self, text, add_special_tokens=False):
        return text.split()

    def decode(self, ids):
        return " ".join(ids)


def test_split_text_keeps_every_word_in_pieces_that_fit():
    long_sentence = " ".join(f"w{i}" for i in range(75))  # longer than a piece: cut by tokens
    text = ("First paragraph. Short.\n\n" + "Second one is here. " * 6 + "\n\n" + long_sentence + ".\n\nEnd.")
    pieces = tasks.split_text(text, Words(), budget=20)
    assert all(len(p.split()) <= 20 for p in pieces)
    assert " ".join(pieces).split() == text.split()
    assert pieces[0].startswith("First paragraph. Short.")
    assert tasks.split_text("one two", Words(), budget=20) == ["one two"]


def test_split_text_with_a_real_tokenizer_never_cuts_a_character(smollm2_gguf):
    from pocketlm.api import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf)
    text = "Ça coûte très cher à Zürich, naïvement. " * 30 + "\n\n" + "東京は大きい都市です。" * 40
    pieces = tasks.split_text(text, tokenizer, budget=40)
    assert all(len(tokenizer.encode(p, add_special_tokens=False)) <= 40 for p in pieces)
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")


@pytest.mark.parametrize("reply, question, span", [
    ("1889", "When?", "1889"),
    ("gustave eiffel.", "Who?", "Gustave Eiffel"),                           # case and closing stop
    ('"Paris"', "Where?", "Paris"),
    ("It was designed by Gustave Eiffel", "Who designed the tower?", "Gustave Eiffel"),
    ("The Eiffel Tower stands in Paris, France.", "Where does the tower stand?", "Paris"),
])
def test_answers_are_located_in_the_context(reply, question, span):
    start, end, text = tasks.locate(reply, EIFFEL, question)
    assert EIFFEL[start:end] == text == span


def test_an_answer_that_is_not_in_the_context_has_no_offsets():
    assert tasks.locate("London, England", EIFFEL, "Where?") == (None, None, "London, England")


def test_answers_match_whole_words_across_line_breaks_and_prefer_what_the_model_saw():
    context = "Start the art class.\r\nThe key is under the\r\nblue mat. Later: the key is under the blue mat."
    assert tasks.locate("art", context)[:2] == (10, 13)  # not inside "Start"
    start, end, text = tasks.locate("under the blue mat", context)
    assert (start, text) == (context.index("under"), "under the\r\nblue mat") and context[start:end] == text
    later = context.rindex("under")
    assert tasks.locate("under the blue mat", context, within=[(later, len(context))])[0] == later
    assert tasks._PREAMBLE.sub("", "Answering machines") == "Answering machines"
    assert tasks._PREAMBLE.sub("", "The answer is: 1889") == "1889"


def test_code_block_and_language_names():
    assert tasks.code_block("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1"
    assert tasks.code_block("```\nx = 1\n") == "x = 1"  # a reply cut off before its closing fence
    assert tasks.code_block("print(1)") == "print(1)"
    assert [tasks.language_name(c) for c in ("fr", "DE", "pt-BR", "fr_XX", "Swahili")] == \
        ["French", "German", "Portuguese", "French", "Swahili"]
    for bad in ("", "x1", "zz"):
        with pytest.raises(ConfigError, match="language"):
            tasks.language_name(bad)


@pytest.fixture(scope="module")
def tiny(folders):  # noqa: F811
    """A tiny random Llama with a 1024-token window and the folders' tokenizer (chat template included)."""
    tokenizer = AutoTokenizer.from_pretrained(folders / "gen")
    config = ModelConfig(**TINY["llama-mha-untied"] | {"vocab_size": len(tokenizer), "max_position": 1024},
                         eos_token_id=tokenizer.eos_token_id)
    return Generator(randomize(AutoModelForCausalLM.from_config(config)).eval(), tokenizer), tokenizer


def test_long_texts_are_split_so_every_message_fits_the_window(tiny, monkeypatch):
    """The tiny model's window is 1,024 tokens; a long text is summarized in pieces, then the
    summaries again, and a question is answered from the part that fits — never over the window."""
    generator, tokenizer = tiny
    window = generator.model.config.max_position
    seen = []  # each prompt's length plus the reply's allowance, as the model gets them
    real = generator.generate

    def recording(ids, **kwargs):
        seen.append(len(ids) + kwargs["max_new_tokens"])
        return real(ids, **kwargs)
    monkeypatch.setattr(generator, "generate", recording)
    text = "\n\n".join(f"the movie was good. the film was bad. a great story {i}." for i in range(150))
    assert len(tokenizer.encode(text)) > 2 * window  # it cannot go in one message
    summary = tasks.summarize(generator, tokenizer, text, max_new_tokens=16)
    assert isinstance(summary, str) and summary and len(seen) > 2 and max(seen) <= window
    seen.clear()
    result = tasks.answer_question(generator, tokenizer, "which story was great?", text, max_new_tokens=8)
    assert set(result) == {"score", "start", "end", "answer"} and 0 <= result["score"] <= 1
    assert result["start"] is None or text[result["start"]:result["end"]] == result["answer"]
    assert len(seen) == 1 and seen[0] <= window
    seen.clear()
    tasks.translate(generator, tokenizer, text, "fr", "en")
    assert len(seen) > 2 and max(seen) <= window
    with pytest.raises(ContextLengthError, match="window"):
        tasks.summarize(generator, tokenizer, text, max_new_tokens=1000)


def test_pipeline_arguments_are_checked(folders):  # noqa: F811
    translator = pipeline("translation", model=folders / "gen")
    with pytest.raises(ConfigError, match="tgt_lang"):
        translator("good")
    qa = pipeline("question-answering", model=folders / "gen")
    with pytest.raises(ConfigError, match="context"):
        qa(question="why?")
    with pytest.raises(ConfigError, match="top_k"):
        qa(question="why?", context="because", top_k=2)
    with pytest.raises(ConfigError, match="top_k"):
        qa({"question": "why?", "context": "because"}, top_k=3)
    with pytest.raises(ConfigError, match="num_beams"):
        qa(question="why?", context="because", num_beams=2)
    with pytest.raises(ConfigError, match="empty"):
        qa(question=" ", context="because")
    with pytest.raises(ConfigError, match="messages"):
        pipeline("chat", model=folders / "gen")([1, 2])
    with pytest.raises(ConfigError, match="translation_xx_to_yy"):
        pipeline("translation_english", model=folders / "gen")
    with pytest.raises(ConfigError, match="text"):
        pipeline("summarization", model=folders / "gen")([3])


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return str(smollm2_gguf)


def test_question_answering_gives_offsets_into_the_context(smol):
    qa = pipeline("question-answering", model=smol)
    found = qa(question="When was the Eiffel Tower completed?", context=EIFFEL)
    assert set(found) == {"score", "start", "end", "answer"}
    assert found["answer"] == "1889" and EIFFEL[found["start"]:found["end"]] == "1889"
    assert 0 < found["score"] <= 1
    both = qa([{"question": "Who designed the Eiffel Tower?", "context": EIFFEL},
               {"question": "In which city is the tower?", "context": EIFFEL}])
    assert [EIFFEL[r["start"]:r["end"]] for r in both] == [r["answer"] for r in both]
    assert "Gustave Eiffel" in both[0]["answer"] and both[1]["answer"] == "Paris"


def test_summarization_translation_and_chat_shapes(smol):
    text = ("The city council voted on Tuesday to build a new public library in the old market district. The project "
            "will cost 12 million euros and is expected to open in 2028.")
    summary = pipeline("summarization", model=smol)([text, text], max_length=60)
    assert [set(s) for s in summary] == [{"summary_text"}] * 2
    assert "library" in summary[0]["summary_text"] and summary[0] == summary[1]
    french = pipeline("translation_en_to_fr", model=smol)("Good morning, my friend.")
    assert [set(t) for t in french] == [{"translation_text"}]
    assert "bonjour" in french[0]["translation_text"].lower()
    chat = pipeline("chat", model=smol)("What is the capital of France?", max_new_tokens=12)
    messages = chat[0]["generated_text"]
    assert messages[0] == {"role": "user", "content": "What is the capital of France?"}
    assert messages[1]["role"] == "assistant" and "Paris" in messages[1]["content"]


def test_cli_verbs(smol, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "news.txt").write_text("The city council voted on Tuesday to build a new public library in the old "
                                       "market district. It is expected to open in 2028.\n")
    assert main(["summarize", "news.txt", "--model", smol]) == 0
    assert "library" in capsys.readouterr().out
    assert main(["translate", "--to", "fr", "Good morning, my friend.", "--model", smol]) == 0
    assert "bonjour" in capsys.readouterr().out.lower()
    assert main(["code", "reverse a string", "--out", "rev.py", "--model", smol]) == 0
    code = capsys.readouterr().out
    assert "def " in code and (tmp_path / "rev.py").read_text() == code
    assert "```" not in code


@pytest.mark.parametrize("argv, message", [
    (["summarize", "missing.txt"], "missing.txt: no such file"),
    (["summarize", "binary.txt"], "binary.txt holds NUL bytes"),
    (["summarize", "latin1.txt"], "latin1.txt is not UTF-8"),
    (["summarize", "."], ". is a folder"),
    (["translate", "--to", "klingon9", "hi"], "unknown language 'klingon9'"),
    (["translate", "--to", "fr", "hi", "--input", "x.txt"], "not both"),
    (["code", "  "], "the task is empty"),
    (["code", "sort a list", "--out", "binary.txt"], "--out binary.txt exists"),
    (["summarize", "news.txt", "--num-beams", "0"], "--num-beams must be at least 1"),
    (["translate", "--to", "fr", "hi", "--num-beams", "-1"], "--num-beams must be at least 1"),
    (["ask", "why?", "--context", "binary.txt"], "binary.txt holds NUL bytes"),
    (["code", "sort a list", "--out", "missing/x.py"], "does not exist"),
])
def test_cli_verbs_refuse_bad_input_before_loading_a_model(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "news.txt").write_text("The library opens in 2028.\n")
    assert main(argv + ["--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
