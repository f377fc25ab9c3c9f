"""What the benchmark scripts share: a one-line description of the machine a figure was taken on,
and replacing one script's section of docs/benchmarks.md without touching the others."""

import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_description(gpu: str | None = None, packages: tuple[str, ...] = ("torch",)) -> str:
    """E.g. "AMD EPYC (2 cores), 23.4 GiB RAM, no GPU; Python 3.11.9, torch 2.13.0"."""
    ram = ram_gib()
    parts = [f"{cpu_model()} ({os.cpu_count()} cores)", f"{ram:.1f} GiB RAM" if ram else "RAM unknown",
             gpu or "no GPU"]
    versions = [f"Python {platform.python_version()}"] + [f"{p} {version(p)}" for p in packages]
    return ", ".join(parts) + "; " + ", ".join(versions)


def command_line() -> str:
    """The command that is running, as a reader would retype it from the repository root."""
    python = sys.executable
    if os.path.abspath(python).startswith(os.getcwd() + os.sep):
        python = os.path.relpath(python)
    args = [os.path.relpath(a) if i == 0 and os.path.isabs(a) else a for i, a in enumerate(sys.argv)]
    env = "HF_HUB_OFFLINE=1 " if os.environ.get("HF_HUB_OFFLINE") else ""
    return env + " ".join([python] + [_quote(a) for a in args])


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w./=:,+-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def replace_section(path: str | Path, heading: str, body: str) -> None:
    """Put `heading` + `body` in the markdown file in place of the section with that heading (up
    to the next heading of the same level), or append it; everything else stays as it was."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    level = len(heading) - len(heading.lstrip("#"))
    section = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^#{{1,{level}}} |\Z)", re.M | re.S)
    match = pattern.search(text)
    if match:
        tail = text[match.end():]
        text = text[:match.start()] + section + ("\n" if tail else "") + tail
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section
    path.write_text(text, encoding="utf-8")


def publish(text: str, heading: str, markdown: str | None) -> None:
    """Print a benchmark's section, and put it in place of its old one in `markdown` when given."""
    print(text)
    if markdown:
        replace_section(markdown, heading, text)
        print(f"wrote section {heading!r} of {markdown}", file=sys.stderr)
