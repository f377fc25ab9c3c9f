"""The server's counters, gauges and histograms, written in Prometheus' text format."""

from __future__ import annotations

import threading
from collections import defaultdict

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 400, 800)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.total, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.rate = Histogram(RATE_BUCKETS)

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def timing(self, ttft: float | None, tokens_per_second: float | None) -> None:
        with self._lock:
            if ttft is not None:
                self.ttft.observe(ttft)
            if tokens_per_second is not None:
                self.rate.observe(tokens_per_second)

    def render(self, queue_depth: int, running: int) -> str:
        with self._lock:
            lines = ["# HELP pocketlm_requests_total HTTP requests by route and status.",
                     "# TYPE pocketlm_requests_total counter"]
            lines += [f'pocketlm_requests_total{{route="{r}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self.requests.items())]
            for name, value, kind, text in (
                    ("pocketlm_prompt_tokens_total", self.prompt_tokens, "counter", "Prompt tokens processed."),
                    ("pocketlm_completion_tokens_total", self.completion_tokens, "counter", "Tokens generated."),
                    ("pocketlm_queue_depth", queue_depth, "gauge", "Requests waiting for a slot."),
                    ("pocketlm_running_requests", running, "gauge", "Requests holding slots.")):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
            for name, hist, text in (("pocketlm_time_to_first_token_seconds", self.ttft,
                                      "Seconds from a request's arrival to its first token."),
                                     ("pocketlm_tokens_per_second", self.rate,
                                      "Each request's decode rate after its first token.")):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(lines) + "\n"
