"""Pretraining speed: pocketlm's Trainer against a plain PyTorch loop over transformers'
GPT2LMHeadModel, the same model shape, data, split, batches and optimizer, in one run on one
machine, each in a fresh process.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train.py [--steps 2000] [--write docs/benchmarks.md]

Character-level Shakespeare (`pocketlm prepare shakespeare --char`, its train/val split), a GPT-2
shape of 4 layers, 4 heads, width 128, block 64, batch 12, AdamW at a constant lr 1e-3, no
dropout. Both sides draw the same windows (pocketlm.data.Batches with one seed) and score the
same validation windows at the end. Reported: training tokens/s over the whole loop (its
wall time from the first step to the last, evaluation excluded) and the validation loss after
--steps steps. pocketlm runs its Trainer as `pocketlm train` would (AdamW with decay on matrices,
gradient clipping at 1.0); --compile adds torch.compile to pocketlm's side.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import command_line, machine_description, publish

HEADING = "## Pretraining (bench/train.py)"
SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block=64, batch=12, lr=1e-3)


def child_transformers(data: str, steps: int, threads: int, seed: int) -> dict:
    import torch
    import transformers

    from pocketlm.data import Batches, TokenShard, eval_windows

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    train, val = TokenShard(data, "train"), TokenShard(data, "val")
    config = transformers.GPT2Config(vocab_size=train.vocab_size, n_positions=SHAPE["block"], n_embd=SHAPE["n_embd"],
                                     n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=SHAPE["lr"])
    batches = Batches(train, SHAPE["batch"], SHAPE["block"], train.vocab_size, seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        window = batches.next()
        x, y = window[:, :-1], window[:, 1:]  # 64 inputs, each predicting the next token
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        losses = []
        for w in eval_windows(val, 32, SHAPE["block"], val.vocab_size):
            logits = model(w[:, :-1]).logits
            losses.append(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())))
    return {"seconds": seconds, "val_loss": sum(losses) / len(losses), "last_train_loss": float(loss),
            "parameters": sum(p.numel() for p in model.parameters())}


def child_pocketlm(data: str, steps: int, threads: int, seed: int, compile: bool, out: str) -> dict:
    import torch

    from pocketlm.api import CausalLM
    from pocketlm.config import ModelConfig, TrainConfig
    from pocketlm.data import TokenShard
    from pocketlm.tokenizer import Tokenizer
    from pocketlm.train import Trainer

    torch.set_num_threads(threads)
    tokenizer = Tokenizer.from_pretrained(data)
    shape = ModelConfig.preset("gpt2", vocab_size=TokenShard(data, "train").vocab_size, n_layer=SHAPE["n_layer"],
                               n_head=SHAPE["n_head"], n_embd=SHAPE["n_embd"],
                               max_position=SHAPE["block"],
                               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    CausalLM.from_config(shape).save_pretrained(Path(out) / "init", tokenizer=tokenizer)
    config = TrainConfig(data=data, model=str(Path(out) / "init"), out=str(Path(out) / "run"), max_steps=steps,
                         batch_size=SHAPE["batch"], block_size=SHAPE["block"], lr=SHAPE["lr"], min_lr=SHAPE["lr"],
                         warmup_steps=0, weight_decay=0.01, eval_every=steps, eval_windows=32, sample_tokens=0,
                         log_every=max(1, steps // 10), seed=seed, threads=threads, compile=compile)
    trainer = Trainer(config)
    evaluate = trainer.evaluate
    timing = {}

    def timed_evaluate():  # the loop's wall time stops where the final evaluation starts
        timing.setdefault("end", time.perf_counter())
        return evaluate()

    trainer.evaluate = timed_evaluate
    t0 = time.perf_counter()
    last = trainer.fit()
    return {"seconds": timing["end"] - t0, "val_loss": last["val_loss"], "last_train_loss": last["train_loss"],
            "parameters": trainer.model.num_parameters()}


def run_child(kind: str, args, data: str, out: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--data", data, "--steps", str(args.steps),
           "--threads", str(args.threads), "--seed", str(args.seed), "--out", out]
    if args.compile:
        cmd.append("--compile")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--compile", action="store_true", help="torch.compile pocketlm's side")
    parser.add_argument("--data", help="a prepared char-level folder (default: prepare Shakespeare into a temp dir)")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace or append this script's section there")
    parser.add_argument("--child", choices=("pocketlm", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "transformers":
        print(json.dumps(child_transformers(args.data, args.steps, args.threads, args.seed)))
        return
    if args.child == "pocketlm":
        print(json.dumps(child_pocketlm(args.data, args.steps, args.threads, args.seed, args.compile, args.out)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = str(Path(tmp) / "shakespeare-char")
            print("preparing character-level Shakespeare ...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pocketlm", "prepare", "shakespeare", "--char", "--out", data],
                           check=True, stdout=subprocess.DEVNULL)
        results = {}
        for kind in ("transformers", "pocketlm"):
            print(f"training with {kind} ({args.steps} steps) ...", file=sys.stderr)
            results[kind] = run_child(kind, args, data, str(Path(tmp) / kind))
    tokens = args.steps * SHAPE["batch"] * SHAPE["block"]
    speed = {k: tokens / r["seconds"] for k, r in results.items()}
    ours, ref = results["pocketlm"], results["transformers"]
    table = "\n".join([
        "| metric | pocketlm Trainer | transformers GPT2LMHeadModel, plain loop | ratio |",
        "|---|---|---|---|",
        f"| training tokens/s ↑ | {speed['pocketlm']:,.0f} | {speed['transformers']:,.0f} | "
        f"{speed['pocketlm'] / speed['transformers']:.2f}× |",
        f"| validation loss after {args.steps} steps ↓ | {ours['val_loss']:.4f} | {ref['val_loss']:.4f} | "
        f"{ours['val_loss'] - ref['val_loss']:+.4f} |",
        f"| parameters | {ours['parameters']:,} | {ref['parameters']:,} | |",
    ])
    text = "\n".join([
        f"Run {datetime.date.today()}. Machine: {machine_description(None, ('torch', 'transformers'))}. "
        f"{args.threads} threads; {'pocketlm with torch.compile; ' if args.compile else ''}"
        f"character-level Shakespeare; GPT-2 shape {SHAPE['n_layer']} layers, {SHAPE['n_head']} heads, width "
        f"{SHAPE['n_embd']}, block {SHAPE['block']}, batch {SHAPE['batch']}, AdamW lr {SHAPE['lr']:g} constant.",
        "",
        "    " + command_line(),
        "",
        table,
    ])
    publish(text, HEADING, args.write)


if __name__ == "__main__":
    main()
