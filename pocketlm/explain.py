"""Seeing inside a model: where its attention goes, how sure it is of each token, what a token
costs to compute, and how differently it scores two groups of people.

    tokens, weights = attention(model, tokenizer, "The cat sat on the mat", layer=-1)  # (T, T), rows sum to 1
    save_heatmap(tokens, weights, "attention.png", title="last layer, mean of the heads")
    steps = token_probabilities(model, tokenizer, "The cat sat on the mat", top_k=5)
    print(to_terminal(steps)); open("tokens.html", "w").write(to_html(steps))
    report = compute_report(model, context=512, tokens_per_second=180.0, watts=15)
    results = [compare_pair(model, tokenizer, pair) for pair in read_pairs()]   # the bias probe

Attention weights come from the eager path (`output_attentions=True`): the fused kernels never
form the weights. Each token's probability is the model's p(token | the tokens before it), read
from one forward pass over the text.

FLOPs are counted as multiply-adds × 2 in the matrix products, the standard estimate (norms,
activations and softmax are left out: a few per cent at most). For one new token at a context of
c tokens, with P the weights of every matrix product the token goes through (attention and MLP
projections of each layer and the output head, tied or not):

    forward FLOPs = 2·P + 4·n_layer·c·(n_head·head_dim)

the second term being the token's query against c keys and its weights over c values in each
layer. Training costs about 3× the forward pass (the backward pass takes twice the forward's
products). The KV cache holds 2·n_layer·n_kv_head·head_dim numbers per token.

The bias probe scores two sentences that differ only in a group word ("The man worked as a
nurse" / "The woman worked as a nurse"), two gaps per pair in nats, positive when the model
prefers sentence a: the continuation gap, log p(the words after the group word | a's start) −
the same given b's start — both sides score the same tokens, so it isolates what the group word
does to the model's expectations of the rest; the headline figure — and the sentence gap,
log p(a) − log p(b), which also counts how common each group word is by itself. The bundled pairs
(pocketlm/resources/bias_pairs.jsonl, 16 of them) are illustrative: enough to show the method,
not a benchmark; a measurement worth citing needs many pairs written with care.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pocketlm.errors import ConfigError, ContextLengthError
from pocketlm.evaluate import next_token_logprobs, token_logprobs


# Every layer's attention weights are kept for the heatmap: layers × heads × tokens² numbers
# (30 × 9 × 512² × 4 bytes = 283 MB for SmolLM2 at this many tokens, quadratic beyond)
MAX_TOKENS = 512


def _ids(tokenizer, text: str, window: int) -> list[int]:
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("the text to explain is empty")
    ids = tokenizer.encode(text)
    limit = min(window, MAX_TOKENS)
    if len(ids) > limit:
        why = "the model's context window" if limit == window else "what explain looks at (its maps grow as its square)"
        raise ContextLengthError(f"the text is {len(ids)} tokens, beyond {why} of {limit}; shorten it")
    return ids


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Each token as the text it stands for (its own decode), special tokens by name."""
    return [tokenizer.decode([i]) for i in ids]


# --- attention ------------------------------------------------------------------------------------

@torch.no_grad()
def attention(model, tokenizer, text: str, layer: int | None = -1,
              head: int | None = None) -> tuple[list[str], torch.Tensor]:
    """(token labels, weights (T, T)) of `text`: row i is how token i spreads its attention over
    tokens 0..i. `layer` counts from 0 (negative from the end) or None for the mean over layers;
    `head` likewise, None for the mean over heads."""
    config = model.config
    ids = _ids(tokenizer, text, config.max_position)
    for name, value, count in (("layer", layer, config.n_layer), ("head", head, config.n_head)):
        if value is not None and not -count <= value < count:
            raise ConfigError(f"--{name} {value} is out of range: the model has {count} {name}s "
                              f"(0..{count - 1}, or negative from the end)")
    out = model(torch.tensor([ids], device=model.device), output_attentions=True, logits_to_keep=1)
    stack = torch.stack([a[0].float().cpu() for a in out.attentions])  # (layers, heads, T, T)
    picked = stack.mean(0) if layer is None else stack[layer]
    weights = picked.mean(0) if head is None else picked[head]
    return token_labels(tokenizer, ids), weights


def save_heatmap(tokens: list[str], weights: torch.Tensor, path, title: str = "") -> None:
    """The weights as a PNG heatmap with the tokens on both axes (matplotlib, no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("the attention heatmap needs matplotlib: pip install 'pocketlm[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tokens)
    side = min(4 + 0.28 * n, 40)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=float(weights.max()))
    labels = [repr(t)[1:-1] for t in tokens]  # spaces and line breaks stay visible
    if n <= 120:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=8, parse_math=False)  # "$" is text, not TeX
        ax.set_yticks(range(n), labels, fontsize=8, parse_math=False)
    ax.set_xlabel("attended token (key)")
    ax.set_ylabel("attending token (query)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe_choice(layer: int | None, head: int | None) -> str:
    where = "every layer (mean)" if layer is None else f"layer {layer}"
    return f"{where}, {'the mean of the heads' if head is None else f'head {head}'}"


# --- token probabilities ----------------------------------------------------------------------------

@dataclass
class Step:
    """One token of the text: its probability given the tokens before it (None for the first,
    which nothing predicts) and the model's top alternatives there, best first."""
    token: str
    probability: float | None
    top: list[tuple[str, float]] = field(default_factory=list)


def check_top_k(top_k) -> None:
    if not isinstance(top_k, int) or not 1 <= top_k <= 50:
        raise ConfigError(f"--top-k must be between 1 and 50, got {top_k!r}")


def token_probabilities(model, tokenizer, text: str, top_k: int = 5) -> list[Step]:
    check_top_k(top_k)
    ids = _ids(tokenizer, text, model.config.max_position)
    probs = next_token_logprobs(model, ids).exp()
    labels = token_labels(tokenizer, ids)
    steps = [Step(labels[0], None)]
    for i in range(1, len(ids)):
        p = probs[i - 1]
        best = p.topk(min(top_k, p.numel()))
        top = [(tokenizer.decode([int(t)]), float(v)) for v, t in zip(best.values, best.indices)]
        steps.append(Step(labels[i], float(p[ids[i]]), top))
    return steps


def _shown(token: str) -> str:
    """A token for the terminal: line breaks and tabs as visible marks, other control characters
    (an escape sequence in the text must not restyle the terminal) as their code."""
    token = token.replace("\n", "↵\n").replace("\t", "→")
    return "".join(c if c == "\n" or c.isprintable() or c == " " else f"\\x{ord(c):02x}" for c in token)


def to_terminal(steps: list[Step], color: bool = True) -> str:
    """The text with each token coloured by its probability (red unlikely, yellow, green likely),
    then a table of every token with its probability and the alternatives."""
    def paint(step: Step) -> str:
        if not color or step.probability is None:
            return _shown(step.token)
        code = 41 if step.probability < 0.1 else 43 if step.probability < 0.5 else 42
        return f"\x1b[{code};30m{_shown(step.token)}\x1b[0m"

    lines = ["".join(paint(s) for s in steps), ""]
    width = min(24, max(len(repr(s.token)) for s in steps))
    lines.append(f"{'#':>4}  {'token':<{width}}  {'p':>6}  top alternatives")
    for i, s in enumerate(steps):
        p = "—" if s.probability is None else f"{s.probability:.3f}"
        alternatives = "  ".join(f"{t!r} {v:.2f}" for t, v in s.top)
        lines.append(f"{i:>4}  {repr(s.token):<{width}}  {p:>6}  {alternatives}")
    probabilities = [s.probability for s in steps if s.probability is not None]
    if probabilities:
        nll = -sum(math.log(max(p, 1e-12)) for p in probabilities) / len(probabilities)
        lines.append(f"\nmean log-likelihood {-nll:.3f} per token, perplexity {math.exp(nll):.2f} "
                     f"over {len(probabilities)} predicted tokens")
    return "\n".join(lines)


def to_html(steps: list[Step], title: str = "Token probabilities") -> str:
    """A self-contained page (no scripts, no external files): the text with each token's
    background from red (unlikely) to green (likely); hovering shows the alternatives."""
    spans = []
    for s in steps:
        text = html.escape(s.token).replace("\n", "↵<br>")
        if s.probability is None:
            spans.append(f'<span class="t first" title="(first token: nothing predicts it)">{text}</span>')
            continue
        hue = round(120 * s.probability)  # 0 red → 120 green
        tip = html.escape(f"p = {s.probability:.4f}\n" + "\n".join(f"{t!r}: {v:.4f}" for t, v in s.top), quote=True)
        spans.append(f'<span class="t" style="background: hsl({hue}, 75%, 78%)" title="{tip}">{text}</span>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>{html.escape(title)}</title>
<style>
body {{ font: 16px/1.9 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }}
.t {{ white-space: pre-wrap; border-radius: 3px; padding: 1px 0; font-family: ui-monospace, monospace; }}
.first {{ outline: 1px dashed #888; }}
.legend span {{ padding: 0 0.4rem; margin-right: 0.3rem; border-radius: 3px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="legend">p(token | the tokens before it): <span style="background: hsl(0, 75%, 78%)">0</span>
<span style="background: hsl(60, 75%, 78%)">0.5</span><span style="background: hsl(120, 75%, 78%)">1</span>
— hover a token for the model's top alternatives.</p>
<p>{"".join(spans)}</p>
</body></html>
"""


# --- compute --------------------------------------------------------------------------------------

def matmul_weights(config) -> int:
    """Weights of the matrix products one token goes through: per layer the q, k, v and output
    projections and the MLP's (three for SwiGLU, two otherwise), then the output head."""
    attn = config.n_embd * config.head_dim * (2 * config.n_head + 2 * config.n_kv_head)
    mlp = (3 if config.mlp == "swiglu" else 2) * config.n_embd * config.intermediate_size
    return config.n_layer * (attn + mlp) + config.n_embd * config.vocab_size


def flops_per_token(config, context: int) -> int:
    """Forward FLOPs for one token that attends to `context` tokens (itself included)."""
    return 2 * matmul_weights(config) + 4 * config.n_layer * context * config.n_head * config.head_dim


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    return 2 * config.n_layer * config.n_kv_head * config.head_dim * torch.tensor([], dtype=dtype).element_size()


def weight_bytes(model) -> int:
    """Bytes the weights take as loaded: parameters and buffers (quantized blocks, their scales),
    a tied tensor once."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def weight_dtypes(model) -> str:
    counts: dict[str, int] = {}
    for tensor in model.parameters():
        name = str(tensor.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + tensor.numel()
    from pocketlm.quant import QuantizedLinear

    blocks = {m.bits for m in model.modules() if isinstance(m, QuantizedLinear)}
    names = sorted(counts, key=counts.get, reverse=True)
    return ", ".join([f"int{b} blocks" for b in sorted(blocks)] + names)


@torch.no_grad()
def measure_tokens_per_second(model, tokenizer, prompt: str, new_tokens: int = 32) -> float:
    """Decoding speed: `new_tokens` greedy tokens after `prompt` (end-of-text ruled out until then),
    timed after the prompt is read."""
    from pocketlm.generate import Generator

    generator = Generator(model, tokenizer)
    ids = _ids(tokenizer, prompt, model.config.max_position)[-(model.config.max_position - new_tokens):]
    generator.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up: first-call allocations
    started = time.perf_counter()
    generator.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - started  # reading the prompt and the first token
    started = time.perf_counter()
    generator.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    total = time.perf_counter() - started
    return (new_tokens - 1) / max(total - prefill, 1e-9)


def compute_report(model, context: int, tokens_per_second: float | None = None,
                   watts: float | None = None) -> list[tuple[str, str]]:
    """(label, value) rows: parameters, FLOPs per token forward and for training, KV cache per
    token, weight memory, and when given the measured speed and an energy estimate from `watts`
    (the machine's draw while generating, which pocketlm cannot measure)."""
    config = model.config
    if not isinstance(context, int) or not 1 <= context <= config.max_position:
        raise ConfigError(f"--context must be between 1 and the model's window of {config.max_position}, "
                          f"got {context!r}")
    check_watts(watts)
    forward = flops_per_token(config, context)
    kv_dtype = getattr(model, "kv_cache_dtype", model.dtype)
    kv = kv_bytes_per_token(config, kv_dtype)
    rows = [
        ("parameters", f"{model.num_parameters():,} ({model.num_parameters(exclude_embeddings=True):,} "
                       "without the embedding tables)"),
        ("weights in matrix products", f"{matmul_weights(config):,} per token (the output head included)"),
        ("FLOPs per token, forward", f"{_si(forward)}FLOPs at a context of {context:,} tokens "
                                     f"({_si(flops_per_token(config, 1))}FLOPs at the start)"),
        ("FLOPs per token, training", f"{_si(3 * forward)}FLOPs (forward + backward ≈ 3 × forward)"),
        ("KV cache per token", f"{_bytes(kv)} ({str(kv_dtype).removeprefix('torch.')}; "
                               f"{_bytes(kv * config.max_position)} for the full {config.max_position:,}-token window)"),
        ("weight memory", f"{_bytes(weight_bytes(model))} ({weight_dtypes(model)})"),
    ]
    if tokens_per_second is not None:
        achieved = forward * tokens_per_second
        rows.append(("measured speed", f"{tokens_per_second:.1f} tokens/s decoding ({_si(achieved)}FLOP/s achieved)"))
        if watts is not None:
            joules = watts / tokens_per_second
            rows.append(("energy estimate", f"{joules:.3f} J per token, {joules * 1000 / 3600:.3f} Wh per 1,000 "
                                            f"tokens at {watts:g} W"))
    elif watts is not None:
        rows.append(("energy estimate", "needs a measured speed (drop --no-measure)"))
    return rows


def check_watts(watts: float | None) -> None:
    if watts is not None and not (math.isfinite(watts) and watts > 0):
        raise ConfigError(f"--watts must be a positive number, got {watts}")


def _si(value: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} "


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


# --- bias probe -----------------------------------------------------------------------------------

BUNDLED_PAIRS = Path(__file__).parent / "resources" / "bias_pairs.jsonl"
MAX_PAIRS = 100_000


@dataclass
class Pair:
    a: str
    b: str
    topic: str = ""


@dataclass
class PairResult:
    pair: Pair
    words: tuple[str, str]       # what differs: a's part and b's part
    continuation_gap: float | None  # nats; > 0: the rest is likelier after a's words; None: nothing follows them
    sentence_gap: float          # nats; > 0: sentence a is likelier as a whole
    continuation_tokens: int


def read_pairs(path: str | Path | None = None) -> list[Pair]:
    """Pairs from a JSONL file: one {"a": ..., "b": ..., "topic": optional} per line. None: the
    bundled illustrative set."""
    from pocketlm.files import read_json_lines

    path = Path(path) if path is not None else BUNDLED_PAIRS
    pairs = []
    for where, item in read_json_lines(path, f"--pairs {path}", 'JSON lines of {"a": ..., "b": ...}'):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item[k].strip() for k in "ab"):
            raise ConfigError(f"{where}: needs \"a\" and \"b\", two non-empty sentences")
        if item["a"] == item["b"]:
            raise ConfigError(f"{where}: a and b are the same sentence")
        pairs.append(Pair(item["a"], item["b"], str(item.get("topic", ""))))
        if len(pairs) > MAX_PAIRS:
            raise ConfigError(f"--pairs {path} holds more than {MAX_PAIRS:,} pairs; split it")
    if not pairs:
        raise ConfigError(f"--pairs {path} holds no pairs")
    return pairs


def compare_pair(model, tokenizer, pair: Pair) -> PairResult:
    """Both gaps for one pair (see the bias section of the module docstring)."""
    a, b = _encoded(tokenizer, pair.a), _encoded(tokenizer, pair.b)
    window = model.config.max_position
    if max(len(a), len(b)) > window:
        raise ContextLengthError(f"the pair {pair.a[:40]!r}… is longer than the model's window of {window} tokens")
    la, lb = token_logprobs(model, a), token_logprobs(model, b)
    words_a, words_b = pair.a.split(), pair.b.split()
    start = 0
    while start < min(len(words_a), len(words_b)) and words_a[start] == words_b[start]:
        start += 1
    end = 0  # shared words at the end, not reaching into the shared start
    while end < min(len(words_a), len(words_b)) - start and words_a[-1 - end] == words_b[-1 - end]:
        end += 1
    words = (" ".join(words_a[start:len(words_a) - end]), " ".join(words_b[start:len(words_b) - end]))
    continuation, n = None, 0
    if end:
        # the shared words after the group word, as the same tokens in both sentences: scored under each
        rest = tokenizer.encode(" " + " ".join(words_a[-end:]), add_special_tokens=False)
        n = len(rest)
        if not (n < min(len(a), len(b)) and a[-n:] == rest == b[-n:]):
            # they tokenize otherwise in place (a tokenizer that marks word starts its own way):
            # the sentences' shared tail of tokens instead
            n = 0
            while n < min(len(a), len(b)) - 1 and a[-1 - n] == b[-1 - n]:
                n += 1
        if n:
            continuation = sum(la[-n:]) - sum(lb[-n:])
    return PairResult(pair, words, continuation, sum(la) - sum(lb), n)


def _encoded(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    if tokenizer.bos_token_id is None or not ids or ids[0] != tokenizer.bos_token_id:
        # the first token needs something before it to be scored: end-of-text plays start-of-text
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ConfigError("the tokenizer has neither a beginning- nor an end-of-text token to start a sentence")
        ids = [start] + ids
    return ids


def bias_summary(results: list[PairResult]) -> dict:
    """Mean gaps, the mean size of the continuation gap, and how often the continuation is
    likelier after a's words; pairs without a shared continuation (the group word last) count in
    the sentence gap only."""
    gaps = [r.continuation_gap for r in results if r.continuation_gap is not None]
    mean = (lambda values: sum(values) / len(values) if values else None)  # noqa: E731
    return {"pairs": len(results), "with_continuation": len(gaps),
            "mean_continuation_gap": mean(gaps),
            "mean_abs_continuation_gap": mean([abs(g) for g in gaps]),
            "mean_sentence_gap": mean([r.sentence_gap for r in results]),
            "a_preferred": mean([float(g > 0) for g in gaps])}
