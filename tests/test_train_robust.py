"""`pocketlm train` on bad settings, signals, a second run, a finished run and failures: one clear
line (exit 2) before any work, and never a lost step or a half-made run folder."""

import json
import logging
import os
import signal
import subprocess
import sys

import pytest

from conftest import TINY
from test_train import DOCS, _flags, _metrics, corpus  # noqa: F401  (corpus is a fixture)
from pocketlm import train as train_module
from pocketlm.api import CausalLM
from pocketlm.checkpoint import complete_checkpoints
from pocketlm.cli import main
from pocketlm.config import ModelConfig, TrainConfig
from pocketlm.data import DataError, prepare
from pocketlm.errors import ConfigError
from pocketlm.train import Trainer


def _config(corpus, out, **kw) -> TrainConfig:
    data, model = corpus
    settings = dict(data=str(data), model=str(model), out=str(out), max_steps=6, batch_size=4, block_size=16,
                    warmup_steps=2, eval_every=2, eval_windows=2, log_every=1, sample_tokens=4, threads=2)
    return TrainConfig(**{**settings, **kw})


def _train(capsys, *flags: str) -> tuple[int, str, str]:
    code = main(["train", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pocketlm: error: "), err
    return lines[0]


# --- 1 and 8: every setting checked before any work, named as the flag -----------------------------

@pytest.mark.parametrize("flags,message", [
    (["--beta1", "2"], "--beta1 must be in [0, 1), got 2.0"),
    (["--beta1", "-0.5"], "--beta1 must be in [0, 1)"),
    (["--beta2", "1.5"], "--beta2 must be in [0, 1), got 1.5"),
    (["--beta2", "1"], "--beta2 must be in [0, 1)"),
    (["--seed", str(2**64)], "--seed must be in 0..2**63-1"),
    (["--seed", "-1"], "--seed must be an integer ≥ 0"),
    (["--lr", "nan"], "--lr must be a finite number ≥ 0"),
    (["--lr", "inf"], "--lr must be a finite number ≥ 0"),
    (["--lr", "0"], "--lr must be above 0"),
    (["--min-lr", "1"], "--min-lr (1) is above --lr (0.003)"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number ≥ 0"),
    (["--max-minutes", "inf"], "--max-minutes must be a finite number ≥ 0"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--block-size", "0"], "--block-size must be an integer ≥ 1"),
    (["--grad-accum", "0"], "--grad-accum must be an integer ≥ 1"),
    (["--sample-tokens", "-5"], "--sample-tokens must be an integer ≥ 0"),
    (["--threads", "100000"], "--threads must be at most 1024"),
    (["--precision", "fp8"], "--precision must be auto, fp32 or bf16"),
])
def test_bad_settings_give_one_line_naming_the_flag_before_any_work(capsys, tmp_path, flags, message):
    # the data folder does not even exist: the settings are checked first
    code, _, err = _train(capsys, "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), *flags)
    assert code == 2
    assert message in _one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_the_library_names_flags_too():
    with pytest.raises(ConfigError, match="^--block-size must be an integer ≥ 1, got 0$"):
        TrainConfig(data="x", block_size=0).validate()
    with pytest.raises(ConfigError, match="--eval-every"):
        TrainConfig(data="x", eval_every=True).validate()  # a bool is not a count


# --- 2: memory and context, bounded from the model before step 1 -----------------------------------

def test_a_batch_that_cannot_fit_in_memory_is_refused_up_front(corpus, capsys, tmp_path):
    code, _, err = _train(capsys, "--data", str(corpus[0]), "--model", "baby", "--out", str(tmp_path / "run"),
                          "--batch-size", "100000000", "--block-size", "16")
    line = _one_error_line(err)
    assert code == 2 and "--batch-size 100000000 × --block-size 16 needs at least" in line
    assert "--grad-accum" in line
    assert not (tmp_path / "run").exists()


def test_the_memory_floor_suggests_a_batch_that_fits_and_accepts_the_defaults(corpus, tmp_path, monkeypatch):
    import pocketlm.generate

    # the defaults (--batch-size 16 --block-size 128 on baby) on this machine
    Trainer(_config(corpus, tmp_path / "defaults", model="baby", batch_size=16, block_size=128))

    monkeypatch.setattr(pocketlm.generate, "available_memory", lambda device: 64 * 2**20)
    Trainer(_config(corpus, tmp_path / "small", model="baby", batch_size=16, block_size=128))  # fits 64 MiB
    with pytest.raises(ConfigError) as refused:
        Trainer(_config(corpus, tmp_path / "big", model="baby", batch_size=512, block_size=128))
    suggested = str(refused.value).split("lower --batch-size: ")[1].split()
    assert suggested[0] == "--batch-size" and suggested[2] == "--grad-accum", refused.value
    batch, accum = int(suggested[1]), int(suggested[3])
    assert 16 <= batch < 512 and batch * accum >= 512
    Trainer(_config(corpus, tmp_path / "fits", model="baby", batch_size=batch, grad_accum=accum, block_size=128))
    with pytest.raises(ConfigError, match="needs at least"):
        Trainer(_config(corpus, tmp_path / "one-more", model="baby", batch_size=batch + 1, block_size=128))


def test_block_size_beyond_a_loaded_rope_models_context_is_refused(corpus, tmp_path):
    # rope has no table that would stop it; the model's max_position (128) is its context all the same
    with pytest.raises(ConfigError, match="--block-size 200 is beyond the model's context of 128 tokens"):
        Trainer(_config(corpus, tmp_path / "run", block_size=200))
    assert not (tmp_path / "run").exists()


# --- 3: samples checked before step 1; an error after training saves first ---------------------------

@pytest.mark.parametrize("settings,message", [
    (dict(sample_tokens=200), r"1 prompt tokens \(--sample-prompt\) \+ --sample-tokens 200 = 201 positions"),
    (dict(sample_prompt="the lazy dog " * 10, sample_tokens=10), r"130 prompt tokens .* = 140 positions"),
])
def test_samples_too_long_for_the_context_are_refused_before_step_1(corpus, tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message + ".*context of 128"):
        Trainer(_config(corpus, tmp_path / "run", **settings))
    assert not (tmp_path / "run").exists()


def test_an_error_after_training_saves_the_steps_first(corpus, capsys, tmp_path, monkeypatch):
    def broken_plot(metrics, out):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_module, "plot_losses", broken_plot)
    config = _config(corpus, tmp_path / "run", eval_every=3)
    code, _, err = _train(capsys, *_flags(config))
    line = _one_error_line(err.splitlines()[-1])  # after the progress bar
    saved = tmp_path / "run" / "checkpoints" / "step-0000003"
    assert code == 2 and "No space left on device" in line and f"step 3 was saved in {saved}" in line
    assert complete_checkpoints(tmp_path / "run" / "checkpoints") == [saved]
    CausalLM.from_pretrained(saved)  # loads


# --- 4: a signal stops after the step; a second one stops now -------------------------------------

def test_a_second_ctrl_c_stops_inside_the_step_and_keeps_the_checkpoints(corpus, capsys, caplog, tmp_path,
                                                                         monkeypatch):
    real = Trainer._train_step

    def interrupted_step(self):
        if self.step == 4:  # in the middle of step 5: Ctrl-C, then Ctrl-C again
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("the second SIGINT did not stop the step")
        return real(self)

    monkeypatch.setattr(Trainer, "_train_step", interrupted_step)
    before = signal.getsignal(signal.SIGINT)
    code, out, err = _train(capsys, *_flags(_config(corpus, tmp_path / "run", max_steps=100)))
    assert code == 130 and err.strip().splitlines()[-1] == "pocketlm: interrupted"
    assert "SIGINT: stopping after this step (saving a checkpoint); press Ctrl-C again to stop now" in caplog.text
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in saved] == ["step-0000002", "step-0000004"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".step-*"))
    CausalLM.from_pretrained(saved[-1])
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back
    assert not (tmp_path / "run" / ".lock").exists()


def test_the_first_signal_only_asks_to_stop(corpus, tmp_path, caplog):
    trainer = Trainer(_config(corpus, tmp_path / "run"))
    previous = trainer._install_signal_handlers()
    try:
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)
        assert trainer._stop_signal == "SIGTERM" and "press Ctrl-C again to stop now" in caplog.text
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
    finally:
        trainer._restore_signal_handlers(previous)


# --- 5: one run per folder --------------------------------------------------------------------------

def test_a_second_run_into_the_same_folder_is_refused(corpus, tmp_path):
    first = Trainer(_config(corpus, tmp_path / "run", max_steps=2))
    with pytest.raises(ConfigError, match=rf"in use by another training run \(pid {os.getpid()}\)"):
        Trainer(_config(corpus, tmp_path / "run", max_steps=2))
    first.fit()
    assert not (tmp_path / "run" / ".lock").exists()
    Trainer(_config(corpus, tmp_path / "run", max_steps=4, resume=True)).fit()  # free again
    assert max(_metrics(tmp_path / "run")) == 4


def test_a_crashed_holders_lock_goes_with_it(corpus, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(run / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); "
        "f.flush(); print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"\(pid {holder.pid}\)"):
            Trainer(_config(corpus, run))
    finally:
        holder.kill()  # as a crash would
        holder.wait()
    assert (run / ".lock").exists()  # left behind, but no longer locked
    Trainer(_config(corpus, run, max_steps=2)).fit()
    assert complete_checkpoints(run / "checkpoints")


# --- 6: --resume of a finished run ----------------------------------------------------------------

def test_resuming_a_finished_run_says_so_and_changes_nothing(corpus, capsys, caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="pocketlm")
    config = _config(corpus, tmp_path / "run", max_steps=4)
    assert _train(capsys, *_flags(config))[0] == 0
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}

    code, out, _ = _train(capsys, *_flags(config), "--resume")
    assert code == 0 and "nan" not in out
    assert "run already finished at step 4 (--max-steps 4); pass a larger --max-steps to train further" in caplog.text
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before

    code, out, _ = _train(capsys, *_flags(config), "--resume", "--max-steps", "6")  # a larger one continues
    assert code == 0 and "train loss" in out and "nan" not in out
    assert sorted(_metrics(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]
    assert complete_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == "step-0000006"
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["max_steps"] == 6


# --- 7: a run that fails before step 1 leaves no folder ---------------------------------------------

def test_a_run_that_fails_before_step_1_leaves_no_folder(corpus, tmp_path, monkeypatch):
    def out_of_memory(model, window):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train_module, "next_token_loss", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        Trainer(_config(corpus, tmp_path / "new" / "run")).fit()
    assert not (tmp_path / "new").exists()  # nor the parent it made

    (tmp_path / "mine").mkdir()  # a folder the user made stays, as it was
    with pytest.raises(RuntimeError):
        Trainer(_config(corpus, tmp_path / "mine")).fit()
    assert list((tmp_path / "mine").iterdir()) == []

    # two runs start in a new folder; the one that made it fails, and the other one's folder stays
    failing = Trainer(_config(corpus, tmp_path / "exp" / "a"))
    other = Trainer(_config(corpus, tmp_path / "exp" / "b", max_steps=2, sample_tokens=0))
    with pytest.raises(RuntimeError):
        failing.fit()
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["b"]
    monkeypatch.undo()
    other.fit()
    assert complete_checkpoints(tmp_path / "exp" / "b" / "checkpoints")


def test_an_out_that_is_a_file_is_refused(corpus, capsys, tmp_path):
    (tmp_path / "file").write_text("keep me")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        code, _, err = _train(capsys, *_flags(_config(corpus, out)))
        assert code == 2 and "--out" in _one_error_line(err)
    assert (tmp_path / "file").read_text() == "keep me"


# --- 8: a GGUF model's tokenizer must be the data's ---------------------------------------------------

def test_a_gguf_model_needs_shards_of_its_own_tokenizer(corpus, tmp_path):
    import gguf
    import torch

    from pocketlm.gguf import GGUFFile, tokenizer_from_gguf
    from pocketlm.quant import quantized_bits
    from pocketlm.tokenizer import Tokenizer
    from test_gguf import llama_gguf_with_tokenizer

    (tmp_path / "text.txt").write_text("".join(DOCS))
    bpe = Tokenizer.train(tmp_path / "text.txt", vocab_size=300)
    model = CausalLM.from_config(ModelConfig(**{**TINY["llama-gqa-tied"], "vocab_size": len(bpe)}))
    # in blocks, as real GGUF files are: for inference they would load quantized, for training never
    path = llama_gguf_with_tokenizer(tmp_path / "model.gguf", model, bpe, qtype=gguf.GGMLQuantizationType.Q8_0)

    with pytest.raises(DataError, match="different tokenizer.*--tokenizer"):  # the corpus is char-level
        Trainer(_config(corpus, tmp_path / "run", model=str(path)))
    assert not (tmp_path / "run").exists()

    with GGUFFile(path) as f:
        own = tokenizer_from_gguf(f)
    prepare([tmp_path / "text.txt"], tmp_path / "data", tokenizer=own, val_frac=0.2, seed=0)
    trainer = Trainer(_config((tmp_path / "data", path), tmp_path / "run", max_steps=1, sample_tokens=0))
    assert quantized_bits(trainer.model) == {} and trainer.model.model.layers[0].mlp.up_proj.weight.requires_grad
    before = trainer.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer.fit()
    assert complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert not torch.equal(trainer.model.model.layers[0].mlp.up_proj.weight, before)  # it trained


# --- 9: a model built from a preset takes the tokenizer's pad token, where transformers reads it ----

def test_a_preset_model_takes_the_tokenizers_pad_token(corpus, tmp_path):
    import torch
    import transformers

    from pocketlm.tokenizer import Tokenizer

    Trainer(_config(corpus, tmp_path / "run", model="baby", max_steps=1, sample_tokens=0)).fit()
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    tokenizer = Tokenizer.from_pretrained(corpus[0])
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    ours = CausalLM.from_pretrained(saved)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
    assert ours.config.pad_token_id == theirs.config.pad_token_id == tokenizer.pad_token_id
    assert theirs.generation_config.pad_token_id == tokenizer.pad_token_id
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-4)


def test_a_fit_after_a_stopped_one_trains_on(corpus, tmp_path, monkeypatch):
    real = Trainer._train_step

    def ctrl_c_at_step_2(self):
        if self.step == 1 and not getattr(self, "_interrupted", False):
            self._interrupted = True
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(Trainer, "_train_step", ctrl_c_at_step_2)
    trainer = Trainer(_config(corpus, tmp_path / "run", max_steps=4, sample_tokens=0))
    trainer.fit()
    assert trainer.step == 2  # stopped after the step, with a checkpoint
    trainer.fit()  # in a notebook: run the cell again
    assert trainer.step == 4 and sorted(_metrics(tmp_path / "run")) == [1, 2, 3, 4]
