"""Tokenizer speed against transformers on the same tokenizer files, and how encoding time grows
with pathological input size (a linear tokenizer doubles its time when the input doubles).

    make data/shakespeare.txt && .venv/bin/python bench/tokenizer.py --text data/shakespeare.txt

Prints markdown for docs/benchmarks.md. Medians of 3 runs after a warm-up.
"""

import argparse
import statistics
import tempfile
import time

from pocketlm.tokenizer import Tokenizer


def median_seconds(fn, repeats=3):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", required=True)
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    import transformers

    text = open(args.text, encoding="utf-8").read()
    ours = Tokenizer.train([args.text], vocab_size=args.vocab_size)
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
    lines = text.splitlines()
    assert ours(lines[:2000])["input_ids"] == theirs(lines[:2000])["input_ids"]

    print(f"corpus: {args.text}, {len(text):,} characters in {len(lines):,} lines; vocab {len(ours)}\n")
    print("| task | pocketlm s | transformers s | speed ratio (pocketlm / transformers) |")
    print("|---|---|---|---|")
    for task, a, b in [
        ("batch of all lines", lambda: ours(lines), lambda: theirs(lines)),
        ("whole text as one string", lambda: ours.encode(text), lambda: theirs.encode(text)),
    ]:
        ta, tb = median_seconds(a), median_seconds(b)
        print(f"| {task} | {ta:.3f} | {tb:.3f} | {tb / ta:.2f}× |")

    print("\n| pathological input | 250 K chars s | 500 K s | 1 M s | growth per doubling |")
    print("|---|---|---|---|---|")
    for name, unit in [("'a' repeated", "a"), ("spaces", " "), ("newlines", "\n"), ("digits", "7"),
                       ("emoji", "🙂"), ("alternating 'ab'", "ab")]:
        times = [median_seconds(lambda n=n: ours.encode(unit * (n // len(unit))), repeats=1)
                 for n in (250_000, 500_000, 1_000_000)]
        growth = (times[2] / times[0]) ** 0.5
        print(f"| {name} | {times[0]:.3f} | {times[1]:.3f} | {times[2]:.3f} | {growth:.2f}× |")


if __name__ == "__main__":
    main()
