"""The Trainer: maximum likelihood on prepared shards, checkpoints that survive crashes, resume
that reproduces an uninterrupted run, DDP equal to one process."""

import csv
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from conftest import TINY
from pocketlm import train as train_module
from pocketlm.api import CausalLM
from pocketlm.config import ModelConfig, TrainConfig
from pocketlm.data import DataError, char_tokenizer, prepare
from pocketlm.errors import ConfigError, NotFoundError
from pocketlm.train import Trainer, TrainingError, complete_checkpoints

ROOT = Path(__file__).resolve().parent.parent
TEXT = "the quick brown fox jumps over the lazy dog. "
DOCS = [f"{i}: {TEXT * (3 + i % 4)}\n" for i in range(40)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, model folder): char-level shards of a repetitive text, and a tiny untrained
    Llama saved with the same tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "docs.jsonl"
    import json

    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    tok = char_tokenizer(DOCS)
    prepare([src], root / "data", tokenizer=tok, val_frac=0.2, seed=0)
    config = ModelConfig(**{**TINY["llama-gqa-tied"], "vocab_size": len(tok), "eos_token_id": tok.eos_token_id})
    torch.manual_seed(0)
    CausalLM.from_config(config).save_pretrained(root / "model", tokenizer=tok)
    return root / "data", root / "model"


def _config(corpus, out, **kw) -> TrainConfig:
    data, model = corpus
    settings = dict(data=str(data), model=str(model), out=str(out), max_steps=12, batch_size=4, block_size=16,
                    lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=4, eval_windows=4, log_every=1,
                    sample_tokens=8, threads=2, keep_last=5)
    return TrainConfig(**{**settings, **kw})


def _metrics(run: Path) -> dict[int, dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


def _cli(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pocketlm", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _flags(config: TrainConfig) -> list[str]:
    flags = []
    for name, value in vars(config).items():
        if isinstance(value, bool):
            flags.append(f"--{'' if value else 'no-'}{name.replace('_', '-')}")
        else:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def test_learning_rate_warms_up_then_decays_by_cosine():
    c = TrainConfig(data="x", lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert [c.lr_at(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert c.lr_at(10) == 1.0 and abs(c.lr_at(60) - 0.55) < 1e-12 and abs(c.lr_at(110) - 0.1) < 1e-12
    assert all(c.lr_at(s) >= c.lr_at(s + 1) for s in range(10, 120))


def test_loss_falls_to_near_zero_on_repetitive_text(corpus, tmp_path):
    config = _config(corpus, tmp_path / "run", max_steps=150, eval_every=50, lr=2e-2, warmup_steps=10,
                     batch_size=8, block_size=32, sample_tokens=0)
    last = Trainer(config).fit()
    rows = _metrics(tmp_path / "run")
    assert float(rows[1]["train_loss"]) > 2.0  # starts near a uniform guess over the characters
    assert last["train_loss"] < 0.25 and last["val_loss"] < 0.25, last
    assert float(rows[150]["val_loss"]) < float(rows[50]["val_loss"])
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000  # the curve, drawn at each evaluation
    # the final checkpoint is a Hugging Face folder transformers loads and agrees with
    final = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert final.name == "step-0000150"
    ours = CausalLM.from_pretrained(final)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-4)


def test_optimizer_decays_matrices_only(corpus, tmp_path):
    trainer = Trainer(_config(corpus, tmp_path / "run"))
    decayed, plain = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(trainer.model.parameters()))


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> Path:
    """The run the crashed-and-resumed ones must reproduce, in a process of its own like them."""
    run = tmp_path_factory.mktemp("reference") / "run"
    done = _cli(["train", *_flags(_config(corpus, run))])
    assert done.returncode == 0, done.stderr
    return run


@pytest.mark.parametrize("point", ["after-weights", "after-state", "before-rename", "after-rename"])
def test_a_crash_inside_a_save_loses_only_unsaved_steps_and_resume_is_exact(corpus, uninterrupted, tmp_path, point):
    """Killed (like kill -9) at a point inside the save of step 8; the newest complete checkpoint
    is step 4 (step 8 when the rename had happened); resuming reproduces the uninterrupted
    run's losses bit for bit."""

    crashed = _config(corpus, tmp_path / "crashed")
    done = _cli(["train", *_flags(crashed)], env={train_module.FAULT_ENV: f"{point}:8"})
    assert done.returncode == 86, done.stderr
    kept = [p.name for p in complete_checkpoints(tmp_path / "crashed" / "checkpoints")]
    assert kept == (["step-0000004", "step-0000008"] if point == "after-rename" else ["step-0000004"])
    CausalLM.from_pretrained(tmp_path / "crashed" / "checkpoints" / kept[-1])  # loads

    resumed = _config(corpus, tmp_path / "crashed", resume=True)
    done = _cli(["train", *_flags(resumed)])
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stderr
    ref, got = _metrics(uninterrupted), _metrics(tmp_path / "crashed")
    assert sorted(got) == list(range(1, 13))
    assert [got[s]["train_loss"] for s in range(1, 13)] == [ref[s]["train_loss"] for s in range(1, 13)]
    assert got[12]["val_loss"] == ref[12]["val_loss"]
    assert not list((tmp_path / "crashed" / "checkpoints").glob(".step-*"))  # the cut-short save is gone


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(corpus, tmp_path):
    config = _config(corpus, tmp_path / "run", max_steps=100_000, eval_every=100_000, log_every=5)
    proc = subprocess.Popen([sys.executable, "-m", "pocketlm", "train", *_flags(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.csv"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(saved) == 1
    assert max(_metrics(tmp_path / "run")) == int(saved[0].name.split("-")[1])


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_module.next_token_loss

    def poisoned(model, window):
        calls["n"] += 1
        loss = real(model, window)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(train_module, "next_token_loss", poisoned)
    trainer = Trainer(_config(corpus, tmp_path / "run", eval_windows=1))
    with pytest.raises(TrainingError, match=r"became nan at step \d+.*step-0000004"):
        trainer.fit()
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in saved] == ["step-0000004"]
    model = CausalLM.from_pretrained(saved[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_finished_run_is_not_overwritten_and_mismatches_are_refused(corpus, tmp_path):
    config = _config(corpus, tmp_path / "run", max_steps=4, sample_tokens=0)
    Trainer(config).fit()
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(config)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before

    other = tmp_path / "other"  # a model whose tokenizer is not the data's
    tok = char_tokenizer(["completely different characters: XYZ"])
    CausalLM.from_config(ModelConfig(**{**TINY["llama-gqa-tied"], "vocab_size": len(tok)})).save_pretrained(
        other, tokenizer=tok)
    with pytest.raises(DataError, match="different tokenizer"):
        Trainer(_config(corpus, tmp_path / "run2", model=str(other)))
    with pytest.raises(ConfigError, match="--min-lr"):
        Trainer(_config(corpus, tmp_path / "run3", min_lr=1.0))
    with pytest.raises(NotFoundError, match="neither a preset"):
        Trainer(_config(corpus, tmp_path / "run4", model="no-such-model"))
    with pytest.raises(NotFoundError, match="data folder not found"):
        Trainer(_config(corpus, tmp_path / "run5", data=str(tmp_path / "no-data")))


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory) -> Path:
    """20 steps with a batch of 4 in one process: what the multi-process runs must match."""
    run = tmp_path_factory.mktemp("one-process") / "run"
    config = _config(corpus, run, max_steps=20, eval_every=10, sample_tokens=0, threads=1)
    done = _cli(["train", *_flags(config)])
    assert done.returncode == 0, done.stderr
    return run


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "pocketlm", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_ddp_on_two_cpu_processes_matches_one_process(corpus, one_process, tmp_path):
    """The same global batch (4 sequences): one process, or two ranks of two under torchrun
    with gloo; the losses after 20 steps agree within 1e-3 relative."""
    ddp = _config(corpus, tmp_path / "ddp", max_steps=20, eval_every=10, sample_tokens=0, threads=1, batch_size=2)
    done = _torchrun(["train", *_flags(ddp)])
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _metrics(one_process), _metrics(tmp_path / "ddp")
    for key in ("train_loss", "val_loss"):
        a, b = float(one[20][key]), float(two[20][key])
        assert abs(a - b) <= 1e-3 * abs(a), (key, a, b)
    assert len(complete_checkpoints(tmp_path / "ddp" / "checkpoints")) == 2  # rank 0 alone wrote them


def test_fsdp_shards_across_two_processes_saves_whole_checkpoints_and_resumes(corpus, one_process, tmp_path):
    """--fsdp under torchrun: each rank holds half of every weight and moment; the losses follow
    one process's (within 1%: gradients are reduce-scattered, summed in another order), the
    checkpoint is the whole model, and --resume continues from it."""
    fsdp = _config(corpus, tmp_path / "fsdp", max_steps=20, eval_every=10, sample_tokens=4, threads=1,
                   batch_size=2, fsdp=True)
    done = _torchrun(["train", *_flags(fsdp)])
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _metrics(one_process), _metrics(tmp_path / "fsdp")
    assert abs(float(one[10]["train_loss"]) - float(two[10]["train_loss"])) <= 1e-3 * float(one[10]["train_loss"])
    for key in ("train_loss", "val_loss"):
        a, b = float(one[20][key]), float(two[20][key])
        assert abs(a - b) <= 1e-2 * abs(a), (key, a, b)
    saved = complete_checkpoints(tmp_path / "fsdp" / "checkpoints")
    whole = CausalLM.from_pretrained(saved[-1])
    reference = CausalLM.from_pretrained(complete_checkpoints(one_process / "checkpoints")[-1])
    assert whole.num_parameters() == reference.num_parameters()
    done = _torchrun(["train", *_flags(dataclasses.replace(fsdp, max_steps=24, resume=True))])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and max(_metrics(tmp_path / "fsdp")) == 24
    with pytest.raises(ConfigError, match="torchrun"):
        Trainer(dataclasses.replace(fsdp, out=str(tmp_path / "alone")))


def test_compiled_training_follows_the_eager_run(corpus, tmp_path):
    """--compile trains the same model: the losses of 6 steps agree with eager ones (kernels differ,
    so not bit for bit)."""
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        Trainer(_config(corpus, out, max_steps=6, eval_every=3, sample_tokens=4, compile=compiled)).fit()
        runs[compiled] = _metrics(out)
    for step in range(1, 7):
        a, b = float(runs[False][step]["train_loss"]), float(runs[True][step]["train_loss"])
        assert abs(a - b) <= 1e-4 * a, (step, a, b)
    assert abs(float(runs[False][6]["val_loss"]) - float(runs[True][6]["val_loss"])) <= 1e-4 * float(runs[False][6]["val_loss"])
