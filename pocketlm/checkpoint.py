"""Checkpoint folders in the Hugging Face layout: `config.json`, `model.safetensors` (or shards
with `model.safetensors.index.json`), tokenizer files and `generation_config.json`.

Saving writes the family's own layout (GPT-2 or Llama names), so transformers loads our folders
with no code of ours; other switch mixes save as `model_type: "pocketlm"`. Loading accepts both
GPT-2 layouts (with or without the `transformer.` prefix, Conv1D weights stored transposed, fused
`c_attn`) and Llama's. Every safetensors header is validated against the file and the config
before a tensor is read, and pickle files load only when the caller opts in.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import struct
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from pocketlm.config import ModelConfig
from pocketlm.errors import ConfigError, FormatError, NotFoundError, UnsafeFormatError, TokenizerError
from pocketlm.files import atomic_path, atomic_write_json, read_json, staged_folder
from pocketlm.model import Transformer
from pocketlm.packing import standalone, wants_transposed_storage
from pocketlm.quant import BLOCK, QUANT_METHOD, dequantize_model, quantize_model, quantized_bits, replace_modules

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
CHECKPOINTS = "checkpoints"  # a training run folder keeps its checkpoints here, one folder per step
STATE_JSON = "trainer_state.json"  # written last into a checkpoint: its presence marks it complete
BEST_JSON = "best.json"  # in a fine-tune run folder: {"checkpoint": "step-NNNNNNN", "metric", "value", "step"}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}

_ST_DTYPES = {"F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
              "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
              "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1),
              "BOOL": (torch.bool, 1), "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1)}
_MAX_HEADER = 100 * 1024 * 1024

# GPT-2 name ↔ our name, per layer ("{}" is the layer index); True marks Conv1D weights, which
# GPT-2 stores as (in, out), the transpose of nn.Linear's (out, in)
_GPT2_GLOBAL = {"wte.weight": "model.embed_tokens.weight", "wpe.weight": "model.embed_positions.weight",
                "ln_f.weight": "model.norm.weight", "ln_f.bias": "model.norm.bias"}
_GPT2_LAYER = {
    "ln_1.weight": ("input_layernorm.weight", False), "ln_1.bias": ("input_layernorm.bias", False),
    "ln_2.weight": ("post_attention_layernorm.weight", False),
    "ln_2.bias": ("post_attention_layernorm.bias", False),
    "attn.c_proj.weight": ("self_attn.o_proj.weight", True), "attn.c_proj.bias": ("self_attn.o_proj.bias", False),
    "mlp.c_fc.weight": ("mlp.up_proj.weight", True), "mlp.c_fc.bias": ("mlp.up_proj.bias", False),
    "mlp.c_proj.weight": ("mlp.down_proj.weight", True), "mlp.c_proj.bias": ("mlp.down_proj.bias", False),
}
_GPT2_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers, not weights
TRANSPOSED_READ_BYTES = 4 << 20  # bounce buffer for reading a matrix into transposed storage
_LLAMA_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


# --- saving ---------------------------------------------------------------------------------------

def save_pretrained(model: Transformer, folder: str | Path, tokenizer=None,
                    generation_config: dict[str, Any] | None = None,
                    max_shard_size: int | str | None = None) -> Path:
    """Write `model` (and optionally its tokenizer) as a Hugging Face checkpoint folder.

    Each file is written atomically and config.json last, so an interrupted save never leaves a
    folder that looks complete but is not. A new folder is filled under a temporary name and
    renamed into place, so a failed save leaves no folder behind. `max_shard_size` (bytes, or
    a size such as "200KB", see parse_size) splits the weights.
    """
    folder = Path(folder)
    max_bytes = parse_size(max_shard_size)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file; save_pretrained writes a folder, so pass a folder path")
    if folder.exists():
        _write_checkpoint(model, folder, tokenizer, generation_config, max_bytes)
    else:
        with staged_folder(folder) as staging:
            _write_checkpoint(model, staging, tokenizer, generation_config, max_bytes)
    return folder


# the units of a size string, as transformers reads them (decimal), and their binary cousins
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]i?B)\s*"  # a number, then a unit


def parse_size(size: int | str | None) -> int | None:
    """Bytes from a max_shard_size: an int, or a number and a unit, "200KB", "0.5GB" (decimal:
    1KB = 1000 bytes, as transformers reads them) or "10MiB" (binary); None stays None."""
    if size is None or (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        return size
    m = re.fullmatch(_SIZE, size, re.IGNORECASE) if isinstance(size, str) else None
    if m is None or float(m[1]) * _SIZE_UNITS[m[2].upper()] < 1:
        raise ConfigError(f"max_shard_size={size!r} is not a size; pass bytes (a positive int) or a string "
                          "such as '200KB', '10MB' or '5GB' (decimal units) or '512MiB' (binary)")
    return int(float(m[1]) * _SIZE_UNITS[m[2].upper()])


def _write_checkpoint(model: Transformer, folder: Path, tokenizer, generation_config: dict[str, Any] | None,
                      max_shard_size: int | None) -> None:
    from safetensors.torch import save_file

    tensors = hf_state_dict(model)
    shards = _split_shards(tensors, max_shard_size)
    previous = {*folder.glob("model-*-of-*.safetensors"), folder / WEIGHTS_INDEX, folder / WEIGHTS}
    if len(shards) == 1:
        written = [folder / WEIGHTS]
        with atomic_path(written[0]) as tmp:
            save_file(shards[0], tmp, metadata={"format": "pt"})
    else:
        weight_map, written = {}, [folder / WEIGHTS_INDEX]
        for i, shard in enumerate(shards, 1):
            written.append(folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors")
            with atomic_path(written[-1]) as tmp:
                save_file(shard, tmp, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, written[-1].name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_json(folder / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    for stale in previous - set(written):  # only once the new weights are complete
        stale.unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
           "pad_token_id": model.config.pad_token_id, **(generation_config or {})}
    atomic_write_json(folder / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    hf = model.config.to_hf_config(model.head)
    hf["dtype"] = str(model.dtype).removeprefix("torch.")
    quantized = quantized_bits(model)
    if quantized:  # which modules hold blocks, so loading builds them before reading the tensors
        hf["quantization_config"] = {"quant_method": QUANT_METHOD, "block_size": BLOCK, "modules": quantized}
    atomic_write_json(folder / "config.json", hf)


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under its family's Hugging Face names (tied lm_head left out)."""
    config = model.config
    ours = {k: standalone(v.detach()) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        for part in ("weight", "q", "scale", "offset"):
            ours.pop(f"lm_head.{part}", None)  # a classifier has no lm_head at all
    if config.family != "gpt2":
        return ours
    if quantized_bits(model):
        raise ConfigError("a quantized GPT-2 model cannot be saved in GPT-2's layout; save the float model "
                          "(load it with dtype=torch.float32) and quantize it at load time instead")
    out = {}
    for hf_name, name in _GPT2_GLOBAL.items():
        out[f"transformer.{hf_name}"] = ours.pop(name)
    for i in range(config.n_layer):
        prefix, hf_prefix = f"model.layers.{i}.", f"transformer.h.{i}."
        for hf_name, (name, transposed) in _GPT2_LAYER.items():
            t = ours.pop(prefix + name)
            out[hf_prefix + hf_name] = (t.t() if transposed else t).contiguous()
        q, k, v = (ours.pop(f"{prefix}self_attn.{p}_proj.weight") for p in "qkv")
        out[hf_prefix + "attn.c_attn.weight"] = torch.cat((q, k, v), 0).t().contiguous()
        q, k, v = (ours.pop(f"{prefix}self_attn.{p}_proj.bias") for p in "qkv")
        out[hf_prefix + "attn.c_attn.bias"] = torch.cat((q, k, v), 0).contiguous()
    out.update(ours)  # lm_head.weight when untied, or a classifier's score.weight
    return out


def _split_shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [tensors]
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


# --- training run folders --------------------------------------------------------------------------
# A run folder (pocketlm train --out) holds checkpoints/step-NNNNNNN/, each a checkpoint folder
# plus the training state; a folder counts once its trainer_state.json, written last, is there.

_STEP_DIR = re.compile(r"step-(\d+)")


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in `folder` (a run's checkpoints/ folder), oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / STATE_JSON).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))


def newest_checkpoint(folder: Path) -> Path | None:
    done = complete_checkpoints(folder)
    return done[-1] if done else None


def best_checkpoint(run: Path) -> Path | None:
    """The checkpoint a fine-tune run marked best (run/best.json), when it is complete; None for a
    pretraining run (no mark) or a mark whose checkpoint is gone."""
    mark = run / BEST_JSON
    if not mark.is_file():
        return None
    raw = read_json(mark, "best-checkpoint mark")
    name = raw.get("checkpoint") if isinstance(raw, dict) else None
    if not isinstance(name, str) or not _STEP_DIR.fullmatch(name):
        raise FormatError(f"{mark}: 'checkpoint' must name a step-NNNNNNN folder, got {name!r}")
    folder = run / CHECKPOINTS / name
    return folder if (folder / STATE_JSON).is_file() else None


def is_run_folder(path: Path) -> bool:
    """A training run folder (not itself a checkpoint folder) with a checkpoints/ folder inside."""
    return path.is_dir() and not (path / "config.json").exists() and (path / CHECKPOINTS).is_dir()


# --- loading --------------------------------------------------------------------------------------

def load_config(folder: str | Path) -> ModelConfig:
    folder = resolve_folder(folder)
    return ModelConfig.from_hf_config(read_json(folder / "config.json", "model config"))


def not_local_message(path) -> str:
    return (f"{str(path)!r} is not a local folder or file. pocketlm does not download from a model hub "
            "at run time: pass the path of a checkpoint folder (config.json + model.safetensors), e.g. one "
            "written by save_pretrained(), or of a .gguf file, or a registry name (`pocketlm list`), or build an "
            "untrained model with from_config()")


def resolve_folder(path: str | Path) -> Path:
    """Check that `path` is a local checkpoint folder; explain what to do when it is not."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise NotFoundError(not_local_message(path))
    if not folder.is_dir():
        raise NotFoundError(f"{folder} is a file but not a GGUF model; pass a .gguf file or the checkpoint "
                            "folder that holds config.json and model.safetensors")
    if not (folder / "config.json").is_file():
        raise NotFoundError(f"{folder} has no config.json, so it is not a checkpoint folder")
    return folder


def load_pretrained(path: str | Path, device=None, dtype=None, allow_pickle: bool = False,
                    cls: type[Transformer] = Transformer, adapt_config=None) -> Transformer:
    """Load a checkpoint folder into `cls`, validating every tensor against the config.

    dtype: None or a torch dtype / name ("float32", "bf16", ...) or "auto" for the stored dtype.
    adapt_config: a function from the folder's config to the one to build (e.g. a classifier's labels).
    """
    folder = resolve_folder(path)
    config = load_config(folder)
    if adapt_config is not None:
        config = adapt_config(config)
    check_tokenizer_fits(folder, config)
    on_cpu = device is None or torch.device(device).type == "cpu"
    quantized = read_quantization(folder)
    bits = quant_bits(dtype)
    transposed = output_head_names(config) if on_cpu and not (quantized or bits) else ()
    tensors = _from_hf_names(config, _read_weights(folder, allow_pickle, transposed))
    if quantized:  # blocks as saved; a float dtype asked for dequantizes them, int8/int4 requantize
        model = model_from_tensors(cls, config, tensors, where=str(folder), device=device, quantized=quantized)
        if dtype not in (None, "auto"):
            dequantize_model(model, torch.float32 if bits else _resolve_dtype(dtype, torch.float32))
    else:
        target = torch.float32 if bits else \
            _resolve_dtype(dtype, next(iter(tensors.values())).dtype) if tensors else torch.float32
        model = model_from_tensors(cls, config, tensors, where=str(folder), device=device, dtype=target)
    if bits:
        quantize_model(model, bits)
    return model


def read_quantization(folder: Path) -> dict[str, int] | None:
    """{module: bits} from a quantized checkpoint's config.json (None for a float checkpoint),
    checked: pocketlm's own method, blocks of 32, 4 or 8 bits."""
    raw = read_json(folder / "config.json", "model config").get("quantization_config")
    if raw is None:
        return None
    where = f"{folder / 'config.json'}: quantization_config"
    if not isinstance(raw, dict) or raw.get("quant_method") != QUANT_METHOD:
        method = raw.get("quant_method") if isinstance(raw, dict) else raw
        raise FormatError(f"{where} has quant_method {method!r}; pocketlm reads only its own "
                          f"({QUANT_METHOD!r}): load a float checkpoint and pass dtype='int8' or 'int4'")
    modules = raw.get("modules")
    if raw.get("block_size") != BLOCK or not isinstance(modules, dict) or not all(
            isinstance(k, str) and v in (4, 8) and not isinstance(v, bool) for k, v in modules.items()):
        raise FormatError(f"{where} must hold block_size {BLOCK} and modules {{name: 4 or 8}}")
    return modules


_HEADS_SUPPLIED = contextvars.ContextVar("heads_supplied", default=False)


@contextlib.contextmanager
def heads_supplied():
    """Loading a base whose new head something else fills next (an adapter's saved `score`): no
    warning that the head is untrained."""
    token = _HEADS_SUPPLIED.set(True)
    try:
        yield
    finally:
        _HEADS_SUPPLIED.reset(token)


def model_from_tensors(cls: type[Transformer], config: ModelConfig, tensors: dict[str, torch.Tensor], *,
                       where: str, device=None, dtype: torch.dtype | None = None,
                       quantized: dict[str, int] | None = None) -> Transformer:
    """`cls(config)` holding `tensors` (our names; moved to device/dtype), after checking that
    they are exactly the tensors the config needs, with the right shapes. `where` names the
    source in errors. The tensors become the parameters: no copy beyond the device/dtype move.
    `quantized` ({module: bits}) names the modules that hold quantized blocks (their q, scale
    and offset tensors keep their own dtypes)."""
    with torch.device("meta"):
        model = cls(config)
        replace_modules(model, quantized or {})
        model.tie_weights()
    expected = model.state_dict()
    optional = {"lm_head.weight", "lm_head.q", "lm_head.scale", "lm_head.offset"} if config.tie_embeddings else set()
    blocks = {f"{module}.{part}" for module in quantized or {} for part in ("q", "scale", "offset")}
    tensors = {k: v for k, v in tensors.items() if k not in cls.ignored_on_load}
    fresh = sorted(cls.new_on_load - set(tensors))
    if fresh:
        # as transformers does for a head the checkpoint lacks: normal(0, initializer_range)
        (log.debug if _HEADS_SUPPLIED.get() else log.warning)("%s: %s newly initialised (the checkpoint has no such head); train the model before "
                    "using its predictions", where, ", ".join(fresh))
        tensors.update({name: torch.empty(expected[name].shape).normal_(0.0, config.initializer_range)
                        for name in fresh})
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise FormatError(f"{where}: tensors not in a {config.family} model with this config: "
                          f"{_names(unknown)}; do the config and the weights come from the same model?")
    missing = sorted(set(expected) - set(tensors) - optional)
    if missing:
        raise FormatError(f"{where}: the weights lack {len(missing)} tensors the config needs: {_names(missing)}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise FormatError(f"{where}: tensor {name} has shape {tuple(t.shape)} but the config needs "
                              f"{tuple(expected[name].shape)}; the config and the weights disagree")
        if name in blocks and t.dtype != expected[name].dtype:  # the kernels read these bytes as they are
            raise FormatError(f"{where}: quantized tensor {name} is {t.dtype}, not {expected[name].dtype}")
    tensors = {k: v.to(device=device, dtype=None if k in blocks else dtype) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    if quantized:
        model.requires_grad_(False)  # quantized blocks are for inference
    model.tie_weights()
    config.dtype = model.dtype  # transformers' config.dtype: what the weights were loaded in
    return model.eval()


def output_head_names(config: ModelConfig) -> set[str]:
    """The names the output projection's matrix may have on disk (the embedding's when tied),
    when decoding reads it faster from transposed storage (pocketlm.packing). Reading it that
    way at once spares the second copy that re-laying it out later would briefly need."""
    if not wants_transposed_storage(config.vocab_size, config.n_embd):
        return set()
    if not config.tie_embeddings:
        return {"lm_head.weight"}
    return {"model.embed_tokens.weight", "transformer.wte.weight", "wte.weight"}


def check_tokenizer_fits(folder: Path, config: ModelConfig) -> None:
    """A tokenizer that can emit ids past the embedding rows would crash deep inside torch later;
    refuse the pair now."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        return
    from pocketlm.tokenizer import Tokenizer

    n = len(Tokenizer.from_pretrained(folder))
    if n > config.vocab_size:
        raise TokenizerError(f"{folder}: the tokenizer has {n} tokens but the model embeds only "
                             f"{config.vocab_size}; ids ≥ {config.vocab_size} would have no embedding. "
                             "Use the tokenizer the model was trained with, or resize the model")


def read_generation_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    data = read_json(path, "generation config")
    if not isinstance(data, dict):
        raise FormatError(f"{path} must hold a JSON object")
    return data


QUANTIZED_DTYPES = {"int8": 8, "int4": 4}


def quant_bits(dtype) -> int | None:
    """8 or 4 for dtype "int8" / "int4" (weights in quantized blocks), None for anything else."""
    return QUANTIZED_DTYPES.get(dtype) if isinstance(dtype, str) else None


def _resolve_dtype(dtype, stored: torch.dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return stored if stored.is_floating_point else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}, 'auto', or 'int8' / 'int4' (quantized blocks)")


def _names(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _read_weights(folder: Path, allow_pickle: bool, transposed: Collection[str] = ()) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS).is_file():
        return read_safetensors(folder / WEIGHTS, transposed)
    if (folder / WEIGHTS_INDEX).is_file():
        index = read_json(folder / WEIGHTS_INDEX, "safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FormatError(f"{folder / WEIGHTS_INDEX} has no valid weight_map")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise FormatError(f"{folder / WEIGHTS_INDEX} names shard {shard!r} outside the folder")
            tensors.update(read_safetensors(folder / shard, transposed))
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise FormatError(f"{folder}: the index lists tensors no shard holds: {_names(absent)}")
        return tensors
    if (folder / PICKLE_WEIGHTS).is_file():
        if not allow_pickle:
            raise UnsafeFormatError(
                f"{folder} holds only {PICKLE_WEIGHTS}, a pickle file that can run code when loaded. "
                "If you trust it, convert it to model.safetensors once, in Python: "
                "AutoModelForCausalLM.from_pretrained(folder, allow_pickle=True).save_pretrained(new_folder) "
                "(loaded with weights_only=True)")
        try:
            return torch.load(folder / PICKLE_WEIGHTS, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many kinds for a bad pickle
            raise FormatError(f"{folder / PICKLE_WEIGHTS} could not be read as a weights-only state dict: {e}") from None
    raise NotFoundError(f"{folder} has config.json but no weights ({WEIGHTS}, {WEIGHTS_INDEX} or {PICKLE_WEIGHTS})")


def read_safetensors_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Parse and validate a safetensors header: size, JSON, dtypes, shapes and byte ranges.
    Returns the tensor entries and the file offset where their data section starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: file is {size} bytes, too short for a safetensors header (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > _MAX_HEADER:
            raise FormatError(f"{path}: header claims {n} bytes at offset 0 but the file has {size - 8} "
                              "after the length field (truncated or not safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: header (bytes 8..{8 + n}) is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise FormatError(f"{where}: header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ST_DTYPES:
            raise FormatError(f"{where}: unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise FormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise FormatError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise FormatError(f"{where}: bytes {begin}..{end} lie outside the {data_len}-byte data section "
                              "(file truncated?)")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * _ST_DTYPES[dtype][1]:
            raise FormatError(f"{where}: shape {shape} of {dtype} needs {numel * _ST_DTYPES[dtype][1]} bytes, "
                              f"the header gives {end - begin}")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, a), (b1, e1, b) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(f"{path}: tensors {a!r} and {b!r} overlap in the data section")
    return header, 8 + n


def read_safetensors(path: Path, transposed: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Read every tensor of a validated safetensors file into fresh memory. Plain reads, not a
    memory map, so the file's pages do not sit in the process beside the copies (a mapped 540 MB
    checkpoint would otherwise count twice towards peak memory while loading).

    Matrices named in `transposed` get the same shape and values in transposed storage, filled
    a few rows at a time, so a layout that decoding prefers costs no second copy of the matrix."""
    header, data_start = read_safetensors_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            dtype, shape = _ST_DTYPES[info["dtype"]][0], info["shape"]
            begin, end = info["data_offsets"]
            f.seek(data_start + begin)
            if name in transposed and len(shape) == 2 and end > begin:
                t = torch.empty(shape[::-1], dtype=dtype).t()
                step = max(1, TRANSPOSED_READ_BYTES // ((end - begin) // shape[0]))
                bounce = torch.empty(min(step, shape[0]), shape[1], dtype=dtype)
                for row in range(0, shape[0], step):
                    rows = bounce[:min(step, shape[0] - row)]
                    _read_exactly(f, rows, path, name)
                    t[row:row + len(rows)] = rows
            else:
                t = torch.empty(shape, dtype=dtype)
                if end > begin:
                    _read_exactly(f, t, path, name)
            tensors[name] = t
    return tensors


def _read_exactly(f, t: torch.Tensor, path: Path, name: str) -> None:
    want = t.numel() * t.element_size()
    if f.readinto(t.reshape(-1).view(torch.uint8).numpy()) != want:
        raise FormatError(f"{path}: tensor {name!r} ends past the end of the file (truncated?)")


def _from_hf_names(config: ModelConfig, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a checkpoint's tensors to ours; GPT-2 weights are untransposed and c_attn split."""
    if config.family != "gpt2":
        return {k: v for k, v in raw.items() if not _LLAMA_IGNORED.match(k)}
    out = {}
    per_layer = re.compile(r"^h\.(\d+)\.(.+)$")
    for full_name, t in raw.items():
        name = full_name.removeprefix("transformer.")
        if _GPT2_IGNORED.match(name):
            continue
        if name in _GPT2_GLOBAL:
            out[_GPT2_GLOBAL[name]] = t
            continue
        m = per_layer.match(name)
        if m is None:
            out[full_name] = t  # lm_head.weight, or an unknown name reported by the caller
            continue
        prefix, rest = f"model.layers.{m[1]}.", m[2]
        if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
            kind = rest.rsplit(".", 1)[1]
            fused = t.t() if kind == "weight" else t  # (3C, C) or (3C,)
            if fused.shape[0] != 3 * config.n_embd:
                raise FormatError(f"tensor {full_name} has shape {tuple(t.shape)}; a fused q|k|v for "
                                  f"n_embd={config.n_embd} needs {3 * config.n_embd} outputs")
            for proj, part in zip("qkv", fused.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{proj}_proj.{kind}"] = part
        elif rest in _GPT2_LAYER:
            ours, transposed = _GPT2_LAYER[rest]
            out[prefix + ours] = t.t() if transposed and t.dim() == 2 else t
        else:
            out[full_name] = t
    return out
