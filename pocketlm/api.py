"""The Hugging Face-style facade: `AutoTokenizer`, `AutoModelForCausalLM` and the familiar
aliases (`GPT2Tokenizer`, `GPT2LMHeadModel`, `LlamaForCausalLM`), so code written for
transformers runs on pocketlm with only its import line changed:

    tokenizer = GPT2Tokenizer.from_pretrained(path)
    model = GPT2LMHeadModel.from_pretrained(path)
    out = model.generate(tokenizer.encode("Once upon a time", return_tensors="pt"), max_length=100)

`from_pretrained` loads local checkpoints only and never returns random weights; untrained
models come from `from_config` with a `ModelConfig` or a preset name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pocketlm import checkpoint, registry
from pocketlm.config import ModelConfig
from pocketlm.errors import ConfigError, NotFoundError
from pocketlm.generate import Generator
from pocketlm.model import Transformer
from pocketlm.tokenizer import Tokenizer


class CausalLM(Transformer):
    """A `Transformer` with `from_pretrained`, `save_pretrained` and `generate`."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.generation_config: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device=None, dtype=None, torch_dtype=None,
                        allow_pickle: bool = False) -> "CausalLM":
        """Load a local checkpoint folder, a GGUF file (dequantized, float32 unless `dtype` says
        otherwise) or a pulled registry model by name. `torch_dtype` is an alias of `dtype`."""
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ConfigError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one")
        path = registry.resolve(path)
        if is_gguf(path):
            from pocketlm.gguf import GGUFFile

            with GGUFFile(path) as f:
                return cls._from_gguf(f, device=device, dtype=dtype or torch_dtype)
        model = checkpoint.load_pretrained(path, device=device, dtype=dtype or torch_dtype,
                                           allow_pickle=allow_pickle, cls=cls)
        model.generation_config = checkpoint.read_generation_config(path)
        return model

    @classmethod
    def _from_gguf(cls, f, device=None, dtype=None) -> "CausalLM":
        from pocketlm.gguf import load_gguf

        model = load_gguf(f, device=device, dtype=dtype, cls=cls)
        model.generation_config = {k: v for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                   if (v := getattr(model.config, k)) is not None}
        return model

    @classmethod
    def from_config(cls, config: ModelConfig | str | dict, *, device=None, dtype=None) -> "CausalLM":
        """A randomly initialised model from a ModelConfig, a preset name or an HF config dict."""
        if isinstance(config, str):
            config = ModelConfig.preset(config)
        elif isinstance(config, dict):
            config = ModelConfig.from_hf_config(config)
        model = cls(config)
        if dtype is not None:
            model = model.to(checkpoint._resolve_dtype(dtype, torch.float32))
        model.generation_config = {k: v for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                   if (v := getattr(config, k)) is not None}
        return model.to(device) if device is not None else model

    def save_pretrained(self, folder: str | Path, tokenizer: Tokenizer | None = None,
                        max_shard_size: int | None = None) -> Path:
        return checkpoint.save_pretrained(self, folder, tokenizer=tokenizer,
                                          generation_config=self.generation_config,
                                          max_shard_size=max_shard_size)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 streamer=None, **kwargs) -> torch.Tensor:
        """transformers-style generate: returns the prompt followed by the new tokens.

        Settings come from the call, then the checkpoint's generation_config.json. When
        `do_sample` is not passed, an explicit temperature/top_k/top_p/min_p or several return
        sequences mean sampling (see pocketlm.generate). `streamer` receives each step's new
        tokens: an object with put(tokens)/end() as in transformers, or a callable."""
        on_tokens = None
        if streamer is not None:
            on_tokens = streamer.put if hasattr(streamer, "put") else streamer
        out = Generator(self).generate_ids(input_ids, attention_mask, on_tokens=on_tokens, **kwargs)
        if hasattr(streamer, "end"):
            streamer.end()
        return out


def is_gguf(path: str | Path) -> bool:
    """A file that starts with GGUF's magic (its name need not end in .gguf)."""
    path = Path(path).expanduser()
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_model_and_tokenizer(path: str | Path, *, device=None, dtype=None) -> tuple[CausalLM, Tokenizer]:
    """Both halves of a local checkpoint folder, GGUF file (parsed once) or pulled registry name."""
    path = registry.resolve(path)
    if is_gguf(path):
        from pocketlm.gguf import GGUFFile

        with GGUFFile(path) as f:
            return gguf_model_and_tokenizer(f, device=device, dtype=dtype)
    return CausalLM.from_pretrained(path, device=device, dtype=dtype), AutoTokenizer.from_pretrained(path)


def gguf_model_and_tokenizer(f, *, device=None, dtype=None) -> tuple[CausalLM, Tokenizer]:
    """Model and tokenizer from one open GGUFFile (its header parsed once for both)."""
    from pocketlm.gguf import tokenizer_from_gguf

    return CausalLM._from_gguf(f, device=device, dtype=dtype), tokenizer_from_gguf(f)


class AutoModelForCausalLM:
    """Entry point as in transformers; returns a `CausalLM`."""

    from_pretrained = CausalLM.from_pretrained
    from_config = CausalLM.from_config

    def __init__(self):
        raise TypeError("use AutoModelForCausalLM.from_pretrained(path) or .from_config(config)")


class AutoTokenizer:
    """Entry point as in transformers; returns a `Tokenizer`."""

    def __init__(self):
        raise TypeError("use AutoTokenizer.from_pretrained(path)")

    @staticmethod
    def from_pretrained(path: str | Path) -> Tokenizer:
        path = registry.resolve(path)
        if not path.exists():
            raise NotFoundError(checkpoint.not_local_message(path))
        if is_gguf(path):
            from pocketlm.gguf import GGUFFile, tokenizer_from_gguf

            with GGUFFile(path) as f:
                return tokenizer_from_gguf(f)
        return Tokenizer.from_pretrained(path)


# the names from the classic snippets: same loaders, the checkpoint's config decides the family
GPT2Tokenizer = AutoTokenizer
GPT2LMHeadModel = AutoModelForCausalLM
LlamaForCausalLM = AutoModelForCausalLM
