"""The kernels' math in plain PyTorch: the definition the C++ kernels are tested against, and what
runs when they cannot be built. Weights are blocks of 32 (see pocketlm/quant.py); activations are
quantized per row per block to int8 (amax / 127 steps, round half to even) before the product, so
both paths compute the same integers: the block products are exact in float32 (|Σ| < 2^24)."""

from __future__ import annotations

import torch

BLOCK = 32


def _int_weights(q: torch.Tensor) -> torch.Tensor:
    """The integer weights (out, blocks, 32) as float32 (exact)."""
    out = q.shape[0]
    if q.dtype == torch.int8:
        return q.view(out, -1, BLOCK).float()
    packed = q.view(out, -1, BLOCK // 2)
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1).float()


def quantize_activations(x: torch.Tensor, top: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, in) float32 → (qx (M, blocks, 32) integers held in float32, sx (M, blocks)): int8
    steps (top 127) or int16 steps (top 32767)."""
    xb = x.reshape(x.shape[0], -1, BLOCK)
    amax = xb.abs().amax(-1)
    # a tensor-by-tensor division: `127 / amax` would multiply by a reciprocal and round differently
    inv = torch.where(amax > 0, amax.new_full((), float(top)) / amax, 0.0)
    return (xb * inv[..., None]).round(), amax / amax.new_full((), float(top))


def linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """y[m, o] = Σ_b scale[o, b]·sx[m, b]·Σ qw·qx + offset[o, b]·sx[m, b]·Σ qx  (+ bias[o])."""
    return _blocked_product(x, q, scale, offset, bias, 127)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def decode_layer(x, norm1, qkv, o, norm2, gate_up, down, eps, cos, sin, k_cache, v_cache, n,
                 n_head, n_kv_head, key_mask=None, lengths=None, rows=None) -> torch.Tensor:
    """One Llama-family decoder layer for one new token per row: row b writes its key and value
    at position lengths[b] (default n) of cache row rows[b] (default b) and attends to positions
    0..lengths[b] of that row (under key_mask, (B, S), when given)."""
    B, C = x.shape
    H, K, D = n_head, n_kv_head, cos.shape[-1]
    pos = torch.full((B,), n, dtype=torch.long) if lengths is None else lengths
    rows = torch.arange(B) if rows is None else rows
    t = linear(_rms_norm(x, norm1, eps), *qkv)
    heads = t.view(B, H + 2 * K, D)
    qk = heads[:, :H + K]
    # rotate pairs (j, j + D/2); sin's first half carries the minus sign (model.rope_cos_sin)
    qk = qk * cos[:, None] + qk.roll(D // 2, dims=-1) * sin[:, None]
    q, k, v = qk[:, :H], qk[:, H:], heads[:, H + K:]
    k_cache[rows, :, pos] = k.to(k_cache.dtype)
    v_cache[rows, :, pos] = v.to(v_cache.dtype)
    S = int(pos.max()) + 1
    keys, values = k_cache[rows, :, :S].float(), v_cache[rows, :, :S].float()  # (B, K, S, D)
    scores = q.view(B, K, H // K, D) @ keys.transpose(-1, -2) / D ** 0.5  # (B, K, G, S)
    visible = torch.arange(S)[None, :] <= pos[:, None]  # (B, S): each row's own positions
    if key_mask is not None:
        visible = visible & key_mask[:, :S]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    # a row whose keys are all masked attends to nothing (zeros), as the C++ kernel does
    attn = (scores.softmax(-1).nan_to_num(0.0) @ values).reshape(B, H * D)
    x = x + linear(attn, *o)
    gate, up = linear(_rms_norm(x, norm2, eps), *gate_up).chunk(2, dim=-1)
    return x + linear(torch.nn.functional.silu(gate) * up, *down)


def linear16(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """As linear with the activations quantized to int16 per block (amax / 32767 steps)."""
    return _blocked_product(x, q, scale, offset, bias, 32767)


def _blocked_product(x, q, scale, offset, bias, top):
    """The block products exactly: int8 sums stay below 2^24 (exact in float32), int16 ones reach
    2^27 and are taken in float64, a slice of output rows at a time (a head's whole weight in
    float64 would be large)."""
    qx, sx = quantize_activations(x.float(), top)
    exact = torch.float32 if top <= 127 else torch.float64
    qx_t = qx.to(exact).transpose(0, 1)  # (blocks, M, 32)
    sx_t = sx.t()[:, :, None]
    parts = []
    for start in range(0, q.shape[0], 4096):
        rows = slice(start, start + 4096)
        isum = torch.bmm(qx_t, _int_weights(q[rows]).to(exact).permute(1, 2, 0)).float()  # (blocks, M, out)
        y = scale[rows].float().t()[:, None, :] * sx_t * isum
        if offset is not None:
            y = y + offset[rows].float().t()[:, None, :] * sx_t * qx.sum(-1).t()[:, :, None]
        parts.append(y.sum(0))
    y = torch.cat(parts, dim=1)
    return y if bias is None else y + bias.float()
