"""Safe file I/O shared by every writer and reader: atomic writes (temp file → fsync → rename,
so a crash never leaves a half-written checkpoint behind) and JSON reading that turns a
malformed or missing file into a typed error instead of a traceback."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pocketlm.errors import ConfigError, FormatError, NotFoundError

MAX_JSON_BYTES = 64 * 1024 * 1024  # config and tokenizer JSON files are far smaller than this


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, the temp file is synced and
    renamed over `path`, so readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp (and some writers, safetensors among them) make 0600 files; give the final
        # file the mode any other new file would get
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file, raising NotFoundError / FormatError that name the file."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise FormatError(f"{what} {path} is {size} bytes, larger than any valid one; is it the right file?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{what} {path} is not valid JSON: {e}") from None


def read_json_lines(path: str | os.PathLike, label: str, holds: str) -> Iterator[tuple[str, Any]]:
    """(where, value) for each non-blank line of a JSON-lines file, in order, `where` being
    "label:line" for the caller's own errors about the value (a caller may stop early). The file is
    checked before the first: NotFoundError (saying it should hold `holds`) when there is none,
    ConfigError when it is not UTF-8; ConfigError at a line that is not JSON."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{label}: no such file ({holds})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"{label} is not UTF-8 text") from None
    return _json_rows(lines, label)


def _json_rows(lines: list[str], label: str) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{label}:{number}: not JSON ({e.msg})") from None
        yield f"{label}:{number}", value


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def staged_folder(path: str | os.PathLike, replaces: Collection[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder to fill in place of the folder `path`. When the block
    succeeds, what it holds moves into `path` (the folder is renamed into place when `path` does
    not exist yet, else entry by entry, each rename atomic); when it fails, the temporary folder
    goes, so `path` and the folders above it are left as they were — no empty folder behind.
    `replaces` names files of an earlier output in `path` that the new one stands in for: those
    the new one lacks are removed (a stale chat_template.jinja would otherwise win over the new
    tokenizer's template)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file, and the output must be a folder; choose another --out")
    base = path.parent
    while not base.exists():  # stage on the same file system, without making missing parents yet
        base = base.parent
    try:
        staging = Path(tempfile.mkdtemp(dir=base, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        raise ConfigError(f"cannot write into {base}: {e.strerror}") from None
    try:
        yield staging
        for entry in staging.rglob("*"):
            if entry.is_file():
                with open(entry, "rb+") as f:
                    os.fsync(f.fileno())
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            written = {entry.name for entry in staging.iterdir()}
            for name in written:
                os.replace(staging / name, path / name)
            for name in set(replaces) - written:
                (path / name).unlink(missing_ok=True)
        else:
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; give it a new folder's mode
            os.replace(staging, path)
        fsync_dir(path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
