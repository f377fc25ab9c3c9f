"""`pocketlm ask`: answers from retrieved chunks with their sources listed, a context longer than
the window cut to the parts that match the question, and SmolLM2 answering from a planted note."""

import pytest

from pocketlm.cli import main
from pocketlm.errors import ConfigError
from pocketlm.rag import context_chunks, sources_prompt
from pocketlm.search import Chunk



class Words:  # a tokenizer that counts words
    def encode(self, text, add_special_tokens=False):
        return text.split()


def test_a_long_context_is_cut_to_what_matches_the_question():
    lines = [f"filler line {i} about nothing in particular" for i in range(300)]
    lines[170] = "The orchid on the windowsill needs watering every 11 days."
    chosen = context_chunks("\n".join(lines), "How often does the orchid need watering?", Words(), budget=120)
    assert any("orchid" in c.text for c in chosen)
    assert sum(len(c.text.split()) + 16 for c in chosen) <= 120
    assert [c.start_line for c in chosen] == sorted(c.start_line for c in chosen)
    short = context_chunks("one line\n\ntwo line", "q", Words(), budget=120)
    assert [(c.start_line, c.end_line) for c in short] == [(1, 3)]
    with pytest.raises(ConfigError, match="empty"):
        context_chunks("\n \n", "q", Words(), budget=100)
    prompt = sources_prompt("Why?", [Chunk("a text", "f.txt", 3, 4)])
    assert "[1] (f.txt, lines 3-4)\na text" in prompt and prompt.endswith("Question: Why?")


def test_ask_answers_from_the_index_and_cites(minilm, smollm2_gguf, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths: the sources' names in the prompt are the same every run
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("Notes from the trip.\nThe spare car key is taped under the blue mailbox.\n"
                                    "We bought bread on Tuesday.\n")
    (docs / "recipe.md").write_text("Grandma's lasagna needs exactly 400 grams of ricotta.\n")
    idx = "idx"
    assert main(["index", "docs", "--out", idx, "--encoder", str(minilm)]) == 0
    capsys.readouterr()
    assert main(["ask", "Where is the spare car key?", "--index", idx, "--encoder", str(minilm), "-k", "1",
                 "--model", str(smollm2_gguf)]) == 0
    out = capsys.readouterr().out
    answer, sources = out.split("\nsources:\n")
    assert "mailbox" in answer
    assert sources.strip() == "[1] docs/notes.txt:1-3"
    assert main(["ask", "How much ricotta does the lasagna need?", "--context", "docs/recipe.md",
                 "--model", str(smollm2_gguf)]) == 0
    out = capsys.readouterr().out
    assert "400" in out.split("\nsources:\n")[0]
    assert main(["ask", "q", "--index", idx, "--context", "x"]) == 2
    assert "pass one" in capsys.readouterr().err
