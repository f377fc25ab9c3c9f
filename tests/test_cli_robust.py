"""What a new user hits on the command line: the default answer length, input that is not UTF-8,
a closed pipe, a cache folder that is a file, messages in flag terms, and model references
resolved once."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pocketlm import registry
from pocketlm.api import CausalLM, load_model_and_tokenizer
from pocketlm.chat import ChatSession
from pocketlm.cli import DEFAULT_NEW_TOKENS, main
from pocketlm.errors import NotFoundError
from pocketlm.generate import Generator
from pocketlm.tokenizer import Tokenizer
from test_cli_generate import WINDOW, folder, one_line_error, run  # noqa: F401  (folder is a fixture)

LONG_QUESTION = "hello there, how are you? " * 2  # over 20 tokens


def test_generate_without_max_new_tokens_answers_within_the_window(folder, capsys):
    tokenizer = Tokenizer.from_pretrained(folder)
    session = ChatSession(tokenizer, WINDOW)
    session.add("user", LONG_QUESTION)
    prompt = session.encode()
    assert 20 < len(prompt) < WINDOW
    room = min(DEFAULT_NEW_TOKENS, WINDOW - len(prompt))
    expected = Generator(CausalLM.from_pretrained(folder), tokenizer).generate(
        prompt, max_new_tokens=room, do_sample=False, stop_token_ids=session.stop_token_ids, stop=session.stop)
    code, out, err = run(capsys, "generate", folder, LONG_QUESTION, "--chat", "--greedy")
    assert code == 0, err
    assert out == expected.text + "\n"
    # the API keeps transformers' default of 20 new tokens
    plain = Generator(CausalLM.from_pretrained(folder), tokenizer).generate(prompt, do_sample=False, eos_token_id=[])
    assert len(plain.token_ids) == 20


def test_a_prompt_that_is_not_utf8_is_one_line(folder, capsys, monkeypatch):
    err = one_line_error(capsys, "generate", str(folder), "caf\udce9")  # argv byte 0xe9 alone
    assert "PROMPT is not UTF-8" in err
    err = one_line_error(capsys, "generate", str(folder), "hi", "--chat", "--system", "caf\udce9")
    assert "--system is not UTF-8" in err
    err = one_line_error(capsys, "generate", str(folder), "hi", "--stop", "a", "--stop", "\udcff")
    assert "--stop is not UTF-8" in err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\n")))
    err = one_line_error(capsys, "generate", str(folder), "-")
    assert "stdin is not UTF-8" in err and "0xe9" in err


def test_chat_skips_a_line_that_is_not_utf8_and_goes_on(folder, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\nhello there\n")))
    code = main(["chat", str(folder), "--max-new-tokens", "4", "--greedy"])
    out, err = capsys.readouterr()
    assert code == 0 and "not UTF-8" in err and "Traceback" not in err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hello there\n")))
    assert main(["chat", str(folder), "--max-new-tokens", "4", "--greedy"]) == 0
    assert out.strip() and out == capsys.readouterr().out  # the second line was answered, as if alone


def test_a_closed_pipe_ends_quietly(folder):
    proc = subprocess.Popen([sys.executable, "-m", "pocketlm", "generate", str(folder), "the quick brown",
                             "--max-new-tokens", "50", "--greedy"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` exiting before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_pocketlm_home_that_is_a_file_fails_before_any_download(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("POCKETLM_HOME", str(home))
    monkeypatch.setattr(registry, "_download", lambda *a: pytest.fail("downloaded into a broken cache"))
    err = one_line_error(capsys, "pull", registry.DEFAULT_CHAT_MODEL)
    assert "POCKETLM_HOME" in err and "is a file" in err
    assert home.read_text() == "not a folder"
    monkeypatch.setenv("POCKETLM_HOME", str(home / "below"))
    assert "is a file" in one_line_error(capsys, "list")


def test_library_messages_are_shown_as_flags(folder, capsys):
    err = one_line_error(capsys, "generate", str(folder), "hi", "--greedy", "--num-return-sequences", "2")
    assert "do_sample" not in err and "--temperature" in err
    err = one_line_error(capsys, "generate", str(folder), "hi", "--top-p", "2")
    assert "--top-p" in err and "top_p" not in err


def test_a_run_folder_without_a_checkpoint_says_so(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(NotFoundError, match="without a complete checkpoint"):
        registry.resolve(tmp_path / "run")


def test_model_and_tokenizer_resolve_the_reference_once(folder, monkeypatch):
    seen = []
    original = registry.resolve

    def counting(model, **keywords):
        if not isinstance(model, registry.ModelRef):
            seen.append(model)
        return original(model, **keywords)

    monkeypatch.setattr(registry, "resolve", counting)
    model, tokenizer = load_model_and_tokenizer(folder)
    assert seen == [folder] and len(tokenizer) <= model.config.vocab_size


def test_run_folders_resolve_without_the_trainer(folder, tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step-0000001"
    step.parent.mkdir(parents=True)
    os.symlink(folder, step)
    (Path(folder) / "trainer_state.json").write_text("{}")
    try:
        probe = ("import sys; from pocketlm import registry; "
                 f"print(registry.resolve({str(tmp_path / 'run')!r}).path.name, 'pocketlm.train' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        assert done.stdout.split() == ["step-0000001", "False"], done.stderr
    finally:
        (Path(folder) / "trainer_state.json").unlink()


def test_flag_names_replace_settings_but_never_paths_or_words():
    from pocketlm.cli import build_parser, in_cli_terms

    parser = build_parser()
    message = ("max_new_tokens=300 is past max_length; see runs/max_new_tokens/x, max_new_tokens.txt, "
               "C:\\top_k\\y and my_top_k; the new tokens of top_k.")
    assert in_cli_terms(message, parser, "generate") == (
        "--max-new-tokens=300 is past max_length; see runs/max_new_tokens/x, max_new_tokens.txt, "
        "C:\\top_k\\y and my_top_k; the new tokens of --top-k.")  # generate has no --max-length flag
    assert in_cli_terms("block_size 9 and max_new_tokens", parser, "train") == "--block-size 9 and max_new_tokens"
    assert in_cli_terms("do_sample=True", parser, "train") == "do_sample=True"  # train samples by its own rules


def test_an_os_error_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    import errno

    from pocketlm import data

    def full_disk(sources, out, *args):
        (out / "train.bin").write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "train.bin"))

    (tmp_path / "a.txt").write_text("some text\n" * 50)
    monkeypatch.setattr(data, "_write_shards", full_disk)
    code, out, err = run(capsys, "prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "data"))
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith("pocketlm: error: No space left on device: ") and "train.bin" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no folder, no staging folder


def test_num_beams_prints_the_generators_best_beams(folder, capsys):
    beams = Generator(CausalLM.from_pretrained(folder), Tokenizer.from_pretrained(folder)).generate(
        "the quick brown", max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    code, out, err = run(capsys, "generate", folder, "the quick brown", "--max-new-tokens", 6, "--num-beams", 3,
                         "--num-return-sequences", 2)
    assert code == 0, err
    assert out == "".join(f"--- sequence {i} ---\n{c.text}\n" for i, c in enumerate(beams, 1))
    assert "--show-probs" in one_line_error(capsys, "generate", str(folder), "hi", "--num-beams", "2", "--show-probs")


def test_a_pickle_checkpoint_gets_advice_the_cli_user_can_follow(folder, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    err = one_line_error(capsys, "info", str(pickled))
    assert "pickle" in err and "pass allow_pickle" not in err and "in Python" in err
