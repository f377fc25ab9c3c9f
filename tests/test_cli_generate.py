"""`pocketlm generate` and `pocketlm chat`, run in-process on a tiny checkpoint with a ChatML template."""

import io
import math
import re

import pytest
import torch

from conftest import randomize
from pocketlm.api import CausalLM
from pocketlm.chat import ChatSession
from pocketlm.cli import main
from pocketlm.config import ModelConfig
from pocketlm.generate import Generator
from pocketlm.tokenizer import Tokenizer
from test_chat import CHATML

WINDOW = 128


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    text = path / "t.txt"
    text.write_text("User: hello there, how are you?\nAssistant: I am fine, thank you.\n" * 60
                    + "the quick brown fox jumps over the lazy dog. " * 60)
    tokenizer = Tokenizer.train([text], vocab_size=300,
                                special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tokenizer.chat_template = CHATML
    config = ModelConfig(vocab_size=len(tokenizer), n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                         intermediate_size=64, max_position=WINDOW, norm="rmsnorm", mlp="swiglu", act="silu",
                         pos="rope", bias=False, tie_embeddings=True)
    # random weights with some spread, so the next-token distribution is far from uniform
    randomize(CausalLM.from_config(config), seed=1).save_pretrained(path / "model", tokenizer=tokenizer)
    return path / "model"


@pytest.fixture(scope="module")
def generator(folder):
    return Generator(CausalLM.from_pretrained(folder), Tokenizer.from_pretrained(folder))


def run(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8"))))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("pocketlm: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


# --- generate -----------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_greedy_generate_prints_what_the_generator_makes(folder, generator, capsys, stream):
    expected = generator.generate("the quick brown", max_new_tokens=12, do_sample=False)
    assert expected.text.strip()  # a test of nothing if the model said nothing
    code, out, _ = run(capsys, "generate", folder, "the quick brown", "--max-new-tokens", 12, stream)
    assert code == 0 and out == expected.text + "\n"
    # sampling flags with --greedy stay greedy
    code, out, _ = run(capsys, "generate", folder, "the quick brown", "--max-new-tokens", 12,
                       "--temperature", 5, "--greedy", stream)
    assert code == 0 and out == expected.text + "\n"


def test_dash_reads_the_prompt_from_stdin(folder, generator, capsys, monkeypatch):
    expected = generator.generate("hello there", max_new_tokens=8, do_sample=False).text
    code, out, _ = run(capsys, "generate", folder, "-", "--max-new-tokens", 8,
                       stdin="hello there\n", monkeypatch=monkeypatch)
    assert code == 0 and out == expected + "\n"


def test_sampling_flags_sample_reproducibly(folder, generator, capsys):
    argv = ("generate", folder, "the", "--max-new-tokens", 10, "--temperature", 1.5, "--seed", 3,
            "--num-return-sequences", 2)
    code, out, _ = run(capsys, *argv)
    expected = generator.generate("the", max_new_tokens=10, do_sample=True, temperature=1.5, seed=3,
                                  num_return_sequences=2)
    assert code == 0
    assert out == "".join(f"--- sequence {i} ---\n{c.text}\n" for i, c in enumerate(expected, 1))
    assert expected[0].text != expected[1].text and run(capsys, *argv)[1] == out


def test_stop_string(folder, generator, capsys):
    full = generator.generate("the quick", max_new_tokens=12, do_sample=False).text
    stop = full[3:6]
    code, out, _ = run(capsys, "generate", folder, "the quick", "--max-new-tokens", 12, "--stop", stop)
    assert code == 0 and out == full[:full.index(stop)] + "\n"


def test_chat_flag_applies_the_template(folder, generator, capsys):
    tokenizer = generator.tokenizer
    session = ChatSession(tokenizer, WINDOW)
    ids = session.encode([{"role": "user", "content": "hello there"}])
    assert tokenizer.decode(ids).endswith("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
    expected = generator.generate(ids, max_new_tokens=10, do_sample=False,
                                  stop_token_ids=session.stop_token_ids).text
    code, out, _ = run(capsys, "generate", folder, "hello there", "--chat", "--max-new-tokens", 10)
    assert code == 0 and out == expected + "\n"

    session = ChatSession(tokenizer, WINDOW, system="Be brief.")
    session.add("user", "hello there")
    expected = generator.generate(session.encode(), max_new_tokens=10, do_sample=False,
                                  stop_token_ids=session.stop_token_ids).text
    code, out, _ = run(capsys, "generate", folder, "hello there", "--chat", "--system", "Be brief.",
                       "--max-new-tokens", 10)
    assert code == 0 and out == expected + "\n"
    assert "--chat" in one_line_error(capsys, "generate", folder, "hi", "--system", "Be brief.")


PAIR = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\s+(\S+)""")  # a token repr and its probability


def test_show_probs_lists_each_token_with_its_top_candidates(folder, generator, capsys):
    code, out, _ = run(capsys, "generate", folder, "the quick", "--max-new-tokens", 6, "--show-probs", 3)
    assert code == 0
    expected = generator.generate("the quick", max_new_tokens=6, do_sample=False, logprobs=3)
    text, table = out.split("\n\n--- token probabilities ---\n")
    assert text == expected.text
    rows = table.strip().split("\n")[1:]  # below the header
    assert len(rows) == len(expected.logprobs) == 6
    for row, step in zip(rows, expected.logprobs):
        pairs = PAIR.findall(row)
        assert len(pairs) == 1 + 3  # the chosen token, then 3 candidates
        probs = [float(p) for _, p in pairs]
        assert all(0 < p <= 1 for p in probs)
        assert probs[1:] == sorted(probs[1:], reverse=True) and sum(probs[1:]) <= 1.001
        assert pairs[0] == pairs[1]  # greedy: the chosen token is the most likely one
        assert eval(pairs[0][0]) == step.token  # noqa: S307  (a repr of a str from our own output)
        assert math.isclose(probs[0], math.exp(step.logprob), rel_tol=1e-2)
    code, out, _ = run(capsys, "generate", folder, "the quick", "--max-new-tokens", 2, "--show-probs")
    assert code == 0 and len(PAIR.findall(out.strip().split("\n")[-1])) == 1 + 5  # default N


def test_generate_errors_are_one_line(folder, tmp_path, capsys):
    assert "model hub" in one_line_error(capsys, "generate", tmp_path / "missing", "hi")
    assert "no config.json" in one_line_error(capsys, "generate", tmp_path, "hi")
    assert "--top-p" in one_line_error(capsys, "generate", folder, "hi", "--top-p", 2)
    long_prompt = "the quick brown fox jumps over the lazy dog. " * 30
    err = one_line_error(capsys, "generate", folder, long_prompt, "--max-new-tokens", 10)
    assert "context window of 128 tokens" in err
    assert "context window" in one_line_error(capsys, "generate", folder, "hi", "--max-new-tokens", 500)
    assert "logprobs" in one_line_error(capsys, "generate", folder, "hi", "--show-probs", 50)
    assert "device" in one_line_error(capsys, "generate", folder, "hi", "--device", "toaster")
    assert "dtype" in one_line_error(capsys, "generate", folder, "hi", "--dtype", "float7")


# --- chat -----------------------------------------------------------------------------------------

@pytest.fixture
def recorded(monkeypatch, generator):
    """Record the prompt of every answer the chat asks for (the answers are the real ones)."""
    prompts = Recorded()
    original = Generator.stream

    def stream(self, prompt, *args, **kwargs):
        prompts.append(generator.tokenizer.decode(prompt))
        prompts.settings = kwargs
        yield from original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(Generator, "stream", stream)
    return prompts


class Recorded(list):
    settings: dict = {}


def test_chat_two_turns_reset_and_exit(folder, capsys, monkeypatch, recorded):
    script = "hello there\nhow are you?\n/reset\nthe quick fox\n/exit\nnever read\n"
    code, out, err = run(capsys, "chat", folder, "--system", "Be brief.", "--max-new-tokens", 8,
                         stdin=script, monkeypatch=monkeypatch)
    assert code == 0 and len(recorded) == 3
    answers = out.split("\n")[:3]
    system = "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert recorded[0] == system + "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    assert recorded[1] == (recorded[0] + f"{answers[0].strip()}<|im_end|>\n"
                           "<|im_start|>user\nhow are you?<|im_end|>\n<|im_start|>assistant\n")
    assert recorded[2] == system + "<|im_start|>user\nthe quick fox<|im_end|>\n<|im_start|>assistant\n"
    assert "cleared" in err and "never read" not in "".join(recorded)
    # answers end at the template's end-of-turn token, not only at the tokenizer's eos
    im_end = Tokenizer.from_pretrained(folder).convert_tokens_to_ids("<|im_end|>")
    assert im_end in recorded.settings["stop_token_ids"] and recorded.settings["max_new_tokens"] == 8


def test_chat_ends_at_end_of_input(folder, capsys, monkeypatch, recorded):
    code, out, _ = run(capsys, "chat", folder, "--max-new-tokens", 4, stdin="hi", monkeypatch=monkeypatch)
    assert code == 0 and len(recorded) == 1 and recorded[0].endswith("user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_long_chat_drops_the_oldest_turns(folder, capsys, monkeypatch, recorded):
    lines = [f"message {i}: the quick brown fox jumps over the lazy dog" for i in range(8)]
    code, out, err = run(capsys, "chat", folder, "--system", "Be brief.", "--max-new-tokens", 24,
                         stdin="\n".join(lines) + "\n", monkeypatch=monkeypatch)
    assert code == 0 and len(recorded) == 8
    notices = re.findall(r"dropped (\d+) oldest turns? to fit the 128 token context window", err)
    assert notices and sum(map(int, notices)) >= 2
    tokenizer = Tokenizer.from_pretrained(folder)
    for line, prompt in zip(lines, recorded):
        assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")
        assert prompt.endswith(f"<|im_start|>user\n{line}<|im_end|>\n<|im_start|>assistant\n")
        assert len(tokenizer.encode(prompt, add_special_tokens=False)) + 24 <= WINDOW
    assert "message 0:" not in recorded[-1]


def test_chat_message_too_long_for_the_window_is_refused_and_chat_goes_on(folder, capsys, monkeypatch, recorded):
    script = "the lazy dog " * 60 + "\nhello there\n"
    code, out, err = run(capsys, "chat", folder, "--max-new-tokens", 8, stdin=script, monkeypatch=monkeypatch)
    assert code == 0 and "context window of 128" in err and "dropped" not in err
    assert len(recorded) == 1 and "lazy dog" not in recorded[0]


def test_ctrl_c_stops_the_answer_and_keeps_it(folder, capsys, monkeypatch, generator):
    prompts = []

    def stream(self, prompt, *args, **kwargs):
        prompts.append(generator.tokenizer.decode(prompt))
        yield "Partial"
        yield " answ"
        if len(prompts) == 1:
            raise KeyboardInterrupt
        yield "er."

    monkeypatch.setattr(Generator, "stream", stream)
    code, out, err = run(capsys, "chat", folder, "--max-new-tokens", 8, stdin="first\nsecond\n",
                         monkeypatch=monkeypatch)
    assert code == 0 and "answer stopped" in err
    assert out == "Partial answ\nPartial answer.\n"
    assert "<|im_start|>assistant\nPartial answ<|im_end|>\n<|im_start|>user\nsecond" in prompts[1]


def test_chat_errors_are_one_line(folder, capsys, tmp_path):
    assert "model hub" in one_line_error(capsys, "chat", tmp_path / "missing")
    assert "context window" in one_line_error(capsys, "chat", folder, "--max-new-tokens", 128)
    assert "temperature" in one_line_error(capsys, "chat", folder, "--temperature", -1)


def test_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "generate" in out and "chat" in out and "info" in out
    torch.manual_seed(0)  # keep later tests independent of the global RNG
