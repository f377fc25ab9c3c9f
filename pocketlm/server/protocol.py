"""OpenAI's request and response shapes: each request field validated (a bad one is an
InvalidRequest naming it, answered 400 in OpenAI's error shape), and the JSON the routes return.

Nothing here imports the web framework, so the rules can be read and tested on their own."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from pocketlm.server.scheduler import Sampling

MAX_N = 16
MAX_STOP = 32
MAX_LOGIT_BIAS = 100.0
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_PROMPTS = 16  # prompts in one /v1/completions request
MAX_EMBEDDING_INPUTS = 256
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI
CHAT_ROLES = ("system", "developer", "user", "assistant")
REFUSED = {"tools": "tool calls", "functions": "function calls", "tool_choice": "tool calls",
           "function_call": "function calls", "audio": "audio output", "prediction": "predicted outputs",
           "chat_template": "chat templates from requests (the server uses the model's own)"}


class InvalidRequest(Exception):
    """A request pocketlm cannot serve as sent: HTTP `status` with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; NaN and Infinity (which Python's json accepts) are refused."""
    def no_constants(name):
        raise InvalidRequest(f"the body holds {name}, which is not a JSON number; send finite numbers")

    try:
        body = json.loads(raw, parse_constant=no_constants)
    except InvalidRequest:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"the body must be a JSON object, got {type(body).__name__}")
    return body


# --- field checks ---------------------------------------------------------------------------------

def _number(body, name, low, high, default, *, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high or (low_open and value == low):
        bound = f"{'(' if low_open else '['}{low}, {high}]"
        raise InvalidRequest(f"{name} must be a number in {bound}, got {value!r}", name)
    return float(value)


def _integer(body, name, low, high, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}, got {value!r}", name)
    return value


def _boolean(body, name, default=False):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false, got {value!r}", name)
    return value


def _stop(body) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequest("stop must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP:
        raise InvalidRequest(f"stop holds {len(stop)} strings; at most {MAX_STOP}", "stop")
    return stop


def _logit_bias(body, vocab_size: int) -> dict[int, float]:
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise InvalidRequest("logit_bias must be an object mapping token ids to numbers", "logit_bias")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequest(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise InvalidRequest(f"logit_bias names token {token}; this model's ids run from 0 to {vocab_size - 1}",
                                 "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or abs(value) > MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias[{key}] must be a number in [-100, 100], got {value!r}", "logit_bias")
        out[token] = float(value)
    return out


def _refuse_unsupported(body) -> None:
    for name, what in REFUSED.items():
        if body.get(name) not in (None, [], {}):
            raise InvalidRequest(f"{name}: {what} are not supported by pocketlm's server", name)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise InvalidRequest("response_format: only {\"type\": \"text\"} is supported", "response_format")


def _stream_options(body, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise InvalidRequest("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object", "stream_options")
    return _boolean(options, "include_usage")


def check_model(body, served: list[str]) -> str:
    name = body.get("model")
    if name is None:
        return served[0]
    if not isinstance(name, str):
        raise InvalidRequest("model must be a string", "model")
    if name not in served:
        raise InvalidRequest(f"the model {name!r} does not exist here; this server has {', '.join(served)}", "model",
                             status=404, code="model_not_found")
    return name


@dataclass
class Generation:
    """A validated chat or completion request."""
    model: str
    sampling: Sampling
    stream: bool
    include_usage: bool
    max_tokens_given: bool


def generation(body: dict, *, served: list[str], vocab_size: int, chat: bool) -> Generation:
    """The settings both routes share, checked field by field."""
    _refuse_unsupported(body)
    model = check_model(body, served)
    if chat:
        given = [k for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
        if len(given) == 2 and body["max_tokens"] != body["max_completion_tokens"]:
            raise InvalidRequest("max_tokens and max_completion_tokens disagree; send one", "max_tokens")
        max_tokens = _integer(body, given[0], 1, 10**9, None) if given else None
        logprobs_on = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, MAX_CHAT_TOP_LOGPROBS, None)
        if top is not None and not logprobs_on:
            raise InvalidRequest("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (top or 0) if logprobs_on else None
    else:
        max_tokens = _integer(body, "max_tokens", 1, 10**9, None)
        logprobs = _integer(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS, None)
    stream = _boolean(body, "stream")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64):
        raise InvalidRequest(f"seed must be an integer, got {seed!r}", "seed")
    sampling = Sampling(
        max_tokens=max_tokens or 0, n=_integer(body, "n", 1, MAX_N, 1),
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0), top_p=_number(body, "top_p", 0.0, 1.0, 1.0, low_open=True),
        seed=None if seed is None else seed % 2**64, stop=_stop(body),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        logit_bias=_logit_bias(body, vocab_size), logprobs=logprobs)
    return Generation(model, sampling, stream, _stream_options(body, stream), max_tokens is not None)


def chat_messages(body) -> list[dict[str, str]]:
    """messages as plain {role, content} dicts; content parts of type text are joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise InvalidRequest(f"{where} must be an object with role one of {', '.join(CHAT_ROLES)}", where)
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InvalidRequest(f"{where}.content: only text parts are supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InvalidRequest(f"{where}.content must be a string", f"{where}.content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def completion_prompts(body, tokenizer, vocab_size: int) -> list[tuple[str, list[int]]]:
    """prompt as (text, ids) pairs: a string, a list of strings, token ids, or lists of them."""
    prompt = body.get("prompt")
    if body.get("suffix"):
        raise InvalidRequest("suffix (insertion) is not supported by pocketlm's server", "suffix")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) or _is_ids(p) for p in prompt):
        raise InvalidRequest("prompt must be a string, a list of strings, a list of token ids or a list of such "
                             "lists", "prompt")
    if len(prompt) > MAX_PROMPTS:
        raise InvalidRequest(f"prompt holds {len(prompt)} prompts; at most {MAX_PROMPTS} per request", "prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids = tokenizer.encode(p)
        else:
            if not all(0 <= t < vocab_size for t in p):
                raise InvalidRequest(f"prompt token ids must be from 0 to {vocab_size - 1}", "prompt")
            ids, p = list(p), tokenizer.decode(p)
        if not ids:
            raise InvalidRequest("a prompt must hold at least one token", "prompt")
        out.append((p, ids))
    return out


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def fit_context(prompt_tokens: int, sampling: Sampling, context: int, explicit: bool, default: int | None) -> None:
    """Set max_tokens (default: `default`, else the rest of the context) and check the request fits:
    an explicit max_tokens past the context is an error stating both numbers."""
    room = context - prompt_tokens
    if room < 1:
        raise InvalidRequest(f"the prompt has {prompt_tokens} tokens and this server's context is {context} "
                             "tokens (--ctx); shorten the prompt", "messages", code="context_length_exceeded")
    if explicit:
        if sampling.max_tokens > room:
            raise InvalidRequest(f"the prompt has {prompt_tokens} tokens and max_tokens asks for "
                                 f"{sampling.max_tokens}: {prompt_tokens + sampling.max_tokens} exceeds this "
                                 f"server's context of {context} tokens", "max_tokens",
                                 code="context_length_exceeded")
    else:
        sampling.max_tokens = min(default, room) if default else room


def embedding_inputs(body, tokenizer, vocab_size: int, window: int) -> list[list[int]]:
    if body.get("dimensions") is not None:
        raise InvalidRequest("dimensions is not supported: the embeddings have the model's own size", "dimensions")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise InvalidRequest(f"encoding_format must be 'float' or 'base64', got {fmt!r}", "encoding_format")
    value = body.get("input")
    if isinstance(value, str) or _is_ids(value):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) or _is_ids(v) for v in value):
        raise InvalidRequest("input must be a string, a list of strings, token ids or a list of such lists", "input")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"input holds {len(value)} items; at most {MAX_EMBEDDING_INPUTS}", "input")
    out = []
    for i, v in enumerate(value):
        ids = tokenizer.encode(v) if isinstance(v, str) else v
        if not ids:
            raise InvalidRequest(f"input[{i}] is empty", "input")
        if not all(0 <= t < vocab_size for t in ids):
            raise InvalidRequest(f"input token ids must be from 0 to {vocab_size - 1}", "input")
        if len(ids) > window:
            raise InvalidRequest(f"input[{i}] has {len(ids)} tokens; the embedding model reads at most {window}",
                                 "input", code="context_length_exceeded")
        out.append(list(ids))
    return out
