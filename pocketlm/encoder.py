"""Encoders: a BERT model, and SentenceEncoder over it for sentence embeddings.

A BERT encoder reads a whole text at once (no causal mask): token + position + segment
embeddings, then post-norm layers of bidirectional self-attention and a GELU feed-forward block.
Its last hidden states, pooled (the mean over real tokens, as all-MiniLM-L6-v2 does) and
normalised, are a sentence embedding: texts that mean similar things get nearby vectors, which is
what semantic search ranks by.

    encoder = SentenceEncoder.from_pretrained("minilm-l6")     # after `pocketlm pull minilm-l6`
    vectors = encoder.encode(["A cat sat on the mat.", "Stock prices fell."])   # (2, 384), unit length

`SentenceEncoder.from_pretrained` reads a sentence-transformers folder (modules.json: a
Transformer, a Pooling config, optionally Normalize) holding a Hugging Face BERT checkpoint
(config.json + model.safetensors + tokenizer.json); `BertModel.from_pretrained` reads the BERT
folder alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.errors import ConfigError, FormatError, NotFoundError

ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}
POOLING = ("mean", "cls", "max", "mean_sqrt_len")
MAX_LAYERS, MAX_WIDTH = 64, 16384  # far beyond published encoders: a config past them is damaged


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config.json") -> "BertConfig":
        if raw.get("model_type", "bert") != "bert":
            raise FormatError(f"{where}: model_type {raw.get('model_type')!r} is not a BERT encoder")
        values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
        config = cls(**{"vocab_size": 0, "hidden_size": 0, "num_hidden_layers": 0, "num_attention_heads": 0,
                        "intermediate_size": 0, **values})
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(config, name)
            limit = MAX_LAYERS if name == "num_hidden_layers" else 10**7 if name == "vocab_size" else MAX_WIDTH
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise FormatError(f"{where}: {name} must be an integer from 1 to {limit}, got {value!r}")
        if config.hidden_size % config.num_attention_heads:
            raise FormatError(f"{where}: hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                              f"{config.num_attention_heads}")
        if config.hidden_act not in ACTIVATIONS:
            raise FormatError(f"{where}: hidden_act {config.hidden_act!r} is not supported (known: "
                              f"{', '.join(ACTIVATIONS)})")
        return config


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)


class _Output(nn.Module):  # dense, then LayerNorm of (dense + residual): BERT's post-norm
    def __init__(self, c: BertConfig, width: int):
        super().__init__()
        self.dense = nn.Linear(width, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        setattr(self, "self", _SelfAttention(c))  # the checkpoint's name for it
        self.output = _Output(c, c.hidden_size)


class _Intermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)


class _Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Output(c, c.intermediate_size)
        self.heads, self.act = c.num_attention_heads, ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        attn = getattr(self.attention, "self")

        def split(t):
            return t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(split(attn.query(x)), split(attn.key(x)), split(attn.value(x)),
                                           attn_mask=mask)
        x = self.attention.output(y.transpose(1, 2).reshape(B, T, C), x)
        return self.output(self.act(self.intermediate.dense(x)), x)


class _Encoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class BertModel(nn.Module):
    """BERT's encoder with the parameter names of Hugging Face checkpoints (its pooler is not
    kept: sentence embeddings pool the hidden states instead)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) → last hidden states (B, T, C); attention_mask (B, T) is 0 at padding."""
        c, T = self.config, input_ids.shape[1]
        if T > c.max_position_embeddings:
            raise ConfigError(f"{T} tokens is more than this encoder's {c.max_position_embeddings} positions; "
                              "split the text or let the caller truncate it")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= c.vocab_size):
            raise ConfigError(f"token ids must be from 0 to {c.vocab_size - 1}")
        e = self.embeddings
        positions = torch.arange(T, device=input_ids.device)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = e.LayerNorm(e.word_embeddings(input_ids) + e.position_embeddings(positions)[None]
                        + e.token_type_embeddings(types))
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): every query sees the real tokens
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    @classmethod
    def from_pretrained(cls, folder: str | Path, device=None) -> "BertModel":
        """A Hugging Face BERT folder: config.json and model.safetensors (names with or without the
        `bert.` prefix; pooler and position_ids ignored). Every tensor is checked against the
        config before it is used."""
        from pocketlm.checkpoint import read_safetensors, read_safetensors_header
        from pocketlm.files import read_json

        folder = Path(folder)
        config = BertConfig.from_dict(read_json(folder / "config.json", "encoder config"), str(folder / "config.json"))
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise NotFoundError(f"{folder} has no model.safetensors (pocketlm reads encoder weights only in the "
                                "safetensors format)")
        with torch.device("meta"):
            model = cls(config)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        header, _ = read_safetensors_header(weights)  # validated before any tensor is read
        wanted = {}
        for key, info in header.items():
            name = key.removeprefix("bert.")
            if name not in expected:
                if name.startswith(("pooler.", "cls.")) or name.endswith("position_ids"):
                    continue
                raise FormatError(f"{weights}: unexpected tensor {key!r} for a BERT encoder")
            if tuple(info["shape"]) != expected[name]:
                raise FormatError(f"{weights}: {key} has shape {tuple(info['shape'])}, the config says {expected[name]}")
            wanted[key] = name
        tensors = {wanted[k]: t.float() for k, t in read_safetensors(weights).items() if k in wanted}
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise FormatError(f"{weights} lacks {len(missing)} tensors of the encoder, e.g. {missing[0]}")
        model.load_state_dict(tensors, assign=True)  # the meta model takes the tensors as they are read
        return model.to(device or "cpu").eval()


class _TextEncoder:
    """What both encoders share: texts → token rows (`tokenize`) → vectors (`encode_ids`),
    normalised to unit length when asked."""

    def encode(self, texts: str | Sequence[str], batch_size: int = 32, normalize: bool | None = None) -> torch.Tensor:
        """(N, dimension) float32 embeddings (a single text gives (dimension,))."""
        single = isinstance(texts, str)
        out = self.encode_ids(self.tokenize([texts] if single else list(texts)), batch_size, normalize)
        return out[0] if single else out

    def _finished(self, vectors: torch.Tensor, normalize: bool | None) -> torch.Tensor:
        return F.normalize(vectors, dim=-1) if (self.normalize if normalize is None else normalize) else vectors


def _checked_texts(texts: Sequence[str]) -> Sequence[str]:
    for text in texts:
        if not isinstance(text, str):
            raise ConfigError(f"texts must be strings, got {type(text).__name__}")
    return texts


class SentenceEncoder(_TextEncoder):
    """Texts → fixed-size vectors: a BERT encoder, a pooling over its last hidden states, and an
    optional normalisation to unit length (as the folder's sentence-transformers modules say).
    Texts are batched by length, so padding stays small."""

    def __init__(self, model: BertModel, tokenizer, *, pooling: str = "mean", normalize: bool = True,
                 max_seq_length: int | None = None, name: str = "encoder"):
        if pooling not in POOLING:
            raise ConfigError(f"pooling {pooling!r} is not one of {', '.join(POOLING)}")
        self.model, self.tokenizer, self.pooling, self.normalize = model, tokenizer, pooling, normalize
        window = model.config.max_position_embeddings
        self.max_seq_length = min(max_seq_length or window, window)
        self.name = name

    @property
    def dimension(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def from_pretrained(cls, source: str | Path, device=None) -> "SentenceEncoder":
        """A sentence-transformers folder, or a registry name (`minilm-l6`, once pulled)."""
        from pocketlm import registry
        from pocketlm.files import read_json
        from pocketlm.tokenizer import Tokenizer

        ref = registry.resolve(source)
        folder = ref.path
        if not folder.is_dir():
            raise FormatError(f"{source}: a sentence encoder is a folder (modules.json, config.json, "
                              "model.safetensors, tokenizer.json), not a file")
        transformer, pooling, normalize = folder, "mean", False
        modules_file = folder / "modules.json"
        if modules_file.is_file():
            modules = read_json(modules_file, "sentence-transformers modules")
            if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
                raise FormatError(f"{modules_file} must be a list of module objects")
            for m in modules:
                kind, path = str(m.get("type", "")), folder / str(m.get("path", ""))
                if folder.resolve() not in (path.resolve(), *path.resolve().parents):
                    raise FormatError(f"{modules_file}: module path {m.get('path')!r} leaves the folder")
                if kind.endswith(".Transformer"):
                    transformer = path
                elif kind.endswith(".Pooling"):
                    pooling = _pooling_mode(read_json(path / "config.json", "pooling config"), path / "config.json")
                elif kind.endswith(".Normalize"):
                    normalize = True
                else:
                    raise FormatError(f"{modules_file}: module {kind!r} is not supported (pocketlm reads "
                                      "Transformer, Pooling and Normalize)")
        settings = transformer / "sentence_bert_config.json"
        max_len = read_json(settings, "sentence-transformers settings").get("max_seq_length") if settings.is_file() \
            else None
        model = BertModel.from_pretrained(transformer, device=device)
        tokenizer = Tokenizer.from_pretrained(transformer)
        return cls(model, tokenizer, pooling=pooling, normalize=normalize,
                   max_seq_length=max_len if isinstance(max_len, int) and max_len > 0 else None,
                   name=ref.given)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, [CLS] ... [SEP], cut to max_seq_length (as sentence-transformers does)."""
        out = []
        for text in _checked_texts(texts):
            ids = self.tokenizer.encode(text)
            if len(ids) > self.max_seq_length:  # keep the closing [SEP]
                ids = ids[:self.max_seq_length - 1] + ids[-1:]
            out.append(ids)
        return out

    @torch.inference_mode()
    def encode_ids(self, rows: list[list[int]], batch_size: int = 32, normalize: bool | None = None) -> torch.Tensor:
        """encode() for texts already tokenized ([CLS] ... [SEP], at most max_seq_length ids each)."""
        if any(len(r) > self.max_seq_length for r in rows):
            raise ConfigError(f"a text of more than {self.max_seq_length} tokens; this encoder reads at most that many")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        out = torch.empty(len(rows), self.dimension)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            width = max(len(rows[i]) for i in chosen)
            ids = torch.full((len(chosen), width), pad, dtype=torch.long)
            mask = torch.zeros(len(chosen), width, dtype=torch.long)
            for r, i in enumerate(chosen):
                ids[r, :len(rows[i])] = torch.tensor(rows[i])
                mask[r, :len(rows[i])] = 1
            device = self.model.device
            hidden = self.model(ids.to(device), attention_mask=mask.to(device)).float().cpu()
            out[chosen] = pool(hidden, mask, self.pooling)
        return self._finished(out, normalize)


class DecoderEncoder(_TextEncoder):
    """Sentence embeddings from a causal LM (pocketlm's decoder models): its final normed hidden
    states pooled by `mean` over the tokens or taken at the `last` token (which has read the whole
    text), then normalised. Texts run one at a time, so no padding enters a causal model's
    states."""

    def __init__(self, model, tokenizer, *, pooling: str = "mean", normalize: bool = True, name: str = "decoder"):
        if pooling not in ("mean", "last"):
            raise ConfigError(f"a decoder model pools by 'mean' or 'last', not {pooling!r}")
        self.model, self.tokenizer, self.pooling, self.normalize, self.name = model.eval(), tokenizer, pooling, \
            normalize, name
        self.max_seq_length = model.config.max_position

    @property
    def dimension(self) -> int:
        return self.model.config.n_embd

    @classmethod
    def from_pretrained(cls, source, device=None, pooling: str = "mean") -> "DecoderEncoder":
        from pocketlm.api import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(source, device=device)
        return cls(model, tokenizer, pooling=pooling, name=str(source))

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer.encode(text)[-self.max_seq_length:] or [self.tokenizer.eos_token_id or 0]
                for text in _checked_texts(texts)]

    @torch.inference_mode()
    def encode_ids(self, rows: list[list[int]], batch_size: int = 32, normalize: bool | None = None) -> torch.Tensor:
        out = torch.empty(len(rows), self.dimension)
        for i, ids in enumerate(rows):
            x = torch.tensor([ids], device=self.model.device)
            hidden = self.model(x, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][0].float().cpu()
            out[i] = hidden.mean(0) if self.pooling == "mean" else hidden[-1]
        return self._finished(out, normalize)


def is_encoder_folder(ref) -> bool:
    """Whether a resolved model reference (registry.ModelRef) is a folder this module loads: a
    sentence-transformers folder (modules.json) or a BERT checkpoint (config.json's model_type)."""
    from pocketlm.files import read_json

    if ref.kind != "folder":
        return False
    if (ref.path / "modules.json").is_file():
        return True
    try:
        config = read_json(ref.path / "config.json", "model config")
    except (NotFoundError, FormatError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "bert"


def load_encoder(source, device=None, pooling: str | None = None):
    """A SentenceEncoder for a sentence-transformers or BERT folder, else a DecoderEncoder for a
    causal LM (pooling `mean` unless told `last`)."""
    from pocketlm import registry

    ref = registry.resolve(source)
    if is_encoder_folder(ref):
        if pooling is not None:
            raise ConfigError("--pooling is for decoder models; a sentence encoder pools as its folder says")
        return SentenceEncoder.from_pretrained(ref, device=device)
    return DecoderEncoder.from_pretrained(ref, device=device, pooling=pooling or "mean")


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, T, C) hidden states and a (B, T) 0/1 mask → (B, C) by `mode` (see POOLING)."""
    m = mask.to(hidden.dtype)[..., None]
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, -math.inf).max(1).values
    total = (hidden * m).sum(1)
    count = m.sum(1).clamp(min=1e-9)
    return total / (count if mode == "mean" else count.sqrt())


def _pooling_mode(raw: dict, where: Path) -> str:
    chosen = [mode for mode in POOLING if raw.get(f"pooling_mode_{mode}_tokens" if mode != "cls"
                                                  else "pooling_mode_cls_token")]
    if len(chosen) != 1:
        raise FormatError(f"{where}: pocketlm pools one way at a time (one of {', '.join(POOLING)}), the config "
                          f"asks for {chosen or 'none'}")
    return chosen[0]
