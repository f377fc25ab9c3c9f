"""`pocketlm explain` and `pocketlm bias`: attention maps whose rows are distributions, token
probabilities equal to the model's softmax, FLOP counts checked by hand and against torch's
FlopCounterMode, and log-likelihood gaps equal to a direct computation."""

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import TINY, randomize
from pocketlm import AutoModelForCausalLM, ConfigError, ContextLengthError, ModelConfig, explain
from pocketlm.cli import main
from test_pipelines import folders  # noqa: F401  (a tiny GPT-2 folder with a trained tokenizer)


@pytest.fixture(scope="module")
def tiny(folders):  # noqa: F811
    from pocketlm.api import load_model_and_tokenizer

    return load_model_and_tokenizer(folders / "gen")


TEXT = "the movie was good. the film was bad."


def test_attention_rows_are_causal_distributions(tiny, monkeypatch):
    model, tokenizer = tiny
    tokens, weights = explain.attention(model, tokenizer, TEXT, layer=-1, head=None)
    assert weights.shape == (len(tokens), len(tokens)) == (len(tokenizer.encode(TEXT)),) * 2
    assert torch.allclose(weights.sum(-1), torch.ones(len(tokens)), atol=1e-5)
    assert weights.triu(1).abs().max() == 0  # no token looks ahead
    # one head of one layer, and the mean over layers, are distributions too
    _, head = explain.attention(model, tokenizer, TEXT, layer=0, head=3)
    _, every = explain.attention(model, tokenizer, TEXT, layer=None, head=None)
    for w in (head, every):
        assert torch.allclose(w.sum(-1), torch.ones(len(tokens)), atol=1e-5)
    assert not torch.allclose(head, weights)
    with pytest.raises(ContextLengthError, match="context window of 128"):
        explain.attention(model, tokenizer, "good " * 129)
    monkeypatch.setattr(explain, "MAX_TOKENS", 5)  # the maps' memory is bounded below the window too
    with pytest.raises(ContextLengthError, match="its maps grow as its square"):
        explain.attention(model, tokenizer, TEXT)
    monkeypatch.undo()
    for bad in (dict(layer=2), dict(layer=-3), dict(head=4)):
        with pytest.raises(ConfigError, match="out of range"):
            explain.attention(model, tokenizer, TEXT, **{"layer": -1, "head": None, **bad})


def test_heatmap_is_a_png(tiny, tmp_path):
    model, tokenizer = tiny
    tokens, weights = explain.attention(model, tokenizer, TEXT)
    explain.save_heatmap(tokens, weights, tmp_path / "a.png", "test")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_token_probabilities_are_the_models_softmax(tiny):
    model, tokenizer = tiny
    steps = explain.token_probabilities(model, tokenizer, TEXT, top_k=3)
    ids = tokenizer.encode(TEXT)
    with torch.no_grad():
        probs = model(torch.tensor([ids])).logits[0].float().softmax(-1)
    assert len(steps) == len(ids) and steps[0].probability is None
    for i, step in enumerate(steps[1:], 1):
        assert step.probability == pytest.approx(probs[i - 1, ids[i]].item(), rel=1e-5)
        assert len(step.top) == 3 and step.top[0][1] == pytest.approx(probs[i - 1].max().item(), rel=1e-5)
        assert step.top[0][1] >= step.probability - 1e-6
    plain = explain.to_terminal(steps, color=False)
    assert "\x1b[" not in plain and "perplexity" in plain
    assert "\x1b[" in explain.to_terminal(steps, color=True)
    # control characters in the text never reach the terminal as such
    shown = explain.to_terminal([explain.Step("\x1b[2J\r", None), explain.Step("a\tb\n", 0.5, [])], color=False)
    assert "\x1b" not in shown and "\r" not in shown and "\\x1b[2J\\x0d" in shown and "a→b↵" in shown


def test_html_escapes_the_text():
    steps = [explain.Step("<script>", None), explain.Step('"><img src=x onerror=alert(1)>', 0.5,
                                                          [("<b>", 0.5)])]
    page = explain.to_html(steps)
    assert "<script>" not in page and "<img" not in page and "<b>" not in page
    assert "&lt;script&gt;" in page and "default-src 'none'" in page


def _counted(model, ids, **kwargs):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model(ids, **kwargs)
    return counter.get_total_flops(), out


@pytest.mark.parametrize("arch", sorted(TINY))
def test_flops_match_a_hand_count_and_torch_flop_counter(arch):
    config = ModelConfig(**TINY[arch])
    d_attn = config.n_head * config.head_dim  # 32, or 48 for the Llama with head_dim 12
    mlp = 3 if config.mlp == "swiglu" else 2
    hand = config.n_layer * (config.n_embd * config.head_dim * (2 * config.n_head + 2 * config.n_kv_head)
                             + mlp * config.n_embd * config.intermediate_size) + config.n_embd * config.vocab_size
    assert explain.matmul_weights(config) == hand
    assert explain.flops_per_token(config, 10) == 2 * hand + 4 * config.n_layer * 10 * d_attn
    # the eager path's matrix products as torch counts them: T tokens at once (the full T × T
    # scores, as the kernel computes them), then one more token against a cache of T
    model = randomize(AutoModelForCausalLM.from_config(config)).eval()
    model.set_attn_implementation("eager")
    T = 7
    counted, out = _counted(model, torch.arange(T)[None], use_cache=True)
    assert counted == T * 2 * hand + 4 * config.n_layer * T * T * d_attn
    counted, _ = _counted(model, torch.tensor([[T]]), past_key_values=out.past_key_values, use_cache=True)
    assert counted == explain.flops_per_token(config, T + 1)


def test_compute_report(tiny):
    model, _ = tiny
    rows = dict(explain.compute_report(model, context=16, tokens_per_second=100.0, watts=20))
    assert rows["parameters"].startswith(f"{model.num_parameters():,}")
    assert "0.200 J per token" in rows["energy estimate"]
    kv = 2 * model.config.n_layer * model.config.n_kv_head * model.config.head_dim * 4  # float32
    assert explain.kv_bytes_per_token(model.config, torch.float32) == kv
    assert explain.weight_bytes(model) == sum(p.numel() * 4 for p in model.parameters())
    for bad in (dict(context=0), dict(context=10**6), dict(context=4, watts=-1.0), dict(context=4, watts=math.nan)):
        with pytest.raises(ConfigError):
            explain.compute_report(model, **bad)


def test_bias_gaps_are_the_log_likelihood_differences(tiny):
    model, tokenizer = tiny
    pair = explain.Pair("the movie was good.", "the film was good.")
    result = explain.compare_pair(model, tokenizer, pair)

    def logprob(text):  # the direct computation: every token after a leading end-of-text
        ids = [tokenizer.eos_token_id] + tokenizer.encode(text)
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        return [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    a, b = logprob(pair.a), logprob(pair.b)
    assert result.sentence_gap == pytest.approx(sum(a) - sum(b), abs=1e-4)
    n = result.continuation_tokens
    assert n == len(tokenizer.encode(" was good.")) and tokenizer.encode(pair.a)[-n:] == tokenizer.encode(" was good.")
    assert result.continuation_gap == pytest.approx(sum(a[-n:]) - sum(b[-n:]), abs=1e-4)
    assert result.words == ("movie", "film")
    overall = explain.bias_summary([result, explain.compare_pair(model, tokenizer, explain.Pair(pair.b, pair.a))])
    assert overall["mean_continuation_gap"] == pytest.approx(0, abs=1e-4)  # swapped pairs cancel
    assert overall["mean_abs_continuation_gap"] == pytest.approx(abs(result.continuation_gap), abs=1e-4)
    # words that tokenize otherwise in place (here, after a line break): the shared tail of tokens
    spaced = explain.compare_pair(model, tokenizer, explain.Pair("the movie\nwas good.", "the film\nwas good."))
    ids_a, ids_b = tokenizer.encode("the movie\nwas good."), tokenizer.encode("the film\nwas good.")
    m = spaced.continuation_tokens
    assert m > 0 and ids_a[-m:] == ids_b[-m:] and ids_a[-m - 1] != ids_b[-m - 1]
    a2, b2 = logprob("the movie\nwas good."), logprob("the film\nwas good.")
    assert spaced.continuation_gap == pytest.approx(sum(a2[-m:]) - sum(b2[-m:]), abs=1e-4)
    # the group word last: nothing follows it to score, so the pair counts in the sentence gap only
    last = explain.compare_pair(model, tokenizer, explain.Pair("the film was good", "the film was bad"))
    assert last.continuation_gap is None and last.words == ("good", "bad")
    overall = explain.bias_summary([result, last])
    assert overall["with_continuation"] == 1 and overall["mean_continuation_gap"] == result.continuation_gap
    assert overall["mean_sentence_gap"] == pytest.approx((result.sentence_gap + last.sentence_gap) / 2)


def test_pairs_files_are_checked(tmp_path):
    assert len(explain.read_pairs()) == 16  # the bundled illustrative set
    cases = {"not json": "not JSON", '{"a": "x"}': "needs", '{"a": "x", "b": "x"}': "same sentence", "": "no pairs"}
    for i, (content, message) in enumerate(cases.items()):
        (tmp_path / f"{i}.jsonl").write_text(content)
        with pytest.raises(ConfigError, match=message):
            explain.read_pairs(tmp_path / f"{i}.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file"):
        explain.read_pairs(tmp_path / "missing.jsonl")


def test_cli(folders, tiny, tmp_path, capsys):  # noqa: F811
    model, tokenizer = str(folders / "gen"), tiny[1]
    out = tmp_path / "ex"
    assert main(["explain", model, TEXT, "--out", str(out), "--layer", "0", "--head", "1", "--watts", "10"]) == 0
    printed = capsys.readouterr().out
    assert "FLOPs per token, forward" in printed and "energy estimate" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["attention"] == "layer 0, head 1"
    assert [t["token"] for t in report["tokens"]] == explain.token_labels(tokenizer, tokenizer.encode(TEXT))
    assert (out / "attention.png").stat().st_size > 0 and "<html" in (out / "tokens.html").read_text()
    (tmp_path / "file").write_text("x")
    for argv, message in ((["--out", str(tmp_path / "file")], "is a file"), (["--layer", "top"], "--layer must be"),
                          (["--layer", "9"], "--layer 9 is out of range"), (["--top-k", "0"], "--top-k")):
        assert main(["explain", model, TEXT, "--no-measure", "--out", str(out)] + argv) == 2
        assert message in capsys.readouterr().err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"a": "the movie was good.", "b": "the film was good.", "topic": "t"}\n')
    assert main(["bias", model, "--pairs", str(pairs), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["pairs"] == 1 and data["pairs"][0]["words"] == ["movie", "film"]
    assert main(["bias", model]) == 0
    assert "illustrate the method" in capsys.readouterr().out
