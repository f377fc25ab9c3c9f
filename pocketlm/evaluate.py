"""Perplexity of a causal language model over a long text, by a sliding window.

A text longer than the model's window is scored window by window; each window starts `stride`
tokens after the previous one, and only the tokens not scored before count, so every token but
the first is scored exactly once, with up to `max_length - stride` tokens of context before it.
perplexity = exp(mean −log p(token | the tokens before it)). This is the method the transformers
documentation uses; here each window's new tokens are counted exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pocketlm.data import DataError, TokenShard
from pocketlm.errors import ConfigError, NotFoundError


@dataclass
class Perplexity:
    loss: float  # mean negative log-likelihood per token, in nats
    tokens: int  # tokens scored
    windows: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, max_length: int | None = None, stride: int | None = None,
               progress: bool = False) -> Perplexity:
    """Score the 1-D token ids with windows of max_length tokens (default: the model's context,
    at most 1024) moved by stride (default: half a window)."""
    ids = torch.as_tensor(ids).flatten()
    if ids.numel() < 2:
        raise ConfigError(f"the text is {ids.numel()} token{'' if ids.numel() == 1 else 's'} long; perplexity "
                          "scores each token after the first, so it needs at least 2")
    # 0 is a value to refuse, not "the default": only None means default
    max_length = min(1024, model.config.max_position) if max_length is None else max_length
    stride = max(1, max_length // 2) if stride is None else stride
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2 (a window scores the tokens after its first), "
                          f"got {max_length}")
    if stride < 1:
        raise ConfigError(f"stride must be at least 1, got {stride}")
    if stride > max_length:
        raise ConfigError(f"a stride of {stride} is longer than the window of {max_length} tokens, so tokens "
                          f"between windows would go unscored; use a stride of at most {max_length}")
    if max_length > model.config.max_position:
        raise ConfigError(f"a window of {max_length} tokens is longer than the model's context of "
                          f"{model.config.max_position}")
    model.eval()
    device = model.device
    total, count, windows = 0.0, 0, 0
    scored_until = 1  # position 0 has nothing before it
    starts = range(0, ids.numel(), stride)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(starts), unit="window", desc="scoring")
    for begin in starts:
        end = min(begin + max_length, ids.numel())
        window = ids[begin:end].to(device)[None]
        logp = model(window).logits[0, :-1].float().log_softmax(-1)  # predicts window[1:]
        targets = window[0, 1:]
        # the targets no earlier window scored (with stride == max_length, a window's first token
        # has no context inside it and stays unscored, as in the transformers method)
        new = slice(max(0, scored_until - begin - 1), None)
        total -= float(logp[new].gather(-1, targets[new, None]).sum())
        count += targets[new].numel()
        scored_until, windows = end, windows + 1
        if bar is not None:
            bar.update(1)
        if end == ids.numel():
            break
    if bar is not None:
        bar.close()
    return Perplexity(loss=total / count, tokens=count, windows=windows)


def tokens_to_score(source: str | Path, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """The ids a perplexity run scores: a text file (tokenized as a whole, special tokens as the
    tokenizer adds them), or a folder of shards from `pocketlm prepare` (its validation split)."""
    if max_tokens is not None and max_tokens < 2:
        raise ConfigError(f"max_tokens must be at least 2 (perplexity scores each token after the first), "
                          f"got {max_tokens}")
    source = Path(source)
    if source.is_dir():
        shard = TokenShard(source, "val")
        shard.check_tokenizer(tokenizer)
        if shard.count < 2:
            raise DataError(f"{shard.path} holds {shard.count} tokens, too few to score; prepare the data "
                            "with a --val-frac above 0 (or with more text)")
        end = shard.count if max_tokens is None else min(shard.count, max_tokens)
        return torch.from_numpy(shard.tokens[:end].astype("int64"))
    if not source.is_file():
        raise NotFoundError(f"no such file or data folder: {source}")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{source} is not UTF-8 text") from None
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    return ids if max_tokens is None else ids[:max_tokens]


# --- multiple choice ------------------------------------------------------------------------------

@dataclass
class ChoiceResult:
    accuracy: float  # by the summed log-likelihood of each choice
    accuracy_norm: float  # by that sum divided by the choice's length in characters
    questions: int
    picks: list[tuple[int, int, int]]  # per question: (answer, raw pick, normalised pick)


def read_choice_items(path: str | Path) -> list[dict]:
    """A JSONL file of {"question": str, "choices": [str, ...], "answer": index or the right choice}."""
    from pocketlm.files import read_json_lines

    path = Path(path)
    items = []
    for where, item in read_json_lines(path, str(path), 'multiple-choice questions, one {"question", "choices", '
                                                        '"answer"} object a line'):
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise ConfigError(f'{where}: each line is an object with "question", "choices" and "answer"')
        choices, answer = item.get("choices"), item.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ConfigError(f'{where}: "choices" must list at least two non-empty strings')
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ConfigError(f'{where}: "answer" must be the index of a choice (0..{len(choices) - 1}) or its text')
        items.append({"question": item["question"], "choices": choices, "answer": answer})
    if not items:
        raise ConfigError(f"{path} holds no questions")
    return items


@torch.no_grad()
def next_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, vocab): row i is log p(next token | ids[:i + 1]), in float32 on the CPU."""
    logits = model(torch.tensor([ids], device=model.device)).logits[0, :-1]
    return logits.float().log_softmax(-1).cpu()


def token_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i ≥ 1."""
    return next_token_logprobs(model, ids).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def choice_loglikelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """log p(choice | context) for each choice, summed over its tokens: the context encoded as a
    prompt (special tokens included), each choice, with a leading space, encoded on its own and
    appended, as lm-evaluation-harness scores them."""
    window = model.config.max_position
    ctx = tokenizer.encode(context)
    out = []
    for choice in choices:
        cont = tokenizer.encode(" " + choice, add_special_tokens=False)
        ids = (ctx + cont)[-window - 1:]  # the choice always scored whole; the context's start may go
        if len(cont) >= len(ids):
            raise ConfigError(f"the choice {choice[:40]!r} alone is longer than the model's window of {window}")
        out.append(sum(token_logprobs(model, ids)[-len(cont):]))
    return out


def multiple_choice(model, tokenizer, items: list[dict]) -> ChoiceResult:
    picks = []
    for item in items:
        scores = choice_loglikelihoods(model, tokenizer, item["question"], item["choices"])
        raw = max(range(len(scores)), key=scores.__getitem__)
        norm = max(range(len(scores)), key=lambda i: scores[i] / len(" " + item["choices"][i]))
        picks.append((item["answer"], raw, norm))
    n = len(picks)
    return ChoiceResult(sum(a == r for a, r, _ in picks) / n, sum(a == m for a, _, m in picks) / n, n, picks)
