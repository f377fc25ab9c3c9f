"""Sliding-window perplexity: exact accounting against the math, and the CLI on files and shards."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, randomize
from pocketlm.api import CausalLM
from pocketlm.cli import main
from pocketlm.config import ModelConfig
from pocketlm.data import char_tokenizer, prepare
from pocketlm.errors import ConfigError
from pocketlm.evaluate import perplexity


@pytest.fixture(scope="module")
def model():
    return randomize(CausalLM.from_config(ModelConfig(**TINY["llama-gqa-tied"])), seed=3).eval()


def _token_nll(model, window: torch.Tensor) -> torch.Tensor:
    """−log p of window[1:], each given everything before it in the window."""
    with torch.no_grad():
        logits = model(window[None]).logits[0, :-1]
    return F.cross_entropy(logits, window[1:], reduction="none")


def test_one_window_is_the_models_own_loss(model):
    ids = torch.randint(0, 96, (40,))
    result = perplexity(model, ids, max_length=64)
    with torch.no_grad():
        expected = model(ids[None], labels=ids[None]).loss.item()
    assert result.tokens == 39 and result.windows == 1
    assert abs(result.loss - expected) < 1e-5 and abs(result.perplexity - math.exp(expected)) < 1e-3


@pytest.mark.parametrize("max_length,stride", [(16, 8), (16, 5), (16, 16), (10, 1)])
def test_sliding_window_scores_every_token_once_with_the_most_context(model, max_length, stride):
    ids = torch.randint(0, 96, (53,))
    result = perplexity(model, ids, max_length=max_length, stride=stride)
    total, count, scored_until = 0.0, 0, 1
    for begin in range(0, len(ids), stride):  # by hand: for each window, the tokens it adds
        end = min(begin + max_length, len(ids))
        nll = _token_nll(model, ids[begin:end])
        for p in range(max(scored_until, begin + 1), end):
            total += float(nll[p - begin - 1])
            count += 1
        scored_until = end
        if end == len(ids):
            break
    expected_count = 52 - (0 if stride < max_length else (52 // max_length))
    assert result.tokens == count == expected_count
    assert abs(result.loss - total / count) < 1e-5


def test_bad_settings(model):
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, torch.arange(20), max_length=8, stride=9)
    with pytest.raises(ConfigError, match="context"):
        perplexity(model, torch.arange(20), max_length=10_000)
    with pytest.raises(ConfigError, match="at least 2"):
        perplexity(model, torch.arange(1))


def test_cli_eval_on_a_text_file_and_on_prepared_shards(tmp_path, capsys):
    text = "".join(f"line {i}: the cat sat on the mat.\n" for i in range(60))
    (tmp_path / "a.txt").write_text(text)
    tok = char_tokenizer([text])
    config = ModelConfig(**{**TINY["llama-gqa-tied"], "vocab_size": len(tok)})
    randomize(CausalLM.from_config(config), seed=1).save_pretrained(tmp_path / "m", tokenizer=tok)
    assert main(["eval", str(tmp_path / "m"), "--data", str(tmp_path / "a.txt"), "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    ids = torch.tensor(tok.encode(text))
    expected = perplexity(CausalLM.from_pretrained(tmp_path / "m"), ids, max_length=64)
    assert f"perplexity {expected.perplexity:.3f}" in out and f"{expected.tokens:,} tokens" in out

    (tmp_path / "docs").mkdir()
    for i in range(10):
        (tmp_path / "docs" / f"{i}.txt").write_text(text[i * 100:(i + 1) * 100])
    prepare([tmp_path / "docs"], tmp_path / "data", tokenizer=tok, val_frac=0.3, seed=2)
    assert main(["eval", str(tmp_path / "m"), "--data", str(tmp_path / "data"), "--max-length", "32"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "m"), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


# --- multiple choice ------------------------------------------------------------------------------

def test_choice_loglikelihoods_by_hand(tmp_path):
    import json

    from pocketlm.evaluate import choice_loglikelihoods, multiple_choice, read_choice_items
    from pocketlm.tokenizer import Tokenizer

    (tmp_path / "t.txt").write_text("the cat sat on the mat and the dog ran far away " * 50)
    tokenizer = Tokenizer.train([tmp_path / "t.txt"], vocab_size=300)
    torch.manual_seed(0)
    lm = randomize(CausalLM.from_config(ModelConfig(**{**TINY["llama-gqa-tied"], "vocab_size": 320}))).eval()
    scores = choice_loglikelihoods(lm, tokenizer, "the cat sat on the", ["mat", "dog ran far"])
    for choice, score in zip(["mat", "dog ran far"], scores):
        ctx, cont = tokenizer.encode("the cat sat on the"), tokenizer.encode(" " + choice, add_special_tokens=False)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = lm(ids).logits[0, :-1].log_softmax(-1)
        expected = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert math.isclose(score, expected, rel_tol=1e-5, abs_tol=1e-5)
    lines = [{"question": "the cat sat on the", "choices": ["mat", "dog ran far"], "answer": "mat"},
             {"question": "the dog", "choices": ["ran", "sat", "mat"], "answer": 2}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    items = read_choice_items(tmp_path / "q.jsonl")
    result = multiple_choice(lm, tokenizer, items)
    expected_picks = []
    for item in items:
        s = choice_loglikelihoods(lm, tokenizer, item["question"], item["choices"])
        expected_picks.append((item["answer"], max(range(len(s)), key=s.__getitem__),
                               max(range(len(s)), key=lambda i: s[i] / len(" " + item["choices"][i]))))
    assert result.picks == expected_picks and result.questions == 2
    assert result.accuracy == sum(a == r for a, r, _ in expected_picks) / 2
    for bad, message in (('{"question": "q", "choices": ["a"], "answer": 0}', "at least two"),
                         ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "index of a choice"),
                         ('{"choices": ["a", "b"], "answer": 0}', '"question"'), ("nope", "not JSON")):
        (tmp_path / "bad.jsonl").write_text(bad + "\n")
        with pytest.raises(ConfigError, match=message):
            read_choice_items(tmp_path / "bad.jsonl")


def test_eval_task_mc_with_smollm2(smollm2_gguf, tmp_path, capsys):
    import json

    (tmp_path / "q.jsonl").write_text(
        '{"question": "The capital of France is", "choices": ["Paris", "a banana"], "answer": 0}\n'
        '{"question": "The sun rises in the", "choices": ["east", "refrigerator"], "answer": "east"}\n')
    assert main(["eval", str(smollm2_gguf), "--task", "mc", str(tmp_path / "q.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["questions"] == 2 and result["accuracy"] == 1.0
    assert main(["eval", str(smollm2_gguf), "--task", "mc", str(tmp_path / "q.jsonl")]) == 0
    assert "| accuracy (log-likelihood) | 1.0000 |" in capsys.readouterr().out
    assert main(["eval", str(smollm2_gguf), "--task", "mc"]) == 2
    assert "--task mc F.jsonl" in capsys.readouterr().err
