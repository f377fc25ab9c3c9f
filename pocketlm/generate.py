"""Text generation: prefill the prompt once, then decode one token at a time from a KV cache
sized to the request.

`Generator(model, tokenizer)` is the engine behind `model.generate`, the CLI and the server:

    gen = Generator(model, tokenizer)
    gen.generate("Once upon a time", max_new_tokens=50, temperature=0.7)   # -> Completion
    for delta in gen.stream("Once upon a time"): print(delta, end="")

Greedy, sampled or beam search. Argument semantics follow transformers (20 new tokens when no
length is set anywhere, `max_length` counting the prompt, the same logits processors in the same
order, the same beams), with deliberate differences: when `do_sample` is not given, a sampling
parameter (temperature, top_k, top_p, min_p) or several return sequences without beams mean the
caller wants samples, so pocketlm samples (transformers would silently decode greedily), and an
explicit `do_sample=False` is always greedy; rules that read the text so far (repetition penalty,
no-repeat n-grams, bad words) never count left padding as text; a length in the call replaces the
checkpoint's (transformers lets a stored max_new_tokens beat a max_length passed to the call).
Processors and samplers are pure functions of (logits, history, settings, torch.Generator).
Streaming never splits a UTF-8 character, holds back text that may be the start of a stop string,
and its deltas concatenate to exactly the final text.

The pieces, top to bottom: `GenerationConfig` (the settings, transformers' names, validation
and lengths); the logits processors (`process_logits`: penalties, n-grams, bad words, minimum
lengths) and samplers (`warp_logits`, `pick_tokens`); the results (`Completion`, `Chunk`,
`GenerateOutput`, `transition_scores`) and `TextTracker` (ids → safe text deltas);
`check_memory`, which refuses oversized requests before allocating; and the engine: a `Plan`
lays a request out in rows, `Forward` prefills them into a KV cache and steps them (through
packing.DecodeStep on CPU), and `Generator` runs greedy/sampled decoding (`_decode`) or beam
search (`_beam_search`) over it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pocketlm.errors import ConfigError, ContextLengthError
from pocketlm.model import Transformer
from pocketlm.packing import DecodeStep, QuantizedDecodeStep, pack_linears, unpack_linears

log = logging.getLogger(__name__)

DEFAULT_NEW_TOKENS = 20  # as transformers: with no length set anywhere, 20 new tokens (fewer at the window's end)
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p")
# transformers' sampling defaults, used when sampling and nothing else sets them (top_k=0: no top-k)
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50}
CACHE_ROUNDING = 64  # cache lengths are rounded up so similar requests reuse one shape
MAX_TOP_LOGPROBS = 20
# keys a transformers GenerationConfig carries that change nothing in pocketlm's output
FOREIGN_HARMLESS = {"transformers_version", "_from_model_config", "use_cache", "output_attentions",
                    "output_hidden_states", "decoder_start_token_id", "is_assistant"}


@dataclass
class GenerationConfig:
    """How to generate, with transformers' names and meanings (`model.generation_config` is one).
    `None` means "not set": the checkpoint's generation_config.json, then transformers' defaults,
    fill it in."""

    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens, as in transformers
    min_new_tokens: int | None = None  # EOS is ruled out until this many new tokens
    min_length: int | None = None  # the same, counting the (padded) prompt
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    bad_words_ids: list[list[int]] | None = None
    suppress_tokens: list[int] | None = None
    num_beams: int | None = None
    length_penalty: float | None = None  # beam scores are divided by (new tokens) ** length_penalty
    early_stopping: bool | str | None = None  # beam search: True, False or "never", as in transformers
    num_return_sequences: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    seed: int | None = None
    logprobs: int | None = None  # None: off; 0: the chosen token's; N: also the N most likely
    return_dict_in_generate: bool | None = None  # model.generate returns a GenerateOutput
    output_scores: bool | None = None
    output_logits: bool | None = None
    # generation_config.json keys pocketlm does not use, kept so that saving writes them back
    unused: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def settings(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "unused"]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        """From a generation_config.json dict (transformers' names); other keys are kept aside."""
        known = set(cls.settings())
        values = {k: v for k, v in data.items() if k in known and v is not None}
        if data.get("stop_strings"):  # transformers' name
            stop = data["stop_strings"]
            values["stop"] = [stop] if isinstance(stop, str) else list(stop)
        unused = {k: v for k, v in data.items() if k not in known and k != "stop_strings"}
        return cls(**values, unused=unused)

    @classmethod
    def of(cls, value) -> "GenerationConfig":
        """A copy of `value` as a GenerationConfig: None (all unset), a GenerationConfig, a dict
        as in generation_config.json, or transformers' GenerationConfig (read through its dict)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return copy.deepcopy(value)
        if isinstance(value, dict):
            return cls.from_dict(value)
        as_dict = getattr(value, "to_diff_dict", None) or getattr(value, "to_dict", None)
        if not callable(as_dict):
            raise ConfigError(f"a generation config is a GenerationConfig or a dict, not {type(value).__name__}")
        data = as_dict()
        config = cls.from_dict(data)
        ignored = sorted(k for k, v in config.unused.items() if v is not None and k not in FOREIGN_HARMLESS)
        if ignored:
            raise ConfigError(f"pocketlm does not support the generation settings {ignored}; "
                              f"it supports {cls.settings()}")
        return config

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "GenerationConfig":
        from pocketlm.checkpoint import read_generation_config

        return cls.from_dict(read_generation_config(folder))

    def to_dict(self) -> dict[str, Any]:
        """The settings that are set, under transformers' names (generation_config.json)."""
        out = {**self.unused, **self.explicit()}
        if "stop" in out:
            out["stop_strings"] = out.pop("stop")
        return out

    def explicit(self) -> dict[str, Any]:
        """The settings that differ from "not set", under pocketlm's names."""
        unset = GenerationConfig()
        return {k: copy.deepcopy(getattr(self, k)) for k in self.settings()
                if getattr(self, k) is not None and getattr(self, k) != getattr(unset, k)}

    def updated(self, **overrides) -> "GenerationConfig":
        """A copy with the caller's settings applied, reading their intent about sampling."""
        if "stop_strings" in overrides:  # transformers' name
            overrides["stop"] = overrides.pop("stop_strings")
        unknown = set(overrides) - set(self.settings())
        if unknown:
            raise ConfigError(f"unknown generation settings {sorted(unknown)}; known: {self.settings()}")
        if "max_new_tokens" in overrides and "max_length" not in overrides:
            overrides["max_length"] = None  # the caller's limit replaces the checkpoint's
        elif "max_length" in overrides and "max_new_tokens" not in overrides:
            overrides["max_new_tokens"] = None
        if isinstance(overrides.get("stop"), str):
            overrides["stop"] = [overrides["stop"]]
        elif overrides.get("stop") is None:
            overrides.pop("stop", None)
        if overrides.get("do_sample") is None:
            overrides.pop("do_sample", None)
            asked = [k for k in SAMPLING_KEYS if overrides.get(k) is not None]
            beams = overrides.get("num_beams", self.num_beams) or 1
            many = overrides.get("num_return_sequences")
            if isinstance(many, int) and many > 1 and beams == 1:  # (validate() judges other values)
                asked.append(f"num_return_sequences={many}")
            if asked:
                log.info("do_sample not given; sampling because %s was set (pass do_sample=False for greedy)",
                         ", ".join(asked))
                overrides["do_sample"] = True
        if overrides.get("num_return_sequences", 1) is None:
            overrides["num_return_sequences"] = 1
        return dataclasses.replace(self, **overrides)

    @property
    def sampling(self) -> bool:
        return bool(self.do_sample) and self.temperature != 0.0  # temperature → 0 is greedy

    @property
    def beams(self) -> int:
        return self.num_beams or 1

    @property
    def eos_ids(self) -> list[int]:
        eos = [] if self.eos_token_id is None else (
            [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id))
        return list(dict.fromkeys(eos + list(self.stop_token_ids)))

    @property
    def pad_id(self) -> int:
        """What fills a row after it ends: pad_token_id, else the first EOS id, as transformers."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return (self.eos_ids or [0])[0]

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

        def token_ids(name, value):
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
                raise ConfigError(f"{name} must be a list of token ids (non-negative integers), got {value!r}")

        number("temperature", 0.0, math.inf)
        number("top_p", 0.0, 1.0, low_open=True)
        number("min_p", 0.0, 1.0)
        number("repetition_penalty", 0.0, math.inf, low_open=True)
        number("length_penalty", -math.inf, math.inf)
        positive = ("max_new_tokens", "max_length", "num_return_sequences", "num_beams")
        for name in (*positive, "min_new_tokens", "min_length", "no_repeat_ngram_size", "top_k", "seed",
                     "logprobs"):
            value = getattr(self, name)
            smallest = 1 if name in positive else 0
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < smallest):
                raise ConfigError(f"{name} must be an integer ≥ {smallest}, got {value!r}")
        if self.seed is not None and self.seed >= 2**64:  # torch.Generator keeps seeds in 64 bits
            raise ConfigError(f"seed must be below 2**64, got {self.seed}")
        if self.logprobs is not None and self.logprobs > MAX_TOP_LOGPROBS:
            raise ConfigError(f"logprobs asks for {self.logprobs} alternatives; at most {MAX_TOP_LOGPROBS}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        for value in self.eos_ids + ([] if self.pad_token_id is None else [self.pad_token_id]):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"token ids must be non-negative integers, got {value!r}")
        if self.suppress_tokens is not None:
            token_ids("suppress_tokens", self.suppress_tokens)
        if self.bad_words_ids is not None:
            if not isinstance(self.bad_words_ids, (list, tuple)) or not all(self.bad_words_ids):
                raise ConfigError(f"bad_words_ids must be a list of non-empty lists of token ids, "
                                  f"got {self.bad_words_ids!r}")
            for word in self.bad_words_ids:
                token_ids("each entry of bad_words_ids", word)
        if not (self.early_stopping is None or isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ConfigError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.beams > 1:
            self._validate_beams()
        elif not self.sampling and self.num_return_sequences > 1:
            raise ConfigError(f"greedy decoding gives the same sequence every time; to get "
                              f"{self.num_return_sequences} different return sequences, sample (do_sample=True) "
                              f"or use beam search (num_beams ≥ {self.num_return_sequences})")

    def _validate_beams(self) -> None:
        if self.sampling:
            raise ConfigError(f"num_beams={self.num_beams} with sampling (do_sample=True, or a temperature, "
                              "top_k, top_p or min_p, which imply it) is not supported; pass do_sample=False "
                              "for beam search, or num_beams=1 to sample")
        if self.num_return_sequences > self.num_beams:
            raise ConfigError(f"num_return_sequences={self.num_return_sequences} is more than num_beams="
                              f"{self.num_beams}; beam search returns at most num_beams sequences per prompt")
        if self.logprobs is not None:
            raise ConfigError("logprobs are not available with beam search; use output_scores with "
                              "model.generate(..., return_dict_in_generate=True) and compute_transition_scores")

    def new_tokens_for(self, prompt_len: int, window: int) -> int:
        """How many tokens to generate after a (padded) prompt, checked against the context window.
        As in transformers: max_new_tokens wins; max_length counts the prompt; with neither set,
        DEFAULT_NEW_TOKENS new tokens, or fewer where the window ends first."""
        if self.max_new_tokens is not None:
            new = self.max_new_tokens
        elif self.max_length is not None:
            new = self.max_length - prompt_len
            if new <= 0:
                raise ContextLengthError(
                    f"the prompt has {prompt_len} tokens, already at or past max_length={self.max_length} "
                    "(a total length, prompt included); set max_new_tokens instead to count only new "
                    "tokens")
        else:
            new = min(DEFAULT_NEW_TOKENS, window - prompt_len)
            if new <= 0:
                raise ContextLengthError(f"the prompt has {prompt_len} tokens and fills the model's context "
                                         f"window of {window} tokens; shorten the prompt")
        if prompt_len + new > window:
            raise ContextLengthError(f"{prompt_len} prompt tokens + {new} requested new tokens exceed the "
                                     f"model's context window of {window} tokens; shorten the prompt or "
                                     "ask for fewer new tokens (max_new_tokens)")
        return new


# --- logits processors and samplers: pure functions of (logits, history, settings, generator) -------

def process_logits(scores: torch.Tensor, history: torch.Tensor, real: torch.Tensor,
                   config: GenerationConfig, prompt_len: int) -> torch.Tensor:
    """The rules that reshape next-token scores (B, V) before any sampling, in transformers'
    order: repetition penalty, no-repeat n-grams, bad words, minimum lengths, suppressed tokens.
    history (B, L) holds each row's tokens so far (the padded prompt first, prompt_len columns);
    real (B, L) is False at padding, which no rule counts as text."""
    B, V = scores.shape
    if config.repetition_penalty not in (None, 1.0):
        scores = apply_repetition_penalty(scores, token_set(history, real, V), config.repetition_penalty)
    banned = None
    if config.no_repeat_ngram_size:
        banned = banned_by_ngrams(history, real, config.no_repeat_ngram_size, V)
    if config.bad_words_ids:
        banned = banned_words(history, real, config.bad_words_ids, config.eos_ids, V, banned)
    if banned is not None:
        scores = scores.masked_fill(banned, -math.inf)
    new = history.shape[1] - prompt_len
    too_short = (config.min_new_tokens is not None and new < config.min_new_tokens) or \
                (config.min_length is not None and history.shape[1] < config.min_length)
    if too_short and config.eos_ids:
        scores = scores.index_fill(1, torch.tensor(config.eos_ids, device=scores.device), -math.inf)
    if config.suppress_tokens:
        scores = scores.index_fill(1, torch.tensor(config.suppress_tokens, device=scores.device), -math.inf)
    return scores


def token_set(tokens: torch.Tensor, real: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which tokens occur among each row's real tokens. Padding is sent to an extra
    column that is then dropped, so it neither counts nor races a real occurrence of its id."""
    index = tokens.masked_fill(~real, vocab_size)
    seen = torch.zeros(tokens.shape[0], vocab_size + 1, dtype=torch.bool, device=tokens.device)
    return seen.scatter_(1, index, True)[:, :vocab_size]


def banned_by_ngrams(history: torch.Tensor, real: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: the tokens that would repeat an n-gram already in the row, i.e. every token
    that followed the row's last n - 1 tokens somewhere before."""
    B, L = history.shape
    if L < n:
        return torch.zeros(B, vocab_size, dtype=torch.bool, device=history.device)
    grams = history.unfold(1, n, 1)  # (B, L - n + 1, n), every n-gram of the row
    whole = real.unfold(1, n, 1).all(-1)  # n-grams that touch padding do not count
    tail = history[:, L - n + 1:]  # (B, n - 1), the prefix the next token would complete
    hit = whole & (grams[:, :, :-1] == tail[:, None]).all(-1) & real[:, L - n + 1:].all(-1, keepdim=True)
    return token_set(grams[:, :, -1], hit, vocab_size)


def banned_words(history: torch.Tensor, real: torch.Tensor, words: list[list[int]], eos: list[int],
                 vocab_size: int, banned: torch.Tensor | None) -> torch.Tensor:
    """Add to `banned` (B, V) the last token of every bad word whose other tokens end the row.
    A one-token bad word that is an EOS id is ignored, as transformers does (it would make
    ending impossible)."""
    if banned is None:
        banned = torch.zeros(history.shape[0], vocab_size, dtype=torch.bool, device=history.device)
    for word in words:
        *prefix, last = word
        if not prefix:
            if last not in eos:
                banned[:, last] = True
            continue
        if len(prefix) > history.shape[1]:
            continue
        ends = history[:, -len(prefix):] == torch.tensor(prefix, device=history.device)
        banned[:, last] |= (ends & real[:, -len(prefix):]).all(-1)
    return banned



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


def warp_logits(scores: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """When sampling: temperature, top-k, top-p and min-p (transformers' defaults for the unset
    ones). Greedy decoding leaves the scores as they are."""
    if not config.sampling:
        return scores
    temperature = SAMPLING_DEFAULTS["temperature"] if config.temperature is None else config.temperature
    top_k = SAMPLING_DEFAULTS["top_k"] if config.top_k is None else config.top_k
    return filter_logits(scores, temperature, top_k, config.top_p, config.min_p)


def pick_tokens(scores: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The next token (B,) from processed and warped scores (B, V): the best, or a sample."""
    if not config.sampling:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


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


@dataclass
class GenerateOutput:
    """What `model.generate(..., return_dict_in_generate=True)` returns, as in transformers:
    `sequences` (prompt + new tokens), and per step `scores` (the processed scores the choice was
    made from) and `logits` (the model's raw ones), each a tuple of (rows, V) tensors, when
    output_scores / output_logits ask for them. Beam search adds `sequences_scores` (the final,
    length-normalised beam scores) and `beam_indices` (per new token, the row of `scores` it was
    chosen from; -1 past a sequence's end)."""
    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    sequences_scores: torch.Tensor | None = None
    beam_indices: torch.Tensor | None = None

    def __getitem__(self, key: str | int):
        """out["sequences"], or out[0] over the fields that are set, as transformers' outputs."""
        if isinstance(key, str):
            return getattr(self, key)
        return tuple(v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None)[key]


def transition_scores(sequences: torch.Tensor, scores: Sequence[torch.Tensor],
                      beam_indices: torch.Tensor | None = None, normalize_logits: bool = False) -> torch.Tensor:
    """(rows, steps): the score each generated token had when it was chosen, read from a
    GenerateOutput's `scores` (log-softmaxed first with normalize_logits) along `beam_indices`
    for beam search; 0 where a beam sequence had already ended."""
    if not scores:
        raise ConfigError("no scores to read: generate with return_dict_in_generate=True, output_scores=True")
    stacked = torch.stack(tuple(scores))  # (steps, rows_scored, V)
    if normalize_logits:
        stacked = stacked.float().log_softmax(-1)
    if beam_indices is None:  # one row per sequence, each step read from the sequence's own row
        beam_indices = torch.arange(stacked.shape[1])[:, None].expand(-1, len(scores))
    # generate returns the ids on the prompt's device, the scores on the model's
    sequences, beam_indices = sequences.to(stacked.device), beam_indices.to(stacked.device)
    ended = beam_indices < 0
    steps = int((~ended).sum(-1).max())
    rows = beam_indices[:, :steps].clamp(min=0)
    tokens = sequences[:, sequences.shape[1] - steps:]
    picked = stacked[torch.arange(steps, device=stacked.device)[None], rows, tokens]
    return picked.masked_fill(ended[:, :steps], 0.0)


class TextStreamer:
    """Prints what `model.generate(..., streamer=TextStreamer(tokenizer))` decides as it decides
    it, as transformers' TextStreamer does: generate hands it the prompt first (skipped with
    skip_prompt=True), then each step's new token. Text is printed as soon as it is whole (never
    half a UTF-8 character); subclass and override on_finalized_text to send it elsewhere.
    decode_kwargs (e.g. skip_special_tokens=True) go to tokenizer.decode."""

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs):
        self.tokenizer, self.skip_prompt, self.decode_kwargs = tokenizer, skip_prompt, decode_kwargs
        self.token_cache: list[int] = []
        self.printed = 0
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise ConfigError("TextStreamer follows one sequence; generate a batch of one, or stream with "
                              "Generator.stream")
        prompt, self.next_tokens_are_prompt = self.next_tokens_are_prompt, False
        if prompt and self.skip_prompt:
            return
        self.token_cache.extend(value.flatten().tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        whole = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence decodes to U+FFFD for now
        if whole > self.printed:
            self.on_finalized_text(text[self.printed:whole])
            self.printed = whole

    def end(self) -> None:
        """The rest of the text (at most a held-back broken character), and a newline."""
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs) if self.token_cache else ""
        rest = text[self.printed:]
        self.token_cache, self.printed, self.next_tokens_are_prompt = [], 0, True
        self.on_finalized_text(rest, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else None)


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


# --- memory ----------------------------------------------------------------------------------------

def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`, or None where that cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: MemAvailable counts the page cache the kernel would hand out
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(model: Transformer, prompts: int, per_prompt: int, length: int, config: GenerationConfig) -> None:
    """Refuse, before allocating anything, a request whose KV cache and per-step logits would
    take more than half of the memory available on the model's device: the cache holds
    rows × n_layer × 2 (keys, values) × n_kv_head × head_dim × length numbers."""
    c = model.config
    rows = prompts * per_prompt
    per_row = (c.n_layer * 2 * c.n_kv_head * c.head_dim * length * model.dtype.itemsize
               + 3 * c.vocab_size * 4)  # a step's float32 logits and their processed copies
    free = available_memory(model.device)
    if free is None or rows * per_row <= free // 2:
        return
    knob = "num_beams" if config.beams > 1 else "num_return_sequences"
    fix = "fewer beams (num_beams)" if config.beams > 1 else \
        "fewer sequences (num_return_sequences)"
    raise ConfigError(f"{prompts} prompt(s) × {per_prompt} ({knob}) = {rows:,} sequences of up to {length} tokens "
                      f"need {rows * per_row / 2**30:,.1f} GiB for the KV cache and logits, more than half of the "
                      f"{free / 2**30:,.1f} GiB available on {model.device}; ask for {fix}, fewer prompts at "
                      "once, or fewer new tokens")


# --- the engine ------------------------------------------------------------------------------------

PREFILL_CHUNK = 256  # prompt positions per forward call while prefilling


@dataclass
class Plan:
    """One request laid out for the model: every row's prompt tokens (each prompt repeated once
    per return sequence or beam, the copies adjacent), the longest prompt (the others are
    left-padded to it), how many tokens to generate, and the KV cache length that holds them."""
    rows: list[list[int]]
    longest: int
    max_new: int
    cache_len: int


class Forward:
    """The model over one plan's rows: the prompts prefilled into a KV cache, then one token per
    row per step (through the packed or the compiled decode step when there is one). `history`
    keeps every row's tokens for the logits processors; beam search reorders the rows."""

    def __init__(self, model: Transformer, plan: Plan, fill: int, compiled_step=None):
        device, B, T = model.device, len(plan.rows), plan.longest
        self.model, self.compiled_step = model, compiled_step
        self.history = torch.full((B, T + plan.max_new), fill, dtype=torch.long, device=device)
        self.real = torch.ones(B, T + plan.max_new, dtype=torch.bool, device=device)
        self.history[:, :T], self.real[:, :T] = 0, False
        for row, p in enumerate(plan.rows):  # left padding keeps every row's last token at the end
            self.history[row, T - len(p):T] = torch.tensor(p)
            self.real[row, T - len(p):T] = True
        self.length = T
        self.mask = self.real[:, :T].long()
        self.padded = bool((self.mask == 0).any())
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = model.new_cache(B, plan.cache_len)
        # a long prompt goes in PREFILL_CHUNK positions at a time: its activations (and the
        # attention scores of each chunk) stay small, so the memory it takes does not grow with it
        for start in range(0, T, PREFILL_CHUNK):
            end = min(T, start + PREFILL_CHUNK)
            out = model(self.history[:, start:end], attention_mask=self.mask[:, :end] if self.padded else None,
                        cache=self.cache, position_ids=self.positions[:, start:end], logits_to_keep=1)
        self.logits = out.logits[:, -1]
        self.fast_step = None
        if compiled_step is None:
            self.fast_step = QuantizedDecodeStep.for_model(model) or DecodeStep.for_model(model)
        self.key_mask = None
        if compiled_step is not None:  # static shapes: the whole cache, read under this mask
            self.key_mask = torch.zeros(B, plan.cache_len, dtype=torch.bool, device=device)
            self.key_mask[:, :T] = self.mask.bool()

    def seen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, real) so far, each (B, length)."""
        return self.history[:, :self.length], self.real[:, :self.length]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token (B,) to every row; return the logits (B, V) that follow it."""
        model, cache = self.model, self.cache
        self.history[:, self.length] = tokens
        self.length += 1
        if self.padded and self.key_mask is None:  # the compiled step reads key_mask instead
            self.mask = torch.cat((self.mask, torch.ones_like(self.mask[:, :1])), dim=1)
        self.positions = self.positions[:, -1:] + 1
        if self.fast_step is not None:
            return self.fast_step(tokens, self.positions[:, 0], cache, self.mask.bool() if self.padded else None)
        if self.key_mask is None:
            return model(tokens[:, None], attention_mask=self.mask if self.padded else None, cache=cache,
                         position_ids=self.positions).logits[:, -1]
        self.key_mask[:, cache.length] = True
        slot = torch.tensor([cache.length], device=tokens.device)
        logits = self.compiled_step(tokens[:, None], self.positions, slot, self.key_mask, cache)[:, -1]
        cache.length += 1
        return logits

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i continues from row rows[i] (beam search). Only rows of one prompt trade places,
        and those share their padding, so the masks and positions stay as they are."""
        n = self.cache.length
        for buffer in (*self.cache.keys, *self.cache.values):  # (B, K, S_max, D)
            buffer[:, :, :n] = buffer[:, :, :n].index_select(0, rows)
        self.history[:, :self.length] = self.history[:, :self.length].index_select(0, rows)


class Generator:
    """Prefill + decode with a pre-allocated KV cache, for one prompt or a left-padded batch:
    greedy, sampled or beam search."""

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
        if config is None:  # a copy: the model's generation_config stays as it is
            config = GenerationConfig.of(getattr(model, "generation_config", None))
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
        num_return_sequences completions of each prompt adjacent). Prompts are text or token ids.
        With num_beams > 1 the completions are the best beams, best first."""
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()  # (T,) one prompt, (B, T) a batch
        single = isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))
        prompts = [prompt] if single else list(prompt)
        cfg = (config or self.config).updated(**overrides)
        ids = [self._encode(p) for p in prompts]
        plan = self._plan(ids, cfg)
        n = cfg.num_return_sequences
        results = self._beam_completions(plan, cfg) if cfg.beams > 1 else self._sampled_completions(plan, cfg)
        for row, completion in enumerate(results):
            completion.prompt_tokens = len(ids[row // n])
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
        if cfg.beams > 1:
            raise ConfigError("beam search settles its text only at the end, so it cannot stream; use "
                              "generate() with num_beams, or num_beams=1 to stream")
        plan = self._plan([self._encode(prompt)], cfg)
        tracker = TextTracker(self._need_tokenizer(), cfg.stop)
        for step in self._decode(plan, cfg, [tracker]):
            yield step[0]

    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     config: GenerationConfig | None = None,
                     on_tokens: Callable[[torch.Tensor], None] | None = None,
                     **overrides) -> torch.Tensor | GenerateOutput:
        """transformers-style: (B, T) ids (left-padded with a mask for uneven prompts) →
        (B * num_return_sequences, T + new), rows that stop early padded with pad_token_id; a
        GenerateOutput with return_dict_in_generate."""
        cfg = (config or self.config).updated(**overrides)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2) \
                or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            got = f"shape {tuple(input_ids.shape)}, {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) \
                else type(input_ids).__name__
            raise ConfigError(f"input_ids must be a (batch, length) tensor of integer token ids, e.g. "
                              f"tokenizer(text, return_tensors='pt').input_ids; got {got}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if attention_mask is None:
            rows = [r.tolist() for r in input_ids]
        else:
            if attention_mask.shape != input_ids.shape:
                raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                                  f"has {tuple(input_ids.shape)}")
            rows = [r[m.bool()].tolist() for r, m in zip(input_ids, attention_mask)]
        plan = self._plan(rows, cfg)
        if cfg.beams > 1:
            if on_tokens is not None:
                raise ConfigError("a streamer cannot follow beam search (the best beam is known only at the "
                                  "end); drop the streamer or use num_beams=1")
            if cfg.stop:
                raise ConfigError("stop strings do not steer beam search in model.generate; end beams with "
                                  "eos_token_id, or use Generator.generate, which cuts the finished text")
            out = self._beam_search(plan, cfg)
        else:
            out = self._sampled_ids(plan, cfg, on_tokens)
        prompt = input_ids.repeat_interleave(cfg.num_return_sequences, dim=0)
        out.sequences = torch.cat((prompt, out.sequences.to(prompt.device, prompt.dtype)), dim=1)
        if not cfg.output_scores:
            out.scores = out.sequences_scores = None
        if not cfg.output_logits:
            out.logits = None
        return out if cfg.return_dict_in_generate else out.sequences

    # --- planning and the decode loops ------------------------------------------------------------

    def _plan(self, prompts: list[list[int]], cfg: GenerationConfig) -> Plan:
        """Check the settings against the model, size the request, and refuse what cannot fit."""
        cfg.validate()
        config = self.model.config
        if not prompts:
            raise ConfigError("no prompts to complete: the batch is empty")
        if any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt needs at least one token (with attention_mask, at least one 1 per row)")
        listed = [*(cfg.suppress_tokens or []), *(t for word in cfg.bad_words_ids or [] for t in word)]
        if any(t >= config.vocab_size for t in listed):
            raise ConfigError(f"suppress_tokens / bad_words_ids name token ids beyond the model's vocabulary "
                              f"of {config.vocab_size}")
        per_prompt = cfg.num_beams if cfg.beams > 1 else cfg.num_return_sequences
        longest = max(len(p) for p in prompts)
        max_new = cfg.new_tokens_for(longest, config.max_position)  # max_length counts padding
        cache_len = -(-(longest + max_new) // CACHE_ROUNDING) * CACHE_ROUNDING
        check_memory(self.model, len(prompts), per_prompt, cache_len, cfg)
        return Plan([p for p in prompts for _ in range(per_prompt)], longest, max_new, cache_len)

    def _sampled_completions(self, plan: Plan, cfg: GenerationConfig) -> list[Completion]:
        trackers = [TextTracker(self._need_tokenizer(), cfg.stop) for _ in plan.rows]
        logprobs: list[list[TokenLogprob]] = [[] for _ in trackers]
        reasons: list[str | None] = [None] * len(trackers)
        for step in self._decode(plan, cfg, trackers):
            for row, chunk in enumerate(step):
                if chunk is not None:
                    if chunk.logprob is not None:
                        logprobs[row].append(chunk.logprob)
                    reasons[row] = chunk.finish_reason or reasons[row]
        return [Completion(text=tracker.emitted, token_ids=tracker.ids, finish_reason=reasons[row] or "length",
                           prompt_tokens=0, logprobs=logprobs[row] if cfg.logprobs is not None else None)
                for row, tracker in enumerate(trackers)]

    def _beam_completions(self, plan: Plan, cfg: GenerationConfig) -> list[Completion]:
        out = self._beam_search(plan, cfg)
        eos = set(cfg.eos_ids)
        results = []
        for row, chosen_from in enumerate(out.beam_indices):
            new = out.sequences[row, :int((chosen_from >= 0).sum())].tolist()
            ended = bool(new) and new[-1] in eos
            tracker = TextTracker(self._need_tokenizer(), cfg.stop)  # stop strings cut the finished text
            for token in new[:-1] if ended else new:
                tracker.push(token)
                if tracker.stopped:
                    break
            tracker.flush()
            results.append(Completion(text=tracker.emitted, token_ids=tracker.ids, prompt_tokens=0,
                                      finish_reason="stop" if ended or tracker.stopped else "length"))
        return results

    def _sampled_ids(self, plan: Plan, cfg: GenerationConfig,
                     on_tokens: Callable[[torch.Tensor], None] | None) -> GenerateOutput:
        """Greedy or sampled decoding for generate_ids: `sequences` holds the new tokens only."""
        trackers = [TextTracker(self._need_tokenizer(), cfg.stop) for _ in plan.rows] if cfg.stop else None
        record: tuple[list, list] | None = ([], []) if cfg.return_dict_in_generate else None
        new: list[list[int]] = [[] for _ in plan.rows]
        for step in self._decode(plan, cfg, trackers, record):
            tokens = [cfg.pad_id if chunk is None else chunk.token_id for chunk in step]
            for row, token in enumerate(tokens):
                new[row].append(token)
            if on_tokens is not None:
                on_tokens(torch.tensor(tokens))
        return GenerateOutput(torch.tensor(new, dtype=torch.long),
                              scores=tuple(record[0]) if record else None, logits=tuple(record[1]) if record else None)

    @torch.inference_mode()
    def _decode(self, plan: Plan, cfg: GenerationConfig, trackers: list[TextTracker] | None,
                record: tuple[list, list] | None = None) -> Iterator[list[Chunk | None]]:
        """Greedy or sampled decoding. Yield, per step, one Chunk per row (None for rows that
        finished earlier). With trackers, chunk texts are the safe text deltas, the held-back rest
        included in a row's last chunk. `record` (scores, logits) lists receive each step's
        processed scores and raw logits."""
        model, device, B = self.model, self.model.device, len(plan.rows)
        forward = Forward(model, plan, cfg.pad_id, self._compiled_step)
        generator = None  # without a seed, sample from torch's global RNG (torch.manual_seed applies)
        if cfg.sampling and cfg.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(cfg.seed)
        eos = torch.tensor(cfg.eos_ids, dtype=torch.long, device=device)
        feed_pad = cfg.pad_id < model.config.vocab_size
        finished = [False] * B
        logits = forward.logits
        for step in range(plan.max_new):
            logits = logits.float()
            processed = process_logits(logits, *forward.seen(), cfg, plan.longest)
            scores = warp_logits(processed, cfg)
            tokens = pick_tokens(scores, cfg, generator)
            if record is not None:
                record[0].append(scores)
                record[1].append(logits)
            infos = self._logprobs(processed, tokens, cfg.logprobs) if cfg.logprobs is not None else [None] * B
            if feed_pad and any(finished):  # as transformers: an ended row runs on padding
                tokens = tokens.masked_fill(torch.tensor(finished, device=device), cfg.pad_id)
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
                if reason is None and step == plan.max_new - 1:
                    reason = "length"
                if reason is not None and trackers is not None:
                    text += trackers[row].flush()
                finished[row] = reason is not None
                out.append(Chunk(text=text, token_id=token_list[row], logprob=infos[row], finish_reason=reason))
            yield out
            if all(finished):
                return
            logits = forward.step(tokens)

    @torch.inference_mode()
    def _beam_search(self, plan: Plan, cfg: GenerationConfig) -> GenerateOutput:
        """Beam search, deciding as transformers does. Per prompt it keeps the num_beams best
        running sequences by summed log-probability (of the processed scores), and the num_beams
        best finished ones by that sum / (new tokens ** length_penalty). Each step ranks the
        continuations of every running beam together and takes the best few more than num_beams,
        so that num_beams of them go on even when some end (EOS, or the last step). A finished
        one enters only from the top num_beams. Search stops when the finished set cannot
        improve: early_stopping=True, once it holds num_beams; False, once no running beam
        could beat its worst at the current length; "never", the same at the longest length.
        `sequences` holds the new tokens only, padded after each sequence's end."""
        model, device = self.model, self.model.device
        nb, V, T, steps = cfg.num_beams, model.config.vocab_size, plan.longest, plan.max_new
        B = len(plan.rows) // nb
        lp = 1.0 if cfg.length_penalty is None else cfg.length_penalty
        early = bool(cfg.early_stopping) if cfg.early_stopping != "never" else "never"
        forward = Forward(model, plan, cfg.pad_id, self._compiled_step)
        eos = torch.tensor(cfg.eos_ids, dtype=torch.long, device=device)
        K = max(2, 1 + len(cfg.eos_ids)) * nb  # candidates per prompt and step
        top_nb = torch.arange(K, device=device) < nb
        offsets = torch.arange(B, device=device)[:, None] * nb  # the row of each prompt's first beam
        running = torch.zeros(B, nb, device=device)
        running[:, 1:] = -1e9  # the beams start as copies of the prompt: expand only the first
        running_from = torch.full((B, nb, steps), -1, dtype=torch.long, device=device)  # row per new token
        done_tokens = torch.full((B, nb, T + steps), cfg.pad_id, dtype=torch.long, device=device)
        done_scores = torch.full((B, nb), -1e9, device=device)
        done_from = running_from.clone()
        done = torch.zeros(B, nb, dtype=torch.bool, device=device)
        improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
        all_scores, all_logits = [], []
        logits = forward.logits
        for step in range(steps):
            logits = logits.float()
            logp = process_logits(logits.log_softmax(-1), *forward.seen(), cfg, T)
            all_scores.append(logp)
            all_logits.append(logits)
            total = (logp.view(B, nb, V) + running[..., None]).view(B, nb * V)
            cand_scores, cand = total.topk(K)  # (B, K), best first
            beam, token = cand // V, cand % V

            def follow(x: torch.Tensor) -> torch.Tensor:  # (B, nb, ...) per candidate's beam
                return x.gather(1, beam.view(B, K, 1).expand(-1, -1, x.shape[-1])).clone()

            cand_tokens = follow(forward.history.view(B, nb, -1))
            cand_tokens[:, :, T + step] = token
            cand_from = follow(running_from)
            cand_from[:, :, step] = beam + offsets
            ends = torch.isin(token, eos) | (step == steps - 1)

            # the finished set: merge in candidates of the top num_beams that end here
            ending = ends & top_nb
            final = cand_scores / ((step + 1) ** lp)
            final = final + (done.all(-1, keepdim=True) & (early is True)).float() * -1e9  # full, and done
            final = final + (~improvable).float() * -1e9
            final = final + (~ending).float() * -1e9
            keep = torch.cat((done_scores, final), 1).topk(nb).indices
            done_scores = torch.cat((done_scores, final), 1).gather(1, keep)
            done_tokens = _take(torch.cat((done_tokens, cand_tokens), 1), keep)
            done_from = _take(torch.cat((done_from, cand_from), 1), keep)
            done = torch.cat((done, ending), 1).gather(1, keep)

            # the running beams: the best num_beams candidates that do not end
            alive = cand_scores + ends.float() * -1e9
            keep = alive.topk(nb).indices
            running = alive.gather(1, keep)
            running_from = _take(cand_from, keep)

            longest_new = steps if early == "never" and lp > 0 else step + 1
            best = running[:, :1] / (longest_new ** lp)
            worst = torch.where(done, done_scores.min(-1, keepdim=True).values, -1e9)
            improvable = improvable & (best > worst).any(-1, keepdim=True)
            if step == steps - 1 or bool(ends.all()) or not bool(improvable.any()) \
                    or (early is True and bool(done.all())):
                break
            forward.reorder((beam.gather(1, keep) + offsets).flatten())
            logits = forward.step(token.gather(1, keep).flatten())

        n = cfg.num_return_sequences
        chosen_from = done_from[:, :n].flatten(0, 1)
        length = int((chosen_from >= 0).sum(-1).max())
        return GenerateOutput(sequences=done_tokens[:, :n, T:T + length].flatten(0, 1),
                              scores=tuple(all_scores), logits=tuple(all_logits),
                              sequences_scores=done_scores[:, :n].flatten(), beam_indices=chosen_from[:, :length])

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
        if isinstance(prompt, torch.Tensor) and prompt.dim() == 1:
            prompt = prompt.tolist()
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise ConfigError(f"a prompt is a string or a list of token ids, got {str(prompt)[:60]}")

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ConfigError("this needs a tokenizer: create the Generator with Generator(model, tokenizer), "
                              "or pass model.generate(..., tokenizer=tokenizer) for stop_strings")
        return self.tokenizer


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, L) → (B, k, L): the rows `index` (B, k) names, per prompt."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
