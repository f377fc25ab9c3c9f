"""Fine-tuning: sentiment accuracy of SmolLM2-135M fine-tuned by pocketlm (LoRA and full) against
zero-shot scoring and a bag-of-words baseline (A), and LoRA training speed and memory against
transformers' own Trainer with peft (B), each configuration in a fresh process.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/finetune.py [--train-examples 1000] [--steps 60] [--only A|B] \\
        [--write docs/benchmarks.md]

Data: the bundled movie-review snippets (`sentiment`). Training draws a seeded sample of
--train-examples from the training split, and validation a sample a tenth that size from the
rest of it; the accuracy is measured on the held-out test split (`sentiment:test`, or a seeded
sample of --test-examples of it). The base is `smollm2-135m-instruct` converted once into an
HF folder (`pocketlm convert`), which every configuration loads, pocketlm and the peer alike.

A. (1) `pocketlm finetune classify --lora` with its defaults (rank 8 on every linear layer of
the blocks, lr 5e-4, one epoch), (2) the same without --lora (every weight, lr 5e-5), scored
with `pipeline("sentiment-analysis", model=RUN)`; (3) the base zero-shot (pocketlm.zeroshot, its
default instruction); (4) logistic regression on unigram+bigram counts (L2, C = 1, full-batch
L-BFGS, written here in torch). The fine-tunes validate once, after their epoch (so the best
checkpoint is the last); time per epoch is the training loop's wall time, that validation
excluded. Their peak RSS includes scoring the test split.

B. --steps LoRA steps on the same training sample, in the same order (pocketlm's seeded
epochs), batch 8 padded on the right with EOS: pocketlm's Trainer against transformers' Trainer
on AutoModelForSequenceClassification + peft LoraConfig(task_type="SEQ_CLS") with the same rank,
alpha, dropout, targets, AdamW settings, gradient clipping and learning rates step by step (the
peer's scheduler is given pocketlm's warm-up + cosine formula, since transformers' cosine starts
its warm-up at lr 0). tokens/s counts the real (non-pad) tokens over the training loop's wall
time; the loss is the mean of the last 10 step losses.
"""

import argparse
import datetime
import hashlib
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import command_line, machine_description, publish

HEADING = "## Fine-tuning (bench/finetune.py)"
PART_A = "### A. Sentiment accuracy on the held-out movie snippets"
PART_B = "### B. LoRA speed and memory: pocketlm vs transformers + peft"
BASE = "smollm2-135m-instruct"
LAST_LOSSES = 10  # step losses averaged into "loss after N steps"
NEVER = 10**9  # an eval_every past the last step: the Trainer then validates only after it


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# --- data, written once by the parent -------------------------------------------------------------

def write_samples(folder: Path, train_examples: int, test_examples: int, seed: int) -> dict:
    """train.jsonl, val.jsonl and test.jsonl: seeded samples of the sentiment set, each in file order."""
    from pocketlm.labelled import read_labelled

    train_split, test_split = read_labelled("sentiment"), read_labelled("sentiment:test")
    val_examples = max(8, train_examples // 10)
    if train_examples + val_examples > len(train_split):
        raise SystemExit(f"--train-examples {train_examples} (and {val_examples} for validation) exceeds the "
                         f"{len(train_split)} training sentences")
    drawn = random.Random(seed).sample(range(len(train_split)), train_examples + val_examples)
    parts = {"train": sorted(drawn[:train_examples]), "val": sorted(drawn[train_examples:])}
    parts["test"] = sorted(random.Random(seed).sample(range(len(test_split)), min(test_examples, len(test_split))))
    paths = {}
    for name, indices in parts.items():
        source = test_split if name == "test" else train_split
        paths[name] = str(folder / f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": source[i][0], "label": source[i][1]}) + "\n" for i in indices)
    return paths


def finetune_config(spec: dict, lora: bool, out: str, **settings):
    """The pocketlm fine-tune both sides of B (and the runs of A) follow: one source of truth."""
    from pocketlm.config import FinetuneConfig

    return FinetuneConfig(task="classify", data=spec["train"], val=spec["val"], model=spec["base"], out=out,
                          lora=lora, threads=spec["threads"], seed=spec["seed"], eval_every=NEVER, **settings)


# --- children: one configuration each ------------------------------------------------------------

def child_finetune(spec: dict, lora: bool) -> dict:
    """A: a pocketlm fine-tune with the CLI's defaults (one epoch), then the test split scored
    through the sentiment-analysis pipeline on the run folder (its best checkpoint)."""
    from pocketlm.labelled import read_labelled
    from pocketlm.pipelines import pipeline

    config = finetune_config(spec, lora, str(Path(spec["tmp"]) / ("run-lora" if lora else "run-full")))
    trainer, seconds = timed_fit(config)
    steps = trainer.step
    test = read_labelled(spec["test"])
    t0 = time.perf_counter()
    classify = pipeline("sentiment-analysis", model=config.out, batch_size=16)
    predicted = [answer["label"] for answer in classify([text for text, _ in test])]
    return {**scores(test, predicted), "train_seconds": seconds, "steps": steps,
            "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "test_seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def timed_fit(config):
    """Run pocketlm's Trainer; its wall time from the first step to where the final validation
    starts (as bench/train.py times it)."""
    from pocketlm.train import Trainer

    trainer = Trainer(config)
    evaluate, timing = trainer.evaluate, {}

    def timed_evaluate():
        timing.setdefault("end", time.perf_counter())
        return evaluate()

    trainer.evaluate = timed_evaluate
    t0 = time.perf_counter()
    trainer.fit()
    return trainer, timing["end"] - t0


def child_zeroshot(spec: dict) -> dict:
    """A: the base model, no training: each label's log-likelihood after pocketlm's default instruction."""
    import torch

    from pocketlm.api import AutoModelForCausalLM, AutoTokenizer
    from pocketlm.labelled import label_names, read_labelled
    from pocketlm.zeroshot import ZeroShotClassifier

    torch.set_num_threads(spec["threads"])
    test = read_labelled(spec["test"])
    labels = label_names(read_labelled(spec["train"]))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["base"]).eval()
    classifier = ZeroShotClassifier(model, AutoTokenizer.from_pretrained(spec["base"]), labels)
    predicted = classifier.predict([text for text, _ in test], batch_size=16)
    return {**scores(test, predicted), "train_seconds": None, "trainable": 0,
            "test_seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def child_bag_of_words(spec: dict) -> dict:
    """A: logistic regression on unigram and bigram counts of the same training sample: mean
    cross-entropy + ||W||² / (2·C·n) with C = 1 (scikit-learn's default objective, bias not
    penalised), minimised full-batch by L-BFGS from zero."""
    import torch
    import torch.nn.functional as F

    from pocketlm.labelled import label_names, read_labelled

    # one thread: the products are tiny, and a second thread made sparse backward 30× slower on
    # a loaded 2-core machine (it waits for the busier core at every product)
    torch.set_num_threads(1)
    train, test = read_labelled(spec["train"]), read_labelled(spec["test"])
    labels = label_names(train)
    t0 = time.perf_counter()
    vocabulary: dict[str, int] = {}
    for text, _ in train:
        for gram in ngrams(text):
            vocabulary.setdefault(gram, len(vocabulary))
    x_train, y_train = bag(train, vocabulary), torch.tensor([labels.index(label) for _, label in train])
    weights = torch.zeros(len(vocabulary) + 1, len(labels), dtype=torch.float64, requires_grad=True)  # + bias
    optimizer = torch.optim.LBFGS([weights], lr=1, max_iter=500, tolerance_grad=1e-7, tolerance_change=1e-10,
                                  history_size=20, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        penalty = weights[:-1].pow(2).sum() / (2 * len(train))
        loss = F.cross_entropy(torch.sparse.mm(x_train, weights), y_train) + penalty
        loss.backward()
        return loss

    optimizer.step(objective)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        predicted = torch.sparse.mm(bag(test, vocabulary), weights).argmax(-1).tolist()
    return {**scores(test, [labels[i] for i in predicted]), "train_seconds": seconds,
            "trainable": weights.numel(), "test_seconds": None, "peak_rss_mb": peak_rss_mb()}


def ngrams(text: str) -> list[str]:
    words = re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


def bag(examples: list, vocabulary: dict[str, int]):
    """(N, V + 1) sparse float64 counts of the known n-grams, and a last column of ones for the bias."""
    import torch

    rows, columns = [], []
    for row, (text, _) in enumerate(examples):
        known = [vocabulary[gram] for gram in ngrams(text) if gram in vocabulary] + [len(vocabulary)]
        rows += [row] * len(known)
        columns += known
    counts = torch.sparse_coo_tensor(torch.tensor([rows, columns]), torch.ones(len(rows), dtype=torch.float64),
                                     (len(examples), len(vocabulary) + 1), check_invariants=True)
    return counts.coalesce()  # a repeated n-gram's ones summed into its count


def scores(test: list, predicted: list[str]) -> dict:
    from pocketlm.metrics import classification_metrics

    labels = sorted({label for _, label in test} | set(predicted))
    found = classification_metrics([labels.index(label) for _, label in test],
                                   [labels.index(label) for label in predicted], len(labels))
    return {"accuracy": found["accuracy"], "macro_f1": found["macro_f1"], "examples": len(test)}


def child_pocketlm_lora(spec: dict) -> dict:
    """B: pocketlm's LoRA fine-tune for --steps steps; every step's loss from metrics.csv."""
    import csv

    config = finetune_config(spec, True, str(Path(spec["tmp"]) / "speed-pocketlm"), max_steps=spec["steps"],
                             log_every=1)
    trainer, seconds = timed_fit(config)
    with open(Path(config.out) / "metrics.csv", newline="") as f:
        losses = [float(row["train_loss"]) for row in csv.DictReader(f)]
    rows = drawn(trainer.task.train, config.batch_size, config.seed, config.max_steps)
    return {"seconds": seconds, "losses": losses, **fed(rows), "batch_size": config.batch_size,
            "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "peak_rss_mb": peak_rss_mb()}


def drawn(rows: list, batch_size: int, seed: int, steps: int) -> list:
    """The (ids, label) rows of the `steps` batches pocketlm's seeded epochs draw from `rows`, in order."""
    from pocketlm.finetune import ExampleBatches

    batches = ExampleBatches(rows, batch_size, seed, collate=lambda chosen: chosen)
    return [row for _ in range(steps) for row in batches.next()]


def fed(rows: list) -> dict:
    """What a side trained on: its real tokens, and a digest of the rows in order (both must agree)."""
    digest = hashlib.sha256(json.dumps([[list(ids), label] for ids, label in rows]).encode()).hexdigest()
    return {"tokens": sum(len(ids) for ids, _ in rows), "batches": digest[:16]}


def child_peft(spec: dict) -> dict:
    """B: transformers' Trainer over AutoModelForSequenceClassification with a peft LoRA adapter,
    fed the very batches pocketlm draws (in order), padded by its usual collator."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from torch.optim.lr_scheduler import LambdaLR

    from pocketlm.labelled import label_names, read_labelled
    from pocketlm.lora import LLAMA_TARGETS

    torch.set_num_threads(spec["threads"])
    ours = finetune_config(spec, True, str(Path(spec["tmp"]) / "unused"), max_steps=spec["steps"])
    train = read_labelled(spec["train"])
    labels = label_names(train)
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["base"])
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = tokenizer([text for text, _ in train])["input_ids"]
    rows = drawn([(row, labels.index(label)) for row, (_, label) in zip(ids, train)], ours.batch_size, ours.seed,
                 ours.max_steps)
    ordered = [{"input_ids": row, "labels": label} for row, label in rows]

    transformers.set_seed(ours.seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        spec["base"], num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=ours.lora_r, lora_alpha=ours.lora_alpha,
                                             lora_dropout=ours.lora_dropout, target_modules=list(LLAMA_TARGETS)))
    args = transformers.TrainingArguments(
        output_dir=str(Path(spec["tmp"]) / "speed-peft"), max_steps=ours.max_steps,
        per_device_train_batch_size=ours.batch_size, learning_rate=ours.lr, weight_decay=ours.weight_decay,
        adam_beta1=ours.beta1, adam_beta2=ours.beta2, max_grad_norm=ours.grad_clip, optim="adamw_torch",
        train_sampling_strategy="sequential", eval_strategy="no", save_strategy="no", logging_steps=1,
        report_to="none", disable_tqdm=True, use_cpu=True, seed=ours.seed, dataloader_num_workers=0)

    class Recorder(transformers.TrainerCallback):
        """Times the training loop and keeps each step's logged loss."""

        def __init__(self):
            self.start = self.end = None
            self.losses = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    class PocketlmSchedule(transformers.Trainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lambda step: ours.lr_at(step) / ours.lr)
            return self.lr_scheduler

    record = Recorder()
    trainer = PocketlmSchedule(model=model, args=args, train_dataset=ordered, callbacks=[record],
                               data_collator=transformers.DataCollatorWithPadding(tokenizer))
    trainer.remove_callback(transformers.PrinterCallback)  # (disable_tqdm puts it there: it prints each log)
    trainer.train()
    return {"seconds": record.end - record.start, "losses": record.losses, **fed(rows), "batch_size": ours.batch_size,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "peak_rss_mb": peak_rss_mb()}


CHILDREN = {"lora": lambda spec: child_finetune(spec, lora=True), "full": lambda spec: child_finetune(spec, lora=False),
            "zeroshot": child_zeroshot, "bow": child_bag_of_words, "pocketlm-lora": child_pocketlm_lora,
            "peft-lora": child_peft}


def run_child(kind: str, spec_path: str) -> dict:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--spec", spec_path],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - t0
    print(f"  {kind}: done in {result['process_seconds']:.0f} s", file=sys.stderr)
    return result


# --- the report ----------------------------------------------------------------------------------

def header(args, spec: dict) -> str:
    return "\n".join([
        f"Run {datetime.date.today()}. Machine: "
        f"{machine_description(None, ('torch', 'transformers', 'peft'))}. {args.threads} threads; base "
        f"{BASE} (Q4_1 GGUF dequantized to an fp32 HF folder by `pocketlm convert`); "
        f"{spec['counts']['train']:,} training and {spec['counts']['val']:,} validation sentences drawn from "
        f"the `sentiment` training split (seed {args.seed}); each configuration in a fresh process.",
        "",
        "    " + command_line(),
    ])


def table_a(results: dict, spec: dict) -> str:
    from pocketlm.config import FinetuneConfig

    def seconds(value):
        return "— (no training)" if value is None else f"{value:,.1f} s"

    def rate(lr: float) -> str:  # 5e-4, as the issue writes it
        return re.sub(r"e-0*", "e-", f"{lr:.0e}")

    lora, full = FinetuneConfig(lora=True), FinetuneConfig()
    rows = [(f"pocketlm LoRA (r {lora.lora_r}, {lora.lora_targets}, lr {rate(lora.lr)}, {lora.epochs:g} epoch)",
             "lora"),
            (f"pocketlm full fine-tune (lr {rate(full.lr)}, {full.epochs:g} epoch)", "full"),
            ("zero-shot (pocketlm.zeroshot, default instruction)", "zeroshot"),
            ("bag of words: logistic regression on uni+bigrams", "bow")]
    lines = [f"Held-out test: {spec['counts']['test']:,} sentences of `sentiment:test`.", "",
             "| configuration | accuracy ↑ | macro-F1 ↑ | time per epoch ↓ | trainable parameters "
             "| peak RSS MB ↓ |",
             "|---|---|---|---|---|---|"]
    for name, kind in rows:
        r = results[kind]
        lines.append(f"| {name} | {r['accuracy']:.2%} | {r['macro_f1']:.4f} | {seconds(r['train_seconds'])} | "
                     f"{r['trainable']:,} | {r['peak_rss_mb']:,.0f} |")
    return "\n".join(lines)


def table_b(results: dict, steps: int) -> str:
    ours, peer = results["pocketlm-lora"], results["peft-lora"]
    speed = {k: r["tokens"] / r["seconds"] for k, r in results.items()}
    loss = {k: sum(r["losses"][-LAST_LOSSES:]) / len(r["losses"][-LAST_LOSSES:]) for k, r in results.items()}
    if (ours["tokens"], ours["batches"]) != (peer["tokens"], peer["batches"]):
        raise SystemExit(f"the two sides trained on different batches: {ours['tokens']} tokens, digest "
                         f"{ours['batches']} vs {peer['tokens']} tokens, digest {peer['batches']}")
    gap = max(abs(a - b) for a, b in zip(ours["losses"], peer["losses"]))
    return "\n".join([
        f"{steps} steps of batch {ours['batch_size']}, the same {ours['tokens']:,} real tokens in the same batches "
        "on each side, the same learning rate at each step (the peer's scheduler is given pocketlm's warm-up + "
        "cosine). The peer's collator (DataCollatorWithPadding) passes an attention mask; pocketlm passes none "
        "(under causal attention no real token sees the right padding after it).",
        "",
        "| metric | pocketlm Trainer | transformers Trainer + peft | pocketlm ÷ peer |",
        "|---|---|---|---|",
        f"| trainable parameters | {ours['trainable']:,} | {peer['trainable']:,} | |",
        f"| training tokens/s ↑ | {speed['pocketlm-lora']:,.0f} | {speed['peft-lora']:,.0f} | "
        f"{speed['pocketlm-lora'] / speed['peft-lora']:.2f}× |",
        f"| peak RSS MB ↓ | {ours['peak_rss_mb']:,.0f} | {peer['peak_rss_mb']:,.0f} | "
        f"{ours['peak_rss_mb'] / peer['peak_rss_mb']:.2f}× |",
        f"| loss after {steps} steps (mean of the last {min(LAST_LOSSES, steps)}) | {loss['pocketlm-lora']:.4f} | "
        f"{loss['peft-lora']:.4f} | {loss['pocketlm-lora'] - loss['peft-lora']:+.4f} |",
        f"| largest difference of one step's loss | | | {gap:.4f} |",
    ])


def merged_section(markdown: str | None, parts: dict[str, str]) -> str:
    """The section's text with `parts` (subheading → text) replacing theirs, and the part not
    re-measured in this run kept as the file has it."""
    kept = {}
    if markdown and Path(markdown).exists():
        text = Path(markdown).read_text(encoding="utf-8")
        section = re.search(rf"^{re.escape(HEADING)}[ \t]*\n(.*?)(?=^#{{1,2}} |\Z)", text, re.M | re.S)
        if section:
            for match in re.finditer(r"^(### .*?)\n(.*?)(?=^### |\Z)", section[1], re.M | re.S):
                kept[match[1].strip()] = match[2].strip()
    kept.update(parts)
    return "\n\n".join(f"{heading}\n\n{kept[heading]}" for heading in (PART_A, PART_B) if heading in kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-examples", type=int, default=1000)
    parser.add_argument("--test-examples", type=int, default=10**9, help="a seeded sample of the test split "
                        "(default: all of it)")
    parser.add_argument("--steps", type=int, default=60, help="LoRA steps of the speed comparison (B)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--only", choices=("A", "B"), help="measure one part; the other keeps its text in --write")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace or append this script's section there")
    parser.add_argument("--child", choices=tuple(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        print(json.dumps(CHILDREN[args.child](spec)))
        return
    if min(args.train_examples, args.test_examples, args.steps, args.threads) < 1:
        raise SystemExit("--train-examples, --test-examples, --steps and --threads must be ≥ 1")

    parts = {}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"converting {BASE} and drawing the samples ...", file=sys.stderr)
        base = str(Path(tmp) / "base")
        subprocess.run([sys.executable, "-m", "pocketlm", "convert", BASE, base], check=True, stdout=subprocess.DEVNULL)
        paths = write_samples(Path(tmp), args.train_examples, args.test_examples, args.seed)
        counts = {name: sum(1 for _ in open(path, encoding="utf-8")) for name, path in paths.items()}
        spec = {**paths, "base": base, "tmp": tmp, "threads": args.threads, "seed": args.seed,
                "steps": args.steps, "counts": counts}
        spec_path = str(Path(tmp) / "spec.json")
        Path(spec_path).write_text(json.dumps(spec))
        intro = header(args, spec)
        if args.only in (None, "A"):
            print(f"A: accuracy ({counts['train']} training, {counts['test']} test sentences) ...", file=sys.stderr)
            results = {kind: run_child(kind, spec_path) for kind in ("lora", "full", "zeroshot", "bow")}
            parts[PART_A] = intro + "\n\n" + table_a(results, spec)
            for kind in ("lora", "full"):
                r = results[kind]
                print(f"  {kind}: {r['steps']} steps, {r['train_seconds'] / r['steps']:.2f} s/step, "
                      f"test scored in {r['test_seconds']:.0f} s", file=sys.stderr)
        if args.only in (None, "B"):
            print(f"B: LoRA speed, {args.steps} steps each ...", file=sys.stderr)
            results = {kind: run_child(kind, spec_path) for kind in ("pocketlm-lora", "peft-lora")}
            parts[PART_B] = intro + "\n\n" + table_b(results, args.steps)
            for kind, r in results.items():
                print(f"  {kind}: {r['seconds'] / args.steps:.2f} s/step, step losses "
                      f"{' '.join(f'{loss:.4f}' for loss in r['losses'])}", file=sys.stderr)
    publish(merged_section(args.write, parts), HEADING, args.write)


if __name__ == "__main__":
    main()
