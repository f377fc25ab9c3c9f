"""Text generation: prefill the prompt once, then decode one token at a time from a KV cache
sized to the request.

`Generator(model, tokenizer)` is the engine behind `model.generate`, the CLI and the server:

    gen = Generator(model, tokenizer)
    gen.generate("Once upon a time", max_new_tokens=50, temperature=0.7)   # -> Completion
    for delta in gen.stream("Once upon a time"): print(delta, end="")

Argument semantics follow transformers, with one deliberate difference: when `do_sample` is not
given, a sampling parameter (temperature, top_k, top_p, min_p) or several return sequences mean
the caller wants samples, so pocketlm samples (transformers would silently decode greedily). An
explicit `do_sample=False` is always greedy. Samplers are pure functions of (logits, settings,
torch.Generator). Streaming never splits a UTF-8 character, holds back text that may be the start
of a stop string, and its deltas concatenate to exactly the final text.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pocketlm.errors import ConfigError, ContextLengthError
from pocketlm.model import Transformer
from pocketlm.packing import DecodeStep, pack_linears, unpack_linears

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 20  # transformers' default when neither max_length nor max_new_tokens is set
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p")
# transformers' sampling defaults, used when sampling and nothing else sets them (top_k=0: no top-k)
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50}
CACHE_ROUNDING = 64  # cache lengths are rounded up so similar requests reuse one shape
MAX_TOP_LOGPROBS = 20


@dataclass
class GenerationConfig:
    """How to generate. `None` means "not set": the checkpoint's generation_config.json, then
    transformers' defaults, fill it in."""

    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens, as in transformers
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    num_return_sequences: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    seed: int | None = None
    logprobs: int | None = None  # None: off; 0: the chosen token's; N: also the N most likely

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        """From a generation_config.json dict; keys pocketlm does not use are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        if "stop_strings" in data and data["stop_strings"]:  # transformers' name
            values["stop"] = data["stop_strings"]
        return cls(**values)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "GenerationConfig":
        from pocketlm.checkpoint import read_generation_config

        return cls.from_dict(read_generation_config(folder))

    def updated(self, **overrides) -> "GenerationConfig":
        """A copy with the caller's settings applied, reading their intent about sampling."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown generation settings {sorted(unknown)}; known: "
                              f"{sorted(f.name for f in dataclasses.fields(self))}")
        if "max_new_tokens" in overrides and "max_length" not in overrides:
            overrides["max_length"] = None  # the caller's limit replaces the checkpoint's
        elif "max_length" in overrides and "max_new_tokens" not in overrides:
            overrides["max_new_tokens"] = None
        if isinstance(overrides.get("stop"), str):
            overrides["stop"] = [overrides["stop"]]
        if overrides.get("do_sample") is None:
            overrides.pop("do_sample", None)
            asked = [k for k in SAMPLING_KEYS if overrides.get(k) is not None]
            if overrides.get("num_return_sequences", 1) > 1:
                asked.append(f"num_return_sequences={overrides['num_return_sequences']}")
            if asked:
                log.info("do_sample not given; sampling because %s was set (pass do_sample=False for greedy)",
                         ", ".join(asked))
                overrides["do_sample"] = True
        return dataclasses.replace(self, **overrides)

    @property
    def sampling(self) -> bool:
        return bool(self.do_sample) and self.temperature != 0.0  # temperature → 0 is greedy

    @property
    def eos_ids(self) -> list[int]:
        eos = [] if self.eos_token_id is None else (
            [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id))
        return list(dict.fromkeys(eos + list(self.stop_token_ids)))

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that cannot work."""
        def number(name, low, high, low_open=False):
            value = getattr(self, name)
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                    or value < low or value > high or (low_open and value == low):
                bound = f"{'(' if low_open else '['}{low}, {high}]"
                raise ConfigError(f"{name} must be a number in {bound}, got {value!r}")

        number("temperature", 0.0, math.inf)
        number("top_p", 0.0, 1.0, low_open=True)
        number("min_p", 0.0, 1.0)
        number("repetition_penalty", 0.0, math.inf, low_open=True)
        for name in ("max_new_tokens", "max_length", "top_k", "num_return_sequences", "seed", "logprobs"):
            value = getattr(self, name)
            smallest = 1 if name in ("max_new_tokens", "max_length", "num_return_sequences") else 0
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < smallest):
                raise ConfigError(f"{name} must be an integer ≥ {smallest}, got {value!r}")
        if self.logprobs is not None and self.logprobs > MAX_TOP_LOGPROBS:
            raise ConfigError(f"logprobs asks for {self.logprobs} alternatives; at most {MAX_TOP_LOGPROBS}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        for value in self.eos_ids + ([] if self.pad_token_id is None else [self.pad_token_id]):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"token ids must be non-negative integers, got {value!r}")
        if not self.sampling and self.num_return_sequences > 1:
            raise ConfigError("greedy decoding gives the same sequence every time; use do_sample=True "
                              "to get several different return sequences")

    def new_tokens_for(self, prompt_len: int, window: int) -> int:
        """How many tokens to generate after a prompt, checked against the context window."""
        if self.max_new_tokens is not None:
            new = self.max_new_tokens
        else:
            max_length = self.max_length or DEFAULT_MAX_LENGTH
            new = max_length - prompt_len
            if new <= 0:
                raise ContextLengthError(f"the prompt has {prompt_len} tokens, already at or past "
                                         f"max_length={max_length}; raise max_length or set max_new_tokens")
        if prompt_len + new > window:
            raise ContextLengthError(f"{prompt_len} prompt tokens + {new} requested new tokens exceed the "
                                     f"model's context window of {window} tokens; shorten the prompt or "
                                     "ask for fewer tokens")
        return new


# --- samplers: pure functions of (logits, settings, generator) ---------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in the sequence less likely: positive logits are divided by the
    penalty, negative ones multiplied (so both move down for penalty > 1). seen: (B, V) bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, min_p: float | None = None) -> torch.Tensor:
    """Scale by temperature, then set to -inf every token outside the top-k, outside the smallest
    set whose probability reaches top_p, or less likely than min_p × the best token's probability."""
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the best always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)
    if min_p is not None and min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, -math.inf)
    return logits


def select_tokens(logits: torch.Tensor, config: GenerationConfig,
                  generator: torch.Generator | None) -> torch.Tensor:
    """The next token (B,) from last-position logits (B, V), already repetition-penalised."""
    if not config.sampling:
        return logits.argmax(-1)
    temperature = SAMPLING_DEFAULTS["temperature"] if config.temperature is None else config.temperature
    top_k = SAMPLING_DEFAULTS["top_k"] if config.top_k is None else config.top_k
    probs = filter_logits(logits, temperature, top_k, config.top_p, config.min_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --- results --------------------------------------------------------------------------------------

@dataclass
class TokenLogprob:
    """The chosen token's log-probability under the model, and the most likely alternatives."""
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), best first


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos, stop token or stop string) or "length"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Chunk:
    """One decode step of one sequence while streaming: `text` is "" while text is held back."""
    text: str
    token_id: int
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None


class TextTracker:
    """Turns one sequence's new token ids into safe text deltas: never half a UTF-8 character,
    never text that may turn out to start a stop string, and never the stop string itself."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not full.startswith(self.emitted):
            return ""  # the decoder rewrote earlier text; wait for the final flush
        longest = max((len(s) for s in self.stop), default=0)
        search_from = max(0, len(self.emitted) - longest + 1)
        hits = [i for i in (full.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(full[:min(hits)])
        safe = len(full)
        while safe > len(self.emitted) and full[safe - 1] == "\ufffd":
            safe -= 1  # an incomplete UTF-8 sequence decodes to U+FFFD until its last byte arrives
        for s in self.stop:  # hold back a tail that could grow into a stop string
            for n in range(min(len(s) - 1, safe - len(self.emitted)), 0, -1):
                if full[:safe].endswith(s[:n]):
                    safe -= n
                    break
        return self._emit(full[:safe])

    def flush(self) -> str:
        """The rest of the text once the sequence ends (held-back text that never became a stop)."""
        if self.stopped:
            return ""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._emit(full) if full.startswith(self.emitted) else ""

    def _emit(self, text: str) -> str:
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta


# --- the engine ------------------------------------------------------------------------------------

class Generator:
    """Prefill + decode with a pre-allocated KV cache, for one prompt or a left-padded batch."""

    def __init__(self, model: Transformer, tokenizer=None, config: GenerationConfig | None = None,
                 compile: bool = False, pack: bool = True):
        """pack: lay CPU weights out for fast decoding (pocketlm.packing; same parameters and
        values, a no-op on GPU). compile: run each decode step through torch.compile with static
        shapes; it needs a C++ compiler on CPU and costs about a minute on the first call of each
        shape, and on CPU it decodes slower than the packed eager path (docs/benchmarks.md), so
        it is off by default. The compiled step uses the compiler's kernels, not packed ones."""
        self.model = model
        if compile:
            unpack_linears(model)  # the packed path's thread split cannot be traced
        elif pack:
            pack_linears(model)
        self.tokenizer = tokenizer
        if config is None:
            config = GenerationConfig.from_dict(getattr(model, "generation_config", None) or {})
            if config.eos_token_id is None:
                config.eos_token_id = model.config.eos_token_id
            if config.eos_token_id is None and tokenizer is not None:
                config.eos_token_id = tokenizer.eos_token_id
        self.config = config
        # the compiled decode step: static shapes (the whole cache under a mask, the slot as a
        # tensor), so one compilation serves every step of every request of the same shape
        self._compiled_step = torch.compile(model.decode_step, dynamic=False) if compile else None

    # --- public API -----------------------------------------------------------------------------

    def generate(self, prompt: str | list[int] | Sequence[str | list[int]],
                 config: GenerationConfig | None = None, **overrides) -> Completion | list[Completion]:
        """Complete one prompt (returns a Completion) or a batch (returns a list, the
        num_return_sequences completions of each prompt adjacent). Prompts are text or token ids."""
        single = isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))
        prompts = [prompt] if single else list(prompt)
        cfg = (config or self.config).updated(**overrides)
        ids = [self._encode(p) for p in prompts]
        n = cfg.num_return_sequences
        trackers = [TextTracker(self._need_tokenizer(), cfg.stop) for _ in range(len(ids) * n)]
        logprobs: list[list[TokenLogprob]] = [[] for _ in trackers]
        reasons: list[str | None] = [None] * len(trackers)
        for step in self._decode(ids, cfg, trackers):
            for row, chunk in enumerate(step):
                if chunk is not None:
                    if chunk.logprob is not None:
                        logprobs[row].append(chunk.logprob)
                    reasons[row] = chunk.finish_reason or reasons[row]
        results = []
        for row, tracker in enumerate(trackers):
            results.append(Completion(text=tracker.emitted, token_ids=tracker.ids,
                                      finish_reason=reasons[row] or "length",
                                      prompt_tokens=len(ids[row // n]),
                                      logprobs=logprobs[row] if cfg.logprobs is not None else None))
        return results[0] if single and n == 1 else results

    def stream(self, prompt: str | list[int], config: GenerationConfig | None = None, **overrides) -> Iterator[str]:
        """Text deltas of one completion as they are decided; they concatenate to its text."""
        for chunk in self.stream_chunks(prompt, config, **overrides):
            if chunk.text:
                yield chunk.text

    def stream_chunks(self, prompt: str | list[int], config: GenerationConfig | None = None,
                      **overrides) -> Iterator[Chunk]:
        """One Chunk per generated token (plus a final one with any held-back text)."""
        cfg = (config or self.config).updated(**overrides)
        if cfg.num_return_sequences != 1:
            raise ConfigError("streaming returns one sequence; use generate() for num_return_sequences > 1")
        tracker = TextTracker(self._need_tokenizer(), cfg.stop)
        for step in self._decode([self._encode(prompt)], cfg, [tracker]):
            yield step[0]

    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     config: GenerationConfig | None = None,
                     on_tokens: Callable[[torch.Tensor], None] | None = None, **overrides) -> torch.Tensor:
        """transformers-style: (B, T) ids (left-padded with a mask for uneven prompts) →
        (B * num_return_sequences, T + new), rows that stop early padded with pad_token_id."""
        cfg = (config or self.config).updated(**overrides)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if attention_mask is None:
            rows = [r.tolist() for r in input_ids]
        else:
            if attention_mask.shape != input_ids.shape:
                raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                                  f"has {tuple(input_ids.shape)}")
            rows = [r[m.bool()].tolist() for r, m in zip(input_ids, attention_mask)]
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_ids or [0])[0]
        new: list[list[int]] = [[] for _ in range(len(rows) * cfg.num_return_sequences)]
        for step in self._decode(rows, cfg, trackers=None):
            tokens = [pad if chunk is None else chunk.token_id for chunk in step]
            for row, token in enumerate(tokens):
                new[row].append(token)
            if on_tokens is not None:
                on_tokens(torch.tensor(tokens))
        prompt = input_ids.repeat_interleave(cfg.num_return_sequences, dim=0)
        return torch.cat((prompt, torch.tensor(new, dtype=prompt.dtype, device=prompt.device)), dim=1)

    # --- the decode loop --------------------------------------------------------------------------

    @torch.inference_mode()
    def _decode(self, prompts: list[list[int]], cfg: GenerationConfig,
                trackers: list[TextTracker] | None) -> Iterator[list[Chunk | None]]:
        """Yield, per step, one Chunk per row (None for rows that finished earlier). With trackers,
        chunk texts are the safe text deltas, the held-back rest included in a row's last chunk."""
        cfg.validate()
        model = self.model
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt needs at least one token")
        n = cfg.num_return_sequences
        prompts = [p for p in prompts for _ in range(n)]
        longest = max(len(p) for p in prompts)
        max_new = cfg.new_tokens_for(longest, model.config.max_position)  # max_length counts padding
        device = model.device
        B = len(prompts)
        ids = torch.zeros(B, longest, dtype=torch.long)
        mask = torch.zeros(B, longest, dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding keeps every row's last token at the end
            ids[row, longest - len(p):] = torch.tensor(p)
            mask[row, longest - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        padded = bool((mask == 0).any())
        positions = (mask.cumsum(-1) - 1).clamp(min=0)

        generator = None  # without a seed, sample from torch's global RNG (torch.manual_seed applies)
        if cfg.sampling and cfg.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(cfg.seed)
        seen = None
        if cfg.repetition_penalty not in (None, 1.0):
            seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
            seen.scatter_(1, ids, mask.bool())
        eos = torch.tensor(cfg.eos_ids, dtype=torch.long, device=device)

        cache_len = -(-(longest + max_new) // CACHE_ROUNDING) * CACHE_ROUNDING
        cache = model.new_cache(B, cache_len)
        logits = model(ids, attention_mask=mask if padded else None, cache=cache,
                       position_ids=positions, logits_to_keep=1).logits[:, -1]
        key_mask = None
        fast_step = DecodeStep.for_model(model) if self._compiled_step is None else None
        if self._compiled_step is not None:
            key_mask = torch.zeros(B, cache_len, dtype=torch.bool, device=device)
            key_mask[:, :longest] = mask.bool()
        finished = [False] * B
        for step in range(max_new):
            logits = logits.float()
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
            tokens = select_tokens(logits, cfg, generator)
            infos = self._logprobs(logits, tokens, cfg.logprobs) if cfg.logprobs is not None else [None] * B
            is_eos = torch.isin(tokens, eos).tolist()
            token_list = tokens.tolist()
            out: list[Chunk | None] = []
            for row in range(B):
                if finished[row]:
                    out.append(None)
                    continue
                reason = "stop" if is_eos[row] else None
                text = ""
                if trackers is not None:
                    text = "" if is_eos[row] else trackers[row].push(token_list[row])
                    if trackers[row].stopped:
                        reason = "stop"
                if reason is None and step == max_new - 1:
                    reason = "length"
                if reason is not None and trackers is not None:
                    text += trackers[row].flush()
                finished[row] = reason is not None
                out.append(Chunk(text=text, token_id=token_list[row], logprob=infos[row], finish_reason=reason))
            yield out
            if all(finished):
                return
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            if padded and key_mask is None:  # the compiled step reads key_mask instead
                mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            positions = positions[:, -1:] + 1
            if fast_step is not None:
                logits = fast_step(tokens, positions[:, 0], cache, mask.bool() if padded else None)
            elif key_mask is None:
                logits = model(tokens[:, None], attention_mask=mask if padded else None, cache=cache,
                               position_ids=positions).logits[:, -1]
            else:
                key_mask[:, cache.length] = True
                slot = torch.tensor([cache.length], device=device)
                logits = self._compiled_step(tokens[:, None], positions, slot, key_mask, cache)[:, -1]
                cache.length += 1

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> list[TokenLogprob]:
        # log-probabilities under the model itself, before temperature and filtering
        logp = logits.float().log_softmax(-1)
        chosen = logp.gather(-1, tokens[:, None]).squeeze(-1).tolist()
        top = logp.topk(top_n, dim=-1) if top_n else None
        out = []
        for row, token in enumerate(tokens.tolist()):
            alternatives = []
            if top is not None:
                alternatives = [(i, self._token_text(i), v) for i, v in
                                zip(top.indices[row].tolist(), top.values[row].tolist())]
            out.append(TokenLogprob(token_id=token, token=self._token_text(token), logprob=chosen[row],
                                    top=alternatives))
        return out

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self._need_tokenizer().encode(prompt)
        if isinstance(prompt, torch.Tensor):
            return prompt.flatten().tolist()
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise ConfigError(f"a prompt is a string or a list of token ids, not {type(prompt).__name__}")

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ConfigError("this needs a tokenizer: create the Generator with Generator(model, tokenizer)")
        return self.tokenizer
