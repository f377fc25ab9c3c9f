"""Model configuration: one `ModelConfig` dataclass describes every Transformer pocketlm builds,
from GPT-2 to Llama, through a handful of architecture switches. It also translates to and from
the `config.json` of Hugging Face checkpoints, so folders move between pocketlm and transformers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pocketlm.errors import ConfigError

log = logging.getLogger(__name__)

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "sinusoidal", "rope")
ACTIVATIONS = ("gelu_tanh", "gelu", "silu")

# transformers' names for our activations, both ways
_HF_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
           "gelu": "gelu", "silu": "silu", "swish": "silu"}
_GPT2_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu"}


def _alias(name: str) -> property:
    return property(lambda self: getattr(self, name), doc=f"transformers' name for `{name}` (read-only)")


@dataclass
class ModelConfig:
    """Shape and switches of a decoder-only Transformer.

    `n_kv_head`, `head_dim` and `intermediate_size` default to the classic choices (full
    multi-head attention, width / heads, 4 × width) when left as None.
    """

    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    max_position: int = 1024
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    act: str = "gelu_tanh"
    pos: str = "learned"
    rope_theta: float = 10000.0
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # a sequence classifier's labels (None for a causal LM): id2label {0: "negative", ...} and its
    # inverse, and transformers' problem_type ("single_label_classification", "regression",
    # "multi_label_classification"; None: inferred from the labels at the first loss)
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None

    # Settings transformers' code reads and sets on model.config that are not part of the
    # architecture: class-level defaults, so they stay out of fields, to_dict and config.json.
    use_cache: ClassVar[bool] = False  # forward returns a cache only when asked (use_cache=True)
    dtype: ClassVar[Any] = None  # the torch dtype the weights were loaded in (set by the loader)
    is_encoder_decoder: ClassVar[bool] = False

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None and _positive_int(self.n_head) and isinstance(self.n_embd, int):
            if self.n_embd % self.n_head:
                raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                                  "set head_dim explicitly or change one of them")
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None and isinstance(self.n_embd, int):
            self.intermediate_size = 4 * self.n_embd
        if self.id2label is not None:
            self.id2label = _int_keys(self.id2label)  # JSON writes the ids as strings
            if self.label2id is None:
                self.label2id = {label: i for i, label in self.id2label.items()}
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot describe a working model."""
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head", "head_dim",
                     "intermediate_size", "max_position"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("pos", POSITIONS), ("act", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config field {name}={getattr(self, name)!r} is not one of {allowed}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} "
                              "(grouped-query attention shares each key/value head among query heads)")
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.pos == "sinusoidal" and self.n_embd % 2:
            raise ConfigError(f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ConfigError(f"norm_eps must be a positive number, got {self.norm_eps!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise ConfigError(f"{name}={value!r} is not an id in the vocabulary (0..{self.vocab_size - 1})")
        for value in self.eos_token_ids:
            if not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise ConfigError(f"eos_token_id={value!r} is not an id in the vocabulary (0..{self.vocab_size - 1})")
        if self.id2label is not None and sorted(self.id2label) != list(range(len(self.id2label))):
            raise ConfigError(f"id2label must number its labels 0..n-1, got ids {sorted(self.id2label)}")
        if self.problem_type not in (None, *PROBLEM_TYPES):
            raise ConfigError(f"problem_type={self.problem_type!r} is not one of {PROBLEM_TYPES}")

    # --- derived facts -------------------------------------------------------------------------

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @property
    def num_labels(self) -> int:
        """How many classes a sequence classifier scores (2 when no labels are set, as in transformers)."""
        return len(self.id2label) if self.id2label else 2

    @property
    def family(self) -> str:
        """'gpt2' or 'llama' when transformers has the same architecture, else 'pocketlm'."""
        if (self.norm, self.mlp, self.pos) == ("layernorm", "gelu", "learned") and self.bias \
                and self.act in _GPT2_ACT and self.n_kv_head == self.n_head \
                and self.head_dim * self.n_head == self.n_embd:
            return "gpt2"
        if (self.norm, self.mlp, self.pos, self.act) == ("rmsnorm", "swiglu", "rope", "silu"):
            return "llama"
        return "pocketlm"

    # --- transformers' names for the same facts (read-only), so code reading model.config ports ---

    model_type = _alias("family")
    hidden_size = _alias("n_embd")
    num_hidden_layers = _alias("n_layer")
    num_attention_heads = _alias("n_head")
    num_key_value_heads = _alias("n_kv_head")
    max_position_embeddings = n_positions = n_ctx = _alias("max_position")
    n_inner = _alias("intermediate_size")
    rms_norm_eps = layer_norm_epsilon = layer_norm_eps = _alias("norm_eps")
    tie_word_embeddings = _alias("tie_embeddings")
    torch_dtype = _alias("dtype")
    hidden_act = activation_function = property(lambda self: _GPT2_ACT.get(self.act, self.act))
    architectures = property(lambda self: self.to_hf_config()["architectures"])

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A preset with some fields changed. Fields that follow from a changed width or head count
        (head_dim, n_kv_head, intermediate_size) are derived again unless given too."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        for changed, derived in (("n_head", ("n_kv_head", "head_dim")), ("n_embd", ("head_dim", "intermediate_size"))):
            if changed in overrides:
                for field_name in derived:
                    overrides.setdefault(field_name, None)
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --- Hugging Face config.json ----------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build a config from a Hugging Face `config.json` dict (gpt2, llama or pocketlm)."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        try:
            if model_type == "gpt2":
                return _from_gpt2(hf)
            if model_type == "llama":
                return _from_llama(hf)
            if model_type == "pocketlm":
                known = {f.name for f in dataclasses.fields(cls)}
                return cls(**{k: v for k, v in hf.items() if k in known})
        except ConfigError:
            raise
        except KeyError as e:
            raise ConfigError(f"config.json of model_type {model_type!r} lacks the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json has a field of the wrong type: {e}") from None
        raise ConfigError(f"unknown architecture model_type={model_type!r}; pocketlm loads "
                          "'gpt2', 'llama' and 'pocketlm' checkpoints")

    def to_hf_config(self, head: str = "causal-lm") -> dict[str, Any]:
        """The `config.json` dict for this config, in its family's own Hugging Face layout, for a
        model with `head` "causal-lm" or "sequence-classification" (which adds the label fields)."""
        hf = self._hf_fields()
        hf["architectures"] = [_ARCHITECTURES[head][hf["model_type"]]]
        if self.id2label is not None:  # string ids, as transformers writes them
            hf.update(id2label={str(i): label for i, label in self.id2label.items()},
                      label2id=self.label2id, problem_type=self.problem_type)
        return hf

    def _hf_fields(self) -> dict[str, Any]:
        common = {"vocab_size": self.vocab_size, "initializer_range": self.initializer_range,
                  "tie_word_embeddings": self.tie_embeddings, "bos_token_id": self.bos_token_id,
                  "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}
        if self.family == "gpt2":
            return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **common,
                    "n_positions": self.max_position, "n_embd": self.n_embd, "n_layer": self.n_layer,
                    "n_head": self.n_head, "n_inner": self.intermediate_size,
                    "activation_function": _GPT2_ACT[self.act], "layer_norm_epsilon": self.norm_eps,
                    "resid_pdrop": self.dropout, "embd_pdrop": self.dropout, "attn_pdrop": self.dropout}
        if self.family == "llama":
            return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **common,
                    "hidden_size": self.n_embd, "intermediate_size": self.intermediate_size,
                    "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
                    "num_key_value_heads": self.n_kv_head, "head_dim": self.head_dim,
                    "hidden_act": "silu", "max_position_embeddings": self.max_position,
                    "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
                    "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
                    "attention_bias": self.bias, "mlp_bias": self.bias,
                    "attention_dropout": self.dropout}
        fields = {k: v for k, v in self.to_dict().items() if k not in ("id2label", "label2id", "problem_type")}
        return {"model_type": "pocketlm", "architectures": ["PocketLMForCausalLM"], **fields}


PROBLEM_TYPES = ("single_label_classification", "regression", "multi_label_classification")
_ARCHITECTURES = {
    "causal-lm": {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "pocketlm": "PocketLMForCausalLM"},
    "sequence-classification": {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
                                "pocketlm": "PocketLMForSequenceClassification"},
}


def _int_keys(id2label) -> dict[int, str]:
    try:
        return {int(i): str(label) for i, label in dict(id2label).items()}
    except (TypeError, ValueError):
        raise ConfigError(f"id2label must map class ids to label names, e.g. {{0: 'negative', 1: 'positive'}}, "
                          f"got {id2label!r}") from None


def _labels(hf: dict[str, Any]) -> dict[str, Any]:
    """The label fields of a config.json (none in a causal LM's)."""
    return {k: hf.get(k) for k in ("id2label", "label2id", "problem_type")}


def _from_gpt2(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise ConfigError("this GPT-2 config changes the attention scaling "
                          "(scale_attn_by_inverse_layer_idx / scale_attn_weights), which pocketlm does not support")
    act = hf.get("activation_function", "gelu_new")
    if _HF_ACT.get(act) not in _GPT2_ACT:
        raise ConfigError(f"GPT-2 activation_function {act!r} is not supported; use gelu_new or gelu")
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
        intermediate_size=hf.get("n_inner") or None, max_position=hf.get("n_positions", 1024),
        norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", act=_HF_ACT[act],
        pos="learned", bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        initializer_range=hf.get("initializer_range", 0.02),
        **_special_ids(hf), **_labels(hf))


def _from_llama(hf: dict[str, Any]) -> ModelConfig:
    scaling = hf.get("rope_scaling") or {}
    rope_params = hf.get("rope_parameters") or {}
    rope_type = rope_params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ConfigError(f"rope scaling type {rope_type!r} is not supported yet; only plain RoPE is")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise ConfigError("attention_bias and mlp_bias differ in this Llama config; pocketlm has one "
                          "`bias` switch for both")
    act = hf.get("hidden_act", "silu")
    if _HF_ACT.get(act) != "silu":
        raise ConfigError(f"Llama hidden_act {act!r} is not supported; SwiGLU uses silu")
    n_head = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_embd=hf["hidden_size"], n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=hf.get("head_dim") or None, intermediate_size=hf["intermediate_size"],
        max_position=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", act="silu", pos="rope",
        rope_theta=float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))),
        bias=bool(hf.get("attention_bias", False)), tie_embeddings=hf.get("tie_word_embeddings", False),
        initializer_range=hf.get("initializer_range", 0.02),
        **_special_ids(hf), **_labels(hf))


def _special_ids(hf: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids; ids outside the vocabulary (common in configs copied between model
    sizes, and accepted by transformers) are dropped with a warning rather than refused."""
    vocab = hf["vocab_size"]
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = hf.get(key)
        values = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(v, int) and 0 <= v < vocab for v in values):
            log.warning("config.json: %s=%r is outside the vocabulary of %d; ignoring it", key, value, vocab)
            value = None
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        ids[key] = value
    return ids


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


GPT2 = dict(norm="layernorm", mlp="gelu", act="gelu_tanh", pos="learned", bias=True, tie_embeddings=True)
LLAMA = dict(norm="rmsnorm", mlp="swiglu", act="silu", pos="rope", bias=False)

PRESETS: dict[str, ModelConfig] = {
    "gpt2": ModelConfig(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, max_position=1024,
                        bos_token_id=50256, eos_token_id=50256, **GPT2),
    "gpt2-medium": ModelConfig(vocab_size=50257, n_layer=24, n_head=16, n_embd=1024, max_position=1024,
                               bos_token_id=50256, eos_token_id=50256, **GPT2),
    "llama-tiny": ModelConfig(vocab_size=32000, n_layer=4, n_head=8, n_kv_head=4, n_embd=256,
                              intermediate_size=688, max_position=2048, norm_eps=1e-5,
                              tie_embeddings=False, **LLAMA),
    "smollm2-135m": ModelConfig(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                                intermediate_size=1536, max_position=8192, rope_theta=100000.0,
                                norm_eps=1e-5, tie_embeddings=True, initializer_range=0.041666666666666664,
                                bos_token_id=1, eos_token_id=2, pad_token_id=2, **LLAMA),
    # small enough to pretrain on a laptop CPU in minutes
    "baby": ModelConfig(vocab_size=4096, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
                        intermediate_size=384, max_position=256, norm_eps=1e-5,
                        tie_embeddings=True, **LLAMA),
}


# --- training ---------------------------------------------------------------------------------

MAX_SEED = 2**63 - 1
MAX_THREADS = 1024


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """Every setting of a training run; `pocketlm train` takes one flag per field, with these defaults."""

    _least_steps = 1  # (a class attribute, not a setting)
    data: str = _help("folder of token shards made by `pocketlm prepare`", default="")
    model: str = _help("a preset (baby, llama-tiny, gpt2, ...) to train from scratch, or a model to continue: "
                       "a checkpoint or run folder, a .gguf file or a pulled registry name", default="baby")
    out: str = _help("run folder: configs, metrics.csv, loss.png, checkpoints/", default="runs/train")
    max_steps: int = _help("optimizer steps to train for", default=1000)
    max_minutes: float = _help("stop (saving a checkpoint) after this much training time; 0: no limit",
                               default=0.0)
    batch_size: int = _help("sequences per step (per process)", default=16)
    block_size: int = _help("tokens per sequence", default=128)
    grad_accum: int = _help("micro-batches summed into each step", default=1)
    lr: float = _help("peak learning rate", default=3e-3)
    min_lr: float = _help("learning rate at the end of the cosine decay", default=3e-4)
    warmup_steps: int = _help("linear warm-up steps", default=100)
    weight_decay: float = _help("AdamW decoupled weight decay (matrices only)", default=0.1)
    beta1: float = _help("AdamW beta1, in [0, 1)", default=0.9)
    beta2: float = _help("AdamW beta2, in [0, 1)", default=0.95)
    grad_clip: float = _help("clip the gradient norm to this (0: off)", default=1.0)
    dropout: float = _help("dropout for a model built from a preset", default=0.0)
    eval_every: int = _help("steps between evaluations, samples and checkpoints", default=100)
    eval_windows: int = _help("validation windows scored per evaluation", default=32)
    keep_last: int = _help("checkpoints to keep", default=2)
    log_every: int = _help("steps between rows of metrics.csv", default=10)
    sample_tokens: int = _help("tokens sampled at each evaluation (0: none)", default=64)
    sample_prompt: str = _help("prompt of those samples (empty: start from the EOS token)", default="")
    device: str = _help("cpu, cuda, cuda:N or auto", default="auto")
    precision: str = _help("auto (bf16 autocast on a GPU that has it, else fp32), fp32 or bf16",
                           default="auto")
    compile: bool = _help("torch.compile the model for training", default=False)
    fsdp: bool = _help("under torchrun, shard weights, gradients and optimizer state across the processes "
                       "(FSDP) instead of keeping a replica in each (DDP): for models that do not fit one "
                       "device", default=False)
    seed: int = _help("seed of the weights, the batches and the samples (0..2**63-1)", default=1337)
    threads: int = _help("torch CPU threads (0: torch's default)", default=0)
    resume: bool = _help("continue from the newest complete checkpoint in --out", default=False)

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that cannot work. The messages name the
        command-line flags (`--block-size`), since `pocketlm train` takes one flag per field."""
        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        for name, smallest in (("max_steps", self._least_steps), ("batch_size", 1), ("block_size", 1), ("grad_accum", 1),
                               ("eval_every", 1), ("eval_windows", 1), ("keep_last", 1), ("log_every", 1),
                               ("warmup_steps", 0), ("sample_tokens", 0), ("threads", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                raise ConfigError(f"{flag(name)} must be an integer ≥ {smallest}, got {value!r}")
        if self.seed > MAX_SEED:  # torch keeps seeds in 64 bits, and the samples add the step to it
            raise ConfigError(f"--seed must be in 0..2**63-1 ({MAX_SEED}), got {self.seed}")
        if self.threads > MAX_THREADS:
            raise ConfigError(f"--threads must be at most {MAX_THREADS}, got {self.threads}")
        for name, low, high in (("lr", 0.0, None), ("min_lr", 0.0, None), ("weight_decay", 0.0, None),
                                ("grad_clip", 0.0, None), ("max_minutes", 0.0, None), ("dropout", 0.0, 1.0),
                                ("beta1", 0.0, 1.0), ("beta2", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or (high is not None and value >= high):
                where = f"in [{low:g}, {high:g})" if high is not None else "a finite number ≥ 0"
                raise ConfigError(f"{flag(name)} must be {where}, got {value!r}")
        if self.lr == 0:
            raise ConfigError("--lr must be above 0 (with 0 the weights never change)")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr ({self.min_lr:g}) is above --lr ({self.lr:g})")
        for name in ("data", "model", "out", "sample_prompt", "device", "precision"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{flag(name)} must be a string, got {getattr(self, name)!r}")
        for name in ("compile", "fsdp", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{flag(name)} must be True or False, got {getattr(self, name)!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if not self.data:
            raise ConfigError("no training data: pass --data, a folder made by `pocketlm prepare`")
        if not self.model:
            raise ConfigError("--model is empty: pass a preset (baby, llama-tiny, gpt2, ...) or a checkpoint")
        if not self.out:
            raise ConfigError("--out is empty: pass the run folder to write")

    def lr_at(self, step: int) -> float:
        """Linear warm-up to lr, then cosine decay to min_lr at max_steps."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)


FINETUNE_TASKS = ("classify", "sft")
LORA_LR, FULL_LR = 5e-4, 5e-5  # fine-tuning's default peak learning rates: with --lora, and without


@dataclass
class FinetuneConfig(TrainConfig):
    """Every setting of a fine-tune: the training loop's (TrainConfig's fields, with defaults for
    fine-tuning) and the task's. `pocketlm finetune classify|sft` takes one flag per field; for
    classify, `data` is the flag --train."""

    _least_steps = 0  # 0: as many steps as --epochs take

    data: str = _help("training examples: classify: a .csv, .tsv or .jsonl file or 'sentiment'; sft: a .jsonl "
                      "of conversations (messages, Alpaca or ShareGPT) or 'chatterbot'", default="")
    model: str = _help("the base model: a checkpoint or run folder, a .gguf file or a registry name", default="")
    out: str = _help("run folder: configs, metrics.csv, checkpoints/ (never the base model's folder)",
                     default="runs/finetune")
    max_steps: int = _help("optimizer steps (0: as many as --epochs take)", default=0)
    batch_size: int = _help("examples per step (per process)", default=8)
    block_size: int = _help("longest example in tokens (at most the model's context); longer ones are cut "
                            "(see --truncate)", default=256)
    lr: float = _help(f"peak learning rate (0: {LORA_LR:g} with --lora, {FULL_LR:g} without)", default=0.0)
    min_lr: float = _help("learning rate at the end of the cosine decay", default=0.0)
    warmup_steps: int = _help("linear warm-up steps", default=5)
    weight_decay: float = _help("AdamW decoupled weight decay (matrices only)", default=0.0)
    beta2: float = _help("AdamW beta2, in [0, 1)", default=0.999)
    eval_every: int = _help("steps between evaluations and checkpoints", default=50)
    keep_last: int = _help("newest checkpoints to keep (the best is kept besides)", default=1)
    log_every: int = _help("steps between rows of metrics.csv", default=5)
    sample_tokens: int = _help("(pretraining only; fine-tunes draw no samples)", default=0)
    task: str = _help("classify (a label per text) or sft (chat instruction tuning)", default="classify")
    val: str = _help("validation examples, in the format of the training file (default: hold out --val-frac "
                     "of it, stratified by label for classify)", default="")
    val_frac: float = _help("share of the training examples held out when there is no --val", default=0.1)
    labels: str = _help("classify: the label names in class-id order, comma-separated (default: the training "
                        "file's labels, sorted)", default="")
    text_field: str = _help("classify: the field (column) holding the text", default="text")
    label_field: str = _help("classify: the field (column) holding the label", default="label")
    epochs: float = _help("passes over the training examples, when --max-steps is 0", default=1.0)
    truncate: bool = _help("cut examples longer than --block-size (and count them); --no-truncate refuses them",
                           default=True)
    lora: bool = _help("train LoRA adapters (and a classifier's head) instead of every weight", default=False)
    lora_r: int = _help("LoRA rank", default=8)
    lora_alpha: float = _help("LoRA scale numerator: updates are scaled by alpha / r", default=16.0)
    lora_dropout: float = _help("dropout on the adapters' input", default=0.05)
    lora_targets: str = _help("layers to adapt, comma-separated transformers names (q_proj,v_proj, or c_attn "
                              "for GPT-2); all-linear: every linear layer of the blocks", default="all-linear")

    def __post_init__(self):
        if self.lr == 0 and not isinstance(self.lr, bool):
            self.lr = LORA_LR if self.lora else FULL_LR

    @property
    def data_flag(self) -> str:
        return "--train" if self.task == "classify" else "--data"

    @property
    def label_names(self) -> list[str] | None:
        return [name.strip() for name in self.labels.split(",")] if self.labels.strip() else None

    def validate(self) -> None:
        if self.task not in FINETUNE_TASKS:
            raise ConfigError(f"the fine-tuning task must be one of {', '.join(FINETUNE_TASKS)}, got {self.task!r}")
        if not self.data:
            raise ConfigError(f"no training examples: pass {self.data_flag} FILE")
        if not self.model:
            raise ConfigError("--model is empty: pass the base model to fine-tune (a checkpoint or run folder, a "
                              ".gguf file or a registry name such as smollm2-135m-instruct)")
        super().validate()
        for name, low, high in (("epochs", 0.0, None), ("val_frac", 0.0, 1.0), ("lora_alpha", 0.0, None),
                                ("lora_dropout", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or (high is not None and value >= high) \
                    or (value == low and name != "lora_dropout"):
                where = f"in ({low:g}, {high:g})" if high is not None else "a finite number > 0"
                if name == "lora_dropout":
                    where = "in [0, 1)"
                raise ConfigError(f"--{name.replace('_', '-')} must be {where}, got {value!r}")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ConfigError(f"--lora-r must be an integer ≥ 1, got {self.lora_r!r}")
        if self.fsdp:
            raise ConfigError("--fsdp is for pretraining; fine-tunes run data-parallel (DDP) under torchrun")


def resolve_device(name: str | None):
    """A torch.device from a user's --device: None or "auto" is the GPU when torch sees one, else
    the CPU; a CUDA device on a machine without one is a ConfigError."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:1, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA GPU that torch can use; use --device cpu")
    return device
