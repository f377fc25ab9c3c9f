"""`pocketlm prepare`, `train-tokenizer`, `eval` and `convert` as a new user meets them: one text
file prepares and trains with default flags, every source is read one way, and bad input is one
line on stderr (exit 2) that names the flag, with the output folder left as it was."""

import io
import json
import logging
import random
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import TINY, randomize
from pocketlm import data
from pocketlm.api import CausalLM
from pocketlm.cli import main
from pocketlm.config import ModelConfig
from pocketlm.data import TokenShard, char_tokenizer, prepare
from pocketlm.errors import FormatError
from pocketlm.evaluate import perplexity
from pocketlm.tokenizer import Tokenizer


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("pocketlm: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def words_text(lines: int, seed: int = 0) -> str:
    """Lines of made-up words: a stand-in for a play (about 60 characters a line)."""
    r = random.Random(seed)
    vocabulary = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 8)))
                  for _ in range(3000)]
    return "".join(" ".join(r.choice(vocabulary) for _ in range(10)) + "\n" for _ in range(lines))


def stdin_bytes(monkeypatch, payload: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(payload), encoding="utf-8"))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_from_iterator([words_text(300, seed=1)], vocab_size=300)


# --- 1. the first steps: one file prepares and trains with default flags -------------------------

def test_one_text_file_prepares_with_defaults_holding_out_its_tail_then_trains(tmp_path, capsys):
    text = words_text(2800)  # ~170 KB: under one piece, so it is a single document piece
    assert 150_000 < len(text) < data.PIECE_CHARS
    (tmp_path / "hamlet.txt").write_text(text)
    code, out, _ = run(capsys, "prepare", tmp_path / "hamlet.txt", "--out", tmp_path / "data" / "hamlet")
    assert code == 0 and "the last" in out and "too few documents" in out

    folder = tmp_path / "data" / "hamlet"
    tok = Tokenizer.from_pretrained(folder)
    train, val = (np.asarray(TokenShard(folder, s).tokens).tolist() for s in ("train", "val"))
    assert val[-1] == tok.eos_token_id and tok.eos_token_id not in train + val[:-1]
    head, tail = tok.decode(train), tok.decode(val[:-1])
    assert head + tail == text and head.endswith("\n")  # the tail is cut at a line break
    assert abs(len(tail) - 0.1 * len(text)) <= 70  # val_frac of the text, to within a line
    assert f"the last {len(tail):,} characters" in out

    run_folder = tmp_path / "runs" / "hamlet"
    code, _, err = run(capsys, "train", "--data", folder, "--max-steps", 2, "--out", run_folder,
                       "--batch-size", 2, "--block-size", 32, "--eval-windows", 2, "--sample-tokens", 0)
    assert code == 0, err
    (checkpoint,) = (run_folder / "checkpoints").iterdir()
    assert (checkpoint / "model.safetensors").is_file()

    # 4. the run folder is a tokenizer source for more data, as it is a --model for train
    (tmp_path / "more.txt").write_text(words_text(50, seed=5))
    code, _, err = run(capsys, "prepare", tmp_path / "more.txt", "--out", tmp_path / "more", "--tokenizer", run_folder)
    assert code == 0, err
    assert Tokenizer.from_pretrained(tmp_path / "more").fingerprint() == tok.fingerprint()


def test_a_few_documents_hold_out_the_tail_and_a_tiny_text_says_what_is_missing(tmp_path, bpe, caplog):
    docs = [words_text(40, seed=i) for i in range(3)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    report = prepare([tmp_path / "d.jsonl"], tmp_path / "out", tokenizer=bpe, val_frac=0.1, seed=0)
    chars = sum(map(len, docs))
    assert report.pieces["val"] == 1 and 0 < report.val_tail_chars < len(docs[-1])
    assert abs(report.val_tail_chars - 0.1 * chars) <= 70  # a tenth of the text, not the whole last document
    val = np.asarray(TokenShard(tmp_path / "out", "val").tokens).tolist()
    assert bpe.decode(val, skip_special_tokens=True) == docs[-1][-report.val_tail_chars:]

    (tmp_path / "small.txt").write_text("a short poem\nof two lines\n")
    with caplog.at_level(logging.WARNING, logger="pocketlm.data"):
        report = prepare([tmp_path / "small.txt"], tmp_path / "small", tokenizer=bpe)
    assert report.tokens["val"] > 0  # never an empty val.bin
    assert "fewer than one training window" in caplog.text and "more characters of text" in caplog.text

    (tmp_path / "one.txt").write_text("x")
    with pytest.raises(data.DataError, match="1 character: too little text"):
        prepare([tmp_path / "one.txt"], tmp_path / "x", tokenizer=bpe)


def test_a_text_without_line_breaks_near_the_cut_is_cut_at_a_space(tmp_path, bpe):
    # a title line, then one long paragraph: the only line break must not hand validation it all
    text = "TITLE\n" + words_text(100).replace("\n", " ")
    (tmp_path / "t.txt").write_text(text)
    report = prepare([tmp_path / "t.txt"], tmp_path / "out", tokenizer=bpe)
    assert abs(report.val_tail_chars - 0.1 * len(text)) <= 10
    val = np.asarray(TokenShard(tmp_path / "out", "val").tokens).tolist()
    tail = bpe.decode(val, skip_special_tokens=True)
    assert tail == text[-report.val_tail_chars:] and text[-len(tail) - 1] == " "  # a word start


# --- 2 and 3. a failed run leaves --out as it was; --out that is a file fails first ---------------

def test_failed_prepare_leaves_no_folder_behind(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    before = set(tmp_path.iterdir())
    assert "no text" in one_line_error(capsys, "prepare", tmp_path / "empty.txt", "--out", tmp_path / "a" / "b")
    assert "latin1.txt is not UTF-8" in one_line_error(capsys, "prepare", tmp_path / "latin1.txt",
                                                       "--out", tmp_path / "a")
    # 10. non-UTF-8 stdin, with a tokenizer to train (stdin spooled first) and without
    stdin_bytes(monkeypatch, "caf\xe9\n".encode("latin-1"))
    assert "stdin is not UTF-8" in one_line_error(capsys, "prepare", "-", "--out", tmp_path / "a")
    stdin_bytes(monkeypatch, "caf\xe9\n".encode("latin-1"))
    assert "stdin is not UTF-8" in one_line_error(capsys, "prepare", "-", "--out", tmp_path / "a", "--char")
    assert set(tmp_path.iterdir()) == before  # no folder, no staging folder left


def test_out_naming_a_file_fails_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "t.txt").write_text(words_text(20))
    taken = tmp_path / "taken"
    taken.write_text("keep me")

    def no_reading(*args, **kwargs):
        raise AssertionError("the input was read before --out was checked")

    monkeypatch.setattr(data, "documents", no_reading)
    assert "is a file" in one_line_error(capsys, "prepare", tmp_path / "t.txt", "--out", taken)
    assert "is a file" in one_line_error(capsys, "train-tokenizer", tmp_path / "t.txt", "--out", taken)
    # convert checks OUT before it even looks for the model
    assert "already exists as a file" in one_line_error(capsys, "convert", tmp_path / "nothing.gguf", taken)
    assert taken.read_text() == "keep me"


def test_prepare_again_into_the_same_folder_replaces_its_files_and_a_failure_keeps_them(tmp_path, capsys, bpe):
    (tmp_path / "t.txt").write_text(words_text(40))
    out = tmp_path / "data"
    prepare([tmp_path / "t.txt"], out, tokenizer=bpe)
    (out / "notes.txt").write_text("mine")
    (out / "chat_template.jinja").write_text("{{ messages }}")  # would win over the new tokenizer's config
    assert run(capsys, "prepare", tmp_path / "t.txt", "--out", out, "--char")[0] == 0  # as before: allowed
    char = Tokenizer.from_pretrained(out)
    assert len(char) < len(bpe) and (out / "notes.txt").read_text() == "mine"
    assert char.chat_template is None and not (out / "chat_template.jinja").exists()
    for split in ("train", "val"):
        TokenShard(out, split).check_tokenizer(char)  # the shards and the tokenizer are the new ones
    before = tree(out)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in one_line_error(capsys, "prepare", tmp_path / "latin1.txt", "--out", out)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "latin1.txt", "t.txt"]  # no staging left


def test_convert_refuses_a_folder_with_files_and_leaves_none_after_a_failure(tmp_path, capsys, monkeypatch, bpe):
    import pocketlm.api

    config = ModelConfig(**{**TINY["llama-gqa-tied"], "vocab_size": len(bpe)})
    model = randomize(CausalLM.from_config(config))
    monkeypatch.setattr(pocketlm.api, "load_model_and_tokenizer", lambda *a, **k: (model, bpe))
    source = tokenizer_gguf(tmp_path / "m.gguf", bpe)
    model.save_pretrained(tmp_path / "ckpt", tokenizer=bpe)
    before = tree(tmp_path / "ckpt")
    err = one_line_error(capsys, "convert", source, tmp_path / "ckpt")
    assert "already exists" in err and "pick another OUT" in err
    assert tree(tmp_path / "ckpt") == before

    (tmp_path / "empty").mkdir()  # an empty folder is fine to write into
    assert run(capsys, "convert", source, tmp_path / "empty")[0] == 0
    assert tree(tmp_path / "empty") == tree(tmp_path / "ckpt")

    def half_a_save(folder, tokenizer=None):
        (Path(folder) / "config.json").write_text("{}")
        raise FormatError("the disk is full")

    monkeypatch.setattr(model, "save_pretrained", half_a_save)
    one_line_error(capsys, "convert", source, tmp_path / "new" / "model")
    assert not (tmp_path / "new").exists()


# --- 4. --tokenizer takes what train --model takes ------------------------------------------------

def tokenizer_gguf(path: Path, tokenizer: Tokenizer) -> Path:
    """A GGUF file holding only `tokenizer` (byte-level BPE), as llama.cpp's converter writes it."""
    spec = json.loads(tokenizer._backend.to_str())
    vocab = sorted(tokenizer._backend.get_vocab().items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t, _ in vocab])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_prepare_takes_a_gguf_file_as_its_tokenizer(tmp_path, capsys, bpe):
    (tmp_path / "t.txt").write_text(words_text(200, seed=3))
    bpe.save_pretrained(tmp_path / "tok")
    path = tokenizer_gguf(tmp_path / "m.gguf", bpe)
    assert run(capsys, "prepare", tmp_path / "t.txt", "--out", tmp_path / "a", "--tokenizer", path)[0] == 0
    assert run(capsys, "prepare", tmp_path / "t.txt", "--out", tmp_path / "b", "--tokenizer", tmp_path / "tok")[0] == 0
    for split in ("train", "val"):  # the same token ids as the tokenizer the file was written from
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == (tmp_path / "b" / f"{split}.bin").read_bytes()
    err = one_line_error(capsys, "prepare", tmp_path / "t.txt", "--out", tmp_path / "c", "--tokenizer", "no-such")
    assert "--tokenizer 'no-such' not found" in err and "registry name" in err


# --- 5 and 6. train-tokenizer reads sources as prepare does; the vocabulary size is bounded -------

def test_train_tokenizer_reads_folders_jsonl_and_stdin_like_prepare(tmp_path, capsys, monkeypatch):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(words_text(60, seed=1))
    docs = [words_text(20, seed=i) for i in (2, 3)]
    (tmp_path / "corpus" / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert run(capsys, "train-tokenizer", tmp_path / "corpus", "--vocab-size", 300, "--out", tmp_path / "tok")[0] == 0
    assert run(capsys, "prepare", tmp_path / "corpus", "--vocab-size", 300, "--out", tmp_path / "data")[0] == 0
    trained = Tokenizer.from_pretrained(tmp_path / "tok")
    assert trained.fingerprint() == Tokenizer.from_pretrained(tmp_path / "data").fingerprint()
    # a .jsonl file is its `text` fields, not its JSON: the same tokenizer as from those texts in a .txt
    (tmp_path / "b.txt").write_text("".join(docs))
    for source, out in ((tmp_path / "corpus" / "b.jsonl", "tok-jsonl"), (tmp_path / "b.txt", "tok-txt")):
        assert run(capsys, "train-tokenizer", source, "--vocab-size", 300, "--out", tmp_path / out)[0] == 0
    assert (Tokenizer.from_pretrained(tmp_path / "tok-jsonl").fingerprint()
            == Tokenizer.from_pretrained(tmp_path / "tok-txt").fingerprint())

    stdin_bytes(monkeypatch, (tmp_path / "corpus" / "a.txt").read_bytes())
    assert run(capsys, "train-tokenizer", "-", "--vocab-size", 300, "--out", tmp_path / "from-stdin")[0] == 0
    assert run(capsys, "train-tokenizer", tmp_path / "corpus" / "a.txt", "--vocab-size", 300,
               "--out", tmp_path / "from-file")[0] == 0
    assert (Tokenizer.from_pretrained(tmp_path / "from-stdin").fingerprint()
            == Tokenizer.from_pretrained(tmp_path / "from-file").fingerprint())

    (tmp_path / "empty.txt").write_text("")
    assert "no text in" in one_line_error(capsys, "train-tokenizer", tmp_path / "empty.txt", "--out", tmp_path / "e")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert "latin1.txt is not UTF-8" in one_line_error(capsys, "train-tokenizer", tmp_path / "latin1.txt",
                                                       "--out", tmp_path / "e")
    stdin_bytes(monkeypatch, "caf\xe9\n".encode("latin-1"))
    assert "stdin is not UTF-8" in one_line_error(capsys, "train-tokenizer", "-", "--out", tmp_path / "e")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("verb", ["prepare", "train-tokenizer"])
def test_a_huge_vocabulary_size_is_refused(tmp_path, capsys, verb):
    (tmp_path / "t.txt").write_text(words_text(20))
    err = one_line_error(capsys, verb, tmp_path / "t.txt", "--out", tmp_path / "o", "--vocab-size", 10**12)
    assert "1,000,000,000,000 tokens is too large" in err and "at most 1,000,000" in err


# --- 7. a char tokenizer says how many characters it did not know ---------------------------------

def test_characters_a_char_tokenizer_never_saw_are_counted(tmp_path, capsys, caplog):
    (tmp_path / "seen.txt").write_text("abc abc\nabc\n")
    assert run(capsys, "prepare", tmp_path / "seen.txt", "--char", "--out", tmp_path / "chars")[0] == 0
    new = "abc xyz\nzebra\n"  # x y z z e r: six characters the vocabulary lacks
    (tmp_path / "new.txt").write_text(new)
    with caplog.at_level(logging.WARNING, logger="pocketlm.data"):
        report = prepare([tmp_path / "new.txt"], tmp_path / "out", tokenizer=tmp_path / "chars")
    assert report.unknown == sum(c not in "abc \n" for c in new) == 6
    assert "6 characters not in the vocabulary became <unk>" in caplog.text


# --- 8. eval's flags ---------------------------------------------------------------------------

@pytest.fixture
def char_model(tmp_path):
    text = "".join(f"line {i}: the cat sat on the mat.\n" for i in range(20))
    (tmp_path / "a.txt").write_text(text)
    tok = char_tokenizer([text])
    config = ModelConfig(**{**TINY["llama-gqa-tied"], "vocab_size": len(tok)})
    randomize(CausalLM.from_config(config), seed=1).save_pretrained(tmp_path / "m", tokenizer=tok)
    return tmp_path / "m", tmp_path / "a.txt"


@pytest.mark.parametrize("flags,words", [
    (["--max-length", "1"], "--max-length must be at least 2"),
    (["--max-length", "0"], "--max-length must be at least 2"),
    (["--stride", "0"], "--stride must be at least 1"),
    (["--max-tokens", "-5"], "--max-tokens must be at least 2"),
    (["--max-length", "8", "--stride", "9"], "--stride 9 is longer than --max-length 8"),
])
def test_eval_flags_out_of_range_fail_before_loading(tmp_path, capsys, flags, words):
    (tmp_path / "a.txt").write_text("some text")
    assert words in one_line_error(capsys, "eval", tmp_path / "no-model", "--data", tmp_path / "a.txt", *flags)


def test_eval_flags_against_the_model_and_the_text(tmp_path, capsys, char_model):
    model, text = char_model
    err = one_line_error(capsys, "eval", model, "--data", text, "--max-length", 1000)
    assert "--max-length 1000 is longer than the model's context of 128" in err
    err = one_line_error(capsys, "eval", model, "--data", text, "--stride", 200)  # the default window: 128
    assert "a stride of 200 is longer than the window of 128 tokens" in err
    (tmp_path / "short.txt").write_text("l")
    assert "1 token long" in one_line_error(capsys, "eval", model, "--data", tmp_path / "short.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in one_line_error(capsys, "eval", model, "--data", tmp_path / "latin1.txt")
    # a folder prepared with --val-frac 0 has nothing to score, and nothing to validate training on
    prepare([text], tmp_path / "no-val", tokenizer=model, val_frac=0)
    assert "--val-frac above 0" in one_line_error(capsys, "eval", model, "--data", tmp_path / "no-val")
    err = one_line_error(capsys, "train", "--data", tmp_path / "no-val", "--out", tmp_path / "run", "--block-size", 8)
    assert "prepared with --val-frac 0" in err
    # the smallest settings now work, and --max-tokens counts from the start
    code, out, _ = run(capsys, "eval", model, "--data", text, "--max-length", 2, "--stride", 1, "--max-tokens", 30)
    tok = Tokenizer.from_pretrained(model)
    expected = perplexity(CausalLM.from_pretrained(model), torch.tensor(tok.encode(text.read_text())[:30]),
                          max_length=2, stride=1)
    assert code == 0 and f"perplexity {expected.perplexity:.3f}" in out and "29 tokens" in out


# --- 9. seeds ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [str(2**64), "-1"])
def test_prepare_seed_out_of_range(tmp_path, capsys, seed):
    (tmp_path / "t.txt").write_text(words_text(20))
    assert "--seed must be in 0..2**63-1" in one_line_error(capsys, "prepare", tmp_path / "t.txt",
                                                             "--out", tmp_path / "o", "--seed", seed)
    assert not (tmp_path / "o").exists()
