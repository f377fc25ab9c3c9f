"""Labelled examples for classification: (text, label) pairs read from CSV, TSV or JSONL, a seeded
stratified split, and the bundled sentiment set.

Files are read by their suffix: `.csv` (a header row, RFC 4180 quoting), `.tsv` (a header row,
tab-separated, no quoting: a field holds no tab or line break) and `.jsonl` (one object per line,
blank lines skipped). The text and the label sit in the fields `text_field` / `label_field`.
Labels are strings as the file spells them (a JSON integer label 1 becomes "1"); the label set is
the `labels=` given, in that order, else the training labels sorted. Every problem is a DataError
that names the file and line.

`sentiment` (and `sentiment:test`, `sentiment:tweets`, `sentiment:amazon`, `sentiment:nyt`) names
the bundled set wherever a labelled file goes: the movie-review snippets of VADER (Hutto & Gilbert,
ICWSM 2014) as the `vaderSentiment==3.3.2` sdist on PyPI ships them (MIT), fetched once, labelled
by the sign of their mean rating, with a fixed held-out test split that training never sees.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from pocketlm import data
from pocketlm.data import DataError
from pocketlm.errors import ConfigError, NotFoundError

log = logging.getLogger(__name__)

Example = tuple[str, str]  # (text, label)
FORMATS = (".csv", ".tsv", ".jsonl")

SENTIMENT = "sentiment"
SENTIMENT_PACKAGE = "vaderSentiment==3.3.2"
SENTIMENT_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
SENTIMENT_TEST_FRAC = 0.2  # of the movie snippets, held out once for good
SENTIMENT_SEED = 2014
# file name in the dataset → name of the JSONL written; "movies" is split into train and test
SENTIMENT_SOURCES = {"movieReviewSnippets_GroundTruth.txt": "movies", "tweets_GroundTruth.txt": "tweets",
                     "amazonReviewSnippets_GroundTruth.txt": "amazon", "nytEditorialSnippets_GroundTruth.txt": "nyt"}
SENTIMENT_FILES = ("train", "test", "tweets", "amazon", "nyt")


# --- reading labelled files ----------------------------------------------------------------------

def read_labelled(path: str | os.PathLike, *, text_field: str = "text", label_field: str = "label",
                  labels: Sequence[str] | None = None) -> list[Example]:
    """The (text, label) examples of a CSV, TSV or JSONL file (or a `sentiment` name), in file
    order. With `labels`, a label outside them is an error."""
    path = _resolve(path)
    allowed = set(label_names([], labels)) if labels is not None else None
    examples = []
    for number, text, label in _records(path, text_field, label_field):
        if not text.strip():
            raise DataError(f"{path}:{number}: the text ('{text_field}') is empty; remove the line or give it text")
        if allowed is not None and label not in allowed:
            raise DataError(f"{path}:{number}: label {label!r} is not one of the labels given "
                            f"({', '.join(labels)}); add it to --labels or fix the line")
        examples.append((text, label))
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def read_texts(path: str | os.PathLike, *, text_field: str = "text", label_field: str = "label",
               labels: Sequence[str] | None = None) -> tuple[list[str], list[str] | None]:
    """The texts of a CSV, TSV or JSONL file (or a `sentiment` name) in file order, and their
    labels when the first record has `label_field` (then every record must), else None: what a
    classifier labels, and scores itself against when the file holds the answers. With `labels`,
    a label outside them is an error."""
    path = _resolve(path)
    texts, gold = [], []
    for number, text, label in _records(path, text_field, label_field, label_optional=True):
        if gold and (gold[0] is None) != (label is None):
            raise DataError(f"{path}:{number}: {'a' if gold[0] is None else 'no'} label ('{label_field}') where the "
                            f"first record has {'none' if gold[0] is None else 'one'}; label every record or none")
        if not text.strip():
            raise DataError(f"{path}:{number}: the text ('{text_field}') is empty; remove the line or give it text")
        if labels is not None and label is not None and label not in labels:
            raise DataError(f"{path}:{number}: label {label!r} is not one of the labels ({', '.join(labels)}); "
                            "fix the line")
        texts.append(text)
        gold.append(label)
    if not texts:
        raise DataError(f"{path} holds no texts")
    return texts, None if gold[0] is None else gold


def label_names(examples: Sequence[Example], labels: Sequence[str] | None = None) -> list[str]:
    """The label set in its fixed order: `labels` as given, else the labels of `examples` sorted."""
    if labels is not None:
        if len(set(labels)) != len(labels) or not all(labels):
            raise ConfigError(f"--labels must be distinct, non-empty names, got {', '.join(labels)}")
        return list(labels)
    return sorted({label for _, label in examples})


@dataclass
class LabelledData:
    train: list[Example]
    val: list[Example]
    labels: list[str]


def load_labelled(train: str | os.PathLike, val: str | os.PathLike | None = None, *,
                  text_field: str = "text", label_field: str = "label", labels: Sequence[str] | None = None,
                  val_frac: float = 0.1, seed: int = 1337) -> LabelledData:
    """Training and validation examples with their label set: `val` read and checked against the
    training labels (a label only validation has could never be learned), or, without it, a
    seeded stratified `val_frac` of `train` held out."""
    fields = dict(text_field=text_field, label_field=label_field, labels=labels)
    train_examples = read_labelled(train, **fields)
    names = label_names(train_examples, labels)
    if val is None:
        train_examples, val_examples = stratified_split(train_examples, val_frac, seed)
    else:
        val_examples = read_labelled(val, **fields)
        _check_val_labels(_resolve(val), text_field, label_field, {label for _, label in train_examples})
    if len(names) < 2:
        raise DataError(f"{_resolve(train)} has a single label ({', '.join(names)}): classification needs "
                        "at least two")
    return LabelledData(train_examples, val_examples, names)


def _check_val_labels(path: Path, text_field: str, label_field: str, trained: set[str]) -> None:
    for number, _, label in _records(path, text_field, label_field):
        if label not in trained:
            raise DataError(f"{path}:{number}: label {label!r} appears only in validation, never in the "
                            f"training file ({', '.join(sorted(trained))}); the model cannot learn it")


def _resolve(path: str | os.PathLike) -> Path:
    name = str(path)
    if (name == SENTIMENT or name.startswith(SENTIMENT + ":")) and not Path(name).exists():
        part = name.partition(":")[2] or "train"
        files = sentiment_files()
        if part not in files:
            raise NotFoundError(f"{name}: no such part of the sentiment set; use {SENTIMENT} (the training "
                                f"split) or {', '.join(f'{SENTIMENT}:{p}' for p in SENTIMENT_FILES[1:])}")
        return files[part]
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"labelled file not found: {path} (give a .csv, .tsv or .jsonl file, or '{SENTIMENT}')")
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"{path}: unknown format {path.suffix or '(no suffix)'}; labelled examples are read "
                        f"from {', '.join(FORMATS)} files")
    return path


def _records(path: Path, text_field: str, label_field: str,
             label_optional: bool = False) -> Iterator[tuple[int, str, str | None]]:
    """(line number, text, label) of each record, the label stripped of surrounding spaces (None
    for a record without one, when label_optional)."""
    try:
        with open(path, encoding="utf-8-sig", errors="strict", newline="") as f:  # -sig: Excel's BOM
            rows = _jsonl_rows(f, path) if path.suffix.lower() == ".jsonl" else _table_rows(f, path)
            for number, row in rows:
                yield number, *_fields(row, path, number, text_field, label_field, label_optional)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8 first") from None


def _fields(row: dict, path: Path, number: int, text_field: str, label_field: str,
            label_optional: bool = False) -> tuple[str, str | None]:
    unlabelled = label_optional and row.get(label_field) is None
    for field in (text_field,) if unlabelled else (text_field, label_field):
        if row.get(field) is None:
            raise DataError(f"{path}:{number}: no field {field!r} (it has {', '.join(map(repr, row)) or 'none'}); "
                            f"name the fields with --text-field / --label-field")
    text, label = row[text_field], "" if unlabelled else row[label_field]
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(text, str) or not isinstance(label, str):
        raise DataError(f"{path}:{number}: {text_field!r} and {label_field!r} must be strings "
                        f"(a label may be an integer), got {type(text).__name__} and {type(label).__name__}")
    if unlabelled:
        return text, None
    if not label.strip():
        raise DataError(f"{path}:{number}: the label ('{label_field}') is empty")
    return text, label.strip()


def _jsonl_rows(f: io.TextIOBase, path: Path) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg}); a .jsonl file holds one JSON object "
                            "per line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def _table_rows(f: io.TextIOBase, path: Path) -> Iterator[tuple[int, dict]]:
    # CSV fields may be quoted and span lines; TSV has no quoting at all (a quote is text)
    tsv = path.suffix.lower() == ".tsv"
    reader = csv.reader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
                        strict=True)
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            return
        start = reader.line_num + 1
        for values in reader:
            number, start = start, reader.line_num + 1  # a quoted field may span lines: report the first
            if not values:
                continue  # a blank line
            if len(values) != len(header):
                raise DataError(f"{path}:{number}: {len(values)} fields where the header has {len(header)}"
                                + ("" if tsv else "; quote a text that holds commas (\"like, this\")"))
            yield number, dict(zip(header, values))
    except csv.Error as e:
        raise DataError(f"{path}:{start}: malformed {'TSV' if tsv else 'CSV'} ({e})") from None


# --- splitting -----------------------------------------------------------------------------------

def stratified_split(examples: Sequence[Example], val_frac: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, val): val_frac of each label's examples (rounded) held out, drawn with `seed`; a
    label with two or more examples has at least one on each side, a single one stays in
    training. Both keep the input order."""
    if not 0.0 < val_frac < 1.0:
        raise ConfigError(f"--val-frac must be in (0, 1), got {val_frac}")
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, (_, label) in enumerate(examples):
        by_label.setdefault(label, []).append(i)
    held: set[int] = set()
    for label in sorted(by_label):  # sorted: the draw does not depend on which label came first
        indices = by_label[label]
        count = min(max(round(len(indices) * val_frac), 1), len(indices) - 1)
        held.update(rng.sample(indices, count))
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [e for i, e in enumerate(examples) if i in held]
    return train, val


# --- the sentiment set ---------------------------------------------------------------------------

def sentiment_files() -> dict[str, Path]:
    """The bundled sentiment set as JSONL files (fields text, label, rating, id), fetched once into
    $POCKETLM_HOME/data: "train" and "test" (a fixed stratified 20% of the movie-review snippets,
    never trained on), and "tweets", "amazon", "nyt" (other domains, for testing only)."""
    from pocketlm.registry import home

    folder = home() / "data" / "sentiment-vader-3.3.2"
    if not (folder / "COMPLETE").is_file():
        _fetch_sentiment(folder)
    return {name: folder / f"{name}.jsonl" for name in SENTIMENT_FILES}


def _fetch_sentiment(folder: Path) -> None:
    log.info("fetching the VADER sentiment snippets from PyPI (%s, once) ...", SENTIMENT_PACKAGE)
    with tempfile.TemporaryDirectory() as tmp:
        archive = data.download_sdist(SENTIMENT_PACKAGE, SENTIMENT_SHA256, tmp)
        sets = _read_ground_truth(archive)
    movies = sets.pop("movies")
    # split (index, label) pairs, so that each record comes along whole
    train, test = stratified_split([(i, r["label"]) for i, r in enumerate(movies)], SENTIMENT_TEST_FRAC,
                                   SENTIMENT_SEED)
    sets.update(train=[movies[i] for i, _ in train], test=[movies[i] for i, _ in test])
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".sentiment-"))
    try:
        for name in SENTIMENT_FILES:
            with open(staging / f"{name}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(record) + "\n" for record in sets[name])
        counts = ", ".join(f"{name} {len(sets[name])}" for name in SENTIMENT_FILES)
        (staging / "COMPLETE").write_text(f"{SENTIMENT_PACKAGE} sha256 {SENTIMENT_SHA256}\n{counts}\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_ground_truth(archive: Path) -> dict[str, list]:
    """Each *_GroundTruth.txt of the sdist's inner hutto_ICWSM_2014.tar.gz as a list of records
    (text, label, rating, id), the label the sign of the mean rating; rating 0 (neutral) dropped."""
    with tarfile.open(archive) as outer:
        member = next((m for m in outer.getmembers() if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz")),
                      None)
        if member is None:
            raise DataError(f"{archive.name} lacks additional_resources/hutto_ICWSM_2014.tar.gz")
        inner_bytes = outer.extractfile(member).read()
    sets = {}
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        for m in inner.getmembers():
            name = Path(m.name).name
            if m.isfile() and name in SENTIMENT_SOURCES:
                sets[SENTIMENT_SOURCES[name]] = _ground_truth(inner.extractfile(m).read(), name)
    missing = set(SENTIMENT_SOURCES.values()) - set(sets)
    if missing:
        raise DataError(f"{archive.name}: hutto_ICWSM_2014.tar.gz lacks {', '.join(sorted(missing))}")
    return sets


def _ground_truth(raw: bytes, name: str) -> list:
    examples = []
    # lines end in CRLF; split on exactly that, as a text may hold other Unicode line separators
    for number, line in enumerate(raw.decode("utf-8").split("\r\n"), 1):
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise DataError(f"{name}:{number}: expected id, rating and text separated by tabs")
        try:
            id_, rating, text = parts[0], float(parts[1]), parts[2]
        except ValueError:
            raise DataError(f"{name}:{number}: the rating {parts[1]!r} is not a number") from None
        if rating != 0:
            examples.append({"text": text, "label": "positive" if rating > 0 else "negative",
                             "rating": rating, "id": id_})
    return examples
