"""The OpenAI-compatible server against the real `openai` client, on a live uvicorn server over a
tiny quantized model: chat and completions agree with pocketlm's own Generator, streaming with
the non-streaming answer, logprobs with the model's own log-softmax, embeddings with mean-pooled
hidden states; bad input gets OpenAI-shaped 4xx errors; parallel streams get the same greedy
text as alone; a client that goes away frees its slot."""

import base64
import http.client
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from tokenizers import processors  # noqa: E402

from conftest import TINY  # noqa: E402
from pocketlm import ModelConfig  # noqa: E402
from pocketlm.api import CausalLM  # noqa: E402
from pocketlm.chat import ChatSession  # noqa: E402
from pocketlm.generate import Generator  # noqa: E402
from pocketlm.quant import quantize_model  # noqa: E402
from pocketlm.server.app import Service, create_app  # noqa: E402
from pocketlm.tokenizer import Tokenizer  # noqa: E402

KEY = "test-key"
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONFIG = {**TINY["llama-gqa-tied"], "vocab_size": 320, "n_head": 6, "n_kv_head": 2, "n_embd": 64, "head_dim": 16,
          "intermediate_size": 96, "max_position": 512}
MODEL = "tiny"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    text = path / "t.txt"
    text.write_text("the user asks and the assistant answers, briefly and kindly. <b>bold</b> & more. " * 80)
    tok = Tokenizer.train([text], vocab_size=300, bos_token="<s>", eos_token="</s>",
                          special_tokens=("<s>", "</s>", "<|im_start|>", "<|im_end|>"))
    tok.backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>"))])
    tok.chat_template = CHATML
    return tok


def tiny_model(bits=8, seed=0):
    torch.manual_seed(seed)
    model = CausalLM.from_config(ModelConfig(**CONFIG)).eval()
    with torch.no_grad():  # a flatter output layer: sampled answers vary, greedy ones are long
        model.lm_head.weight.mul_(4.0)
    model.config.eos_token_id = None  # random weights: answers run to max_tokens
    quantize_model(model, bits)
    return model


class LiveServer:
    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def service(tokenizer):
    return Service(MODEL, tiny_model(), tokenizer, parallel=8, max_queue=16, context=256)


@pytest.fixture(scope="module")
def live(service):
    server = LiveServer(create_app(service, api_key=KEY, max_body=64 * 1024))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(live, path, body, key=KEY, raw=None):
    """(status, headers, json) of a POST, errors included."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(live.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


def chat_ids(tokenizer, text):
    return ChatSession(tokenizer, 256, max_new_tokens=1).encode([{"role": "user", "content": text}])


# --- answers --------------------------------------------------------------------------------------

def test_chat_answer_is_the_generators(client, service, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the user asks"}],
                                       max_tokens=12, temperature=0)
    expected = Generator(service.model, tokenizer).generate(chat_ids(tokenizer, "the user asks"), max_new_tokens=12,
                                                            do_sample=False)
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.usage.prompt_tokens == len(chat_ids(tokenizer, "the user asks"))
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completion_stream_matches_the_whole_answer(client):
    whole = client.completions.create(model=MODEL, prompt="the assistant answers", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="the assistant answers", max_tokens=10,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length" and whole.choices[0].finish_reason == "length"
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 10


def test_chat_stream_opens_with_the_role_and_ends_with_done(live):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    request = urllib.request.Request(live.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_n_choices_sample_and_a_seed_repeats_them(client):
    def ask():
        return client.completions.create(model=MODEL, prompt="the user", max_tokens=8, temperature=1.0, n=3,
                                         seed=1234)
    first, again = ask(), ask()
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1  # three draws, not three copies
    assert first.usage.completion_tokens == 24


def test_stop_string_cuts_the_answer(client):
    full = client.completions.create(model=MODEL, prompt="the user asks", max_tokens=16, temperature=0).choices[0]
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip(), full.text
    cut = client.completions.create(model=MODEL, prompt="the user asks", max_tokens=16, temperature=0,
                                    stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]


def test_chat_logprobs_are_the_models(client, service, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "kindly"}],
                                       max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    ids = chat_ids(tokenizer, "kindly")
    with torch.inference_mode():
        logits = service.model(torch.tensor([ids])).logits[0, -1]
    expected = logits.float().log_softmax(-1)
    best = int(expected.argmax())
    first = content[0]
    assert first.token == tokenizer.decode([best])
    assert math.isclose(first.logprob, float(expected[best]), abs_tol=1e-3)
    assert len(first.top_logprobs) == 3 and first.top_logprobs[0].logprob == first.logprob
    assert [t.logprob for t in first.top_logprobs] == sorted((t.logprob for t in first.top_logprobs), reverse=True)
    assert bytes(first.bytes).decode("utf-8", "replace") == first.token
    assert "".join(c.token for c in content) == r.choices[0].message.content


def test_completion_logprobs_shape(client):
    r = client.completions.create(model=MODEL, prompt="the user asks", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(len(top) <= 2 and max(top.values()) == p for top, p in zip(lp.top_logprobs, lp.token_logprobs))


def test_embeddings_are_mean_pooled_hidden_states(client, service, tokenizer):
    floats = client.embeddings.create(model=MODEL, input=["the user", "answers kindly"], encoding_format="float")
    packed = client.embeddings.create(model=MODEL, input=["the user", "answers kindly"])  # base64 by default
    assert [d.index for d in floats.data] == [0, 1]
    for a, b in zip(floats.data, packed.data):
        assert len(a.embedding) == 64
        torch.testing.assert_close(torch.tensor(a.embedding), torch.tensor(b.embedding))
    with torch.inference_mode():
        ids = tokenizer.encode("the user")
        hidden = service.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].mean(0)
    torch.testing.assert_close(torch.tensor(floats.data[0].embedding), hidden, rtol=1e-5, atol=1e-5)
    assert floats.usage.prompt_tokens == len(ids) + len(tokenizer.encode("answers kindly"))
    status, _, body = post_raw_base64(client)
    assert status == 200 and isinstance(body["data"][0]["embedding"], str)
    decoded = torch.frombuffer(bytearray(base64.b64decode(body["data"][0]["embedding"])), dtype=torch.float32)
    torch.testing.assert_close(decoded, hidden, rtol=1e-5, atol=1e-5)


def post_raw_base64(client):
    url = str(client.base_url).rstrip("/") + "/embeddings"
    request = urllib.request.Request(url, data=json.dumps({"model": MODEL, "input": "the user",
                                                           "encoding_format": "base64"}).encode(),
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return r.status, r.headers, json.loads(r.read())


def test_models_health_and_metrics(client, live):
    assert [m.id for m in client.models.list().data] == [MODEL]
    with urllib.request.urlopen(live.url + "/health", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    request = urllib.request.Request(live.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        text = r.read().decode()
    for name in ("pocketlm_requests_total", "pocketlm_prompt_tokens_total", "pocketlm_completion_tokens_total",
                 "pocketlm_queue_depth", "pocketlm_running_requests",
                 "pocketlm_time_to_first_token_seconds_bucket", "pocketlm_tokens_per_second_count"):
        assert name in text
    assert 'route="completions",status="200"' in text


# --- bad input ------------------------------------------------------------------------------------

def test_wrong_key_is_401(live):
    bad = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    status, _, body = post(live, "/v1/chat/completions", {"messages": []}, key="")
    assert status == 401 and body["error"]["type"] == "invalid_request_error"


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("field,value", [
    ("temperature", 2.5), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5), ("n", 17), ("n", 0),
    ("max_tokens", 0), ("max_tokens", 1.5), ("stop", ["x"] * 33), ("stop", [""]), ("logit_bias", {"320": 1}),
    ("logit_bias", {"5": 101}), ("logit_bias", {"a": 1}), ("presence_penalty", 3), ("top_logprobs", 3),
    ("seed", "x"), ("messages", []), ("messages", [{"role": "robot", "content": "x"}]), ("stream", "yes"),
    ("tools", [{"type": "function"}]), ("stream_options", {"include_usage": True})])
def test_bad_chat_fields_are_400_naming_the_field(live, field, value):
    status, _, body = post(live, "/v1/chat/completions", {**CHAT, field: value})
    assert status == 400, body
    assert body["error"]["param"].startswith(field) and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"]


@pytest.mark.parametrize("field,value", [("logprobs", 6), ("suffix", "tail"), ("prompt", []), ("prompt", [[400]]),
                                         ("prompt", 5)])
def test_bad_completion_fields_are_400(live, field, value):
    status, _, body = post(live, "/v1/completions", {"model": MODEL, "prompt": "hi", field: value})
    assert status == 400 and body["error"]["param"] == field, body


def test_non_finite_numbers_bad_json_and_big_bodies(live):
    status, _, body = post(live, "/v1/chat/completions", None,
                           raw=b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}')
    assert status == 400 and "NaN" in body["error"]["message"]
    status, _, body = post(live, "/v1/chat/completions", None, raw=b'{"model": ')
    assert status == 400 and "JSON" in body["error"]["message"]
    status, _, body = post(live, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 70000}]})
    assert status == 413 and body["error"]["message"]
    status, _, body = post(live, "/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": 8})
    assert status == 400 and body["error"]["param"] == "dimensions"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and "tiny" in e.value.body["message"]


def test_context_overflow_states_both_numbers(client, tokenizer):
    prompt_tokens = len(chat_ids(tokenizer, "hi"))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=300)
    message = e.value.body["message"]
    assert str(prompt_tokens) in message and "300" in message and "256" in message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="the user " * 200, max_tokens=5)
    assert e.value.body["code"] == "context_length_exceeded"


# --- many clients ---------------------------------------------------------------------------------

def _stream_text(client, prompt, max_tokens=24):
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
    return "".join(c.choices[0].text for c in stream)


def test_eight_parallel_streams_get_their_text_alone(client):
    prompts = [f"the user asks {i} and" for i in range(8)]
    alone = [_stream_text(client, p) for p in prompts]
    results = [None] * 8

    def run(i):
        results[i] = _stream_text(client, prompts[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == alone


def test_a_client_that_leaves_frees_its_slot(live, client, service):
    body = json.dumps({"model": MODEL, "prompt": "the user", "max_tokens": 200, "stream": True}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    connection.request("POST", "/v1/completions", body=body,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    response.fp.readline()  # the first event: the request holds a slot
    others = [None] * 3

    def run(i):
        others[i] = _stream_text(client, f"answers {i}", max_tokens=30)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    assert service.scheduler.active >= 1
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 20  # a bound on the test, not the 250 ms the scheduler takes
    while any(s.request.prompt == service.tokenizer.encode("the user") for s in service.scheduler.running):
        assert time.monotonic() < deadline, "the slot of the client that left was never freed"
        time.sleep(0.01)
    for t in threads:
        t.join(timeout=120)
    assert all(o for o in others)
    deadline = time.monotonic() + 20
    while service.scheduler.active or len(service.scheduler.free) != service.scheduler.parallel:
        assert time.monotonic() < deadline, "slots leaked"
        time.sleep(0.01)


def test_a_full_queue_answers_429(tokenizer):
    service = Service(MODEL, tiny_model(), tokenizer, parallel=1, max_queue=0, context=256)
    server = LiveServer(create_app(service))
    try:
        body = json.dumps({"model": MODEL, "prompt": "the user", "max_tokens": 250, "stream": True}).encode()
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.fp.readline()
        status, headers, error = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert status == 429 and headers["retry-after"] == "1"
        assert error["error"]["code"] == "rate_limit_exceeded"
        connection.close()
    finally:
        server.stop()


def test_health_is_503_while_loading(tokenizer):
    release = threading.Event()

    def load():
        release.wait(30)
        return Service(MODEL, tiny_model(), tokenizer, parallel=2, context=128)
    server = LiveServer(create_app(load))
    try:
        try:
            urllib.request.urlopen(server.url + "/health", timeout=10)
            raise AssertionError("expected 503 while loading")
        except urllib.error.HTTPError as e:
            assert e.code == 503 and json.loads(e.read())["status"] == "loading"
        status, _, body = post(server, "/v1/completions", {"model": MODEL, "prompt": "x"})
        assert status == 503 and body["error"]["code"] == "model_not_ready"
        release.set()
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
                    assert r.status == 200
                    break
            except urllib.error.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        server.stop()


# --- the scheduler on its own, and the command ----------------------------------------------------

@pytest.mark.parametrize("bits", [None, 8], ids=["float32", "int8"])
def test_scheduler_batches_rows_of_different_lengths(tokenizer, bits):
    """Prompts of different lengths decoded together (the model's static step over all slots for
    float32, the block kernels with per-row lengths for int8) give the Generator's greedy tokens."""
    from pocketlm.server.scheduler import Request, Sampling, Scheduler

    model = tiny_model(bits) if bits else tiny_model_float()
    prompts = [tokenizer.encode(t) for t in ("the user", "the assistant answers briefly and", "kindly")]
    expected = [Generator(model, tokenizer).generate(p, max_new_tokens=10, do_sample=False).token_ids for p in prompts]
    scheduler = Scheduler(model, tokenizer, parallel=4, context=64)
    assert (scheduler.fast_step is not None) == bool(bits)
    scheduler.start()
    got, done = {}, threading.Semaphore(0)

    def emit_for(i):
        def emit(event):
            if event.kind == "token":
                got.setdefault(i, []).append(event.token_id)
            else:
                done.release()
        return emit
    for i, p in enumerate(prompts):
        scheduler.submit(Request(p, Sampling(max_tokens=10, temperature=0), emit_for(i)))
    for _ in prompts:
        assert done.acquire(timeout=60)
    scheduler.stop()
    assert [got[i] for i in range(3)] == expected


def tiny_model_float(seed=0):
    torch.manual_seed(seed)
    model = CausalLM.from_config(ModelConfig(**CONFIG)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.config.eos_token_id = None
    return model


def test_serve_drains_on_sigterm(tmp_path, tokenizer):
    """`pocketlm serve` on a checkpoint folder: ready on /health, and on SIGTERM a running stream
    still ends with [DONE] and the process exits 0."""
    import os
    import signal
    import subprocess
    import sys

    folder = tmp_path / "model"
    tiny_model_float().save_pretrained(folder, tokenizer=tokenizer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "pocketlm", "serve", str(folder), "--port", str(port),
                                "--dtype", "int8", "--parallel", "2", "--ctx", "256", "--grace", "30"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.1)
        body = json.dumps({"prompt": "the user", "max_tokens": 150, "stream": True,
                           "logit_bias": {str(tokenizer.eos_token_id): -100}}).encode()  # no early end
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        first = response.readline()
        assert first.startswith(b"data: {")
        process.send_signal(signal.SIGTERM)
        rest = response.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in (first.decode() + rest).splitlines()
                 if line.startswith("data: {")]
        assert len(texts) == 150
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_a_long_prompt_holds_up_running_streams_one_chunk_at_a_time(tokenizer, monkeypatch):
    """While a 3-chunk prompt is prefilled, the running request gets a decode step after each
    chunk; short prompts that arrive together start in one turn of the loop."""
    from pocketlm.server import scheduler as module
    from pocketlm.server.scheduler import Request, Sampling, Scheduler

    monkeypatch.setattr(module, "PREFILL_CHUNK", 16)
    scheduler = Scheduler(tiny_model(), tokenizer, parallel=8, context=256)
    log = []
    prefill, decode = scheduler._prefill_chunk, scheduler._decode_step
    monkeypatch.setattr(scheduler, "_prefill_chunk", lambda r: (log.append(("prefill", len(r.prompt))), prefill(r)))
    monkeypatch.setattr(scheduler, "_decode_step", lambda: (log.append(("decode", len(scheduler.running))), decode()))
    done = threading.Semaphore(0)

    def emit(event):
        if event.kind != "token":
            done.release()
    long_prompt = (tokenizer.encode("the user asks and the assistant answers") * 10)[:40]  # chunks 16, 16, 8
    scheduler.submit(Request(tokenizer.encode("kindly"), Sampling(max_tokens=30, temperature=0), emit))
    scheduler.start()
    while not scheduler.running:
        time.sleep(0.001)
    scheduler.submit(Request(long_prompt, Sampling(max_tokens=2, temperature=0), emit))
    for p in ("a", "b", "c"):
        scheduler.submit(Request(tokenizer.encode(p), Sampling(max_tokens=2, temperature=0), emit))
    for _ in range(5):
        assert done.acquire(timeout=60)
    scheduler.stop()
    long_chunks = [i for i, (kind, size) in enumerate(log) if kind == "prefill" and size == 40]
    assert len(long_chunks) == 3
    for a, b in zip(long_chunks, long_chunks[1:]):
        assert ("decode", 1) in log[a + 1:b]  # the running request moved on between chunks
    shorts = [i for i, (kind, size) in enumerate(log) if kind == "prefill" and size < 5][1:]  # after "kindly"
    assert shorts == [shorts[0], shorts[0] + 1, shorts[0] + 2]  # one turn: no decode step between them


def test_a_failing_model_fails_requests_and_health(tokenizer, monkeypatch):
    """If the loop dies (here: the model raises), running requests get an error, later ones 503,
    and /health says failed instead of ok; nothing hangs."""
    service = Service(MODEL, tiny_model(), tokenizer, parallel=2, context=128)
    server = LiveServer(create_app(service))
    try:
        def broken(*args, **kwargs):
            raise RuntimeError("simulated failure")
        monkeypatch.setattr(service.scheduler, "_decode_step", broken)
        status, _, body = post(server, "/v1/completions", {"model": MODEL, "prompt": "the user", "max_tokens": 5})
        assert status == 500 and "simulated failure" in body["error"]["message"]
        status, _, body = post(server, "/v1/completions", {"model": MODEL, "prompt": "the user", "max_tokens": 5})
        assert status == 503
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.url + "/health", timeout=10)
        assert e.value.code == 503 and json.loads(e.value.read())["status"] == "failed"
    finally:
        server.stop()


def test_echo_bias_and_penalties_do_what_they_say(client, tokenizer):
    echoed = client.completions.create(model=MODEL, prompt="the user asks", max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt="the user asks", max_tokens=4, temperature=0)
    assert echoed.choices[0].text == "the user asks" + plain.choices[0].text
    forced = tokenizer.convert_tokens_to_ids("the")
    biased = client.completions.create(model=MODEL, prompt="kindly", max_tokens=5, temperature=0,
                                       logit_bias={str(forced): 100}, logprobs=0)
    assert biased.choices[0].logprobs.tokens == [tokenizer.decode([forced])] * 5
    # greedy answers of a random model repeat themselves; a frequency penalty makes them vary
    free = client.completions.create(model=MODEL, prompt="the user", max_tokens=24, temperature=0, logprobs=0)
    penalised = client.completions.create(model=MODEL, prompt="the user", max_tokens=24, temperature=0, logprobs=0,
                                          frequency_penalty=2.0, presence_penalty=2.0)
    assert len(set(penalised.choices[0].logprobs.tokens)) > len(set(free.choices[0].logprobs.tokens))


def test_a_chat_template_in_a_request_is_refused(live):
    status, _, body = post(live, "/v1/chat/completions", {**CHAT, "chat_template": "{{ 7 * 7 }}"})
    assert status == 400 and body["error"]["param"] == "chat_template"


def test_sampling_follows_the_distribution():
    """The scheduler's inverse-transform sampler against the distribution it samples (a chi-square
    bound far past chance), zero-probability tokens never drawn, and a seed repeats its draws."""
    from pocketlm.server.scheduler import sample

    probs = torch.tensor([0.5, 0.0, 0.25, 0.125, 0.125, 0.0])
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample(probs, g) for _ in range(8000)])
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[1] == 0 and counts[5] == 0
    expected = probs.double() * 8000
    live = expected > 0
    chi2 = float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())
    assert chi2 < 30  # 3 degrees of freedom: p < 1e-5 past this
    again = torch.Generator().manual_seed(0)
    assert [sample(probs, again) for _ in range(50)] == draws[:50].tolist()


def test_serve_refuses_bad_flags_before_loading(capsys):
    from pocketlm.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for argv, message in ((["--port", "70000"], "--port must be at most 65535"),
                              (["--parallel", "0"], "--parallel must be at least 1"),
                              (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
                              (["no-such-model", "--port", "0"], "is not a local folder or file")):
            assert main(["serve", *argv]) == 2
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, err


def test_embeddings_from_a_sentence_encoder(tokenizer, minilm):
    """--embedding-model minilm-l6: /v1/embeddings gives the sentence encoder's vectors."""
    from pocketlm.encoder import SentenceEncoder
    from pocketlm.server.app import Embedder

    encoder = SentenceEncoder.from_pretrained(minilm)
    service = Service(MODEL, tiny_model(), tokenizer, parallel=2, context=128,
                      embedder=Embedder("minilm", encoder))
    server = LiveServer(create_app(service))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        assert sorted(m.id for m in client.models.list().data) == ["minilm", MODEL]
        got = client.embeddings.create(model="minilm", input=["A cat sat on the mat.", "Stock prices fell."])
        expected = encoder.encode(["A cat sat on the mat.", "Stock prices fell."])
        torch.testing.assert_close(torch.tensor([d.embedding for d in got.data]), expected, rtol=0, atol=1e-6)
        status, _, body = post(server, "/v1/embeddings", {"model": "minilm", "input": "word " * 300})
        assert status == 400 and "at most 256" in body["error"]["message"]
    finally:
        server.stop()
