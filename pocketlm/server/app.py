"""The HTTP server: OpenAI's routes on FastAPI, every generation through one Scheduler.

    app = create_app(lambda: Service.load("smollm2-135m-instruct"), api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/chat/completions, /v1/completions, /v1/embeddings; GET /v1/models, /health
(503 while the model loads), /metrics (Prometheus text) and / (the chat page in static/).
Errors are OpenAI-shaped ({"error": {message, type, param, code}}): 400 for a bad field, 401 for
a wrong key, 404 for an unknown model, 413 for a body over the limit, 429 with Retry-After when
the queue is full, 503 while loading or shutting down.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hmac
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

from pocketlm.errors import ConfigError, PocketLMError
from pocketlm.server import protocol
from pocketlm.server.metrics import Metrics
from pocketlm.server.protocol import InvalidRequest, error_body
from pocketlm.server.scheduler import Event, QueueFullError, Request, Scheduler, ShuttingDownError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 2**20
STATIC = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.1  # how often a waiting non-streaming request checks its client is still there


@dataclass
class Embedder:
    """An encoder serving /v1/embeddings: a sentence encoder (pocketlm.encoder.SentenceEncoder, e.g.
    minilm-l6: its own pooling and normalisation, as sentence-transformers computes them) or a
    decoder model (see decoder_embedder). It runs on the scheduler's thread (Scheduler.call),
    between decode steps."""
    name: str
    encoder: Any

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.encoder.model.config.vocab_size

    @property
    def window(self) -> int:
        return self.encoder.max_seq_length

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        return self.encoder.encode_ids(inputs).tolist()


def decoder_embedder(name: str, model, tokenizer) -> Embedder:
    """A decoder model's embeddings: the mean of its final hidden states over the input, not
    normalised."""
    from pocketlm.encoder import DecoderEncoder

    return Embedder(name, DecoderEncoder(model, tokenizer, pooling="mean", normalize=False, name=name))


class Service:
    """What the routes serve: the chat model and its scheduler, an optional embedding model."""

    def __init__(self, name: str, model, tokenizer, *, parallel: int = 8, max_queue: int = 64,
                 context: int | None = None, embedder: Embedder | None = None):
        self.name, self.model, self.tokenizer = name, model, tokenizer
        window = model.config.max_position
        self.context = min(context or min(window, 4096), window)
        if context is not None and context > window:
            raise ConfigError(f"--ctx {context} is more than the model's context window of {window} tokens")
        self.scheduler = Scheduler(model, tokenizer, parallel=parallel, max_queue=max_queue, context=self.context)
        self.embedder = embedder or decoder_embedder(name, model, tokenizer)
        self.metrics = Metrics()
        self.created = int(time.time())

    @classmethod
    def load(cls, model: str, *, device=None, dtype=None, embedding_model: str | None = None, **options) -> "Service":
        from pocketlm.api import load_model_and_tokenizer

        loaded, tokenizer = load_model_and_tokenizer(model, device=device, dtype=dtype)
        embedder = None
        if embedding_model is not None:
            embedder = _embedder(embedding_model, device, dtype)
        return cls(_served_name(model), loaded, tokenizer, embedder=embedder, **options)

    @property
    def served(self) -> list[str]:
        return [self.name] + ([self.embedder.name] if self.embedder.name != self.name else [])


def _embedder(ref: str, device, dtype):
    """A sentence encoder (a sentence-transformers folder or an encoder registry name) or a decoder
    model, for /v1/embeddings."""
    from pocketlm import registry
    from pocketlm.api import load_model_and_tokenizer
    from pocketlm.encoder import SentenceEncoder, is_encoder_folder

    found = registry.resolve(ref)
    if is_encoder_folder(found):
        return Embedder(_served_name(ref), SentenceEncoder.from_pretrained(found, device=device))
    model, tokenizer = load_model_and_tokenizer(ref, device=device, dtype=dtype)
    return decoder_embedder(_served_name(ref), model, tokenizer)


def _served_name(ref: str) -> str:
    """A registry name as given; a path by its file or folder name."""
    path = Path(ref)
    return path.name if path.exists() else ref


# --- the app --------------------------------------------------------------------------------------

def create_app(service: Service | Callable[[], Service], *, api_key: str | None = None,
               max_body: int = MAX_BODY_BYTES):
    """The FastAPI app. `service` is ready, or a function that loads it (in the background, with
    /health answering 503 until it returns)."""
    state: dict[str, Any] = {"service": service if isinstance(service, Service) else None, "failed": None}

    def load_in_background():  # then run the scheduler on this thread, the one that loaded the model
        try:
            loaded = service()
        except (PocketLMError, OSError) as e:
            state["failed"] = str(e)
            log.error("pocketlm: error: %s", e)
            return
        state["service"] = loaded
        log.info("ready: serving %s", loaded.name)
        loaded.scheduler.run()

    @asynccontextmanager
    async def lifespan(app):
        state["relay"] = _Relay(asyncio.get_running_loop())
        if state["service"] is not None:
            state["service"].scheduler.start()
        else:
            threading.Thread(target=load_in_background, name="pocketlm-load", daemon=True).start()
        yield
        if state["service"] is not None:  # uvicorn has let open responses finish (or timed out)
            state["service"].scheduler.drain(timeout=0)

    app = FastAPI(title="pocketlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error(e: InvalidRequest, route: str) -> JSONResponse:
        svc = state["service"]
        if svc is not None:
            svc.metrics.request(route, e.status)
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def ready() -> Service:
        svc = state["service"]
        if svc is None:
            why = f"the model failed to load: {state['failed']}" if state["failed"] else "the model is loading"
            raise InvalidRequest(why, status=503, kind="server_error", code="model_not_ready")
        return svc

    def authorize(http: HTTPRequest) -> None:
        if api_key is None:
            return
        given = http.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise InvalidRequest("Incorrect API key provided: pass it as 'Authorization: Bearer KEY' (--api-key)",
                                 status=401, code="invalid_api_key")

    async def read_body(http: HTTPRequest) -> dict:
        length = http.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise InvalidRequest(f"the body is {int(length):,} bytes; this server takes at most {max_body:,}",
                                 status=413)
        raw = bytearray()
        async for chunk in http.stream():
            raw += chunk
            if len(raw) > max_body:
                raise InvalidRequest(f"the body is over this server's limit of {max_body:,} bytes", status=413)
        return protocol.parse_json(bytes(raw))

    def route(path: str, name: str, handler, method: str = "POST"):
        """An API route: the key checked, the model ready, a POST's body read as JSON, every
        refusal in OpenAI's error shape, and the outcome counted in /metrics."""
        async def endpoint(http: HTTPRequest):
            try:
                authorize(http)
                svc = ready()
                body = await read_body(http) if method == "POST" else {}
                response = await handler(http, svc, body)
            except InvalidRequest as e:
                return error(e, name)
            except QueueFullError as e:
                return error(InvalidRequest(str(e), status=429, kind="rate_limit_error", code="rate_limit_exceeded"),
                             name)
            except ShuttingDownError as e:
                return error(InvalidRequest(str(e), status=503, kind="server_error"), name)
            except PocketLMError as e:  # a request the model cannot take (too long, a bad token)
                return error(InvalidRequest(str(e)), name)
            svc.metrics.request(name, 200)
            return response
        app.add_api_route(path, endpoint, methods=[method], name=name)

    async def _models(http, svc: Service, body: dict):
        return {"object": "list", "data": [{"id": n, "object": "model", "created": svc.created, "owned_by": "pocketlm"}
                                           for n in svc.served]}

    async def _metrics(http, svc: Service, body: dict):
        return PlainTextResponse(svc.metrics.render(svc.scheduler.queue_depth, svc.scheduler.active),
                                 media_type="text/plain; version=0.0.4")

    route("/v1/chat/completions", "chat", lambda http, svc, body: _chat(http, svc, body))
    route("/v1/completions", "completions", lambda http, svc, body: _completions(http, svc, body))
    route("/v1/embeddings", "embeddings", lambda http, svc, body: _embeddings(svc, body))
    route("/v1/models", "models", _models, method="GET")
    route("/metrics", "metrics", _metrics, method="GET")

    @app.get("/health")
    async def health():
        svc = state["service"]
        if svc is None or svc.scheduler.failed:
            status = "failed" if state["failed"] or svc is not None else "loading"
            return JSONResponse({"status": status, "error": state["failed"] or (svc and svc.scheduler.failed)},
                                status_code=503)
        return {"status": "ok", "model": svc.name}

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)

    @app.get("/static/{name}")
    async def static(name: str):
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            return JSONResponse(error_body(f"no such file: {name}", code="not_found"), status_code=404)
        return FileResponse(path, headers=_PAGE_HEADERS)

    async def _chat(http, svc: Service, body: dict):
        from pocketlm.chat import ChatSession

        gen = protocol.generation(body, served=svc.served, vocab_size=svc.model.config.vocab_size, chat=True)
        messages = protocol.chat_messages(body)
        session = ChatSession(svc.tokenizer, svc.context, max_new_tokens=1)
        ids = session.encode(messages)
        protocol.fit_context(len(ids), gen.sampling, svc.context, gen.max_tokens_given, None)
        gen.sampling.stop = gen.sampling.stop + session.stop
        gen.sampling.stop_token_ids = session.stop_token_ids
        return await _generate(http, svc, gen, [("", ids, gen.sampling)], chat=True)

    async def _completions(http, svc: Service, body: dict):
        gen = protocol.generation(body, served=svc.served, vocab_size=svc.model.config.vocab_size, chat=False)
        echo = protocol._boolean(body, "echo")
        if echo and gen.sampling.logprobs is not None:
            raise InvalidRequest("echo with logprobs (log-probabilities of the prompt) is not supported", "echo")
        prompts = protocol.completion_prompts(body, svc.tokenizer, svc.model.config.vocab_size)
        if len(prompts) * gen.sampling.n > protocol.MAX_N:
            raise InvalidRequest(f"{len(prompts)} prompts × n={gen.sampling.n} is more than {protocol.MAX_N} "
                                 "choices", "n")
        planned = []
        for text, ids in prompts:  # each prompt its own settings: the default max_tokens depends on its length
            sampling = copy.deepcopy(gen.sampling)
            protocol.fit_context(len(ids), sampling, svc.context, gen.max_tokens_given,
                                 protocol.DEFAULT_COMPLETION_TOKENS)
            planned.append((text, ids, sampling))
        return await _generate(http, svc, gen, planned, chat=False, echo=echo)

    async def _generate(http, svc: Service, gen, prompts, *, chat: bool, echo: bool = False):
        relay = state["relay"]
        events: asyncio.Queue = asyncio.Queue()
        requests = []

        def sender(i):
            return lambda event: relay.post(events, (i, event))

        try:
            for i, (_, ids, sampling) in enumerate(prompts):
                request = Request(ids, sampling, sender(i))
                svc.scheduler.submit(request)
                requests.append(request)
        except (PocketLMError, InvalidRequest):
            for r in requests:
                svc.scheduler.cancel(r)
            raise
        shape = _Shape(svc, gen, prompts, chat=chat, echo=echo)
        if gen.stream:
            return StreamingResponse(_stream(svc, requests, events, shape), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pending = len(requests)
        try:
            while pending:
                try:
                    i, event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                if event.kind == "error":
                    raise InvalidRequest(event.message, status=500, kind="server_error")
                if event.kind == "done":
                    pending -= 1
                    shape.finished(requests[i])
                    continue
                shape.add(i, event)
        finally:
            for r in requests:
                svc.scheduler.cancel(r)
        return JSONResponse(shape.whole())

    async def _stream(svc: Service, requests, events, shape: "_Shape"):
        pending = len(requests)
        try:
            for chunk in shape.opening():
                yield _sse(chunk)
            while pending:
                i, event = await events.get()
                if event.kind == "error":
                    yield _sse(error_body(event.message, "server_error"))
                    break
                if event.kind == "done":
                    pending -= 1
                    shape.finished(requests[i])
                    continue
                chunk = shape.add(i, event)
                if chunk is not None:
                    yield _sse(chunk)
            else:
                if shape.gen.include_usage:
                    yield _sse(shape.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended): free the slots now
            for r in requests:
                svc.scheduler.cancel(r)

    async def _embeddings(svc: Service, body: dict):
        embedder = svc.embedder
        name = protocol.check_model(body, svc.served) if body.get("model") is not None else embedder.name
        if name != embedder.name:
            embedder = decoder_embedder(svc.name, svc.model, svc.tokenizer)
        inputs = protocol.embedding_inputs(body, embedder.tokenizer, embedder.vocab_size, embedder.window)
        vectors = await asyncio.wrap_future(svc.scheduler.call(embedder.embed, inputs))
        as_base64 = body.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": _base64_floats(v) if as_base64 else v} for i, v in enumerate(vectors)]
        tokens = sum(len(ids) for ids in inputs)
        svc.metrics.tokens(tokens, 0)
        return {"object": "list", "data": data, "model": embedder.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app


class _Relay:
    """Hands the scheduler thread's events to the event loop with one wake-up per batch of them
    (a decode step emits one per running sequence), not one per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.pending, self.lock, self.scheduled = loop, [], threading.Lock(), False

    def post(self, queue: asyncio.Queue, item) -> None:
        with self.lock:
            self.pending.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    def _deliver(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for queue, item in items:
            queue.put_nowait(item)


_PAGE_HEADERS = {  # the page loads nothing from elsewhere and runs only its own script
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def _sse(payload: dict) -> str:
    import json

    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _base64_floats(values: list[float]) -> str:
    return base64.b64encode(torch.tensor(values, dtype=torch.float32).numpy().astype("<f4").tobytes()).decode()


# --- response shapes ------------------------------------------------------------------------------

class _Shape:
    """Builds one request's OpenAI JSON: chunks while streaming, or the whole response."""

    def __init__(self, svc: Service, gen, prompts, *, chat: bool, echo: bool):
        self.svc, self.gen, self.prompts, self.chat, self.echo = svc, gen, prompts, chat, echo
        n = gen.sampling.n
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.choices = [{"text": prompts[i // n][0] if echo else "", "tokens": [], "reason": None}
                        for i in range(len(prompts) * n)]
        self.usage = {"prompt_tokens": sum(len(p[1]) for p in prompts), "completion_tokens": 0}

    def _index(self, i: int, event: Event) -> int:
        return i * self.gen.sampling.n + event.index

    def _base(self) -> dict:
        kind = ("chat.completion.chunk" if self.gen.stream else "chat.completion") if self.chat else "text_completion"
        base = {"id": self.id, "object": kind, "created": self.created, "model": self.gen.model}
        if self.gen.stream and self.gen.include_usage:
            base["usage"] = None
        return base

    def opening(self) -> list[dict]:
        """Streamed chat starts each choice with the assistant role; echo starts with the prompt."""
        if self.chat:
            return [{**self._base(), "choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}
                    for k in range(len(self.choices))]
        if self.echo:
            return [{**self._base(), "choices": [{"index": k, "text": c["text"], "logprobs": None,
                                                  "finish_reason": None}]} for k, c in enumerate(self.choices)]
        return []

    def add(self, i: int, event: Event) -> dict | None:
        k = self._index(i, event)
        choice = self.choices[k]
        choice["text"] += event.text
        choice["reason"] = event.finish_reason
        entry = None
        if self.gen.sampling.logprobs is not None and event.token_id is not None:
            entry = self._logprob(event, len(choice["text"]) - len(event.text))
            choice["tokens"].append(entry)
        if not self.gen.stream:
            return None
        logprobs = None if entry is None else self._logprobs_of([entry])
        if self.chat:
            delta = {"content": event.text} if event.text else {}
            return {**self._base(), "choices": [{"index": k, "delta": delta, "logprobs": logprobs,
                                                 "finish_reason": event.finish_reason}]}
        return {**self._base(), "choices": [{"index": k, "text": event.text, "logprobs": logprobs,
                                             "finish_reason": event.finish_reason}]}

    def finished(self, request: Request) -> None:
        completion = request.completion_tokens
        self.usage["completion_tokens"] += completion
        self.svc.metrics.tokens(len(request.prompt), completion)
        ttft = None if request.first_token_at is None else request.first_token_at - request.created
        rate = None
        if request.first_token_at is not None and completion > len(request.sequences):
            elapsed = time.monotonic() - request.first_token_at
            rate = (completion - len(request.sequences)) / elapsed if elapsed > 0 else None
        self.svc.metrics.timing(ttft, rate)

    def _usage(self) -> dict:
        u = self.usage
        return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}

    def usage_chunk(self) -> dict:
        return {**self._base(), "choices": [], "usage": self._usage()}

    def whole(self) -> dict:
        choices = []
        for k, c in enumerate(self.choices):
            logprobs = None if self.gen.sampling.logprobs is None else self._logprobs_of(c["tokens"])
            if self.chat:
                choices.append({"index": k, "message": {"role": "assistant", "content": c["text"]},
                                "logprobs": logprobs, "finish_reason": c["reason"]})
            else:
                choices.append({"index": k, "text": c["text"], "logprobs": logprobs, "finish_reason": c["reason"]})
        return {**self._base(), "choices": choices, "usage": self._usage()}

    def _logprob(self, event: Event, offset: int) -> dict:
        tok = self.svc.tokenizer
        top = [(_token_text(tok, t), lp, t) for t, lp in event.top_logprobs]
        return {"id": event.token_id, "token": _token_text(tok, event.token_id), "logprob": event.logprob,
                "top": top, "offset": offset}

    def _logprobs_of(self, entries: list[dict]) -> dict:
        tok = self.svc.tokenizer
        if self.chat:
            return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": _token_bytes(tok, e["id"]),
                                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": _token_bytes(tok, i)}
                                                  for t, lp, i in e["top"]]} for e in entries],
                    "refusal": None}
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t: lp for t, lp, _ in e["top"]} for e in entries],
                "text_offset": [e["offset"] for e in entries]}


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet: printable bytes stand for themselves, the others for 256 + k."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES = _byte_decoder()


def _token_bytes(tokenizer, token_id: int) -> list[int]:
    """The token's own bytes (a byte-level token may hold part of a UTF-8 character)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and piece and all(c in _BYTES for c in piece):
        return [_BYTES[c] for c in piece]
    return list(_token_text(tokenizer, token_id).encode("utf-8"))
