"""Soak `pocketlm serve`: 100 concurrent streaming clients on 127.0.0.1 for 60 s against SmolLM2,
each sending requests one after another until time is up. Reports errors (the goal: none),
p50/p99 time to first token, aggregate tokens/s and the server's RSS growth from after warm-up
to the end (the goal: under 5%). Stops by itself.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/soak_server.py [--clients 100] [--seconds 60] [--write docs/benchmarks.md]
"""

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

from _common import command_line, machine_description, replace_section  # noqa: E402
from _load import free_port, median, percentile, rss_mb, run_clients, start, stop  # noqa: E402

HEADING = "## Server soak: 100 streaming clients for 60 s (bench/soak_server.py)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file or model name (default: smollm2-135m-instruct)")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--write", metavar="MD", help="put the results in this markdown file's section")
    args = parser.parse_args()
    from pocketlm import registry

    model = args.model or str(registry.resolve(registry.DEFAULT_CHAT_MODEL).path)
    port = free_port()
    server = start([sys.executable, "-m", "pocketlm", "serve", model, "--port", str(port), "--parallel",
                    str(args.parallel), "--ctx", "512", "--max-queue", str(max(100, 2 * args.clients))], port,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        bodies = [{"prompt": f"Question {i}: what is a good name for a cat? Answer:", "max_tokens": args.tokens,
                   "temperature": 0.8, "stream": True, "stream_options": {"include_usage": True}}
                  for i in range(args.clients)]
        run_clients(port, bodies[:args.parallel])  # warm-up: every slot used once
        rss_start = rss_mb(server.pid)
        result, seconds = run_clients(port, bodies, until=time.monotonic() + args.seconds)
        rss_end = rss_mb(server.pid)
    finally:
        stop(server)
    growth = (rss_end - rss_start) / rss_start * 100
    lines = [f"Machine: {machine_description(None, ('torch',))}. Measured {datetime.date.today()}, "
             f"{Path(model).name}, --parallel {args.parallel}, max_tokens {args.tokens}, sampled at temperature 0.8 "
             "(answers end at EOS or max_tokens; with --parallel slots busy the other clients queue, which is "
             "what the time to first token shows).", "",
             f"    {command_line()}", "",
             "| clients | seconds | requests (per s) | tokens per answer | errors | TTFT p50 ms | TTFT p99 ms | "
             "aggregate tok/s | RSS start → end MB |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| {args.clients} | {seconds:.0f} | {result.requests} ({result.requests / seconds:.1f}) | "
             f"{result.tokens / max(1, result.requests):.1f} | {len(result.errors)} | "
             f"{median(result.ttft) * 1000:.0f} | {percentile(result.ttft, 99) * 1000:.0f} | "
             f"{result.tokens / seconds:.1f} | {rss_start:.0f} → {rss_end:.0f} ({growth:+.1f}%) |"]
    if result.errors:
        lines += ["", f"First error: {result.errors[0]}"]
    text = "\n".join(lines)
    print(text)
    if args.write:
        replace_section(args.write, HEADING, text)
    if result.errors or growth >= 5:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
