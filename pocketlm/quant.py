"""Quantized weights: linear layers whose weight stays in blocks of 32 low-bit numbers.

Two layouts, both along the input dimension in blocks of BLOCK = 32 weights, with float16 scales:

    int8: q (out, in) int8, scale (out, in / 32):            w = scale · q
    int4: q (out, in / 2) uint8, two weights a byte,
          scale and offset (out, in / 32):                   w = scale · q + offset,  q in 0..15

In an int4 block the 16 bytes hold weights 0..15 in their low nibbles and 16..31 in their high
ones, as GGUF's Q4_0 and Q4_1 do, so those files repack into this layout without touching a
nibble: Q4_1 is exactly int4 (d, m), Q4_0 is int4 with offset −8·d (exact in float16), Q8_0 is
exactly int8. `QuantizedLinear` computes with these weights; this pure-PyTorch version
dequantizes a layer's weight for each product (the reference the faster kernels must match).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.errors import FormatError

BLOCK = 32
BITS = (4, 8)
# GGUF block types that repack losslessly: bytes per block of 32 weights
GGUF_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


class QuantizedLinear(nn.Module):
    """y = x Wᵀ + b with W held as int8 or int4 blocks (see the module docstring). Buffers, not
    parameters: a quantized layer is for inference; training loads the weights dequantized."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: torch.Tensor | None = None):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        if in_features % BLOCK:
            raise FormatError(f"a quantized layer needs in_features divisible by {BLOCK}, got {in_features}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        blocks = in_features // BLOCK
        width, dtype = (in_features, torch.int8) if bits == 8 else (in_features // 2, torch.uint8)
        self.register_buffer("q", torch.zeros(out_features, width, dtype=dtype))
        self.register_buffer("scale", torch.zeros(out_features, blocks, dtype=torch.float16))
        self.register_buffer("offset", torch.zeros(out_features, blocks, dtype=torch.float16) if bits == 4 else None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) in `dtype`."""
        out, blocks = self.out_features, self.in_features // BLOCK
        if self.bits == 8:
            values = self.q.view(out, blocks, BLOCK).to(dtype)
            return (values * self.scale.to(dtype)[..., None]).view(out, self.in_features)
        packed = self.q.view(out, blocks, BLOCK // 2)
        values = torch.cat((packed & 0x0F, packed >> 4), dim=-1).to(dtype)
        w = values * self.scale.to(dtype)[..., None] + self.offset.to(dtype)[..., None]
        return w.view(out, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)


def quantize(weight: torch.Tensor, bits: int, bias: torch.Tensor | None = None) -> QuantizedLinear:
    """A QuantizedLinear for a float weight (out, in): int8 blocks scaled by max|w| / 127, or int4
    blocks from their minimum in steps of (max − min) / 15 — rounded with the float16 scale and
    offset actually stored, so each weight is within half a step of its original."""
    out, features = weight.shape
    layer = QuantizedLinear(features, out, bits, bias)
    w = weight.detach().float().reshape(out, features // BLOCK, BLOCK)
    if bits == 8:
        scale = (w.abs().amax(-1) / 127).half()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()[..., None]
        layer.q.copy_((w / safe).round().clamp(-127, 127).to(torch.int8).view(out, features))
        layer.scale.copy_(scale)
        return layer
    low, high = w.amin(-1), w.amax(-1)
    offset = low.half()
    scale = ((high - offset.float()) / 15).half()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()[..., None]
    q = ((w - offset.float()[..., None]) / safe).round().clamp(0, 15).to(torch.uint8)
    layer.q.copy_((q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)).view(out, features // 2))
    layer.scale.copy_(scale)
    layer.offset.copy_(offset)
    return layer


def from_gguf_blocks(raw: np.ndarray, kind: str, shape: tuple[int, int],
                     bias: torch.Tensor | None = None) -> QuantizedLinear:
    """A QuantizedLinear holding exactly the weights of a GGUF Q8_0, Q4_0 or Q4_1 tensor of
    `shape` (out, in), from its raw bytes (uint8, row after row), with no float copy of it."""
    if kind not in GGUF_BLOCK_BYTES:
        raise FormatError(f"GGUF {kind} blocks do not repack losslessly; only {', '.join(GGUF_BLOCK_BYTES)} do")
    out, features = shape
    size = GGUF_BLOCK_BYTES[kind]
    if features % BLOCK or raw.size != out * features // BLOCK * size:
        raise FormatError(f"{raw.size} bytes of {kind} do not hold a ({out}, {features}) tensor")
    blocks = torch.from_numpy(np.ascontiguousarray(raw).reshape(out, features // BLOCK, size))
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]
    layer = QuantizedLinear(features, out, 8 if kind == "Q8_0" else 4, bias)
    layer.scale.copy_(d)
    if kind == "Q8_0":
        layer.q.copy_(blocks[..., 2:].contiguous().view(torch.int8).reshape(out, features))
    elif kind == "Q4_1":
        layer.offset.copy_(blocks[..., 2:4].contiguous().view(torch.float16)[..., 0])
        layer.q.copy_(blocks[..., 4:].reshape(out, features // 2))
    else:  # Q4_0: d · (q − 8) = d · q + (−8 · d), −8 · d exact in float16
        layer.offset.copy_(d * -8)
        layer.q.copy_(blocks[..., 2:].reshape(out, features // 2))
    return layer


def quantize_model(model: nn.Module, bits: int) -> int:
    """Replace, in place, every nn.Linear of the Transformer blocks (attention and MLP
    projections) by a QuantizedLinear of `bits`; embeddings, norms and the output head stay in
    floating point. Layers whose input size is not a multiple of 32 stay as they are. Returns the
    number of layers replaced. The model is for inference from then on."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    replaced = 0
    for block in model.model.layers:
        for name, module in list(block.named_modules()):
            if type(module) is not nn.Linear or module.in_features % BLOCK:
                continue
            parent, _, leaf = name.rpartition(".")
            layer = quantize(module.weight, bits, module.bias)
            setattr(block.get_submodule(parent) if parent else block, leaf, layer.to(module.weight.device))
            replaced += 1
    model.requires_grad_(False)
    return replaced
