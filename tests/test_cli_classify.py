"""`pocketlm classify` (issue 11): a sequence classifier's labels or a causal LM's zero-shot choice per
text, checked against the pipelines on the same tiny folders; accuracy, macro-F1 and the confusion
matrix of a labelled --input (pocketlm.metrics, checked against the textbook definitions); the
labelled readers' texts-with-optional-labels; one-line errors."""

import io
import json
import random
import subprocess
import sys

import pytest

from conftest import TINY, randomize
from pocketlm import AutoModelForCausalLM, AutoModelForSequenceClassification, ConfigError, ModelConfig, pipeline
from pocketlm.cli import main
from pocketlm.data import DataError
from pocketlm.labelled import read_texts
from pocketlm.metrics import classification_metrics, format_metrics
from pocketlm.tokenizer import Tokenizer

TEXTS = ["the movie was good", "a bad film", "a great story,\ta poor plot.\nthe film was bad.", "good", "bad"]
GOLD = ["positive", "negative", "negative", "positive", "negative"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama sentiment classifier and a tiny GPT-2 causal LM, with a trained tokenizer."""
    root = tmp_path_factory.mktemp("classify")
    (root / "text.txt").write_text("the movie was good. the film was bad. a great story, a poor plot.\n" * 50)
    tok = Tokenizer.train(root / "text.txt", 300)
    clf_config = ModelConfig(**TINY["llama-mha-untied"] | {"vocab_size": len(tok)}, pad_token_id=tok.pad_token_id)
    randomize(AutoModelForSequenceClassification.from_config(clf_config, id2label={0: "negative", 1: "positive"}))\
        .save_pretrained(root / "clf", tokenizer=tok)
    lm_config = ModelConfig(**TINY["gpt2-tied"] | {"vocab_size": len(tok)}, eos_token_id=tok.eos_token_id)
    randomize(AutoModelForCausalLM.from_config(lm_config)).save_pretrained(root / "lm", tokenizer=tok)
    with open(root / "labelled.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t, "label": g}) + "\n" for t, g in zip(TEXTS, GOLD))
    (root / "texts.txt").write_text("\n".join(TEXTS[:2]) + "\n\n" + TEXTS[3] + "\n")
    (root / "plain.csv").write_text("id,sentence\n1,the movie was good\n2,\"a bad, bad film\"\n")
    return root


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def rows(out: str) -> list[list[str]]:
    return [line.split("\t") for line in out.splitlines()]


def test_a_classifier_labels_texts_as_its_pipeline(folders, capsys):
    want = pipeline("text-classification", model=folders / "clf")(TEXTS)
    code, out, err = run(capsys, "classify", folders / "clf", "--input", folders / "labelled.jsonl", "--batch-size", 2)
    assert code == 0
    # one line per text (tabs and line breaks in a text become spaces), the score to 4 decimals
    assert rows(out) == [[w["label"], f"{w['score']:.4f}", " ".join(t.replace("\t", " ").split("\n"))]
                         for w, t in zip(want, TEXTS)]
    predicted = [w["label"] for w in want]
    right = sum(p == g for p, g in zip(predicted, GOLD))
    assert f"accuracy {right / len(GOLD):.4f} ({right}/{len(GOLD)})" in err
    assert "macro-F1" in err and "confusion matrix" in err
    code, single, _ = run(capsys, "classify", folders / "clf", TEXTS[0])
    assert code == 0 and single == out.splitlines(keepends=True)[0]


def test_zero_shot_with_a_causal_lm(folders, capsys):
    labels = ["positive", "negative"]
    want = pipeline("zero-shot-classification", model=folders / "lm")(TEXTS[:2] + TEXTS[3:4], candidate_labels=labels)
    code, out, err = run(capsys, "classify", folders / "lm", "--input", folders / "texts.txt", "--labels",
                         "positive, negative", "--json")
    assert code == 0 and err == ""  # a plain text file has no gold labels to score against
    got = [json.loads(line) for line in out.splitlines()]  # the blank line was skipped
    assert [g["text"] for g in got] == [w["sequence"] for w in want]
    assert [g["label"] for g in got] == [w["labels"][0] for w in want]
    assert [g["score"] for g in got] == pytest.approx([w["scores"][0] for w in want], abs=1e-6)
    # an instruction of the user's, its \n a line break as a shell passes it
    zs = pipeline("zero-shot-classification", model=folders / "lm")
    mine = zs(TEXTS[0], candidate_labels=labels, instruction="Review: {text}\nVerdict:")
    code, out, _ = run(capsys, "classify", folders / "lm", TEXTS[0], "--labels", "positive,negative",
                       "--instruction", "Review: {text}\\nVerdict:")
    assert rows(out) == [[mine["labels"][0], f"{mine['scores'][0]:.4f}", TEXTS[0]]]


def test_stdin_limit_and_a_file_without_labels(folders, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("\n".join(TEXTS).encode())))
    code, out, _ = run(capsys, "classify", folders / "clf", "--input", "-", "--limit", 2)
    assert code == 0 and [r[2] for r in rows(out)] == TEXTS[:2]
    code, out, err = run(capsys, "classify", folders / "clf", "--input", folders / "plain.csv", "--text-field",
                         "sentence")
    assert code == 0 and [r[2] for r in rows(out)] == ["the movie was good", "a bad, bad film"] and err == ""


def one_line_error(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.startswith("pocketlm: error: ") and err.count("\n") == 1, err
    return err


def test_errors(folders, capsys, tmp_path):
    assert "--labels" in one_line_error(capsys, "classify", folders / "lm", "a film")
    assert "drop --labels" in one_line_error(capsys, "classify", folders / "clf", "a film", "--labels", "a,b")
    assert "TEXT" in one_line_error(capsys, "classify", folders / "clf")
    assert "not both" in one_line_error(capsys, "classify", folders / "clf", "a film", "--input", folders / "texts.txt")
    assert "--batch-size" in one_line_error(capsys, "classify", folders / "clf", "a film", "--batch-size", 0)
    assert "distinct" in one_line_error(capsys, "classify", folders / "lm", "a film", "--labels", "a,a")
    assert "no such file" in one_line_error(capsys, "classify", folders / "clf", "--input", tmp_path / "none.txt")
    (tmp_path / "odd.jsonl").write_text('{"text": "a film", "label": "positive"}\n{"text": "b", "label": "meh"}\n')
    err = one_line_error(capsys, "classify", folders / "clf", "--input", tmp_path / "odd.jsonl")
    assert "odd.jsonl:2" in err and "'meh'" in err
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    assert "not UTF-8" in one_line_error(capsys, "classify", folders / "clf", "--input", tmp_path / "latin1.txt")


def test_a_closed_pipe_ends_quietly(folders):
    proc = subprocess.Popen([sys.executable, "-m", "pocketlm", "classify", str(folders / "clf"), "--input",
                             str(folders / "labelled.jsonl"), "--batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` exiting before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_read_texts(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "one", "label": "x"}\n\n{"text": "two", "label": 3}\n')
    assert read_texts(f) == (["one", "two"], ["x", "3"])
    assert read_texts(f, label_field="gold") == (["one", "two"], None)  # no such field: texts alone
    with pytest.raises(DataError, match=r"a.jsonl:3: label '3' is not one of"):
        read_texts(f, labels=["x", "y"])
    f.write_text('{"text": "one", "label": "x"}\n{"text": "two"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: no label .* first record has one"):
        read_texts(f)
    f.write_text('{"text": "one"}\n{"text": "two", "label": "x"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: a label .* first record has none"):
        read_texts(f)
    f.write_text('{"text": " ", "label": "x"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:1: the text .* is empty"):
        read_texts(f)


def textbook_metrics(gold, predicted, num_labels):
    """Precision, recall and F1 per label as defined (0 where a ratio has nothing to divide),
    averaged over the labels that occur — what scikit-learn's f1_score(average='macro') does."""
    f1s = []
    for label in sorted(set(gold) | set(predicted)):
        tp = sum(g == p == label for g, p in zip(gold, predicted))
        precision = tp / predicted.count(label) if predicted.count(label) else 0.0
        recall = tp / gold.count(label) if gold.count(label) else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    confusion = [[sum(g == i and p == j for g, p in zip(gold, predicted)) for j in range(num_labels)]
                 for i in range(num_labels)]
    accuracy = sum(g == p for g, p in zip(gold, predicted)) / len(gold)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s), "confusion": confusion}


def test_classification_metrics():
    # worked by hand: label 0 F1 = 2·1/(2+2), label 1 = 2·2/(2+3), label 2 = 0; label 3 never occurs
    m = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 4)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["confusion"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    rng = random.Random(0)
    for _ in range(50):
        n, k = rng.randint(1, 30), rng.randint(1, 5)
        gold = [rng.randrange(k) for _ in range(n)]
        predicted = [g if rng.random() < 0.6 else rng.randrange(k) for g in gold]
        want, got = textbook_metrics(gold, predicted, k), classification_metrics(gold, predicted, k)
        assert got["confusion"] == want["confusion"]
        assert got["accuracy"] == pytest.approx(want["accuracy"]) and got["macro_f1"] == pytest.approx(want["macro_f1"])
    with pytest.raises(ConfigError, match="pair up"):
        classification_metrics([0, 1], [0], 2)
    with pytest.raises(ConfigError, match="outside 0..1"):
        classification_metrics([0, 2], [0, 1], 2)
    text = format_metrics(m, ["a", "b", "c", "d"])
    assert text.splitlines()[0] == f"accuracy 0.6000 (3/5), macro-F1 {(1.3 / 3):.4f}"
    assert text.splitlines()[-4].split() == ["a", "1", "1", "0", "0"]
