"""Training: one `Trainer` loop for every task, and the run folder it keeps.

A task (`Task`) plugs into the loop what differs between pretraining and fine-tuning: the model it
starts from, its batches, the loss of a batch and what an evaluation measures. `Pretraining`
(here) maximises the likelihood of each next token on prepared shards; the fine-tuning tasks
(classification, chat instruction tuning, either with LoRA) are in pocketlm.finetune.

A run folder holds `train_config.json` and `model_config.json` (the resolved settings),
`metrics.csv` (step, train_loss, val_loss, lr, tokens_per_s and the task's own metrics, such as
val_accuracy), `best.json` (a fine-tune's best checkpoint), `loss.png` (with the `plot` extra)
and `checkpoints/step-NNNNNNN/`: each a Hugging Face folder (it loads in `pocketlm generate` and
in transformers) plus the training state — `training_state.safetensors` (optimizer moments, RNG
states, the data position) and `trainer_state.json`, written last. A checkpoint is written into
a hidden temporary folder, every file synced, and renamed into place only when complete, so a
crash at any moment leaves the previous checkpoints as they were. `--resume` continues from the
newest complete one; on CPU with the same thread count it reproduces an uninterrupted run's
losses bit for bit.

One run at a time writes into a run folder (it holds a lock, OUT/.lock, while it runs), and every
setting is checked before step 1 — the batch against the memory free on the device, the samples
against the model's context — so a run that starts does not fail on a setting later. A run that
ends before its first step takes away the folder it made; an error after it saves a checkpoint
first. Ctrl-C or SIGTERM stops after the current step, with a checkpoint; a second one stops at
once.

Under `torchrun --nproc-per-node=N` the same Trainer runs data-parallel (DDP; gloo on CPU, nccl
on GPU): every rank draws the same global batch and reads its own rows, rank 0 writes the logs
and checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pocketlm import registry
from pocketlm.checkpoint import (BEST_JSON, CHECKPOINTS, STATE_JSON, best_checkpoint, complete_checkpoints,
                                 newest_checkpoint)
from pocketlm.config import TrainConfig, resolve_device
from pocketlm.errors import ConfigError, PocketLMError
from pocketlm.files import atomic_path, atomic_write_json, fsync_dir, read_json

log = logging.getLogger(__name__)

STATE_TENSORS = "training_state.safetensors"
METRICS = ("step", "train_loss", "val_loss", "lr", "tokens_per_s")
LOCK = ".lock"  # in the run folder: see RunLock
FAULT_ENV = "POCKETLM_FAULT"  # tests: name a point inside a checkpoint save to die there (like kill -9)


class TrainingError(PocketLMError, RuntimeError):
    """Training cannot go on (the loss diverged, the run folder is not resumable, ...)."""


# --- distributed setup ---------------------------------------------------------------------------

@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> "Distributed":
        """torchrun's environment → an initialised process group (none for one process)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    def mean(self, value: float) -> float:
        """The mean of a number over the ranks."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def any(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group together once the run is done: a rank that exits while the
        group's communication threads still run can be aborted on its way out."""
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()


# --- the run folder's lock -----------------------------------------------------------------------

class RunLock:
    """One training run at a time in a run folder: an exclusive flock on OUT/.lock, with the
    holder's pid in it for the error the next run gets. The kernel drops the lock when its
    process ends, even by a crash, so a stale .lock file never blocks anyone. The lock creates
    the folder when it is missing and remembers so, to take the folder away again when the run
    ends before it trained a step."""

    def __init__(self, folder: Path):
        self.folder = folder
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--out {folder} is a file; the run folder must be a folder (choose another --out)")
        self.created = _first_missing(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the run folder --out {folder}: {e.strerror}") from None
        self.path = folder / LOCK
        self.file = self._acquire()
        self.held = True

    def _acquire(self):
        try:
            import fcntl
        except ImportError:  # no flock (Windows): runs go unguarded
            return None
        while True:
            try:
                f = open(self.path, "a+")
            except OSError as e:
                raise ConfigError(f"cannot write into the run folder --out {self.folder}: {e.strerror}") from None
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip()
                f.close()
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise ConfigError(f"{self.folder} is in use by another training run{who}; wait for it to end "
                                  "or choose another --out") from None
            except OSError as e:  # a file system without flock (some network mounts)
                log.warning("cannot lock %s (%s); make sure no other run writes into it", self.folder, e.strerror)
                f.close()
                return None
            try:  # the holder before us may have removed the file between our open and our lock
                current = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if current:
                f.truncate(0)
                f.write(str(os.getpid()))
                f.flush()
                return f
            f.close()

    def release(self, remove_created: bool = False) -> None:
        """Unlock; with remove_created, first take away the folders the lock created."""
        if not self.held:
            return
        self.held = False
        # the lock file goes while the lock is still held: see _acquire
        if remove_created and self.created is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            # the parents it made go only while empty: another run may have made a folder in one since
            for parent in self.folder.absolute().parents:
                if parent == self.created.parent:
                    break
                with contextlib.suppress(OSError):
                    parent.rmdir()
        else:
            self.path.unlink(missing_ok=True)
        if self.file is not None:
            self.file.close()
            self.file = None


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of `folder`'s path that does not exist yet (None when it exists)."""
    missing = None
    for path in (folder.absolute(), *folder.absolute().parents):
        if path.exists():
            return missing
        missing = path
    return missing


# --- the trainer -------------------------------------------------------------------------------

class Task:
    """What a Trainer trains for, plugged into its one loop: the model it starts from, its batches
    (next / state / restore, so a resume continues exactly), the loss of a batch and what an
    evaluation measures. Pretraining is one task; the fine-tuning tasks are in pocketlm.finetune.

    An evaluation returns sums (a loss total, a count, a confusion matrix ...) rather than means,
    so the ranks of a distributed run add theirs up before `summarize` turns them into metrics."""

    metrics: tuple[str, ...] = ()  # metrics.csv columns after step, train_loss, val_loss, lr, tokens_per_s
    best: str | None = None  # the metric that marks the best checkpoint (RUN/best.json) ...
    best_is_highest: bool = True  # ... by its highest value, or its lowest
    tokenizer: Any
    batches: Any  # next(), state() -> tensor, restore(tensor)

    def build_model(self, trainer: "Trainer", resume_from: Path | None) -> torch.nn.Module:
        raise NotImplementedError

    def check(self, trainer: "Trainer") -> None:
        """Checks that need the model (context, vocabulary), before step 1."""

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        """The loss of a batch and the tokens it trained on (for tokens/s)."""
        raise NotImplementedError

    def evaluation_sums(self, model, autocast) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def summarize(self, sums: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Sums → metrics: at least val_loss."""
        return {"val_loss": float(sums["loss"]) / max(float(sums["count"]), 1.0)}

    def sample(self, trainer: "Trainer") -> str | None:
        return None

    def save(self, model, folder: Path) -> None:
        model.save_pretrained(folder, tokenizer=self.tokenizer)

    def report(self, metrics: dict[str, Any]) -> list[str]:
        """Lines printed under an evaluation's summary (a confusion matrix, say)."""
        return []


class Pretraining(Task):
    """Maximum likelihood on token shards made by `pocketlm prepare`: random windows of
    block_size + 1 tokens; the loss is the mean −log p(next token)."""

    def __init__(self, config: TrainConfig, dist: "Distributed"):
        from pocketlm.data import Batches, TokenShard
        from pocketlm.tokenizer import Tokenizer

        self.config = config
        self.train_shard, self.val_shard = TokenShard(config.data, "train"), TokenShard(config.data, "val")
        self.tokenizer = Tokenizer.from_pretrained(config.data)
        for shard in (self.train_shard, self.val_shard):
            shard.check_tokenizer(self.tokenizer)
        # before the model: a --block-size longer than the data is refused before a model that size is built
        self.batches = Batches(self.train_shard, config.batch_size, config.block_size, self.train_shard.vocab_size,
                               config.seed, dist.rank, dist.world_size)
        self.dist = dist

    def build_model(self, trainer: "Trainer", resume_from: Path | None):
        from pocketlm.api import CausalLM
        from pocketlm.config import PRESETS, ModelConfig

        c = self.config
        source = resume_from
        if source is None and c.model not in PRESETS:
            source = registry.resolve(c.model, unknown=f"--model {c.model!r} is neither a preset "
                                      f"({', '.join(PRESETS)}) nor a checkpoint folder, run folder, GGUF file "
                                      "or registry name")
        if source is None:
            preset = ModelConfig.preset(c.model)
            eos = self.tokenizer.eos_token_id
            config = dataclasses.replace(
                preset, vocab_size=len(self.tokenizer), dropout=c.dropout, eos_token_id=eos,
                bos_token_id=self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else eos,
                pad_token_id=self.tokenizer.pad_token_id, max_position=max(c.block_size, preset.max_position if preset.pos != "learned"
                                                    else c.block_size))
            config.validate()
            with torch.device("meta"):  # the parameter count, before allocating any of them
                parameters = CausalLM.from_config(config).num_parameters()
            trainer._check_memory(config, parameters, weights_allocated=False)
            model = CausalLM.from_config(config)
        else:
            from pocketlm.api import load_model_and_tokenizer

            ref = registry.resolve(source)
            if ref.kind == "gguf" or any((ref.path / f).is_file() for f in ("tokenizer.json", "vocab.json")):
                # the shards must hold this model's token ids, whichever way the model came
                model, tokenizer = load_model_and_tokenizer(ref, dtype=torch.float32)
                self.train_shard.check_tokenizer(tokenizer)
            else:
                model = CausalLM.from_pretrained(ref, dtype=torch.float32)
        contiguous(model)
        if c.block_size > model.config.max_position:  # (a preset's context grows to --block-size)
            raise ConfigError(f"--block-size {c.block_size} is beyond the model's context of "
                              f"{model.config.max_position} tokens; use --block-size {model.config.max_position} "
                              "or less")
        if source is not None:
            trainer._check_memory(model.config, model.num_parameters(),
                                  weights_allocated=trainer.device.type == "cpu")
        return model

    def check(self, trainer: "Trainer") -> None:
        from pocketlm.data import eval_windows

        c, vocab = self.config, trainer.model.config.vocab_size
        if vocab < self.train_shard.vocab_size:
            raise ConfigError(f"the model's vocabulary has {vocab:,} tokens but the data's tokenizer has "
                              f"{self.train_shard.vocab_size:,}; prepare the data with the model's tokenizer "
                              "(pocketlm prepare --tokenizer MODEL)")
        self._check_sample_fits(trainer.model)
        self.val = eval_windows(self.val_shard, c.eval_windows, c.block_size, vocab)
        if not c.fsdp:  # under FSDP every rank runs every forward: the shards gather together
            self.val = self.val[self.dist.rank::self.dist.world_size]

    def loss(self, model, window: torch.Tensor) -> tuple[torch.Tensor, int]:
        return next_token_loss(model, window), window.shape[0] * (window.shape[1] - 1)

    def evaluation_sums(self, model, autocast) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        total = 0.0
        for window in self.val:
            with autocast():
                total += float(next_token_loss(model, window.to(device)))
        return {"loss": torch.tensor(total, dtype=torch.float64), "count": torch.tensor(float(len(self.val)))}

    def sample(self, trainer: "Trainer") -> str | None:
        """A short sample from the model, drawn with its own seeded generator so that sampling
        never moves the training RNG; the weights stay as they are (no packing)."""
        from pocketlm.generate import Generator

        c = self.config
        if not c.sample_tokens:
            return None
        gen = Generator(trainer.model, self.tokenizer, pack=False)
        done = gen.generate(self._sample_prompt(), max_new_tokens=c.sample_tokens, do_sample=True, temperature=0.8,
                            top_k=50, seed=c.seed + trainer.step, eos_token_id=None)
        return c.sample_prompt + done.text

    def _sample_prompt(self) -> list[int]:
        c = self.config
        prompt = self.tokenizer.encode(c.sample_prompt, add_special_tokens=False) if c.sample_prompt else []
        if not prompt and self.tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no end-of-text token to start samples from; pass --sample-prompt "
                              "TEXT, or --sample-tokens 0 for no samples")
        return prompt or [self.tokenizer.eos_token_id]

    def _check_sample_fits(self, model) -> None:
        """The samples of every evaluation must fit the model's context: found now, not after
        the first --eval-every steps."""
        c = self.config
        if not c.sample_tokens:
            return
        prompt, context = len(self._sample_prompt()), model.config.max_position
        if prompt + c.sample_tokens > context:
            raise ConfigError(f"samples need {prompt} prompt tokens (--sample-prompt) + --sample-tokens "
                              f"{c.sample_tokens} = {prompt + c.sample_tokens} positions, beyond the model's "
                              f"context of {context}; lower --sample-tokens or shorten --sample-prompt "
                              "(--sample-tokens 0: no samples)")


def task_for(config: TrainConfig, dist: "Distributed") -> Task:
    """The task a config describes: pretraining, or the fine-tune its `task` field names."""
    kind = getattr(config, "task", "pretrain")
    if kind == "pretrain":
        return Pretraining(config, dist)
    from pocketlm import finetune

    return finetune.TASKS[kind](config, dist)


def contiguous(model: torch.nn.Module) -> None:
    """Training runs on plain contiguous weights, whatever layout loading chose."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()


class Trainer:
    """One training loop for every task (pretraining by maximum likelihood, classification and
    instruction fine-tunes): checkpoints, exact resume, signals, evaluation and logs."""

    def __init__(self, config: TrainConfig):
        config.validate()
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.dist = Distributed.from_env(self.device.type)
        if self.device.type == "cuda" and self.dist.world_size > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.autocast = _autocast_dtype(config.precision, self.device)
        self.out = Path(config.out)
        self.checkpoints = self.out / CHECKPOINTS
        self.step = 0
        self._stop_signal: str | None = None
        self._evaluated: dict[str, Any] = {}  # the metrics of an evaluation whose checkpoint is not saved yet
        self.task = task_for(config, self.dist)
        self.config = config = getattr(self.task, "config", config)  # a task may settle --max-steps from --epochs
        self.tokenizer = self.task.tokenizer

        # one run at a time in a folder; what this run creates goes again if it ends before step 1
        self._lock = RunLock(self.out) if self.dist.main else None
        try:
            self._build()
        except BaseException:
            self._release(trained=False)
            raise

    def _build(self) -> None:
        config = self.config
        resume_from = self._resume_point()
        torch.manual_seed(config.seed)  # the initial weights
        self.model = self.task.build_model(self, resume_from).train()
        self.task.check(self)
        self.model.to(self.device)
        if config.fsdp:
            self._shard()
        self.optimizer = self._build_optimizer()
        self.forward = self.model
        if self.dist.world_size > 1 and not config.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.compile:
            self.forward = torch.compile(self.forward)
        self.best = read_json(self.out / BEST_JSON, "best-checkpoint mark") \
            if resume_from is not None and (self.out / BEST_JSON).is_file() else None
        if resume_from is not None:
            self._load_state(resume_from)

    @property
    def finished(self) -> bool:
        """True when the run already reached max_steps (a --resume of a finished run)."""
        return self.step >= self.config.max_steps

    def _release(self, trained: bool) -> None:
        """Unlock the run folder; a run that trained no step takes away the folder it made."""
        if self._lock is not None:
            self._lock.release(remove_created=not trained)
            self._lock = None

    # --- building ---

    def _check_memory(self, config, parameters: int, weights_allocated: bool) -> None:
        """Refuse, before step 1, a --batch-size × --block-size whose step cannot fit the memory
        free on the device (or whose validation windows cannot), suggesting --grad-accum."""
        from pocketlm.generate import available_memory

        c = self.config
        free = available_memory(self.device)
        if free is None:
            return
        if self.device.type == "cpu":  # torchrun's processes on this machine share its memory
            free //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        share = self.dist.world_size if c.fsdp else 1  # FSDP splits weights, gradients and moments
        fixed = ((12 if weights_allocated else 16) * parameters // share
                 + c.eval_windows * (c.block_size + 1) * 8)  # and the validation windows, int64
        per_sequence = c.block_size * activation_bytes_per_token(config, 2 if self.autocast else 4)
        need = fixed + c.batch_size * per_sequence
        if need <= free:
            return
        gib = 2**30
        fits = (free - fixed) // per_sequence if free > fixed else 0
        if fits >= 1:
            advice = (f"lower --batch-size: --batch-size {fits} --grad-accum {math.ceil(c.batch_size / fits)} "
                      "trains on as many tokens per step, in smaller pieces")
        else:
            advice = "lower --block-size (or --eval-windows), or train a smaller model"
        raise ConfigError(f"--batch-size {c.batch_size} × --block-size {c.block_size} needs at least "
                          f"{need / gib:,.1f} GiB for a training step of this {parameters / 1e6:,.1f}M-parameter "
                          f"model, but {self.device.type.upper()} memory has {free / gib:,.1f} GiB free; {advice}")

    def _shard(self) -> None:
        """FSDP: each block's parameters (and the rest, at the root) split across the ranks,
        gathered for each forward and backward, gradients reduce-scattered."""
        if self.dist.world_size == 1:
            raise ConfigError("--fsdp shards the model across processes: run it under torchrun "
                              "--nproc-per-node=N with N ≥ 2")
        from torch.distributed.fsdp import fully_shard

        for block in self.model.model.layers:
            fully_shard(block)
        fully_shard(self.model)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        # decay the matrices (weights of products, embeddings); leave norms' scales and biases alone
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2),
                                 fused=self.device.type == "cuda" or None)

    # --- the loop ---

    def fit(self) -> dict[str, float]:
        """Train to max_steps (or max_minutes, or a SIGINT/SIGTERM, each of which saves a
        checkpoint first). Returns the last train and validation losses; nothing (an empty dict)
        when a resumed run had already reached max_steps, which leaves the run folder as it was."""
        c = self.config
        main = self.dist.main
        first = self.step
        if self.finished:
            if main:
                log.info("run already finished at step %d (--max-steps %d); pass a larger --max-steps to "
                         "train further", self.step, c.max_steps)
            self._release(trained=False)
            return {}
        bar = _progress(self.step, c.max_steps) if main else None
        previous = self._install_signal_handlers()
        started, window_start, window_tokens = time.monotonic(), time.monotonic(), 0
        last = {"train_loss": float("nan"), "val_loss": float("nan")}
        try:
            with _logs_above(bar):
                while self.step < c.max_steps:
                    loss, tokens = self._train_step()
                    self.step += 1
                    if self.step == first + 1 and main:
                        self._start_run_folder(first)  # only now: a run that trains nothing writes nothing
                    window_tokens += tokens
                    last["train_loss"] = loss
                    elapsed = time.monotonic() - window_start
                    speed = window_tokens / elapsed if elapsed > 0 else 0.0
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{speed:,.0f}", refresh=False)
                        bar.update(1)
                    evaluate = self.step % c.eval_every == 0 or self.step == c.max_steps
                    out_of_time = c.max_minutes > 0 and time.monotonic() - started > 60 * c.max_minutes
                    stop = self.dist.any(self._stop_signal is not None or out_of_time)
                    row = None
                    if evaluate or stop or self.step % c.log_every == 0:
                        row = {"step": self.step, "train_loss": loss, "val_loss": "", "lr": c.lr_at(self.step - 1),
                               "tokens_per_s": round(speed, 1)}
                        window_start, window_tokens = time.monotonic(), 0
                    try:
                        self._record(row, evaluate or stop, last, bar)
                    except Exception as e:  # the steps trained so far are saved before the run ends
                        raise self._saved_before_failing(e) from e
                    if evaluate or stop:
                        self.save_checkpoint()
                    if stop:
                        why = f"{self._stop_signal}" if self._stop_signal else f"the {c.max_minutes:g}-minute limit"
                        log.info("stopped by %s at step %d; checkpoint saved; continue with --resume", why, self.step)
                        break
        finally:
            if bar is not None:
                bar.close()
            self._restore_signal_handlers(previous)
            self._release(trained=self.step > first)
        return last

    def _start_run_folder(self, resumed_at: int) -> None:
        atomic_write_json(self.out / "train_config.json", dataclasses.asdict(self.config))
        atomic_write_json(self.out / "model_config.json", dataclasses.asdict(self.model.config))
        self._trim_metrics(resumed_at)

    def _record(self, row: dict | None, evaluate: bool, last: dict[str, float], bar) -> None:
        """A step's evaluation, sample and report, and its row of metrics.csv."""
        c, main = self.config, self.dist.main
        if evaluate:
            metrics = self._evaluated = self.evaluate()
            last.update(metrics)
            row.update(metrics)
            sample = self.sample() if c.sample_tokens and (main or c.fsdp) else None
            if main:
                self._report(row, bar, sample)
        if row is not None and main:
            self._append_metrics(row)  # before the checkpoint: a resume trims rows past it

    def _saved_before_failing(self, error: Exception) -> TrainingError:
        """An evaluation, sample or metrics write failed after training steps: save them, then
        say in one line what failed and where the steps are."""
        what = str(error) if isinstance(error, PocketLMError) else f"{type(error).__name__}: {error}"
        what = " ".join(what.split())
        try:
            saved = self.save_checkpoint()
        except Exception as e:
            newest = newest_checkpoint(self.checkpoints)
            return TrainingError(f"{what}; saving step {self.step} failed too ({e}); the newest complete "
                                 f"checkpoint is {newest or 'none'}")
        where = f" in {saved}" if saved is not None else ""
        return TrainingError(f"{what} (step {self.step} was saved{where} first; continue with --resume)")

    def _train_step(self) -> tuple[float, int]:
        """One optimizer step over --grad-accum batches: (the loss, the tokens of all ranks)."""
        c = self.config
        lr = c.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total, tokens = 0.0, 0
        for micro in range(c.grad_accum):
            batch = _to(self.task.batches.next(), self.device)
            syncing = micro == c.grad_accum - 1 or self.dist.world_size == 1
            with _maybe_no_sync(self.forward, syncing), self._autocast():
                loss, count = self.task.loss(self.forward, batch)
                loss = loss / c.grad_accum
            loss.backward()
            total += loss.item()
            tokens += count
        loss_value = self.dist.mean(total)
        if not math.isfinite(loss_value):
            self._diverged(f"the training loss became {loss_value}")
        if c.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
            if not math.isfinite(norm):
                self._diverged(f"the gradient norm became {norm}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, tokens * self.dist.world_size

    def _diverged(self, what: str) -> None:
        newest = newest_checkpoint(self.checkpoints)
        kept = f"the last good checkpoint is {newest}" if newest else "no checkpoint had been written yet"
        raise TrainingError(f"{what} at step {self.step + 1}; stopped before updating the weights, and "
                            f"{kept}. Lower --lr (now {self.config.lr:g}), raise --warmup-steps or check the data, "
                            "then continue with --resume")

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """The task's validation metrics (val_loss and any others), all ranks together."""
        self.model.eval()
        try:
            sums = self.task.evaluation_sums(self.model, self._autocast)
        finally:
            self.model.train()
        if self.dist.world_size > 1 and not self.config.fsdp:
            import torch.distributed as dist

            for value in sums.values():
                dist.all_reduce(value)
        return self.task.summarize(sums)

    def sample(self) -> str | None:
        self.model.eval()
        try:
            return self.task.sample(self)
        finally:
            self.model.train()

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    # --- reporting ---

    def _report(self, row: dict, bar, sample: str | None) -> None:
        write = bar.write if bar is not None else print
        extra = "".join(f", {name.removeprefix('val_').replace('_', '-')} {row[name]:.4f}"
                        for name in self.task.metrics if isinstance(row.get(name), float))
        write(f"step {row['step']}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}{extra}, "
              f"lr {row['lr']:.2e}, {row['tokens_per_s']:,.0f} tokens/s")
        for line in self.task.report(row):
            write("  " + line)
        if sample is not None:
            write("  sample: " + sample.replace("\n", "\n          ")[:1000])

    @property
    def _metric_fields(self) -> tuple[str, ...]:
        return METRICS + self.task.metrics

    def _append_metrics(self, row: dict) -> None:
        path = self.out / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._metric_fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        if row["val_loss"] != "":
            plot_losses(path, self.out / "loss.png")

    def _trim_metrics(self, resumed_at: int) -> None:
        """On resume, drop the rows of steps that will be trained again."""
        path = self.out / "metrics.csv"
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resumed_at]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._metric_fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    # --- checkpoints ---

    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step-N (rank 0), atomically; keep the newest keep_last."""
        model, optimizer_state = self.model, None
        if self.config.fsdp:  # every rank takes part in gathering the full weights and moments
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(self.model, options=options)
            moments = get_optimizer_state_dict(self.model, self.optimizer, options=options)
            if self.dist.main:  # with cpu_offload only rank 0 holds the full dicts
                optimizer_state = self._by_index(moments)
                from pocketlm.api import CausalLM
                from pocketlm.checkpoint import model_from_tensors

                model = model_from_tensors(CausalLM, self.model.config, weights, where="the gathered FSDP weights")
        if not self.dist.main:
            self.dist.barrier()
            return None
        from safetensors.torch import save_file

        target = self.checkpoints / f"step-{self.step:07d}"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=f".{target.name}."))
        try:
            self.task.save(model, staging)
            _fault("after-weights", self.step)
            tensors, meta = self._state(optimizer_state or self.optimizer.state_dict())
            save_file(tensors, staging / STATE_TENSORS)
            _fault("after-state", self.step)
            atomic_write_json(staging / STATE_JSON, meta)  # last: its presence marks a complete checkpoint
            for f in staging.iterdir():
                with open(f, "rb+") as handle:
                    os.fsync(handle.fileno())
            fsync_dir(staging)
            _fault("before-rename", self.step)
            if target.exists():  # the same step saved again (a stop right after an eval)
                shutil.rmtree(target)
            os.replace(staging, target)
            fsync_dir(self.checkpoints)
            _fault("after-rename", self.step)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._mark_best(target)
        best = best_checkpoint(self.out)
        for old in complete_checkpoints(self.checkpoints)[:-self.config.keep_last]:
            if old != best:  # the best checkpoint stays however old it gets
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return target

    def _mark_best(self, saved: Path) -> None:
        """Record `saved` in RUN/best.json when its evaluation beat every earlier one on the task's
        best metric (a tie keeps the earlier checkpoint)."""
        metric, evaluated, self._evaluated = self.task.best, self._evaluated, {}
        value = evaluated.get(metric) if metric else None
        if not isinstance(value, float) or not math.isfinite(value):
            return
        sign = 1 if self.task.best_is_highest else -1
        if self.best is not None and isinstance(self.best.get("value"), float) \
                and sign * self.best["value"] >= sign * value and best_checkpoint(self.out) is not None:
            return
        self.best = {"checkpoint": saved.name, "metric": metric, "value": value, "step": self.step}
        atomic_write_json(self.out / BEST_JSON, self.best)

    def _state(self, opt: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The optimizer state (keyed by parameter index), RNGs and data position as tensors, the
        rest as JSON."""
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for index, state in opt["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.data"] = self.task.batches.state()
        if torch.cuda.is_available() and self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
        meta = {"step": self.step, "optimizer": {"param_groups": groups, "scalars": scalars},
                "world_size": self.dist.world_size, "train_config": dataclasses.asdict(self.config)}
        return tensors, meta

    def _resume_point(self) -> Path | None:
        if self.dist.main and self.checkpoints.is_dir():
            for leftover in self.checkpoints.glob(".step-*"):  # a save that a crash cut short
                shutil.rmtree(leftover, ignore_errors=True)
        newest = newest_checkpoint(self.checkpoints)
        if not self.config.resume:
            if newest is not None:
                raise ConfigError(f"{self.out} already holds checkpoints ({newest.name}); pass --resume to "
                                  "continue that run, or choose another --out")
            return None
        if newest is None:
            log.info("nothing to resume in %s: starting a new run", self.out)
        return newest

    def _load_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        meta = read_json(folder / STATE_JSON, "trainer state")
        try:
            tensors = load_file(folder / STATE_TENSORS)
        except Exception as e:  # safetensors raises its own error types for broken files
            raise TrainingError(f"{folder / STATE_TENSORS} cannot be read ({e}); resume from an older "
                                "checkpoint by removing this one") from None
        state: dict[int, dict[str, Any]] = {}
        for name, t in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = t.to(self.device)
        for index, values in meta["optimizer"]["scalars"].items():
            state.setdefault(int(index), {}).update(values)
        saved = {"state": state, "param_groups": meta["optimizer"]["param_groups"]}
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, self._by_name(saved),
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(saved)
        torch.set_rng_state(tensors["rng.torch"])
        self.task.batches.restore(tensors["rng.data"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.step = int(meta["step"])
        if meta.get("world_size", 1) != self.dist.world_size:
            log.warning("the checkpoint was written by %s processes, this run has %d: the batches differ from "
                        "an uninterrupted run", meta.get("world_size"), self.dist.world_size)
        if self.dist.main:
            log.info("resumed from %s (step %d)", folder, self.step)

    def _parameter_names(self) -> list[str]:
        """The name of each parameter, in the optimizer's order (its indices)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def _by_index(self, state: dict[str, Any]) -> dict[str, Any]:
        """A full optimizer state keyed by parameter name (as FSDP gives it) → keyed by index."""
        index = {name: i for i, name in enumerate(self._parameter_names())}
        return {"state": {index[n]: v for n, v in state["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}

    def _by_name(self, state: dict[str, Any]) -> dict[str, Any]:
        names = self._parameter_names()
        return {"state": {names[i]: v for i, v in state["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}

    # --- signals ---

    def _install_signal_handlers(self):
        """SIGINT and SIGTERM ask the loop to stop after the step; a second one stops at once.
        Returns the handlers they replace (None off the main thread, where none can be set)."""
        import threading

        self._stop_signal = None  # a fit after a stopped one listens afresh
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self._stop_signal is not None:  # the second: stop inside the step, keeping the saved checkpoints
                raise KeyboardInterrupt(f"a second {name}")
            self._stop_signal = name
            if self.dist.main:
                log.warning("%s: stopping after this step (saving a checkpoint); press Ctrl-C again to stop now",
                            name)

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _restore_signal_handlers(self, previous) -> None:
        for s, h in (previous or {}).items():
            signal.signal(s, h)


def next_token_loss(model, window: torch.Tensor) -> torch.Tensor:
    """The maximum-likelihood objective on windows (B, T+1): the mean over positions of
    −log p(window[t+1] | window[..t])."""
    inputs, targets = window[:, :-1], window[:, 1:]
    logits = model(inputs).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def activation_bytes_per_token(config, value_bytes: int = 4) -> int:
    """A floor for what one token of a training batch keeps for the backward pass: each layer's
    input and MLP hidden state, and the token's logits. With 16 bytes a parameter for weights,
    gradients and AdamW's moments, measured peaks on CPU are 1.1 to 5 times this floor (gpt2 to
    baby), so a step it refuses would never have run."""
    return value_bytes * (config.n_layer * (config.n_embd + config.intermediate_size) + config.vocab_size)


def _fault(point: str, step: int) -> None:
    # tests kill the process at a named point inside a save ("after-state", or "after-state:8" for
    # the save of step 8), as `kill -9` would
    wanted = os.environ.get(FAULT_ENV)
    if wanted in (point, f"{point}:{step}"):
        os._exit(86)


# --- small helpers ------------------------------------------------------------------------------

def plot_losses(metrics: Path, out: Path) -> bool:
    """Train and validation loss against step, as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r["train_loss"]]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for points, label in ((train, "train"), (val, "validation")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label == "validation" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("this GPU has no bf16; use --precision fp32")
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def _to(batch, device: torch.device):
    """A batch (a tensor, or a dict of them) on the device."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def _maybe_no_sync(module, syncing: bool):
    if syncing or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def _logs_above(bar):
    """Log lines (a stop notice, say) printed above the progress bar rather than glued to it."""
    if bar is None:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def _progress(start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
