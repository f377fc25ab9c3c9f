"""The `pocketlm` command: info on a checkpoint, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import TINY, randomize
from pocketlm import __version__
from pocketlm.api import CausalLM
from pocketlm.cli import main
from pocketlm.config import ModelConfig
from pocketlm.tokenizer import Tokenizer


@pytest.fixture
def folder(tmp_path):
    config = ModelConfig(**TINY["llama-gqa-tied"])
    randomize(CausalLM.from_config(config)).to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_help_as_a_module():
    result = subprocess.run([sys.executable, "-m", "pocketlm", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"pocketlm {__version__}"
    result = subprocess.run([sys.executable, "-m", "pocketlm", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "info" in result.stdout and "train-tokenizer" in result.stdout


def test_info_describes_the_checkpoint(folder, capsys):
    code, out, _ = run(capsys, "info", str(folder))
    assert code == 0
    model = CausalLM.from_pretrained(folder)
    assert "llama (rmsnorm, swiglu MLP, rope positions, rope_theta=500)" in out
    assert f"{model.num_parameters():,}" in out
    assert "2 × 4 heads of 12, 2 key/value heads, width 32" in out
    assert "128 tokens" in out and "bfloat16" in out and "96" in out


def _one_line_error(capsys, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("pocketlm: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_bad_path(capsys, tmp_path):
    assert "model hub" in _one_line_error(capsys, "info", "gpt2")
    assert "no config.json" in _one_line_error(capsys, "info", str(tmp_path))


def test_truncated_weights(folder, capsys):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    assert "model.safetensors" in _one_line_error(capsys, "info", str(folder))


def test_inconsistent_config(folder, capsys):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    assert "shape" in _one_line_error(capsys, "info", str(folder))
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    assert "unknown architecture" in _one_line_error(capsys, "info", str(folder))


def test_tokenizer_beyond_embedding_rows(folder, capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("a tokenizer bigger than the model's embedding table " * 50)
    tokenizer = Tokenizer.train([text], vocab_size=300)
    tokenizer.save_pretrained(folder)
    assert len(tokenizer) > 96
    assert f"tokenizer has {len(tokenizer)} tokens" in _one_line_error(capsys, "info", str(folder))


def test_debug_shows_the_traceback(capsys):
    from pocketlm.errors import NotFoundError

    with pytest.raises(NotFoundError):
        main(["--debug", "info", "gpt2"])


def test_train_tokenizer_command(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question " * 200)
    code, out, _ = run(capsys, "train-tokenizer", str(text), "--vocab-size", "300", "--out", str(tmp_path / "tok"))
    assert code == 0 and f"{len(Tokenizer.from_pretrained(tmp_path / 'tok'))} tokens" in out
    tokenizer = Tokenizer.from_pretrained(tmp_path / "tok")
    assert tokenizer.decode(tokenizer.encode("that is the question")) == "that is the question"
    assert "vocab" in _one_line_error(capsys, "train-tokenizer", str(text), "--vocab-size", "10",
                                      "--out", str(tmp_path / "x"))


def test_train_tokenizer_gives_a_pad_token_with_the_special_tokens_given(tmp_path, capsys):
    import transformers

    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question " * 200)
    code, _, err = run(capsys, "train-tokenizer", str(text), "--vocab-size", "300", "--out", str(tmp_path / "tok"),
                       "--special-tokens", "</s>", "<|user|>")
    assert code == 0, err
    ours = Tokenizer.from_pretrained(tmp_path / "tok")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (ours.eos_token, ours.pad_token) == (theirs.eos_token, theirs.pad_token) == ("</s>", "<|pad|>")
    assert [ours.convert_tokens_to_ids(t) for t in ("</s>", "<|user|>", "<|pad|>")] == [0, 1, 2]
    batch = ["to be", "or not to be, that is"]
    assert ours(batch, padding=True)["input_ids"] == theirs(batch, padding=True)["input_ids"]
