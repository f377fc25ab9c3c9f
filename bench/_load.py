"""Streaming clients for the server benchmarks: start a server process, wait for it, and run many
OpenAI-style streaming completion requests against it from threads, timing each."""

import http.client
import json
import socket
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int, timeout: float = 300, env=None) -> subprocess.Popen:
    """Run a server and wait until GET /health answers 200."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise SystemExit(f"{command[0]} exited {process.returncode}: {process.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return process
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"{command[0]} did not become ready in {timeout:.0f} s")
        time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def stream_once(port: int, body: dict, result: Result) -> None:
    """One streaming /v1/completions request: its time to first token and its token count."""
    start_time = time.perf_counter()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        connection.request("POST", "/v1/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        first, tokens, usage = None, 0, None
        for raw in response:  # JSON is parsed only where needed: the clients share the server's CPU
            if not raw.startswith(b"data: {"):
                continue
            if first is None or b'"usage":{' in raw.replace(b" ", b""):
                chunk = json.loads(raw[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                    first = time.perf_counter() - start_time
            tokens += 1
        connection.close()
        with result.lock:
            result.requests += 1
            result.tokens += usage if usage is not None else tokens
            if first is not None:
                result.ttft.append(first)
    except Exception as e:  # noqa: BLE001 - every failure counts as an error of the run
        with result.lock:
            result.errors.append(f"{type(e).__name__}: {e}")


def run_clients(port: int, bodies: list[dict], rounds: int = 1, until: float | None = None) -> tuple[Result, float]:
    """len(bodies) clients at once, each sending its body `rounds` times in a row (or until the
    monotonic time `until`); returns the results and the wall time."""
    result = Result()

    def client(body):
        done = 0
        while (until is None and done < rounds) or (until is not None and time.monotonic() < until):
            stream_once(port, body, result)
            done += 1
    threads = [threading.Thread(target=client, args=(b,)) for b in bodies]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result, time.perf_counter() - began


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
