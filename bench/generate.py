"""Generation speed and memory of pocketlm against transformers, on the same weights and inputs.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/generate.py [--write docs/benchmarks.md]

The parent builds the smollm2-135m architecture with random weights (fixed seed), saves it once as a
checkpoint folder and draws the random prompt ids; each framework then loads that folder in its own
fresh process (so neither's imports or allocations count in the other's peak RSS), warms up on
every shape, and times greedy generation with EOS disabled, so both always produce exactly the
requested number of tokens:

- TTFT: prompt (8 tokens) → 1 new token, i.e. prefill plus choosing the first token;
- decode tok/s: N / (time(prompt → N + 1 tokens) − time(prompt → 1 token)), N = --new-tokens;
- prefill tok/s: --prompt-len / time(long prompt → 1 token);
- peak RSS: the child's ru_maxrss after all runs (imports and loading included).

Medians of --repeats timed calls in each of --rounds fresh processes per framework, the rounds
alternating between the frameworks so that a slow spell of a shared machine hits both. Both
sides' first 32 greedy tokens are checked equal, else the comparison is
of different computations and the script says so loudly. Prints a markdown table; --write puts it
in the "## Generation (bench/generate.py)" section of a markdown file.
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import command_line, machine_description, publish

PRESET = "smollm2-135m"
SHORT_PROMPT = 8
CHECK_TOKENS = 32
FRAMEWORKS = ("pocketlm", "transformers")
HEADING = "## Generation (bench/generate.py)"


# --- child: one framework, one fresh process ----------------------------------------------------

def load_pocketlm(folder, device, dtype, compile):
    from pocketlm.api import CausalLM
    from pocketlm.generate import Generator

    model = CausalLM.from_pretrained(folder, device=device, dtype=dtype).eval()
    gen = Generator(model, compile=compile)

    def generate(ids, n):
        return gen.generate_ids(ids, max_new_tokens=n, do_sample=False, eos_token_id=None)

    return generate, {}


def load_transformers(folder, device, dtype, compile):
    import transformers

    if compile:
        raise SystemExit("--compile applies to pocketlm only")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    # no EOS at all (rather than min_new_tokens alone, which masks EOS out of the logits and could
    # make greedy choices differ from pocketlm's plain argmax)
    model.generation_config.eos_token_id = None

    def generate(ids, n):
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                              pad_token_id=model.config.pad_token_id or 0)

    return generate, {"attention": model.config._attn_implementation, "cache": "default (dynamic)"}


def run_child(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    inputs = json.loads(Path(args.inputs).read_text())
    short = torch.tensor([inputs["short"]], device=device)
    long = torch.tensor([inputs["long"]], device=device)
    load = {"pocketlm": load_pocketlm, "transformers": load_transformers}[args.child]
    t0 = time.perf_counter()
    generate, info = load(args.folder, device, dtype, args.compile)
    load_s = time.perf_counter() - t0

    def timed(ids, n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(ids, n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if out.shape != (1, ids.shape[1] + n):  # an early stop would make the timing meaningless
            raise SystemExit(f"{args.child} returned shape {tuple(out.shape)} for {ids.shape[1]} + {n} tokens")
        return seconds, out[0, ids.shape[1]:].tolist()

    n = args.new_tokens
    cases = {"first": (short, 1), "full": (short, n + 1), "prefill": (long, 1)}
    # warm-up: every shape once (absorbs lazy init, allocator growth and, with --compile, compiling)
    warmup = {name: timed(*case)[0] for name, case in cases.items()}
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, case in cases.items():
            times[name].append(timed(*case)[0])
    check = timed(short, CHECK_TOKENS)[1]
    steady = {name: statistics.median(t) for name, t in times.items()}
    return {
        "decode_tok_s": statistics.median(n / (full - first) for full, first in zip(times["full"], times["first"])),
        "prefill_tok_s": long.shape[1] / steady["prefill"],
        "ttft_ms": steady["first"] * 1000,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # kB on Linux
        "load_s": load_s,
        "warmup_s": sum(warmup.values()),
        # what the first call of each shape cost beyond a steady one: mostly compiling, with --compile
        "first_call_extra_s": sum(warmup.values()) - sum(steady.values()),
        "greedy": check,
        "times": times,
        "threads": torch.get_num_threads(),
        "prefill_len": long.shape[1],
        **info,
    }


# --- parent: one checkpoint, two children, one table --------------------------------------------

def make_checkpoint(folder: Path, seed: int, prompt_len: int) -> Path:
    from pocketlm.api import CausalLM

    torch.manual_seed(seed)
    model = CausalLM.from_config(PRESET)
    model.save_pretrained(folder)
    draw = torch.Generator().manual_seed(seed + 1)
    vocab = model.config.vocab_size
    inputs = {"short": torch.randint(0, vocab, (SHORT_PROMPT,), generator=draw).tolist(),
              "long": torch.randint(0, vocab, (prompt_len,), generator=draw).tolist()}
    path = folder / "bench_inputs.json"
    path.write_text(json.dumps(inputs))
    return path


def spawn(framework: str, folder: Path, inputs: Path, args) -> dict:
    command = [sys.executable, __file__, "--child", framework, "--folder", str(folder), "--inputs", str(inputs),
               "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    if args.compile and framework == "pocketlm":
        command.append("--compile")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"the {framework} child failed (exit {done.returncode}); its stderr is above")
    return json.loads(done.stdout.strip().splitlines()[-1])  # the last line: libraries may print too


def merge_rounds(runs: list[dict], new_tokens: int) -> dict:
    """One result from several fresh-process rounds: medians over every timed call of every
    round, the highest peak RSS, and the first round's greedy tokens (each round is checked)."""
    first = runs[0]
    if any(run["greedy"] != first["greedy"] for run in runs):
        raise SystemExit("the same framework gave different greedy tokens in different rounds")
    times = {name: [t for run in runs for t in run["times"][name]] for name in first["times"]}
    pairs = [(full, one) for run in runs for full, one in zip(run["times"]["full"], run["times"]["first"])]
    steady = {name: statistics.median(t) for name, t in times.items()}
    return {**first, "times": times,
            "decode_tok_s": statistics.median(new_tokens / (full - one) for full, one in pairs),
            "prefill_tok_s": first["prefill_len"] / steady["prefill"],
            "ttft_ms": steady["first"] * 1000,
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
            "warmup_s": statistics.median(run["warmup_s"] for run in runs),
            "first_call_extra_s": statistics.median(run["first_call_extra_s"] for run in runs)}


def greedy_check(ours: list[int], theirs: list[int]) -> str:
    if ours == theirs:
        return f"the first {CHECK_TOKENS} greedy tokens are identical"
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return (f"**MISMATCH: the greedy tokens differ from position {first} of {CHECK_TOKENS}; the two sides "
            f"did not compute the same thing, so this comparison is not fair**")


def report(results: dict, args, gpu: str | None, check: str) -> str:
    ours, theirs = results["pocketlm"], results["transformers"]
    rows = [
        (f"decode tok/s ({args.new_tokens} new tokens after {SHORT_PROMPT}) ↑", "decode_tok_s", "{:.1f}"),
        (f"prefill tok/s ({args.prompt_len}-token prompt) ↑", "prefill_tok_s", "{:.0f}"),
        (f"TTFT ms ({SHORT_PROMPT}-token prompt) ↓", "ttft_ms", "{:.1f}"),
        ("peak RSS MB ↓", "peak_rss_mb", "{:.0f}"),
    ]
    lines = ["| metric | pocketlm | transformers | ratio pocketlm ÷ transformers (↑ higher is better, "
             "↓ lower is better) |", "|---|---|---|---|"]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt.format(ours[key])} | {fmt.format(theirs[key])} | "
                     f"{ours[key] / theirs[key]:.2f}× |")
    notes = (f"Warm-up (every shape once): pocketlm {ours['warmup_s']:.1f} s, transformers "
              f"{theirs['warmup_s']:.1f} s.")
    spread = {name: max(max(t) / min(t) for t in r["times"].values()) for name, r in results.items()}
    if args.repeats > 1:
        notes += (f" Largest spread between repeats of one timed call (max ÷ min; near 1 on a quiet machine): "
                   f"pocketlm {spread['pocketlm']:.2f}, transformers {spread['transformers']:.2f}.")
    if args.compile:
        notes += (f" pocketlm runs with `torch.compile`: compiling cost about "
                   f"{ours['first_call_extra_s']:.1f} s (warm-up minus steady time of the same calls).")
    setup = (f"{PRESET} architecture, random weights (seed {args.seed}), one checkpoint folder loaded by "
             f"both; {args.device}, {args.dtype}, {ours['threads']} threads; greedy with EOS disabled; "
             f"same random prompt ids; each framework in a fresh process, {args.rounds} round(s) alternating "
             f"between them; medians of {args.repeats * args.rounds} timed calls, after a warm-up in each "
             f"process. transformers: `generate` with its default cache, attention "
             f"`{theirs.get('attention')}`. Check: {check}.")
    return "\n".join([
        f"Machine: {machine_description(gpu, ('torch', 'transformers'))}. "
        f"Date: {datetime.date.today().isoformat()}.",
        "",
        "    " + command_line(),
        "",
        setup,
        "",
        *lines,
        "",
        notes,
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in each child")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each kind per process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per framework, alternating; medians are over all rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="pocketlm's Generator with torch.compile")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace or append this script's section there")
    parser.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.child:
        print(json.dumps(run_child(args)))
        return

    gpu = None
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda, but torch sees no CUDA device")
        gpu = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / PRESET
        inputs = make_checkpoint(folder, args.seed, args.prompt_len)
        rounds = {framework: [] for framework in FRAMEWORKS}
        for round_ in range(1, args.rounds + 1):  # alternate, so a slow spell hits both sides alike
            for framework in FRAMEWORKS:
                print(f"round {round_}/{args.rounds}: running {framework} ...", file=sys.stderr, flush=True)
                rounds[framework].append(spawn(framework, folder, inputs, args))
        results = {framework: merge_rounds(runs, args.new_tokens) for framework, runs in rounds.items()}
    check = greedy_check(results["pocketlm"]["greedy"], results["transformers"]["greedy"])
    if "MISMATCH" in check:
        print(f"\n!!! {check.strip('*')}\n    pocketlm:     {results['pocketlm']['greedy']}\n"
              f"    transformers: {results['transformers']['greedy']}\n", file=sys.stderr)
    text = report(results, args, gpu, check)
    publish(text, HEADING, args.write)


if __name__ == "__main__":
    main()
