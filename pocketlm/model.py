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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.config import ModelConfig
from pocketlm.errors import ConfigError, ContextLengthError


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None

    def __getitem__(self, i):
        # tuple-style access as in transformers: (loss, logits) with labels, else (logits,)
        return ((self.logits,) if self.loss is None else (self.loss, self.logits))[i]


class KVCache:
    """Pre-allocated keys and values for every layer, filled left to right.

    `length` is how many positions are stored; forward() appends the new positions and advances
    it. The buffers never move, so a decode step has static shapes (good for torch.compile).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 device=None, dtype=torch.float32):
        shape = (batch_size, config.n_kv_head, max_length, config.head_dim)  # (B, K, S_max, D)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_length = max_length
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor | None = None):
        """Store new keys/values (B, K, T, D) of one layer; return what attention reads.

        Without slots they go after the `length` stored positions and attention reads the filled
        part. With slots (a (T,) tensor of cache indices, as the static decode step passes) they
        go there and attention reads the whole buffer under a mask: the same shapes every step,
        and no Python number that changes, which is what torch.compile needs."""
        keys, values = self.keys[layer], self.values[layer]
        if slots is not None:
            keys.index_copy_(2, slots, k)
            values.index_copy_(2, slots, v)
            return keys, values
        end = self.length + k.shape[2]
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]  # (B, K, S, D)


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

    def forward(self, x, rope, mask, cache: KVCache | None, layer: int, slots=None):
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v, slots)  # (B, K, S, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1 and k.shape[2] == T,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_head != self.n_head)
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

    def forward(self, x, rope, mask, cache, layer, slots=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), rope, mask, cache, layer, slots))
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
    """Decoder-only Transformer with an LM head. `forward` follows transformers' semantics."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":  # a model built to be loaded into needs no init
            self.apply(self._init_weights)

    def tie_weights(self) -> None:
        """Share the input embedding with the output projection when the config says so.
        Call again after replacing parameters (e.g. loading with assign=True)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

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
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied tensor once

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return KVCache(self.config, batch_size, max_length, device=self.device, dtype=self.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: KVCache | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0) -> CausalLMOutput:
        """input_ids (B, T); attention_mask (B, S) with 0 at padding, covering cached + new
        positions; labels (B, T) scored against the next token, -100 ignored; cache appends.
        logits_to_keep=k computes logits for the last k positions only (0: all), which saves
        the (T, V) output projection when only the next token matters."""
        config = self.config
        _check_input_ids(input_ids, config.vocab_size)
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None and past + T > cache.max_length:
            raise ContextLengthError(f"the KV cache holds {cache.max_length} positions; "
                                     f"{past} are used and {T} more were given")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        if config.pos != "rope" and int(position_ids.max()) >= config.max_position:
            raise ContextLengthError(f"position {int(position_ids.max())} is beyond the model's context "
                                     f"window of {config.max_position} tokens; shorten the input")

        x, rope = self._embed(input_ids, position_ids)
        mask = _attention_mask(attention_mask, past, T, x.device)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, mask, cache, i)
        if cache is not None:
            cache.length = past + T
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.model.norm(x))  # (B, T, V)

        loss = None
        if labels is not None:
            # position t predicts token t+1: the maximum-likelihood objective, mean -log p(w_i | w_<i)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)

    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, slots: torch.Tensor,
                    key_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decoding step with the same shapes every time, for torch.compile: input_ids and
        position_ids (B, 1) go to cache slot `slots` (1,); key_mask (B, S_max) is True at every
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
