"""A real GGUF model (SmolLM2-135M-Instruct Q4_1 by default) run by pocketlm (its blocks kept
quantized, its C++ kernels), by llama.cpp (llama-cpp-python, on the same blocks) and by
transformers (its own GGUF loading, dequantized to fp32), each in a fresh process, in one run on
one machine.

    .venv/bin/pocketlm pull smollm2-135m-instruct
    python3 -m venv .venv-llamacpp && CMAKE_ARGS="-DGGML_NATIVE=ON" .venv-llamacpp/bin/pip install llama-cpp-python   # ~10+ min
    HF_HUB_OFFLINE=1 .venv/bin/python bench/real_model.py [--write docs/benchmarks.md]

Per framework: load to first token (from the child's first line, and from when torch or
llama_cpp finished importing, to the first generated token of an 8-token prompt), decode tok/s
(128 new tokens greedy, EOS off: time of prompt → 129 tokens minus prompt → 1 token), decode at
position 1,000 (64 new tokens after a 1,000-token prompt, the same subtraction), aggregate decode
of a batch of 8 prompts (pocketlm and transformers), prefill tok/s (512-token prompt → 1 token),
and peak RSS. Warm-up runs first, then medians of --repeats. The prompts are real text tokenized
by the model's tokenizer, the same ids for everyone. pocketlm and llama.cpp both quantize
activations to int8 for their block products and transformers computes in fp32, so greedy tokens
may part ways after a while: how many of the first 32 agree is reported.
"""

import time

T0 = time.perf_counter()  # the child's clock starts before its imports

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from _common import command_line, machine_description, publish  # noqa: E402

HEADING = "## Real GGUF model: pocketlm, transformers, llama.cpp (bench/real_model.py)"
FRAMEWORKS = ("pocketlm", "transformers", "llama.cpp")
CHECK_TOKENS = 32
VERSIONS = {}  # versions a child reports about itself (llama.cpp lives in its own venv)
MARKS = {}  # when the child's runtime (torch or llama_cpp) finished importing
BATCH = 8
LLAMACPP_PYTHON = Path(__file__).resolve().parent.parent / ".venv-llamacpp" / "bin" / "python"
TEXT = ("The history of the printing press begins in the fifteenth century, when movable type made "
        "it possible to reproduce books quickly and cheaply. Within decades, presses spread across "
        "Europe, and the number of printed works grew from a few thousand to millions. ") * 40


# --- children: one framework each, fresh process ------------------------------------------------

def load_pocketlm(path, threads):
    import torch

    MARKS["runtime_imported"] = time.perf_counter()
    torch.set_num_threads(threads)
    from pocketlm.api import load_model_and_tokenizer
    from pocketlm.generate import Generator

    model, tokenizer = load_model_and_tokenizer(path)  # a GGUF file: its own precision, kept quantized
    gen = Generator(model, tokenizer)

    def generate(ids, n):
        rows = ids if isinstance(ids[0], list) else [ids]
        out = gen.generate_ids(torch.tensor(rows), max_new_tokens=n, do_sample=False, eos_token_id=None)
        return out[0, len(rows[0]):].tolist()

    return generate


def load_transformers(path, threads):
    import torch

    MARKS["runtime_imported"] = time.perf_counter()
    torch.set_num_threads(threads)
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        Path(path).parent, gguf_file=Path(path).name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None

    def generate(ids, n):
        ids = torch.tensor(ids if isinstance(ids[0], list) else [ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, eos_token_id=None, pad_token_id=0)
        return out[0, ids.shape[1]:].tolist()

    return generate


def load_llamacpp(path, threads):
    import llama_cpp
    from llama_cpp import Llama

    MARKS["runtime_imported"] = time.perf_counter()
    VERSIONS["llama-cpp-python"] = llama_cpp.__version__
    llm = Llama(model_path=str(path), n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)

    def generate(ids, n):
        llm.reset()  # else generate() reuses the cached prefix of the previous call's prompt
        out = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == n:
                return out
        return out

    return generate


def run_child(args) -> dict:
    inputs = json.loads(Path(args.inputs).read_text())
    short, long, far, batch = inputs["short"], inputs["long"], inputs["far"], inputs["batch"]
    load = {"pocketlm": load_pocketlm, "transformers": load_transformers, "llama.cpp": load_llamacpp}[args.child]
    generate = load(args.model, args.threads)
    loaded = time.perf_counter() - T0
    generate(short, 1)
    first_token = time.perf_counter()

    def timed(ids, n):
        start = time.perf_counter()
        out = generate(ids, n)
        seconds = time.perf_counter() - start
        if len(out) != n:
            raise SystemExit(f"{args.child} returned {len(out)} tokens, not {n}")
        return seconds, out

    n, far_n = args.new_tokens, args.new_tokens // 2
    cases = {"first": (short, 1), "full": (short, n + 1), "prefill": (long, 1),
             "far_first": (far, 1), "far_full": (far, far_n + 1)}
    if args.child != "llama.cpp":  # llama-cpp-python's high-level API decodes one sequence at a time
        cases.update(batch_first=(batch, 1), batch_full=(batch, n + 1))
    for case in cases.values():  # warm-up (llama.cpp repacks weights on first use)
        timed(*case)
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, case in cases.items():
            times[name].append(timed(*case)[0])

    def rate(tokens, full, first):
        return statistics.median(tokens / (a - b) for a, b in zip(times[full], times[first]))

    result = {
        "load_s": loaded,
        "load_to_first_token_s": first_token - T0,
        "after_import_to_first_token_s": first_token - MARKS["runtime_imported"],
        "decode_tok_s": rate(n, "full", "first"),
        "far_decode_tok_s": rate(far_n, "far_full", "far_first"),
        "prefill_tok_s": len(long) / statistics.median(times["prefill"]),
        "ttft_ms": statistics.median(times["first"]) * 1000,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "greedy": timed(short, CHECK_TOKENS)[1],
        "versions": VERSIONS,
    }
    if "batch_full" in times:
        result["batch_decode_tok_s"] = rate(len(batch) * n, "batch_full", "batch_first")
    return result


# --- parent ----------------------------------------------------------------------------------------

def spawn(framework: str, model: Path, inputs: Path, args) -> dict:
    python = str(LLAMACPP_PYTHON) if framework == "llama.cpp" else sys.executable
    command = [python, __file__, "--child", framework, "--model", str(model), "--inputs", str(inputs),
               "--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"the {framework} child failed (exit {done.returncode}); its stderr is above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict, args, model: Path, prompt_len: int, far_len: int, check: str) -> str:
    rows = [("load → first token s (process start, imports included) ↓", "load_to_first_token_s", "{:.2f}"),
            ("load → first token s (after `import torch` / `import llama_cpp`) ↓", "after_import_to_first_token_s",
             "{:.2f}"),
            (f"decode tok/s ({args.new_tokens} new tokens after 8) ↑", "decode_tok_s", "{:.1f}"),
            (f"decode tok/s at position {far_len:,} ({args.new_tokens // 2} new tokens) ↑", "far_decode_tok_s",
             "{:.1f}"),
            (f"aggregate decode tok/s, batch {BATCH} ↑", "batch_decode_tok_s", "{:.1f}"),
            (f"prefill tok/s ({prompt_len}-token prompt) ↑", "prefill_tok_s", "{:.0f}"),
            ("TTFT ms warm (8-token prompt) ↓", "ttft_ms", "{:.1f}"),
            ("peak RSS MB ↓", "peak_rss_mb", "{:.0f}")]
    present = [f for f in FRAMEWORKS if f in results]
    lines = ["| metric | " + " | ".join(present) + " | pocketlm ÷ transformers | pocketlm ÷ llama.cpp |",
             "|---" * (len(present) + 3) + "|"]
    for label, key, fmt in rows:
        values = [fmt.format(results[f][key]) if key in results[f] else "—" for f in present]
        ratios = [f"{results['pocketlm'][key] / results[o][key]:.2f}×" if o in results and key in results[o]
                  and key in results["pocketlm"] else "—" for o in ("transformers", "llama.cpp")]
        lines.append(f"| {label} | " + " | ".join(values) + " | " + " | ".join(ratios) + " |")
    own = results.get("pocketlm", {})
    if "batch_decode_tok_s" in own:
        lines += ["", f"pocketlm's batch-{BATCH} aggregate is {own['batch_decode_tok_s'] / own['decode_tok_s']:.2f}× "
                      "its own batch-1 decode."]
    return "\n".join([
        f"Machine: {machine_description(None, ('torch', 'transformers'))}"
        + "".join(f", {k} {v}" for r in results.values() for k, v in r.get("versions", {}).items())
        + f". "
        f"Date: {datetime.date.today().isoformat()}.",
        "", "    " + command_line(), "",
        f"Model: {model.name}; {args.threads} threads; greedy, EOS off; real-text prompt ids shared by all; "
        f"each framework in a fresh process; medians of {args.repeats} after a warm-up. pocketlm keeps the "
        f"file's blocks (Q4_1 layers, Q8_0 embedding and head) and decodes through its C++ kernels (cache "
        f"warm); llama.cpp computes on the same blocks; transformers loads the GGUF itself and dequantizes "
        f"to fp32. Check: {check}.",
        "", *lines])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="GGUF file or registry name")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--far", type=int, default=1000, help="prompt length before the far decode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", action="append", default=[], choices=FRAMEWORKS, help="leave a framework out")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace or append this script's section there")
    parser.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return

    from pocketlm import registry
    from pocketlm.api import AutoTokenizer

    model = registry.resolve(args.model).path
    ids = AutoTokenizer.from_pretrained(model).encode(TEXT)
    if len(ids) < max(args.prompt_len, args.far):
        raise SystemExit(f"the prompt text gives only {len(ids)} tokens")
    frameworks = [f for f in FRAMEWORKS if f not in args.skip]
    if "llama.cpp" in frameworks and not LLAMACPP_PYTHON.exists():
        raise SystemExit(f"no {LLAMACPP_PYTHON}; build llama-cpp-python there (see this script's docstring) "
                         "or pass --skip llama.cpp")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.json"
        inputs.write_text(json.dumps({"short": ids[:8], "long": ids[:args.prompt_len], "far": ids[:args.far],
                                      "batch": [ids[i * 8:(i + 1) * 8] for i in range(BATCH)]}))
        results = {}
        for framework in frameworks:
            print(f"running {framework} ...", file=sys.stderr, flush=True)
            results[framework] = spawn(framework, model, inputs, args)
    check = []
    for other in ("transformers", "llama.cpp"):
        if other in results and "pocketlm" in results:
            ours, theirs = results["pocketlm"]["greedy"], results[other]["greedy"]
            agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
            check.append(f"pocketlm's first {CHECK_TOKENS} greedy tokens agree with {other}'s for {agree}")
    text = report(results, args, model, args.prompt_len, args.far, "; ".join(check) or "nothing to compare")
    publish(text, HEADING, args.write)


if __name__ == "__main__":
    main()
