"""Continuous batching: many requests share one model, one KV cache and one running batch.

The cache has `parallel` slots (rows), each holding one sequence at its own length. A request
takes one slot per choice (`n`); its prompt is prefilled into its first slot PREFILL_CHUNK tokens
at a time and copied to the others, then its sequences join the running batch, which advances
every sequence by one token per decode step. Between steps the loop admits waiting requests,
prefills prompt chunks worth one chunk of tokens at most (so a new prompt stalls running streams
for one chunk at most, and many short prompts start together) and drops finished or cancelled
sequences, whose slots go straight back to the pool.

The loop runs on one thread, the only one that touches the model (`call` hands it other work,
such as embeddings, to run between steps): torch's OpenMP threads spin-wait for the next parallel
region only while no more threads exist than cores, and a second thread using the model would
create a second team and halve the decode speed on a small machine. `serve` loads the model on
the thread that then runs the loop. Requests talk to the loop through `submit` and `cancel`, and it
answers through each request's `emit` callback (the HTTP layer hands it to its event loop). On a
quantized CPU model every decode step runs through the block kernels with each row at its own
slot and length (kernels.decode_layer's lengths/rows): rows are computed independently, so a
request's greedy tokens are the same bits whether it runs alone or beside others. Other models
run the model's static-shape decode step over all slots under a key mask.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from pocketlm.errors import ConfigError, PocketLMError
from pocketlm.generate import PREFILL_CHUNK, TextTracker, filter_logits
from pocketlm.packing import QuantizedDecodeStep, pack_linears

log = logging.getLogger(__name__)


class QueueFullError(PocketLMError):
    """Every slot is busy and the waiting queue is full: try again later (HTTP 429)."""


class ShuttingDownError(PocketLMError):
    """The server is draining and takes no new requests (HTTP 503)."""


@dataclass
class Sampling:
    """One request's generation settings, already validated (the HTTP layer checks each field)."""
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: off; k: the chosen token's and the k most likely


@dataclass
class Event:
    """What the scheduler tells a request, in order: `token` events (a choice's new text, token id
    and log-probabilities; `finish_reason` set on its last), then one `done` (usage) or `error`."""
    kind: str  # "token", "done" or "error"
    index: int = 0
    text: str = ""
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""


@dataclass(eq=False)
class Request:
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    cancelled: bool = False
    sequences: list["_Sequence"] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens in the first slot so far

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)


@dataclass(eq=False)
class _Sequence:
    request: Request
    index: int
    slot: int
    tracker: TextTracker
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    length: int = 0  # positions in the slot's cache
    counts: dict[int, int] = field(default_factory=dict)  # generated token → times, for the penalties
    finish_reason: str | None = None


class Scheduler:
    """Runs requests on `model` in one continuously batched loop (see the module docstring).

        scheduler = Scheduler(model, tokenizer, parallel=8, max_queue=64, context=2048)
        scheduler.start()
        scheduler.submit(Request(prompt_ids, Sampling(max_tokens=32), emit=print))
        scheduler.stop()
    """

    def __init__(self, model, tokenizer, *, parallel: int = 8, max_queue: int = 64, context: int = 2048):
        if parallel < 1 or max_queue < 0 or context < 2:
            raise ConfigError(f"parallel ({parallel}) must be ≥ 1, max_queue ({max_queue}) ≥ 0 and context "
                              f"({context}) ≥ 2")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.parallel, self.max_queue, self.context = parallel, max_queue, context
        self.eos = set(_as_list(model.config.eos_token_id))
        if getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos.add(tokenizer.eos_token_id)
        pack_linears(model)
        self.device = model.device
        # one extra position per slot: where rows outside a generic decode step write (never read)
        self.cache = model.new_cache(parallel, context + 1)
        with torch.inference_mode():  # the block kernels' step, where the model has one
            self.fast_step = QuantizedDecodeStep.for_model(model)
        self.free = list(range(parallel - 1, -1, -1))  # a stack: low slots first
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Request] = deque()
        self.running: list[_Sequence] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self.failed: str | None = None  # why the loop died, if it did (health then says so)
        self._threads = torch.get_num_threads()
        self._jobs: deque[tuple[Callable, tuple, Future]] = deque()

    # --- the requests' side -------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request (it starts as soon as it has slots); QueueFullError when the queue
        is full, ShuttingDownError while draining, ConfigError when it can never fit."""
        s = request.sampling
        if s.n > self.parallel:
            raise ConfigError(f"n={s.n} needs {s.n} slots; this server runs {self.parallel} (--parallel)")
        if len(request.prompt) + s.max_tokens > self.context:
            raise ConfigError(f"{len(request.prompt)} prompt tokens + {s.max_tokens} max_tokens exceed the "
                              f"context of {self.context} tokens")
        with self._lock:
            if self._draining or self._stopping:
                raise ShuttingDownError("the server is shutting down and takes no new requests")
            if len(self.waiting) >= self.max_queue and not self._fits_now(request):
                raise QueueFullError(f"{len(self.waiting)} requests are already waiting (--max-queue "
                                     f"{self.max_queue}); try again shortly")
            self.waiting.append(request)
            self._lock.notify()

    def call(self, fn: Callable, *args) -> Future:
        """Run fn(*args) on the loop's thread between two steps; its result or error arrives in
        the returned Future."""
        future: Future = Future()
        with self._lock:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down and takes no new requests")
            self._jobs.append((fn, args, future))
            self._lock.notify()
        return future

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away): its slots are freed before the next step."""
        with self._lock:
            request.cancelled = True
            self._lock.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        """Requests holding slots (prefilling or decoding)."""
        return len(self.prefilling) + len({id(s.request) for s in self.running})

    def _fits_now(self, request: Request) -> bool:
        return not self.waiting and request.sampling.n <= len(self.free)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop on a new thread."""
        self._thread = threading.Thread(target=self.run, name="pocketlm-scheduler", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Run the loop on this thread until stop() (best: the thread that loaded the model)."""
        self._thread = threading.current_thread()
        self._loop()

    def drain(self, timeout: float) -> bool:
        """Take no new requests, let running and queued ones finish for up to `timeout` seconds,
        then stop (cancelling what is left). True when everything finished in time."""
        with self._lock:
            self._draining = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not (self.waiting or self.prefilling or self.running):
                    break
            time.sleep(0.02)
        finished = not (self.waiting or self.prefilling or self.running)
        self.stop()
        return finished

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # --- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_num_threads(self._threads)  # OpenMP's team size is per thread: give this one the caller's
        try:
            while True:
                with self._lock:
                    while not self._stopping and not (self.waiting or self.prefilling or self.running or self._jobs):
                        self._lock.wait()
                    if self._stopping:
                        break
                    self._drop_cancelled()
                    self._admit()
                    jobs = list(self._jobs)
                    self._jobs.clear()
                for fn, args, future in jobs:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn(*args))
                        except Exception as e:  # the job's own failure (a bad input): its caller's to report
                            future.set_exception(e)
                with torch.inference_mode():
                    self._prefill()
                    if self.running:
                        self._decode_step()
        except Exception as e:  # a bug or an out-of-memory: fail every request rather than hang them
            log.exception("the scheduler stopped")
            self.failed = f"the server failed while generating: {type(e).__name__}: {e}"
            self._fail_all(self.failed)
            return
        self._fail_all("the server is shutting down")

    def _fail_all(self, message: str) -> None:
        with self._lock:
            requests = list(self.waiting) + list(self.prefilling) + list({id(s.request): s.request
                                                                         for s in self.running}.values())
            self.waiting.clear()
            self.prefilling.clear()
            self.running.clear()
            jobs = list(self._jobs)
            self._jobs.clear()
            self._stopping = True
        for _, _, future in jobs:
            future.cancel()
        for request in requests:
            request.emit(Event("error", message=message))

    def _drop_cancelled(self) -> None:
        for queue in (self.waiting, self.prefilling):
            for request in [r for r in queue if r.cancelled]:
                queue.remove(request)
                self._release(request)
        gone = [s for s in self.running if s.request.cancelled]
        for s in gone:
            self.running.remove(s)
            self.free.append(s.slot)

    def _release(self, request: Request) -> None:
        for s in request.sequences:
            self.free.append(s.slot)
        request.sequences.clear()

    def _admit(self) -> None:
        while self.waiting and self.waiting[0].sampling.n <= len(self.free):
            request = self.waiting.popleft()
            s = request.sampling
            seed = s.seed if s.seed is not None else random.getrandbits(63)
            request.sequences = [_Sequence(request, i, self.free.pop(), TextTracker(self.tokenizer, s.stop),
                                           _generator(seed, i, self.device)) for i in range(s.n)]
            self.prefilling.append(request)

    def _prefill(self) -> None:
        """Prompt chunks for this turn of the loop: the next one, then more (of this request or
        the next ones) while together they stay within one chunk's worth of tokens, so many
        short prompts start in one turn and a long one holds up the batch for one chunk at most.
        Chunk boundaries stay at multiples of PREFILL_CHUNK, as the Generator's."""
        used = 0
        while self.prefilling:
            request = self.prefilling[0]
            size = min(len(request.prompt), request.prefilled + PREFILL_CHUNK) - request.prefilled
            if used and used + size > PREFILL_CHUNK:
                return
            self._prefill_chunk(request)
            used += size

    def _prefill_chunk(self, request: Request) -> None:
        first = request.sequences[0]
        cache = self.cache.row(first.slot)
        cache.length = start = request.prefilled
        end = min(len(request.prompt), start + PREFILL_CHUNK)
        ids = torch.tensor([request.prompt[start:end]], device=self.device)
        positions = torch.arange(start, end, device=self.device)[None]
        logits = self.model(ids, cache=cache, position_ids=positions, logits_to_keep=1).logits[0, -1]
        request.prefilled = end
        if end < len(request.prompt):
            return
        with self._lock:
            self.prefilling.popleft()
            if request.cancelled:
                self._release(request)
                return
        for s in request.sequences:
            if s is not first:  # n > 1: every choice starts from the same prompt
                for buffers in (self.cache.keys, self.cache.values):
                    for b in buffers:
                        b[s.slot, :, :end] = b[first.slot, :, :end]
            s.length = end
        self._advance(request.sequences, logits.float()[None].expand(len(request.sequences), -1))
        with self._lock:
            self.running.extend(s for s in request.sequences if s.finish_reason is None)

    def _decode_step(self) -> None:
        batch = sorted(self.running, key=lambda s: s.slot)
        tokens = torch.tensor([s.tokens[-1] for s in batch], device=self.device)
        lengths = torch.tensor([s.length for s in batch], device=self.device)
        if self.fast_step is not None:
            rows = torch.tensor([s.slot for s in batch], device=self.device)
            logits = self.fast_step(tokens, lengths, self.cache, lengths=lengths, rows=rows)
        else:
            logits = self._generic_step(batch, tokens, lengths)
        for s in batch:
            s.length += 1
        self._advance(batch, logits.float())
        with self._lock:
            self.running = [s for s in self.running if s.finish_reason is None]

    def _generic_step(self, batch, tokens, lengths) -> torch.Tensor:
        """Every slot through the model's static decode step; rows not in the batch write to the
        spare last position and attend only to it."""
        P, S = self.parallel, self.context + 1
        slots = torch.tensor([s.slot for s in batch], device=self.device)
        ids = torch.zeros(P, dtype=torch.long, device=self.device)
        where = torch.full((P,), S - 1, dtype=torch.long, device=self.device)
        ids[slots], where[slots] = tokens, lengths
        positions = torch.where(where == S - 1, 0, where)
        key_mask = torch.arange(S, device=self.device)[None] <= where[:, None]
        key_mask[:, S - 1] = where == S - 1  # the spare position: only for rows outside the batch
        logits = self.model.decode_step(ids[:, None], positions[:, None], where[:, None], key_mask, self.cache)
        return logits[slots, -1]

    def _advance(self, batch: list[_Sequence], logits: torch.Tensor) -> None:
        """Pick each sequence's next token from its logits row and tell its request."""
        now = time.monotonic()
        best = logits.argmax(-1).tolist()  # one call for the rows whose scores need no shaping
        for s, row, plain_best in zip(batch, logits, best):
            request, cfg = s.request, s.request.sampling
            if request.cancelled:
                s.finish_reason = "cancelled"
                self._finish(s)
                continue
            shaped = self._shape_scores(s, row)
            if cfg.temperature == 0:
                token = plain_best if shaped is row else int(shaped.argmax())
            else:
                warped = filter_logits(shaped[None], cfg.temperature, None, cfg.top_p)
                token = sample(warped[0].softmax(-1), s.generator)
            logprob, top = None, []
            if cfg.logprobs is not None:
                logp = shaped.log_softmax(-1)
                logprob = float(logp[token])
                if cfg.logprobs:
                    values, ids = logp.topk(cfg.logprobs)
                    top = list(zip(ids.tolist(), values.tolist()))
            s.tokens.append(token)
            s.counts[token] = s.counts.get(token, 0) + 1
            if request.first_token_at is None:
                request.first_token_at = now
            reason = None
            if token in self.eos or token in cfg.stop_token_ids:
                reason, text = "stop", ""
            else:
                text = s.tracker.push(token)
                if s.tracker.stopped:
                    reason = "stop"
            if reason is None and (len(s.tokens) >= cfg.max_tokens or s.length >= self.context):
                reason = "length"
            if reason is not None:
                text += s.tracker.flush()
                s.finish_reason = reason
            request.emit(Event("token", index=s.index, text=text, token_id=token, logprob=logprob,
                               top_logprobs=top, finish_reason=reason))
            if reason is not None:
                self._finish(s)

    def _shape_scores(self, s: _Sequence, row: torch.Tensor) -> torch.Tensor:
        """OpenAI's logit_bias, presence and frequency penalties on one sequence's logits."""
        cfg = s.request.sampling
        if cfg.logit_bias:
            row = row.clone()
            ids = torch.tensor(list(cfg.logit_bias), device=row.device)
            row[ids] += torch.tensor(list(cfg.logit_bias.values()), device=row.device)
        if s.counts and (cfg.presence_penalty or cfg.frequency_penalty):
            row = row.clone()
            ids = torch.tensor(list(s.counts), device=row.device)
            counts = torch.tensor(list(s.counts.values()), dtype=row.dtype, device=row.device)
            row[ids] -= cfg.presence_penalty + cfg.frequency_penalty * counts
        return row

    def _finish(self, s: _Sequence) -> None:
        with self._lock:
            self.free.append(s.slot)
        request = s.request
        if not request.cancelled and all(q.finish_reason is not None for q in request.sequences):
            request.emit(Event("done", prompt_tokens=len(request.prompt),
                               completion_tokens=request.completion_tokens))


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _generator(seed: int, index: int, device) -> torch.Generator:
    """Choice `index`'s own random stream: a seeded request draws the same tokens whatever runs
    beside it and whichever slots its choices land in."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + index * 0x9E3779B97F4A7C15) % 2**64)
    return generator


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token drawn from probs (V,) by inverse transform: a uniform number placed in the
    cumulative distribution (in float64). One random draw and one pass over the vocabulary:
    ~0.1 ms where torch.multinomial takes ~1 ms for a 49k vocabulary."""
    cdf = probs.double().cumsum(0)
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=probs.device) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.shape[0] - 1)
