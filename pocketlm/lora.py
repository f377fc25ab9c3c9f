"""LoRA adapters as module surgery: chosen nn.Linear layers are wrapped in a `LoraLinear` that adds
a trainable low-rank update to a frozen base, y = base(x) + B(A(dropout(x))) * alpha / r.

Adapters are saved alone in the PEFT layout (`adapter_config.json` + `adapter_model.safetensors`,
keys such as `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so the `peft`
package applies them to the transformers model of the same base, and pocketlm loads what peft saved.
Target names are transformers' module names; for Llama they are pocketlm's own layer names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pocketlm.errors import ConfigError, FormatError, NotFoundError
from pocketlm.files import atomic_path, atomic_write_json, read_json
from pocketlm.model import Attention, Transformer
from pocketlm.packing import unpack_linears

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# a SEQ_CLS adapter's labels, which peft does not record: config.json's id2label, label2id and
# problem_type under the same keys, so the classifier loads with its label names
LABEL_CONFIG = "label_config.json"
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PREFIX = "base_model.model."  # what peft puts before the transformers model's own tensor names
HEAD = "score"  # the classification head: trained fully, saved whole (peft's modules_to_save)


@dataclass
class LoraConfig:
    """r: rank of the update; alpha: its scale is alpha / r; dropout: applied to the adapter's
    input only; targets: layer names to wrap (q_proj, or a longer tail of the module path, as peft
    matches them); task_type: CAUSAL_LM, or SEQ_CLS to also train and save the `score` head."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = LLAMA_TARGETS
    task_type: str = "CAUSAL_LM"

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.task_type not in TASK_TYPES:
            raise ConfigError(f"LoRA task_type must be one of {', '.join(TASK_TYPES)}, got {self.task_type!r}")
        if not self.targets:
            raise ConfigError("LoRA needs at least one target layer name, e.g. q_proj v_proj")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _add_adapter(module: nn.Module, in_features: int, out_features: int, r: int, scaling: float,
                 dropout: float, like: torch.Tensor) -> None:
    """Give `module` lora_A (r, in), lora_B (out, r), lora_dropout and scaling. lora_B starts at
    zero, so a fresh adapter changes nothing; lora_A starts kaiming-uniform, as peft initialises it."""
    kwargs = dict(bias=False, device=like.device, dtype=like.dtype)
    module.lora_A = nn.Linear(in_features, r, **kwargs)
    module.lora_B = nn.Linear(r, out_features, **kwargs)
    nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(module.lora_B.weight)
    module.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
    module.scaling = scaling


def _update(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module.lora_B(module.lora_A(module.lora_dropout(x))) * module.scaling


def _delta(module: nn.Module) -> torch.Tensor:
    """The adapter as one (out, in) matrix, to add to the base weight."""
    return (module.lora_B.weight @ module.lora_A.weight) * module.scaling


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a low-rank update: base(x) + B(A(dropout(x))) * scaling."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float):
        super().__init__()
        self.base_layer = base  # peft's name for the wrapped layer
        _add_adapter(self, base.in_features, base.out_features, r, scaling, dropout, base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + _update(self, x)

    def merged(self, fold: bool = True) -> nn.Linear:
        """The base layer, with the update folded into its weight unless `fold` is False."""
        if fold:
            with torch.no_grad():
                self.base_layer.weight += _delta(self)
        return self.base_layer


class LoraQKVAttention(Attention):
    """Attention with one adapter on its q, k and v projections taken as one matrix, as GPT-2
    stores them fused (c_attn): a shared lora_A, and a lora_B whose rows split into the q, k and v
    updates — exactly a LoRA on the fused matrix. An Attention becomes one by a class switch."""

    def qkv_sizes(self) -> list[int]:
        return [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features]

    def project_qkv(self, x):
        q, k, v = super().project_qkv(x)
        dq, dk, dv = _update(self, x).split(self.qkv_sizes(), dim=-1)
        return q + dq, k + dk, v + dv

    def merge(self, fold: bool = True) -> None:
        """Fold the update into q_proj, k_proj and v_proj (unless `fold` is False) and become a
        plain Attention again."""
        with torch.no_grad():
            for linear, delta in zip((self.q_proj, self.k_proj, self.v_proj), _delta(self).split(self.qkv_sizes())):
                linear.weight += delta if fold else 0
        del self.lora_A, self.lora_B, self.lora_dropout, self.scaling
        self.__class__ = Attention


# GPT-2's module names (transformers) → pocketlm's: c_attn is q|k|v fused, adapted on the Attention
_GPT2_UNITS = {"attn.c_attn": "self_attn", "attn.c_proj": "self_attn.o_proj",
               "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}


def _units(model: Transformer) -> dict[str, str]:
    """transformers' module path of each layer an adapter may go on → pocketlm's module path.
    Adapters are matched, saved and loaded by the first, so peft's files fit."""
    config, units = model.config, {}
    for i in range(config.n_layer):
        ours = f"model.layers.{i}."
        if config.family == "gpt2":
            units.update({f"transformer.h.{i}.{hf}": ours + name for hf, name in _GPT2_UNITS.items()})
            continue
        names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 *(["mlp.gate_proj"] if config.mlp == "swiglu" else []), "mlp.up_proj", "mlp.down_proj"]
        units.update({ours + name: ours + name for name in names})
    return units


def lora_layers(model: Transformer) -> dict[str, nn.Module]:
    """The adapted modules (LoraLinear or LoraQKVAttention) by transformers' module path."""
    found = {}
    for hf_path, path in _units(model).items():
        module = model.get_submodule(path)
        if isinstance(module, LoraLinear | LoraQKVAttention):
            found[hf_path] = module
    return found


def layer_names(model: Transformer) -> list[str]:
    """The names of the layers adapters may target (q_proj ... down_proj; c_attn, c_proj, c_fc for
    GPT-2): every linear layer of the blocks, as peft's "all-linear" picks them."""
    return sorted({name.rsplit(".", 1)[-1] for name in _units(model)})


def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, Transformer):
        raise ConfigError(f"LoRA applies to pocketlm models, got {type(model).__name__}")
    if getattr(model, "lora_config", None) is not None:
        raise ConfigError("this model already has LoRA adapters; merge_lora(model) first to add new ones")


def _matches(name: str, target: str) -> bool:
    # as peft matches a list of targets: the whole module path or its last components
    return name == target or name.endswith("." + target)


def apply_lora(model: Transformer, config: LoraConfig) -> Transformer:
    """Put adapters on the target layers, in place, and freeze everything but them (and, for
    SEQ_CLS, the `score` head). Targets use transformers' module names. Returns the model."""
    _check_supported(model)
    if config.task_type == "SEQ_CLS" and not isinstance(getattr(model, HEAD, None), nn.Linear):
        raise ConfigError("task_type SEQ_CLS needs a sequence classifier with a `score` head "
                          "(AutoModelForSequenceClassification)")
    units = _units(model)
    unknown = [t for t in config.targets if not any(_matches(name, t) for name in units)]
    if unknown:
        raise ConfigError(f"LoRA target(s) {', '.join(unknown)} match no layer of this model; "
                          f"its layers are: {' '.join(layer_names(model))}")
    unpack_linears(model)  # a fused q/k/v copy made for fast decoding would bypass the adapters
    model.requires_grad_(False)
    for hf_path, path in units.items():
        if not any(_matches(hf_path, t) for t in config.targets):
            continue
        module = model.get_submodule(path)
        if isinstance(module, Attention):  # GPT-2's c_attn
            size = sum(linear.out_features for linear in (module.q_proj, module.k_proj, module.v_proj))
            _add_adapter(module, module.q_proj.in_features, size, config.r, config.scaling, config.dropout,
                         module.q_proj.weight)
            module.__class__ = LoraQKVAttention
        else:
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, LoraLinear(module, config.r, config.scaling, config.dropout))
    if config.task_type == "SEQ_CLS":
        getattr(model, HEAD).requires_grad_(True)
    model.lora_config = config
    return model


def merge_lora(model: Transformer, fold: bool = True) -> Transformer:
    """Fold every adapter into its base weight and remove the wrappers, in place: the result is a
    plain model (all parameters trainable again) that saves as an ordinary checkpoint. With
    fold=False the adapters are dropped instead, leaving the base model as it was."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("this model has no LoRA adapters to merge")
    for hf_path, path in _units(model).items():
        module = layers.get(hf_path)
        if isinstance(module, LoraQKVAttention):
            module.merge(fold)
        elif module is not None:
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, module.merged(fold))
    model.requires_grad_(True)
    model.lora_config = None
    return model


def save_adapter(model: Transformer, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters alone (and the `score` head for SEQ_CLS) in the PEFT layout."""
    from safetensors.torch import save_file

    config = getattr(model, "lora_config", None)
    if config is None:
        raise ConfigError("this model has no LoRA adapters to save; apply_lora(model, config) first")
    tensors = {}
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            tensors[f"{_PREFIX}{name}.{part}.weight"] = getattr(layer, part).weight.detach().contiguous()
    if config.task_type == "SEQ_CLS":
        tensors[f"{_PREFIX}{HEAD}.weight"] = getattr(model, HEAD).weight.detach().contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_json(folder / ADAPTER_CONFIG, {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.targets),
        "modules_to_save": [HEAD] if config.task_type == "SEQ_CLS" else None,
        "fan_in_fan_out": model.config.family == "gpt2",  # transformers' GPT-2 stores (in, out)
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    })
    if config.task_type == "SEQ_CLS" and model.config.id2label is not None:
        c = model.config
        atomic_write_json(folder / LABEL_CONFIG, {"id2label": {str(i): label for i, label in c.id2label.items()},
                                                  "label2id": c.label2id, "problem_type": c.problem_type})
    return folder


def read_adapter_config(folder: str | Path) -> LoraConfig:
    """The LoraConfig an adapter folder describes; refuses the peft options pocketlm lacks."""
    path = Path(folder) / ADAPTER_CONFIG
    raw = read_json(path, "LoRA adapter config")
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise FormatError(f"{path}: not a LoRA adapter (peft_type {raw.get('peft_type') if isinstance(raw, dict) else None!r})")
    # fan_in_fan_out only says how the base stores its weight (GPT-2's Conv1D): adapters are alike
    for option in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
                   "layers_to_transform", "target_parameters"):
        if raw.get(option):
            raise ConfigError(f"{path}: the LoRA option {option}={raw[option]!r} is not supported by pocketlm")
    if raw.get("bias", "none") != "none":
        raise ConfigError(f"{path}: LoRA bias={raw['bias']!r} is not supported by pocketlm (only 'none')")
    targets = raw.get("target_modules")
    if not isinstance(targets, list | tuple):
        raise ConfigError(f"{path}: target_modules must be a list of layer names, got {targets!r}")
    extra = set(raw.get("modules_to_save") or ()) - {HEAD, "classifier"}  # peft adds "classifier" for SEQ_CLS
    if extra:
        raise ConfigError(f"{path}: modules_to_save {sorted(extra)} are not supported (only {HEAD!r})")
    return LoraConfig(r=raw.get("r", 8), alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
                      targets=tuple(targets), task_type=raw.get("task_type") or "CAUSAL_LM")


def read_labels(folder: str | Path) -> dict:
    """The label settings of the classification (SEQ_CLS) adapter in `folder`: those of its
    label_config.json, else labels LABEL_0.. LABEL_{n-1} for the n rows of its saved `score`
    head (what an adapter saved by peft gives, as transformers names unnamed labels); {} for a
    CAUSAL_LM adapter."""
    folder = Path(folder)
    if read_adapter_config(folder).task_type != "SEQ_CLS":
        return {}
    path = folder / LABEL_CONFIG
    if path.is_file():
        raw = read_json(path, "adapter label config")
        if not isinstance(raw, dict) or not isinstance(raw.get("id2label"), dict) or not raw["id2label"]:
            raise FormatError(f"{path} must hold a JSON object with id2label, e.g. "
                              '{"id2label": {"0": "negative", "1": "positive"}}')
        return {key: raw.get(key) for key in ("id2label", "label2id", "problem_type")}
    from pocketlm.checkpoint import read_safetensors_header

    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise NotFoundError(f"LoRA adapter weights not found: {folder / ADAPTER_WEIGHTS}")
    header, _ = read_safetensors_header(folder / ADAPTER_WEIGHTS)
    shape = header.get(f"{_PREFIX}{HEAD}.weight", {}).get("shape")
    if not shape:
        raise FormatError(f"{folder / ADAPTER_WEIGHTS} is a SEQ_CLS adapter without the {HEAD!r} head "
                          f"({_PREFIX}{HEAD}.weight)")
    return {"id2label": {i: f"LABEL_{i}" for i in range(shape[0])}, "label2id": None}


def load_adapter(model: Transformer, folder: str | Path) -> Transformer:
    """Apply the adapter saved in `folder` (by pocketlm or by peft) to `model`, in place. When the
    files do not fit the model, it is left as it was."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_adapter_config(folder)
    weights_path = folder / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise NotFoundError(f"LoRA adapter weights not found: {weights_path}")
    try:
        tensors = {k.removeprefix(_PREFIX): v for k, v in load_file(str(weights_path)).items()}
    except Exception as e:  # safetensors' own error for a truncated or foreign file
        raise FormatError(f"{weights_path} is not a readable safetensors file: {e}") from e
    apply_lora(model, config)
    try:
        _fill(model, config, tensors, weights_path)
    except FormatError:
        merge_lora(model, fold=False)
        raise
    return model


def _fill(model: Transformer, config: LoraConfig, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = {f"{name}.{part}.weight": getattr(layer, part).weight
                for name, layer in lora_layers(model).items() for part in ("lora_A", "lora_B")}
    if config.task_type == "SEQ_CLS":
        expected[f"{HEAD}.weight"] = getattr(model, HEAD).weight
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise FormatError(f"{where} does not fit this model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]} (is it an adapter for a different base?)")
    for key, param in expected.items():
        if tensors[key].shape != param.shape:
            raise FormatError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, "
                              f"this model needs {tuple(param.shape)} (a different base or rank?)")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key])
