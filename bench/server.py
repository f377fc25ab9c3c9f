"""Aggregate decode speed of `pocketlm serve` with 1, 4, 8 and 16 concurrent streams, against
llama.cpp's own llama-server (continuous batching, --parallel 16) on the same GGUF file, in one
run on one machine; plus p50/p99 time to first token. Each server runs alone, in turn.

    .venv/bin/pocketlm pull smollm2-135m-instruct
    # llama-server: built with cmake from the llama.cpp sources vendored in llama-cpp-python 0.3.36
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
        && cmake --build build --target llama-server -j2
    ln -s "$PWD/build/bin/llama-server" ../../../../.venv-llamacpp/bin/   # where this script looks for it
    HF_HUB_OFFLINE=1 .venv/bin/python bench/server.py [--llama-server PATH] [--write docs/benchmarks.md]

Every request streams /v1/completions with 128 new tokens (greedy, EOS forbidden through
logit_bias so every answer has the same length) after a distinct ~12-token prompt; each of the N
clients sends --rounds requests one after another. Aggregate tok/s = completion tokens of all
requests / wall time of the whole N-client run.
"""

import argparse
import datetime
import os
import sys
from pathlib import Path

from _common import command_line, machine_description, replace_section  # noqa: E402
from _load import free_port, median, percentile, run_clients, start, stop  # noqa: E402

HEADING = "## Server: concurrent streams, pocketlm vs llama-server (bench/server.py)"
LLAMA_SERVER = Path(__file__).resolve().parent.parent / ".venv-llamacpp" / "bin" / "llama-server"
TOPICS = ["the history of printing", "how bread is made", "the moons of Jupiter", "why the sky is blue",
          "a day at the sea", "the rules of chess", "how bees make honey", "the first railways",
          "a recipe for soup", "the life of a river", "how clocks work", "the northern lights",
          "a walk in the forest", "how ships float", "the game of cricket", "the invention of paper"]


def bodies(n: int, tokens: int, eos: int) -> list[dict]:
    return [{"prompt": f"Write a few sentences about {TOPICS[i % len(TOPICS)]}.", "max_tokens": tokens,
             "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
             "logit_bias": {str(eos): -100}} for i in range(n)]


def measure(name: str, port: int, streams: list[int], tokens: int, rounds: int, eos: int) -> dict:
    run_clients(port, bodies(2, 8, eos))  # warm-up: kernels, caches, first allocations
    out = {}
    for n in streams:
        result, seconds = run_clients(port, bodies(n, tokens, eos), rounds=rounds)
        if result.errors:
            raise SystemExit(f"{name}: {len(result.errors)} failed requests, e.g. {result.errors[0]}")
        out[n] = {"tok_s": result.tokens / seconds, "ttft_p50": median(result.ttft),
                  "ttft_p99": percentile(result.ttft, 99), "tokens": result.tokens}
        print(f"{name} {n:2d} streams: {out[n]['tok_s']:.1f} tok/s, TTFT p50 {out[n]['ttft_p50'] * 1000:.0f} ms "
              f"p99 {out[n]['ttft_p99'] * 1000:.0f} ms", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the pulled smollm2-135m-instruct)")
    parser.add_argument("--llama-server", default=str(LLAMA_SERVER),
                        help="llama.cpp's llama-server binary (default: .venv-llamacpp/bin/llama-server; "
                             "pocketlm only when it is missing)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--streams", default="1,4,8,16", help="concurrent clients, comma-separated")
    parser.add_argument("--write", metavar="MD", help="put the results in this markdown file's section")
    args = parser.parse_args()
    from pocketlm import registry
    from pocketlm.gguf import GGUFFile

    model = Path(args.model) if args.model else registry.resolve(registry.DEFAULT_CHAT_MODEL).path
    with GGUFFile(model) as f:
        eos = f.metadata["tokenizer.ggml.eos_token_id"]
    streams = [int(s) for s in args.streams.split(",")]
    parallel, ctx = max(streams), 512
    python = Path(sys.executable)
    results = {}

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    server = start([str(python), "-m", "pocketlm", "serve", str(model), "--port", str(port), "--parallel",
                    str(parallel), "--ctx", str(ctx), "--max-queue", "256"], port, env=env)
    try:
        results["pocketlm"] = measure("pocketlm", port, streams, args.tokens, args.rounds, eos)
    finally:
        stop(server)
    if Path(args.llama_server).exists():
        port = free_port()
        server = start([args.llama_server, "-m", str(model), "--port", str(port), "--parallel", str(parallel),
                        "-c", str(parallel * ctx), "-t", str(args.threads), "-tb", str(args.threads),
                        "--cont-batching", "-ngl", "0"], port)
        try:
            results["llama-server"] = measure("llama-server", port, streams, args.tokens, args.rounds, eos)
        finally:
            stop(server)

    names = list(results)
    peer = ""
    if "llama-server" in results:
        import subprocess

        shown = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True)
        version = next((line for line in (shown.stderr + shown.stdout).splitlines() if line.startswith("version")), "")
        peer = f" llama-server {version.removeprefix('version: ')} (llama.cpp vendored in llama-cpp-python 0.3.36)."
    lines = [f"Machine: {machine_description(None, ('torch',))}; {args.threads} threads each. "
             f"Measured {datetime.date.today()}, {model.name}, {args.tokens} new tokens per request, "
             f"{args.rounds} requests per client.{peer}", "", f"    {command_line()}", "",
             "| streams | " + " | ".join(f"{n} tok/s ↑ | {n} TTFT p50 / p99 ms ↓" for n in names) +
             (" | pocketlm ÷ llama-server |" if len(names) > 1 else " |"),
             "|---" * (1 + 2 * len(names) + (len(names) > 1)) + "|"]
    for n in streams:
        cells = []
        for name in names:
            r = results[name][n]
            cells += [f"{r['tok_s']:.1f}", f"{r['ttft_p50'] * 1000:.0f} / {r['ttft_p99'] * 1000:.0f}"]
        if len(names) > 1:
            cells.append(f"{results['pocketlm'][n]['tok_s'] / results['llama-server'][n]['tok_s']:.2f}×")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    own = results["pocketlm"]
    if 1 in own and 8 in own:
        lines += ["", f"pocketlm's 8-stream aggregate is {own[8]['tok_s'] / own[1]['tok_s']:.2f}× its single stream."]
    text = "\n".join(lines)
    print(text)
    if args.write:
        replace_section(args.write, HEADING, text)


if __name__ == "__main__":
    main()
