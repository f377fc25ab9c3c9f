"""The Transformer: one decoder-only model for the GPT-2 and Llama families, chosen by switches
in `ModelConfig` (norm, mlp, pos, n_kv_head, head_dim, bias, tie_embeddings).

    tokens ─▶ embed_tokens (+ learned or sinusoidal positions)
           ─▶ n_layer × [ x + attn(norm(x)) ; x + mlp(norm(x)) ]   (RoPE inside attn when pos="rope")
           ─▶ norm ─▶ lm_head ─▶ logits over the vocabulary

Parameter names follow Hugging Face Llama (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
..., `lm_head`), so Llama checkpoints load one to one; checkpoint.py maps GPT-2 names.

Shape legend: B batch, T new positions in this call, S = cached + new positions (keys),
C channels (n_embd), H query heads, K key/value heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.config import ModelConfig
from pocketlm.errors import ConfigError, ContextLengthError
from pocketlm.quant import QuantizedEmbedding, QuantizedLinear

log = logging.getLogger(__name__)


@dataclass(eq=False)
class CausalLMOutput:
    """What forward returns, readable the ways transformers' outputs are: `out.logits`,
    `out["logits"]`, `out[0]` and `out.to_tuple()`, where indices and keys count only the fields
    that are set, in this order (so `out[0]` is the loss when labels were given)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, T, V)
    cache: KVCache | None = None  # pass it back as past_key_values= to continue
    hidden_states: tuple[torch.Tensor, ...] | None = None  # n_layer + 1 × (B, T, C)
    attentions: tuple[torch.Tensor, ...] | None = None  # n_layer × (B, H, T, S)

    @property
    def past_key_values(self) -> KVCache | None:  # the name before transformers 5 called it cache
        return self.cache

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self.keys())

    def __getitem__(self, key):
        if isinstance(key, str):
            key = "cache" if key == "past_key_values" else key
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):  # like a dict, as transformers' outputs are
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key) -> bool:
        return ("cache" if key == "past_key_values" else key) in self.keys()


class KVCache:
    """Pre-allocated keys and values for every layer, filled left to right.

    `length` is how many positions are stored; forward() appends the new positions and advances
    it. The buffers never move, so a decode step has static shapes (good for torch.compile).
    A `growable` cache (what forward makes for `use_cache=True`, as transformers' callers expect)
    instead doubles its buffers when a call needs more room.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 device=None, dtype=torch.float32, growable: bool = False):
        shape = (batch_size, config.n_kv_head, max_length, config.head_dim)  # (B, K, S_max, D)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_length = max_length
        self.length = 0
        self.growable = growable

    def reset(self) -> None:
        self.length = 0

    def row(self, index: int) -> "KVCache":
        """A cache of batch size 1 over row `index` of this one (views: what it stores lands
        here), empty, for prefilling one sequence into its slot."""
        view = KVCache.__new__(KVCache)
        view.keys = [k[index:index + 1] for k in self.keys]
        view.values = [v[index:index + 1] for v in self.values]
        view.max_length, view.length, view.growable = self.max_length, 0, False
        return view

    def grow(self, needed: int) -> None:
        """Reallocate to hold at least `needed` positions, keeping the stored ones; doubling makes
        a token-by-token loop copy each position a bounded number of times."""
        self.max_length = max(needed, 2 * self.max_length)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_zeros(*old.shape[:2], self.max_length, old.shape[3])
                new[:, :, :self.length] = old[:, :, :self.length]
                buffers[i] = new

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor | None = None):
        """Store new keys/values (B, K, T, D) of one layer; return what attention reads.

        Without slots they go after the `length` stored positions and attention reads the filled
        part. With slots (a (T,) tensor of cache indices, as the static decode step passes) they
        go there and attention reads the whole buffer under a mask: the same shapes every step,
        and no Python number that changes, which is what torch.compile needs. Slots (B, 1) put
        each row's one new position at its own index (the server's rows of different lengths)."""
        keys, values = self.keys[layer], self.values[layer]
        if slots is not None and slots.dim() == 2:  # (B, 1): each row's own cache index
            rows = torch.arange(k.shape[0], device=k.device)
            keys[rows, :, slots[:, 0]] = k[:, :, 0].to(keys.dtype)
            values[rows, :, slots[:, 0]] = v[:, :, 0].to(values.dtype)
            return keys.to(k.dtype), values.to(v.dtype)
        if slots is not None:
            keys.index_copy_(2, slots, k.to(keys.dtype))
            values.index_copy_(2, slots, v.to(values.dtype))
            return keys.to(k.dtype), values.to(v.dtype)
        end = self.length + k.shape[2]
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        # a cache kept in a narrower dtype (a quantized model's float16 cache) is read in k's
        return keys[:, :, :end].to(k.dtype), values[:, :, :end].to(v.dtype)  # (B, K, S, D)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel
        # normalise in fp32 so bf16/fp16 activations do not lose the mean square
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def sinusoidal_encoding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/dim)), PE(pos, 2i+1) = cos(pos / 10000^(2i/dim))."""
    two_i = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
    angles = positions.float()[..., None] / (10000.0 ** (two_i / dim))
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1)  # (..., dim/2, 2) interleaves sin, cos
    return pe.flatten(-2)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin tables (B, 1, T, D) for rotary embeddings at the given positions (B, T).
    The first half of sin carries rotate_half's minus sign (see apply_rope)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)[:, None]  # (B, 1, T, D): halves rotate together
    sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)[:, None]
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # rotate each pair (x[i], x[i + D/2]) by its position's angle: (x1, x2) ↦ (x1 cos − x2 sin,
    # x2 cos + x1 sin); rolling by D/2 swaps the halves and the signed sin table does the rest
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


def eager_attention(q, k, v, mask, dropout: float = 0.0):
    """softmax(q kᵀ / √D) v written out, for when the weights themselves are wanted
    (output_attentions, attn_implementation="eager"): q (B, H, T, D), k and v (B, K, S, D), mask
    (B or 1, 1, T, S) True where a query may attend, or None for causal. Returns the output
    (B, H, T, D) and the weights (B, H, T, S), after dropout as transformers returns them."""
    T, S = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, D)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is None:  # the T new queries are the last T positions: each sees the keys up to itself
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    weights = F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, dropout) if dropout else weights
    return weights @ v, weights


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.bias)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)

    def project_qkv(self, x):
        # one place for the three input projections, so a fused product can stand in for them
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, rope, mask, cache: KVCache | None, layer: int, slots=None, attentions=None):
        """attentions: None for the fused kernel; a list to run eager_attention instead and
        append this layer's weights (B, H, T, S) to it."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v, slots)  # (B, K, S, D)
        dropout = self.dropout if self.training else 0.0
        if attentions is None:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1 and k.shape[2] == T,
                dropout_p=dropout, enable_gqa=self.n_kv_head != self.n_head)
        else:
            y, weights = eager_attention(q, k, v, mask, dropout)
            attentions.append(weights)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.act = {"silu": F.silu, "gelu": F.gelu,
                    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[config.act]

    def project_gate_up(self, x):
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.project_gate_up(x)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, cache, layer, slots=None, attentions=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), rope, mask, cache, layer, slots, attentions))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


def _embedding(rows: int, dim: int) -> nn.Embedding:
    # an uninitialised table (Transformer._init_weights fills it): nn.Embedding's own init would
    # run normal_ on the meta device when building a model to load into, which costs ~2 s of
    # imports inside torch on first use
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = _embedding(config.vocab_size, config.n_embd)
        if config.pos == "learned":
            self.embed_positions = _embedding(config.max_position, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)


class Transformer(nn.Module):
    """Decoder-only Transformer with an LM head. `forward` follows transformers' semantics.
    Other heads (SequenceClassifier) subclass it, replacing `add_head` and `forward`."""

    head = "causal-lm"  # names the architecture in config.json (ModelConfig.to_hf_config)
    new_on_load: frozenset[str] = frozenset()  # head weights a checkpoint may lack: freshly initialised
    ignored_on_load: frozenset[str] = frozenset()  # another head's weights, dropped when loading

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.add_head(config)
        self.attn_implementation = "sdpa"  # or "eager": see set_attn_implementation
        self.tie_weights()
        if self.device.type != "meta":  # a model built to be loaded into needs no init
            self.apply(self._init_weights)

    def add_head(self, config: ModelConfig) -> None:
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def tie_weights(self) -> None:
        """Share the input embedding with the output projection when the config says so.
        Call again after replacing parameters (e.g. loading with assign=True)."""
        if self.config.tie_embeddings and self.get_output_embeddings() is not None:
            embed = self.model.embed_tokens
            if isinstance(embed, QuantizedEmbedding):  # the head reads the embedding's blocks
                self.lm_head = embed.tied_head()
            else:
                self.lm_head.weight = embed.weight

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        # residual projections add up over layers: scale them down so activations stay O(1)
        if isinstance(module, (Attention, MLP)):
            out = module.o_proj if isinstance(module, Attention) else module.down_proj
            nn.init.normal_(out.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    @property
    def device(self) -> torch.device:
        embed = self.model.embed_tokens
        return (embed.q if isinstance(embed, QuantizedEmbedding) else embed.weight).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are computed in (float32 for a model of quantized blocks)."""
        embed = self.model.embed_tokens
        return torch.float32 if isinstance(embed, QuantizedEmbedding) else embed.weight.dtype

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters counted as transformers counts them: a tied matrix once; exclude_embeddings
        leaves out the embedding tables (tokens, and learned positions) but not an untied head."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        floats = sum(p.numel() for p in self.parameters()  # parameters() yields a tied tensor once
                     if (p.requires_grad or not only_trainable)
                     and not (exclude_embeddings and id(p) in embeddings))
        if only_trainable:  # quantized blocks never train
            return floats
        # a head tied to a quantized embedding shares its blocks: left out with the table
        tables = {id(m.q) for m in self.modules() if isinstance(m, QuantizedEmbedding)} if exclude_embeddings else set()
        blocks = {id(m.q): m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
                  for m in self.modules() if isinstance(m, QuantizedLinear) and id(m.q) not in tables}
        return floats + sum(blocks.values())

    def set_attn_implementation(self, name: str) -> None:
        """Switch attention to "sdpa" (the fused kernel, default) or "eager" (softmax written
        out, as output_attentions uses); see check_attn_implementation for transformers' other names."""
        self.attn_implementation = check_attn_implementation(name)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        expected = (self.config.vocab_size, self.config.n_embd)
        if not isinstance(embedding, nn.Embedding) or tuple(embedding.weight.shape) != expected:
            raise ConfigError(f"the input embedding must be an nn.Embedding of shape {expected}; "
                              "to change the vocabulary size use resize_token_embeddings()")
        self.model.embed_tokens = embedding
        self.tie_weights()

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Give the model `new_num_tokens` token rows (rounded up to a multiple of
        `pad_to_multiple_of`), as transformers does: existing rows are kept, rows past the end
        dropped, and new rows of the embedding (and of an untied head) set to the mean of the old
        rows (transformers samples around that mean with a negligible 1e-9 covariance), or drawn
        like fresh weights with mean_resizing=False. config.vocab_size follows."""
        rows = self.config.vocab_size if new_num_tokens is None else new_num_tokens
        for name, value in (("new_num_tokens", rows), ("pad_to_multiple_of", pad_to_multiple_of or 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if pad_to_multiple_of:
            rows = -(-rows // pad_to_multiple_of) * pad_to_multiple_of
        if rows != self.config.vocab_size:
            replace(self.config, vocab_size=rows)  # ConfigError if a special id would fall out
            embedding = self.model.embed_tokens
            embedding.weight = self._resized(embedding.weight, rows, mean_resizing)
            embedding.num_embeddings = rows
            head = self.get_output_embeddings()
            if head is not None and not self.config.tie_embeddings:
                head.weight = self._resized(head.weight, rows, mean_resizing)
            if head is not None:
                head.out_features = rows
            self.config.vocab_size = rows
            self.tie_weights()
        return self.model.embed_tokens

    def _resized(self, weight: nn.Parameter, rows: int, mean_resizing: bool) -> nn.Parameter:
        """A (rows, C) copy of a token matrix: old rows kept, new ones filled (see resize_token_embeddings)."""
        with torch.no_grad():
            new = weight.new_empty(rows, weight.shape[1])
            kept = min(rows, weight.shape[0])
            new[:kept] = weight[:kept]
            if mean_resizing:
                new[kept:] = weight.float().mean(0).to(weight.dtype)
            else:
                new[kept:].normal_(0.0, self.config.initializer_range)
        return nn.Parameter(new, requires_grad=weight.requires_grad)

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The dtype of the KV caches this model makes. A model of quantized blocks on CPU keeps
        them in float16 by default (half the memory; its kernels read float16 caches) and may be
        set to torch.float32; any other model keeps its own dtype."""
        if not (isinstance(self.model.embed_tokens, QuantizedEmbedding) and self.device.type == "cpu"):
            return self.dtype
        return self.__dict__.get("_kv_cache_dtype", torch.float16)

    @kv_cache_dtype.setter
    def kv_cache_dtype(self, dtype: torch.dtype) -> None:
        if dtype not in (torch.float16, torch.float32):
            raise ConfigError(f"kv_cache_dtype must be torch.float16 or torch.float32, not {dtype}")
        self.__dict__["_kv_cache_dtype"] = dtype

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return KVCache(self.config, batch_size, max_length, device=self.device, dtype=self.kv_cache_dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: KVCache | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0, *,
                past_key_values: KVCache | None = None, use_cache: bool | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False,
                return_dict: bool | None = True) -> CausalLMOutput | tuple:
        """input_ids (B, T); attention_mask (B, S) with 0 at padding, covering cached + new
        positions; labels (B, T) scored against the next token, -100 ignored; cache appends.
        logits_to_keep=k computes logits for the last k positions only (0: all), which saves
        the (T, V) output projection when only the next token matters.

        The rest as in transformers: use_cache=True returns a new cache as out.past_key_values,
        and past_key_values= (another name for cache=) continues from it; output_hidden_states
        adds each layer's input and the final normed output (n_layer + 1 tensors);
        output_attentions adds each layer's weights from eager_attention; return_dict=False
        returns out.to_tuple()."""
        _check_input_ids(input_ids, self.config.vocab_size)
        B, T = input_ids.shape
        if labels is not None and labels.shape != input_ids.shape:
            raise ConfigError(f"labels has shape {tuple(labels.shape)} but input_ids has {tuple(input_ids.shape)}; "
                              "labels are the input ids themselves (-100 where not scored), shifted inside")
        cache = self._cache_for(cache, past_key_values, use_cache, B, T)
        x, hidden, attentions = self.final_hidden_states(input_ids, attention_mask, position_ids, cache,
                                                         logits_to_keep, output_hidden_states, output_attentions)
        logits = self.lm_head(x)  # (B, T, V)

        loss = None
        if labels is not None:
            # position t predicts token t+1: the maximum-likelihood objective, mean -log p(w_i | w_<i)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        out = CausalLMOutput(loss=loss, logits=logits, cache=cache, hidden_states=hidden, attentions=attentions)
        return out if return_dict or return_dict is None else out.to_tuple()

    def final_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                            position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                            logits_to_keep: int = 0, output_hidden_states: bool = False,
                            output_attentions: bool = False) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        """The backbone every head reads: the final-norm hidden states (B, T, C) (the last
        `logits_to_keep` positions when nonzero), each layer's input plus that output when
        output_hidden_states, and each layer's attention weights when output_attentions (else
        None). Appends to `cache` when given. Arguments as in forward."""
        config = self.config
        _check_input_ids(input_ids, config.vocab_size)
        B, T = input_ids.shape
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != B):
            raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)}; it must be (batch, "
                              f"positions) with the {B} rows of input_ids")
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        if config.pos != "rope" and int(position_ids.max()) >= config.max_position:
            raise ContextLengthError(f"position {int(position_ids.max())} is beyond the model's context "
                                     f"window of {config.max_position} tokens; shorten the input")

        x, rope = self._embed(input_ids, position_ids)
        mask = _attention_mask(attention_mask, past, T, x.device)
        hidden = [] if output_hidden_states else None
        attentions = [] if output_attentions or self.attn_implementation == "eager" else None
        for i, layer in enumerate(self.model.layers):
            if hidden is not None:
                hidden.append(x)
            x = layer(x, rope, mask, cache, i, attentions=attentions)
            if attentions and not output_attentions:
                attentions.clear()  # the eager path without its weights: keep none of them
        if cache is not None:
            cache.length = past + T
        if hidden is None:
            x = self.model.norm(x[:, -logits_to_keep:] if logits_to_keep else x)
        else:
            x = self.model.norm(x)
            hidden.append(x)  # the last hidden state is the normed one, as in transformers
            x = x[:, -logits_to_keep:] if logits_to_keep else x
        return (x, tuple(hidden) if hidden is not None else None,
                tuple(attentions) if output_attentions else None)

    def _cache_for(self, cache, past_key_values, use_cache, B: int, T: int) -> KVCache | None:
        """The cache this call appends to: the one passed (as cache= or past_key_values=), grown
        if it may be, or a new growable one for use_cache=True (config.use_cache when None)."""
        if past_key_values is not None:
            if cache is not None and cache is not past_key_values:
                raise ConfigError("pass the cache as cache= or as past_key_values=, not both")
            cache = past_key_values
        if cache is None:
            if use_cache or (use_cache is None and self.config.use_cache):
                return KVCache(self.config, B, T, device=self.device, dtype=self.kv_cache_dtype, growable=True)
            return None
        if not isinstance(cache, KVCache):
            raise ConfigError(f"past_key_values must be the cache an earlier call of this model returned "
                              f"(out.past_key_values), not a {type(cache).__name__}; pocketlm does not "
                              "read transformers' cache objects or tuples of tensors")
        config = self.config
        if (len(cache.keys), cache.keys[0].shape[1], cache.keys[0].shape[3]) != \
                (config.n_layer, config.n_kv_head, config.head_dim):
            raise ConfigError("this cache was made by a model of another shape (layers, key/value heads or head "
                              "size); pass the cache this model's own earlier call returned")
        if cache.keys[0].shape[0] != B:
            raise ConfigError(f"the cache holds {cache.keys[0].shape[0]} rows but input_ids has {B}; "
                              "continue each batch with the cache its own earlier call returned")
        if cache.length + T > cache.max_length:
            if not cache.growable:
                raise ContextLengthError(f"the KV cache holds {cache.max_length} positions; "
                                         f"{cache.length} are used and {T} more were given")
            cache.grow(cache.length + T)
        return cache

    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, slots: torch.Tensor,
                    key_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decoding step with the same shapes every time, for torch.compile: input_ids and
        position_ids (B, 1) go to cache slot `slots` (1,), or each row to its own (B, 1); key_mask (B, S_max) is True at every
        slot each row may attend to (its real tokens so far, this one included). Returns logits
        (B, 1, V). The caller validated the inputs and advances cache.length; nothing here reads
        a Python number that changes between steps."""
        x, rope = self._embed(input_ids, position_ids)
        mask = key_mask[:, None, None, :]  # (B, 1, 1, S_max): new tokens see the filled slots
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, mask, cache, i, slots)
        return self.lm_head(self.model.norm(x))

    def _embed(self, input_ids, position_ids):
        """Token embeddings plus learned or sinusoidal positions (B, T, C), and RoPE's tables."""
        config = self.config
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        rope = None
        if config.pos == "learned":
            x = x + self.model.embed_positions(position_ids)
        elif config.pos == "sinusoidal":
            x = x + sinusoidal_encoding(position_ids, config.n_embd).to(x.dtype)
        else:
            rope = rope_cos_sin(position_ids, config.head_dim, config.rope_theta, x.dtype)
        return self.model.dropout(x), rope


@dataclass(eq=False)
class SequenceClassifierOutput(CausalLMOutput):
    """What SequenceClassifier.forward returns: logits (B, num_labels), the loss when labels were
    given, and hidden states / attentions when asked; `cache` stays None."""


class SequenceClassifier(Transformer):
    """The backbone with transformers' sequence-classification head: a bias-free `score` linear
    layer (n_embd → num_labels) read at each row's last token, and no LM head.

    The last token is the rightmost position whose id is not config.pad_token_id, as
    transformers pools: this handles right and left padding alike, and a text that ends in EOS
    when EOS is also the pad token is read at the token before that EOS."""

    head = "sequence-classification"
    new_on_load = frozenset({"score.weight"})  # a causal-LM checkpoint has no score head yet
    ignored_on_load = frozenset({"lm_head.weight"})

    def add_head(self, config: ModelConfig) -> None:
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)

    def get_output_embeddings(self) -> None:
        return None  # no vocabulary projection to tie or resize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
                output_hidden_states: bool = False, output_attentions: bool = False,
                return_dict: bool | None = True, **unused) -> SequenceClassifierOutput | tuple:
        """input_ids (B, T) and attention_mask (B, T) as in Transformer.forward; labels (B,) class
        ids, (B,) or (B, 1) targets for regression, or (B, num_labels) 0/1 floats for
        multi-label. `use_cache` and other keywords transformers' callers pass are ignored."""
        B = input_ids.shape[0] if input_ids.dim() else 0
        pad = self.config.pad_token_id
        if pad is None and B != 1:
            raise ConfigError(f"a batch of {B} rows needs config.pad_token_id to find each row's last token; "
                              "set model.config.pad_token_id (e.g. to the tokenizer's pad or EOS id)")
        x, hidden, attentions = self.final_hidden_states(input_ids, attention_mask, position_ids, None, 0,
                                                         output_hidden_states, output_attentions)
        logits = self.score(x[torch.arange(B, device=x.device), last_token_positions(input_ids, pad)])
        loss = None if labels is None else self.classification_loss(logits, labels)
        out = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=hidden, attentions=attentions)
        return out if return_dict or return_dict is None else out.to_tuple()

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss for config.problem_type; when unset it is inferred (and recorded in the config)
        as transformers does: regression for one label, else single-label for integer labels and
        multi-label for float ones."""
        config, n = self.config, self.config.num_labels
        labels = labels.to(logits.device)
        if config.problem_type is None:
            integer = labels.dtype in (torch.long, torch.int)
            config.problem_type = ("regression" if n == 1 else
                                   "single_label_classification" if integer else "multi_label_classification")
        if config.problem_type == "regression":
            if n == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
            return F.mse_loss(logits, labels.to(logits.dtype))
        if config.problem_type == "single_label_classification":
            if labels.numel() != logits.shape[0] or labels.is_floating_point():
                raise ConfigError(f"single-label classification takes one integer class id per row "
                                  f"({logits.shape[0]} of them), got labels of shape {tuple(labels.shape)} "
                                  f"and dtype {labels.dtype}")
            return F.cross_entropy(logits.view(-1, n), labels.view(-1), ignore_index=-100)
        if labels.shape != logits.shape:
            raise ConfigError(f"multi-label classification takes labels of shape {tuple(logits.shape)} "
                              f"(0/1 per class), got {tuple(labels.shape)}")
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def last_token_positions(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Each row's rightmost position whose id is not pad_token_id (B,); the last position when no
    pad id is set; position 0 for a row of nothing but padding (as transformers pools)."""
    B, T = input_ids.shape
    if pad_token_id is None:
        return torch.full((B,), T - 1, device=input_ids.device)
    positions = torch.arange(T, device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


# transformers' names for attention kernels pocketlm does not ship. Its "sdpa" path already runs
# PyTorch's fused kernels, flash attention among them where the device has it, so these fall back
# to it (with the same results) instead of failing code that names them.
_SDPA_STANDINS = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")


def check_attn_implementation(name: str | None) -> str:
    """The attention pocketlm runs for transformers' `attn_implementation=name`: "sdpa" (also
    for None) or "eager"; flash/flex kernels, paged variants and kernels named from the Hub fall
    back to "sdpa" with a warning; anything else is a ConfigError."""
    if name in (None, "sdpa", "eager"):
        return name or "sdpa"
    if isinstance(name, str) and (name in _SDPA_STANDINS or name.startswith("paged|") or "/" in name):
        log.warning("attn_implementation=%r: pocketlm has no such kernel and uses 'sdpa' (PyTorch's "
                    "fused attention, flash kernels included where the device has them)", name)
        return "sdpa"
    raise ConfigError(f"attn_implementation={name!r} is not known; use 'sdpa' (the default) or 'eager' "
                      "(explicit softmax, which output_attentions uses)")


def _check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    # an id past the embedding table would fail deep inside torch (or assert on a GPU)
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32) or input_ids.shape[1] == 0:
        raise ConfigError(f"input_ids must be a non-empty (batch, time) tensor of integer ids, got shape "
                          f"{tuple(input_ids.shape)} and dtype {input_ids.dtype}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ConfigError(f"token id {high if high >= vocab_size else low} is outside the model's vocabulary "
                          f"of {vocab_size}; encode the text with this model's own tokenizer")


def _attention_mask(attention_mask, past: int, T: int, device) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask, True where a query may attend; None when plain causal suffices."""
    if attention_mask is None and (T == 1 or past == 0):
        return None  # one new token sees every cached key; a fresh prompt is plain causal
    S = past + T
    query_pos = torch.arange(past, S, device=device)[:, None]
    key_pos = torch.arange(S, device=device)[None, :]
    allowed = key_pos <= query_pos  # (T, S) causal
    if attention_mask is None:
        return allowed[None, None]
    if attention_mask.shape[-1] != S:
        raise ContextLengthError(f"attention_mask covers {attention_mask.shape[-1]} positions but the "
                                 f"cache and input hold {S}; pass the mask for past and new tokens")
    allowed = allowed[None] & attention_mask[:, None, :].bool()  # (B, T, S)
    # a padding query would otherwise see no key at all and softmax to NaN; let it see itself
    allowed |= (key_pos == query_pos)[None]
    return allowed[:, None]
