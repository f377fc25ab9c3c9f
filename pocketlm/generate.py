"""Text generation: prefill the prompt once, then decode one token at a time from a KV cache.

`generate()` is what `model.generate(...)` calls. Its argument semantics follow transformers,
with one deliberate difference: when `do_sample` is not given, passing a sampling parameter
(temperature, top_k, top_p) or asking for several return sequences means the caller wants
samples, so pocketlm samples (transformers would silently decode greedily). An explicit
`do_sample=False` is always greedy. Samplers are pure functions of (logits, settings, generator).
"""

from __future__ import annotations

import logging
import math

import torch

from pocketlm.errors import ConfigError, ContextLengthError
from pocketlm.model import Transformer

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 20  # transformers' default when neither max_length nor max_new_tokens is given


def resolve_do_sample(do_sample: bool | None, temperature, top_k, top_p, num_return_sequences: int) -> bool:
    """Decide greedy vs sampling; see the module docstring for why the default differs."""
    if do_sample is not None:
        return bool(do_sample)
    asked = [name for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p))
             if value is not None]
    if num_return_sequences > 1:
        asked.append(f"num_return_sequences={num_return_sequences}")
    if asked:
        log.info("do_sample not given; sampling because %s was set (pass do_sample=False for greedy)",
                 ", ".join(asked))
        return True
    return False


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Scale by temperature and set every token outside top-k / the top-p nucleus to -inf."""
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the best always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k, top_p,
               generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token (B,) from last-position logits (B, V)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_length: int | None = None, max_new_tokens: int | None = None,
             do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, num_return_sequences: int = 1,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             seed: int | None = None) -> torch.Tensor:
    """Continue each row of `input_ids` (B, T); returns (B * num_return_sequences, T + new),
    the prompt followed by the generated tokens, rows that stopped early padded after eos."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.numel() == 0:
        raise ConfigError("generate() needs a non-empty prompt (input_ids has no tokens)")
    if not (isinstance(num_return_sequences, int) and num_return_sequences >= 1):
        raise ConfigError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}")
    sample = resolve_do_sample(do_sample, temperature, top_k, top_p, num_return_sequences)
    if not sample and num_return_sequences > 1:
        raise ConfigError("greedy decoding gives the same sequence every time; use do_sample=True "
                          "to get several different return sequences")
    temperature = 1.0 if temperature is None else float(temperature)
    if sample and temperature == 0.0:
        sample = False  # the temperature → 0 limit of sampling is greedy
    if temperature < 0 or math.isnan(temperature):
        raise ConfigError(f"temperature must be ≥ 0, got {temperature}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 0):
        raise ConfigError(f"top_k must be a non-negative integer, got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")

    prompt_len = input_ids.shape[1]
    if max_new_tokens is None:
        max_new_tokens = (max_length or DEFAULT_MAX_LENGTH) - prompt_len
    if max_new_tokens <= 0:
        raise ContextLengthError(f"the prompt has {prompt_len} tokens, already at or past max_length="
                                 f"{max_length}; raise max_length or pass max_new_tokens")
    window = model.config.max_position
    if prompt_len + max_new_tokens > window:
        raise ContextLengthError(f"{prompt_len} prompt tokens + {max_new_tokens} new tokens exceed the "
                                 f"model's context window of {window}; shorten the prompt or ask for fewer tokens")

    eos = torch.tensor([] if eos_token_id is None else
                       ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
                       device=model.device, dtype=torch.long)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if len(eos) else 0
    generator = None
    if sample:
        generator = torch.Generator(device=model.device)
        generator.manual_seed(seed if seed is not None else torch.seed())

    ids = input_ids.to(model.device).repeat_interleave(num_return_sequences, dim=0)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.to(model.device).repeat_interleave(num_return_sequences, dim=0).long()
    B = ids.shape[0]
    cache = model.new_cache(B, prompt_len + max_new_tokens)
    # left padding: each row's positions count only its real tokens
    positions = (mask.cumsum(-1) - 1).clamp(min=0) if mask is not None else None
    logits = model(ids, attention_mask=mask, cache=cache, position_ids=positions).logits[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=model.device)
    new_tokens = []
    for step in range(max_new_tokens):
        token = next_token(logits, sample, temperature, top_k, top_p, generator)
        token = token.masked_fill(finished, pad_token_id)
        new_tokens.append(token)
        finished |= torch.isin(token, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if mask is not None:
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            positions = positions[:, -1:] + 1
        logits = model(token[:, None], attention_mask=mask, cache=cache, position_ids=positions).logits[:, -1]
    return torch.cat((ids, torch.stack(new_tokens, dim=1)), dim=1)
