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
    assert "UTF-8" in err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\n")))
    err = one_line_error(capsys, "generate", str(folder), "-")
    assert "stdin is not UTF-8" in err and "0xe9" in err


def test_chat_skips_a_line_that_is_not_utf8_and_goes_on(folder, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\nhello there\n")))
    code = main(["chat", str(folder), "--max-new-tokens", "4", "--greedy"])
    out, err = capsys.readouterr()
    assert code == 0 and "not UTF-8" in err and "Traceback" not in err
    assert out.strip()  # the second line was answered


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

    def counting(model):
        if not isinstance(model, registry.ModelRef):
            seen.append(model)
        return original(model)

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
