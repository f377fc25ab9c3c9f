"""Quantized weights: linear layers whose weight stays in blocks of 32 low-bit numbers.

Two layouts, both along the input dimension in blocks of BLOCK = 32 weights, with float16 scales:

    int8: q (out, in) int8, scale (out, in / 32):            w = scale · q
    int4: q (out, in / 2) uint8, two weights a byte,
          scale and offset (out, in / 32):                   w = scale · q + offset,  q in 0..15

In an int4 block the 16 bytes hold weights 0..15 in their low nibbles and 16..31 in their high
ones, as GGUF's Q4_0 and Q4_1 do, so those files repack into this layout without touching a
nibble: Q4_1 is exactly int4 (d, m), Q4_0 is int4 with offset −8·d (exact in float16), Q8_0 is
exactly int8. `QuantizedLinear` computes with these weights: on CPU in float32 through
pocketlm.kernels (activations quantized per block; their pure-PyTorch fallback where no compiler
is), elsewhere by dequantizing the weight for each product.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.errors import FormatError

BLOCK = 32
BITS = (4, 8)
# Up to this many rows (decoding; batches up to 16) a layer's activations are quantized to its
# activation_bits (int8: the fastest products); beyond it (a prompt) to int16, as the head's
KERNEL_ROWS = 16
# config.json's quantization_config.quant_method for checkpoints of these blocks
QUANT_METHOD = "pocketlm"
# the token embedding and output head: every token's choice goes through them
HEAD_BITS = 8
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
        # how finely the kernels quantize this layer's input while decoding: 8 bits, or 16 for the
        # output head, whose logits pick every token (see kernels.linear16)
        self.activation_bits = 8

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (out, in) in `dtype`, or only the given rows of it (an index tensor)."""
        q, scale, offset = self.q, self.scale, self.offset
        if rows is not None:
            q, scale, offset = q[rows], scale[rows], None if offset is None else offset[rows]
        out, blocks = q.shape[0], self.in_features // BLOCK
        if self.bits == 8:
            values = q.view(out, blocks, BLOCK).to(dtype)
            return (values * scale.to(dtype)[..., None]).view(out, self.in_features)
        packed = q.view(out, blocks, BLOCK // 2)
        values = torch.cat((packed & 0x0F, packed >> 4), dim=-1).to(dtype)
        w = values * scale.to(dtype)[..., None] + offset.to(dtype)[..., None]
        return w.view(out, self.in_features)

    def shares(self, other: "QuantizedLinear") -> None:
        """Hold `other`'s buffers (the same tensors): a tied output head reads the embedding's."""
        self.q, self.scale, self.offset = other.q, other.scale, other.offset

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q, scale, offset): what the kernels take."""
        return self.q, self.scale, self.offset

    def kernel_blocks(self) -> tuple:
        """(q, scale, offset, tiles): the blocks plus the scales regrouped for the compiled
        products (kernels.tile_scales), made on first use and again whenever the scales change."""
        from pocketlm import kernels

        module = kernels.compiled()
        key = (module, _identity(self.scale), None if self.offset is None else _identity(self.offset))
        cached = self.__dict__.get("_tiles")
        if cached is None or cached[0] != key:
            cached = (key, kernels.tile_scales(self.scale, self.offset))
            self.__dict__["_tiles"] = cached  # a plain attribute: not a buffer, not in the state dict
        return self.q, self.scale, self.offset, cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """On CPU in float32, through the block kernels: a few rows (decoding, small batches) with
        activations quantized to activation_bits per block, more rows (a prompt, `eval`) to int16,
        as finely as the head (no dequantized copy of the weight, and prompts keep their answers).
        Elsewhere the weight is dequantized to x's dtype."""
        rows = x.numel() // self.in_features
        if x.device.type == "cpu" and x.dtype == torch.float32:
            bits = self.activation_bits if rows <= KERNEL_ROWS else 16
            return self.kernel(x.reshape(rows, self.in_features), bits).view(*x.shape[:-1], self.out_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def kernel(self, x: torch.Tensor, activation_bits: int | None = None) -> torch.Tensor:
        """x (rows, in) float32 on CPU through the block kernels, any number of rows, each row
        computed on its own (the same bits whatever the batch); activations quantized to
        activation_bits (default: the layer's own)."""
        from pocketlm import kernels

        bits = activation_bits or self.activation_bits
        product = kernels.linear16 if bits == 16 else kernels.linear
        q, scale, offset, tiles = self.kernel_blocks()
        return product(x, q, scale, offset, self.bias, tiles)


def _identity(t: torch.Tensor) -> tuple:
    """Where a tensor's values live and how often they were changed in place (tensors made under
    inference_mode keep no count: their identity is where they live)."""
    if t.is_inference():  # asked first: reading _version of such a tensor raises, and raising is slow
        return t.data_ptr(), None
    return t.data_ptr(), t._version


class QuantizedEmbedding(QuantizedLinear):
    """An embedding table (num_embeddings, embedding_dim) kept as blocks along the embedding
    dimension, as GGUF stores token_embd: a lookup dequantizes only the rows it reads. Its
    buffers also serve a tied output head (a QuantizedLinear that `shares` them)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int):
        super().__init__(embedding_dim, num_embeddings, bits)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dequantize(rows=ids.reshape(-1)).view(*ids.shape, self.embedding_dim)

    def tied_head(self) -> QuantizedLinear:
        with torch.device("meta"):  # the buffers are replaced at once: allocate nothing
            head = QuantizedLinear(self.embedding_dim, self.num_embeddings, self.bits)
        head.shares(self)
        head.activation_bits = 16
        return head


def fuse(layers: list[QuantizedLinear]) -> QuantizedLinear | None:
    """One layer whose output rows are the given layers' rows in order (q | k | v, gate | up), for
    layers that read the same input: one kernel call and one pass over memory instead of several.
    Each layer's buffers become views of the fused ones, so nothing is held twice. None when the
    layers differ in bits or input size, or have biases."""
    first = layers[0]
    if any(layer.bits != first.bits or layer.in_features != first.in_features or layer.bias is not None
           for layer in layers):
        return None
    with torch.device("meta"):
        fused = QuantizedLinear(first.in_features, sum(layer.out_features for layer in layers), first.bits)
    parts = ("q", "scale") if first.bits == 8 else ("q", "scale", "offset")
    for part in parts:
        setattr(fused, part, torch.cat([getattr(layer, part) for layer in layers]))
    start = 0
    for layer in layers:
        for part in parts:
            setattr(layer, part, getattr(fused, part)[start:start + layer.out_features])
        start += layer.out_features
    return fused


def empty_like(module: nn.Module, bits: int) -> QuantizedLinear:
    """An unfilled quantized stand-in for an nn.Linear or nn.Embedding, on its device (meta for
    a model built to be loaded into)."""
    if isinstance(module, nn.Embedding):
        with module.weight.device:
            return QuantizedEmbedding(module.num_embeddings, module.embedding_dim, bits)
    bias = module.bias
    with module.weight.device:
        return QuantizedLinear(module.in_features, module.out_features, bits,
                               None if bias is None else torch.empty_like(bias))


def replace_modules(model: nn.Module, bits_of: dict[str, int]) -> None:
    """Put empty quantized modules of the given bits in place of the named nn.Linear and
    nn.Embedding modules (their buffers are then filled, e.g. by load_state_dict(assign=True))."""
    for name, bits in bits_of.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"the quantized module {name!r} is not part of this model") from None
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise FormatError(f"{name} is a {type(module).__name__}, which pocketlm does not quantize")
        parent, _, leaf = name.rpartition(".")
        layer = empty_like(module, bits)
        layer.activation_bits = 16 if name == "lm_head" else 8  # see QuantizedLinear.__init__
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)


def quantized_bits(model: nn.Module) -> dict[str, int]:
    """{module name: bits} of a model's quantized modules (a tied head is the embedding's)."""
    seen, out = set(), {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantizedLinear) and id(module.q) not in seen:
            seen.add(id(module.q))
            out[name] = module.bits
    return out


def describe(model: nn.Module) -> str | None:
    """'int4', 'int8' or 'int4 + int8' for a quantized model, None for a float one."""
    bits = sorted(set(quantized_bits(model).values()))
    return " + ".join(f"int{b}" for b in bits) if bits else None


def quantize(weight: torch.Tensor, bits: int, bias: torch.Tensor | None = None) -> QuantizedLinear:
    """A QuantizedLinear for a float weight (out, in): int8 blocks scaled by max|w| / 127, or int4
    blocks from their minimum in steps of (max − min) / 15 — rounded with the float16 scale and
    offset actually stored, so each weight is within half a step of its original."""
    out, features = weight.shape
    layer = QuantizedLinear(features, out, bits, bias)
    fill(layer, weight)
    return layer


def fill(layer: QuantizedLinear, weight: torch.Tensor) -> None:
    """Quantize the float `weight` (out, in) into `layer`'s buffers (see quantize)."""
    out, features = weight.shape
    bits = layer.bits
    w = weight.detach().float().reshape(out, features // BLOCK, BLOCK)
    if bits == 8:
        scale = (w.abs().amax(-1) / 127).half()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()[..., None]
        layer.q.copy_((w / safe).round().clamp(-127, 127).to(torch.int8).view(out, features))
        layer.scale.copy_(scale)
        return
    low, high = w.amin(-1), w.amax(-1)
    offset = low.half()
    scale = ((high - offset.float()) / 15).half()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()[..., None]
    q = ((w - offset.float()[..., None]) / safe).round().clamp(0, 15).to(torch.uint8)
    layer.q.copy_((q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)).view(out, features // 2))
    layer.scale.copy_(scale)
    layer.offset.copy_(offset)


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
    """Quantize, in place, every nn.Linear of the Transformer blocks (attention and MLP
    projections) to `bits`, and the token embedding and output head to int8 (one table when
    tied): every token's choice goes through the head, and 8 bits keep it close to the float
    model where 4 would not. Norms stay float, as do layers whose input size is not a multiple
    of 32. One matrix at a time, so memory never holds a second float copy. Returns the number
    of modules replaced; the model is for inference from then on."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    targets = {f"model.layers.{i}.{name}": bits for i, block in enumerate(model.model.layers)
               for name, module in block.named_modules()
               if type(module) is nn.Linear and module.in_features % BLOCK == 0}
    embed, head = model.model.embed_tokens, model.get_output_embeddings()
    tied = head is not None and getattr(model.config, "tie_embeddings", False)
    if type(embed) is nn.Embedding and embed.embedding_dim % BLOCK == 0:
        targets["model.embed_tokens"] = HEAD_BITS
    if type(head) is nn.Linear and head.in_features % BLOCK == 0 and not (tied and "model.embed_tokens" in targets):
        targets["lm_head"] = HEAD_BITS
    with torch.no_grad():
        for name, b in targets.items():
            module = model.get_submodule(name)
            replace_modules(model, {name: b})
            layer = model.get_submodule(name)
            fill(layer, module.weight)
            if getattr(module, "bias", None) is not None:
                layer.bias.copy_(module.bias)
    if tied and "model.embed_tokens" in targets:
        model.tie_weights()
    model.requires_grad_(False)
    return len(targets)


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Undo quantization in place: every quantized module becomes an nn.Linear / nn.Embedding
    holding its dequantized weight in `dtype` (the rest of the model moves to `dtype` too), so
    the model can be trained or saved in a float format. Returns the number of modules changed."""
    changed = 0
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if not isinstance(module, QuantizedLinear):
                continue
            tied = name == "lm_head" and getattr(model.config, "tie_embeddings", False)
            if tied:  # the embedding's weight, once tie_weights runs
                plain = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            elif isinstance(module, QuantizedEmbedding):
                plain = nn.Embedding(module.num_embeddings, module.embedding_dim, _weight=module.dequantize(dtype))
            else:
                plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                  device="meta")
                plain.weight = nn.Parameter(module.dequantize(dtype))
                if module.bias is not None:
                    plain.bias = nn.Parameter(module.bias.to(dtype))
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, plain)
            changed += 1
    model.to(dtype)
    model.tie_weights()
    model.requires_grad_(True)
    return changed
