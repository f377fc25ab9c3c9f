"""How differently a model scores two sentences that differ only in a group word ("The man worked
as a nurse" / "The woman worked as a nurse").

Two gaps per pair, in nats (natural log), positive when the model prefers sentence a:

- the continuation gap: log p(the words after the group word | a's start) − the same given b's
  start. Both sides score the same tokens, so this isolates what the group word does to the
  model's expectations of the rest ("…worked as a nurse"). This is the headline figure.
- the sentence gap: log p(a) − log p(b) over whole sentences, which also counts how common each
  group word is by itself.

The bundled pairs (pocketlm/resources/bias_pairs.jsonl, 16 of them) are illustrative: a handful
of sentences to show the method, not a benchmark. A measurement worth citing needs many pairs
written with care (the published sets have over a thousand) and a look at what each pair tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pocketlm.errors import ConfigError, NotFoundError

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
    continuation_gap: float      # nats; > 0: the rest of the sentence is likelier after a's words
    sentence_gap: float          # nats; > 0: sentence a is likelier as a whole
    continuation_tokens: int


def read_pairs(path: str | Path | None = None) -> list[Pair]:
    """Pairs from a JSONL file: one {"a": ..., "b": ..., "topic": optional} per line. None: the
    bundled illustrative set."""
    path = Path(path) if path is not None else BUNDLED_PAIRS
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise NotFoundError(f"--pairs {path}: no such file (JSON lines of {{\"a\": ..., \"b\": ...}})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--pairs {path} is not UTF-8 text") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--pairs {path}, line {n}: not JSON ({e.msg})") from None
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item[k].strip() for k in "ab"):
            raise ConfigError(f"--pairs {path}, line {n}: needs \"a\" and \"b\", two non-empty sentences")
        if item["a"] == item["b"]:
            raise ConfigError(f"--pairs {path}, line {n}: a and b are the same sentence")
        pairs.append(Pair(item["a"], item["b"], str(item.get("topic", ""))))
        if len(pairs) > MAX_PAIRS:
            raise ConfigError(f"--pairs {path} holds more than {MAX_PAIRS:,} pairs; split it")
    if not pairs:
        raise ConfigError(f"--pairs {path} holds no pairs")
    return pairs


@torch.no_grad()
def token_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i ≥ 1."""
    logits = model(torch.tensor([ids], device=model.device)).logits[0, :-1].float()
    picked = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:], device=logits.device)[:, None])[:, 0]
    return picked.cpu().tolist()


def compare(model, tokenizer, pair: Pair) -> PairResult:
    a, b = _encoded(tokenizer, pair.a), _encoded(tokenizer, pair.b)
    window = model.config.max_position
    if max(len(a), len(b)) > window:
        raise ConfigError(f"the pair {pair.a[:40]!r}… is longer than the model's window of {window} tokens")
    # the shared start and end, in tokens; what lies between is the group word(s)
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    la, lb = token_logprobs(model, a), token_logprobs(model, b)
    continuation = sum(la[len(a) - end - 1:]) - sum(lb[len(b) - end - 1:]) if end else 0.0
    words = (tokenizer.decode(a[start:len(a) - end]).strip(), tokenizer.decode(b[start:len(b) - end]).strip())
    return PairResult(pair, words, continuation, sum(la) - sum(lb), end)


def _encoded(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    if tokenizer.bos_token_id is None or not ids or ids[0] != tokenizer.bos_token_id:
        # the first token needs something before it to be scored: end-of-text plays start-of-text
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ConfigError("the tokenizer has neither a beginning- nor an end-of-text token to start a sentence")
        ids = [start] + ids
    return ids


def summary(results: list[PairResult]) -> dict:
    """Mean gaps, the mean size of the continuation gap, and how often a is preferred."""
    gaps = [r.continuation_gap for r in results]
    return {"pairs": len(results),
            "mean_continuation_gap": sum(gaps) / len(gaps),
            "mean_abs_continuation_gap": sum(map(abs, gaps)) / len(gaps),
            "mean_sentence_gap": sum(r.sentence_gap for r in results) / len(results),
            "a_preferred": sum(g > 0 for g in gaps) / len(gaps)}
