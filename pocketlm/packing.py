"""Weight layouts for fast decoding on CPU.

A decode step multiplies one row of activations by every weight matrix once, so on a CPU it is
bound by how fast the weights stream from memory. Through `nn.Linear`, MKL runs each of these
matrix-vector products on one thread at about half the machine's bandwidth. `pack_linears`
fixes that without changing what the model is:

- every `nn.Linear` becomes a `FastLinear` (a subclass: same Parameters, same state dict), whose
  forward splits the output into one slice per thread and runs the slices with `torch.bmm`,
  which MKL spreads over the threads;
- weights whose output side is the longer one are re-laid out in place (`param.data` becomes a
  transposed-storage view with the same shape and values), because the product streams faster
  along contiguous rows of the longer side;
- the projections that read the same input (q, k, v in attention; gate and up in a SwiGLU MLP)
  move side by side into one buffer (`FusedWeights`), and without grad one product serves them
  all: one call and one pass over memory instead of three or two.

Parameter objects keep their identity, so optimizers, tied embeddings and checkpoints keep
working; saving copies each re-laid-out weight back to the usual layout one tensor at a time.
"""

from __future__ import annotations

import ctypes
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.errors import ContextLengthError
from pocketlm.model import MLP, Attention, rope_cos_sin

# Up to this many rows (batch × new positions) the per-thread bmm split beats one GEMM call
# (measured faster at M = 1, 8 and 64, even at M = 512); prefills go through one MKL GEMM.
SMALL_M = 64

# Measured on a 2-core AMD EPYC with MKL (fp32, 2 threads, M = 1, enough weight copies that none
# stays in L3; GB/s of weights read), smollm2-135m shapes:
#                      F.linear(x, W)    split, (out, in) storage    split, (in, out) storage
#     576 → 576              11.5                  18.3                        15.4
#     576 → 192              11.9                  14.9                         9.7
#     576 → 1536             12.5                  19.5                        21.8
#    1536 → 576              17.9                  25.1                        17.5
#     576 → 49152            12.9                  22.4                        34.9
# so store (in, out) when out > in, else keep nn.Linear's (out, in).


def wants_transposed_storage(out_features: int, in_features: int) -> bool:
    return out_features > in_features


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), with few-row products on CPU split into one output slice per
    thread (weight is (out, in), in either storage order)."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    slices = thread_slices(weight) if x.device.type == "cpu" and rows <= SMALL_M else None
    if slices is None:
        return F.linear(x, weight, bias)
    y = sliced_product(x.reshape(rows, in_features), slices).view(*x.shape[:-1], out_features)
    return y if bias is None else y + bias


def thread_slices(weight: torch.Tensor) -> torch.Tensor | None:
    """The (out, in) weight as (P, in, out/P): one output slice per thread, a view whatever the
    storage order; None when the split does not apply (one thread, or out not divisible)."""
    parts = torch.get_num_threads()
    if parts < 2 or weight.shape[0] % parts:
        return None
    return weight.t().unflatten(1, (parts, -1)).transpose(0, 1)


def sliced_product(x: torch.Tensor, slices: torch.Tensor) -> torch.Tensor:
    """x (rows, in) @ the weight split by thread_slices → (rows, out), one bmm over the threads."""
    parts, in_features, part = slices.shape
    y = torch.bmm(x.expand(parts, *x.shape), slices)  # (P, rows, out/P)
    return y.transpose(0, 1).reshape(x.shape[0], parts * part)


class FastLinear(nn.Linear):
    """nn.Linear whose few-row products on CPU run one output slice per thread."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return few_row_linear(x, self.weight, self.bias)


class FusedWeights:
    """The weights (and biases) of linears that read the same input, moved side by side into one
    buffer so that one product serves them all: one pass over memory and one call instead of
    several. Each Parameter keeps its identity and shape and becomes a view of the buffer.

    The buffer is not a Parameter, so gradients would not reach the weights through it: callers
    use it only while `serves` says so: grad is off and every weight is still in place
    (`model.to(...)` or a load with assign=True gives parameters new storage; the caller then
    falls back to the separate products)."""

    def __init__(self, linears: list[nn.Linear]):
        first = linears[0].weight
        self.sizes = [linear.out_features for linear in linears]
        total, in_features = sum(self.sizes), first.shape[1]
        transposed = wants_transposed_storage(total, in_features)
        with_bias = all(linear.bias is not None for linear in linears)
        with torch.no_grad():
            shape = (in_features, total) if transposed else (total, in_features)
            weight = torch.empty(shape, dtype=first.dtype, device=first.device)
            bias = torch.empty(total, dtype=first.dtype, device=first.device) if with_bias else None
            start = 0
            for linear, size in zip(linears, self.sizes):
                part = slice(start, start + size)
                if transposed:
                    weight[:, part] = linear.weight.t()
                    linear.weight.data = weight[:, part].t()
                else:
                    weight[part] = linear.weight
                    linear.weight.data = weight[part]
                if with_bias:
                    bias[part] = linear.bias
                    linear.bias.data = bias[part]
                start += size
        self.weight = weight.t() if transposed else weight  # (out, in) view
        self.bias = bias
        self.pointers = _pointers(linears)

    def serves(self, linears: list[nn.Linear]) -> bool:
        """Whether the fused product may stand in for these linears now."""
        return not torch.is_grad_enabled() and _pointers(linears) == self.pointers

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return few_row_linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def _pointers(linears: list[nn.Linear]) -> list[tuple[int, int]]:
    return [(linear.weight.data_ptr(), linear.bias.data_ptr() if linear.bias is not None else 0)
            for linear in linears]


class FastAttention(Attention):
    """Attention whose q, k and v projections run as one product when decoding without grad."""

    def project_qkv(self, x):
        linears = [self.q_proj, self.k_proj, self.v_proj]
        return self.fused_qkv(x) if self.fused_qkv.serves(linears) else super().project_qkv(x)


class FastMLP(MLP):
    """SwiGLU MLP whose gate and up projections run as one product when decoding without grad."""

    def project_gate_up(self, x):
        linears = [self.gate_proj, self.up_proj]
        return self.fused_gate_up(x) if self.fused_gate_up.serves(linears) else super().project_gate_up(x)


def pack_linears(model: nn.Module, include: Callable[[str], bool] | None = None) -> int:
    """Switch the model's CPU `nn.Linear`s to `FastLinear` in place, and fuse the q/k/v and
    gate/up weights of its attention and MLP blocks; returns how many linears changed.
    Idempotent; a no-op for modules on a GPU, where these products are fast already."""
    changed = 0
    for name, module in model.named_modules():
        if include is not None and not include(name):
            continue
        if type(module) is Attention and _plain_cpu(module.q_proj, module.k_proj, module.v_proj):
            module.fused_qkv = FusedWeights([module.q_proj, module.k_proj, module.v_proj])
            module.__class__ = FastAttention
            trim_heap()
        elif type(module) is MLP and module.swiglu and _plain_cpu(module.gate_proj, module.up_proj):
            module.fused_gate_up = FusedWeights([module.gate_proj, module.up_proj])
            module.__class__ = FastMLP
            trim_heap()
        elif type(module) is nn.Linear and module.weight.device.type == "cpu":
            if wants_transposed_storage(module.out_features, module.in_features) and fills_storage(module.weight):
                with torch.no_grad():  # same Parameter, same shape and values, (in, out) storage
                    module.weight.data = module.weight.data.t().contiguous().t()
            module.__class__ = FastLinear
            changed += 1
    return changed


def _plain_cpu(*linears: nn.Module) -> bool:
    # a projection wrapped by another module (a LoRA adapter) must run itself, never a fused copy
    return all(isinstance(m, nn.Linear) and m.weight.device.type == "cpu" for m in linears)


def unpack_linears(model: nn.Module) -> int:
    """Undo pack_linears: plain modules, each weight contiguous (out, in) in storage of its own."""
    changed = 0
    for module in model.modules():
        if type(module) in (FastAttention, FastMLP):
            del module.__dict__["fused_qkv" if type(module) is FastAttention else "fused_gate_up"]
            module.__class__ = Attention if type(module) is FastAttention else MLP
        elif type(module) is FastLinear:
            with torch.no_grad():
                module.weight.data = standalone(module.weight.data)
                if module.bias is not None:
                    module.bias.data = standalone(module.bias.data)
            module.__class__ = nn.Linear
            changed += 1
    return changed


_malloc_trim = None


def trim_heap() -> None:
    """Hand memory that was freed back to the OS. glibc keeps freed mid-sized blocks in its heap,
    where they still count towards the process's memory; re-laying out weights one matrix at a
    time frees hundreds of MB that way. A no-op where there is no glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def fills_storage(t: torch.Tensor) -> bool:
    """Contiguous and alone in its storage (not a view into a fused buffer)."""
    return t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def standalone(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when it fills its storage, else a contiguous copy: what a file writer needs,
    since fused weights are views that share one buffer."""
    return t if fills_storage(t) else t.clone(memory_format=torch.contiguous_format)


class DecodeStep:
    """One decoding step (one new token per row) of a packed Llama-family model on CPU, written
    as a flat loop over the layers: the same arithmetic as `Transformer.forward` with a cache, in
    about fifteen tensor operations per layer instead of sixty module calls and views. At one
    token per step the weights are small work for the CPU and the per-operation cost is not:
    on smollm2-135m shapes this cuts a step from ~49 to ~36 ms (bench/generate.py).

    Built per request by `for_model`, which returns None unless it applies: a RoPE + RMSNorm +
    SwiGLU (silu) model without biases, packed by `pack_linears`, every fused buffer still in
    place, grad off and no dropout. The views it keeps are of the model's own weights."""

    def __init__(self, model: nn.Module):
        config = model.config
        self.model, self.config = model, config
        self.sizes = (config.n_head, config.n_kv_head, config.head_dim, config.intermediate_size)
        self.layers = []
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            self.layers.append((block.input_layernorm.weight, _product(attn.fused_qkv.weight),
                                _product(attn.o_proj.weight), block.post_attention_layernorm.weight,
                                _product(mlp.fused_gate_up.weight), _product(mlp.down_proj.weight)))

    @classmethod
    def for_model(cls, model: nn.Module) -> "DecodeStep | None":
        if not _flat_step_applies(model) or not isinstance(model.lm_head, nn.Linear):
            return None
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            if not (isinstance(attn, FastAttention) and isinstance(mlp, FastMLP)
                    and attn.fused_qkv.serves([attn.q_proj, attn.k_proj, attn.v_proj])
                    and mlp.fused_gate_up.serves([mlp.gate_proj, mlp.up_proj])
                    and _plain_cpu(attn.o_proj, mlp.down_proj)):
                return None
        return cls(model)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache,
                 key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions (B,) → logits (B, V); appends to cache (advancing its length).
        key_mask (B, length + 1), True where a row may attend (its real tokens), for padded
        batches; None when every cached position of every row is real."""
        model, config = self.model, self.config
        H, K, D, intermediate = self.sizes
        B, n = tokens.shape[0], cache.length
        if n >= cache.max_length:
            raise ContextLengthError(f"the KV cache holds {cache.max_length} positions and all are used")
        norm_shape, eps = (config.n_embd,), config.norm_eps
        x = model.model.embed_tokens(tokens)  # (B, C)
        cos, sin = (t.view(B, 1, D) for t in rope_cos_sin(positions[:, None], D, config.rope_theta, x.dtype))
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S)
        for i, (norm1, qkv_proj, o_proj, norm2, gate_up_proj, down_proj) in enumerate(self.layers):
            qkv = qkv_proj(F.rms_norm(x, norm_shape, norm1, eps)).view(B, H + 2 * K, D)
            qk = qkv[:, :H + K]  # rotate queries and keys together (see model.apply_rope)
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin)
            keys, values = cache.keys[i], cache.values[i]  # (B, K, S_max, D)
            keys[:, :, n] = qk[:, H:]
            values[:, :, n] = qkv[:, H + K:]
            y = F.scaled_dot_product_attention(qk[:, :H, None], keys[:, :, :n + 1], values[:, :, :n + 1],
                                               attn_mask=mask, enable_gqa=H != K)  # (B, H, 1, D)
            x = x + o_proj(y.view(B, H * D))
            gate_up = gate_up_proj(F.rms_norm(x, norm_shape, norm2, eps))
            x = x + down_proj(F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:])
        cache.length = n + 1
        return model.lm_head(model.model.norm(x))


def _flat_step_applies(model: nn.Module) -> bool:
    """Whether a flat decode step (DecodeStep, QuantizedDecodeStep) computes what the model's
    forward does: a RoPE + RMSNorm + SwiGLU (silu) model without biases, on CPU, grad off and no
    dropout running."""
    config = model.config
    return (config.pos == "rope" and config.norm == "rmsnorm" and config.mlp == "swiglu" and config.act == "silu"
            and not config.bias and not (model.training and config.dropout) and not torch.is_grad_enabled()
            and model.device.type == "cpu")


def _product(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (rows, in) → x @ weight.T, split over the threads when that applies."""
    slices = thread_slices(weight)
    if slices is None:
        return lambda x: F.linear(x, weight)
    return lambda x: sliced_product(x, slices)


class QuantizedDecodeStep:
    """One decoding step of a quantized Llama-family model on CPU: each decoder layer is one call
    into the block kernels (pocketlm.kernels.decode_layer: norm, fused q|k|v, RoPE, cache write,
    attention, output projection, fused gate|up, SwiGLU, down projection), so Python only loops
    over the layers. Every row is computed on its own in a fixed order, so a row's logits are
    the same bits whatever else is in the batch.

    Built by `for_model`, which returns None unless it applies: RoPE + RMSNorm + SwiGLU (silu)
    without biases, every block projection quantized, activations and cache in float32 or a
    float16 cache, grad off. Fusing q|k|v and gate|up happens once per model (quant.fuse: the
    layers' buffers become views of the fused ones, nothing is held twice)."""

    def __init__(self, model: nn.Module, layers: list[tuple]):
        self.model, self.config, self.layers = model, model.config, layers

    @classmethod
    def for_model(cls, model: nn.Module) -> "QuantizedDecodeStep | None":
        from pocketlm.quant import QuantizedLinear

        if not _flat_step_applies(model) or model.dtype != torch.float32:
            return None
        layers = []
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            if not all(type(m) is QuantizedLinear for m in linears):
                return None
            qkv = _fused_blocks(attn, "qkv", linears[:3])
            gate_up = _fused_blocks(mlp, "gate_up", linears[4:6])
            if qkv is None or gate_up is None:
                return None
            layers.append((block.input_layernorm.weight, qkv, attn.o_proj.kernel_blocks(),
                           block.post_attention_layernorm.weight, gate_up, mlp.down_proj.kernel_blocks()))
        return cls(model, layers)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache,
                 key_mask: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions (B,) → logits (B, V); appends to cache (advancing its length).
        key_mask (B, length + 1), True where a row may attend, for padded batches. With lengths
        and rows (int64 (B,)), row b instead goes to position lengths[b] of cache row rows[b] and
        attends to that row's positions up to it, and cache.length is left alone (the server's
        slots, each at its own length)."""
        from pocketlm import kernels
        from pocketlm.quant import QuantizedLinear

        model, config = self.model, self.config
        n, D = cache.length, config.head_dim
        if lengths is None and n >= cache.max_length:
            raise ContextLengthError(f"the KV cache holds {cache.max_length} positions and all are used")
        x = model.model.embed_tokens(tokens).float()  # (B, C)
        cos, sin = (t[:, 0, 0].contiguous() for t in rope_cos_sin(positions[:, None], D, config.rope_theta,
                                                                     torch.float32))  # (B, D) each
        mask = None if key_mask is None else key_mask.contiguous()
        for i, (norm1, qkv, o, norm2, gate_up, down) in enumerate(self.layers):
            x = kernels.decode_layer(x, norm1, qkv, o, norm2, gate_up, down, config.norm_eps, cos, sin,
                                     cache.keys[i], cache.values[i], n, config.n_head, config.n_kv_head, mask,
                                     lengths, rows)
        if lengths is None:
            cache.length = n + 1
        x, head = model.model.norm(x), model.lm_head
        if isinstance(head, QuantizedLinear):  # whatever the batch size: rows stay independent
            return head.kernel(x)
        return head(x)


def _fused_blocks(module: nn.Module, name: str, linears) -> tuple | None:
    """The kernel blocks (QuantizedLinear.kernel_blocks) of `linears` fused (made once, kept on
    `module`), while the layers still view it; None when they cannot be fused."""
    from pocketlm.quant import fuse

    attr = f"_fused_{name}"
    fused = module.__dict__.get(attr)
    if fused is None or any(layer.q.untyped_storage().data_ptr() != fused.q.untyped_storage().data_ptr()
                            for layer in linears):
        fused = fuse(list(linears))
        if fused is None:
            return None
        module.__dict__[attr] = fused  # not a submodule: the state dict keeps the layers' own names
    return fused.kernel_blocks()
