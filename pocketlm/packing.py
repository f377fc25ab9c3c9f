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
  along contiguous rows of the longer side.

Parameter objects keep their identity, so optimizers, tied embeddings and checkpoints keep
working; saving copies each re-laid-out weight back to the usual layout one tensor at a time.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

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


def wants_transposed_storage(linear: nn.Linear) -> bool:
    return linear.out_features > linear.in_features


class FastLinear(nn.Linear):
    """nn.Linear whose few-row products on CPU run one output slice per thread."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        parts = torch.get_num_threads()
        rows = x.numel() // self.in_features if self.in_features else 0
        if x.device.type != "cpu" or rows > SMALL_M or parts < 2 or self.out_features % parts:
            return F.linear(x, w, self.bias)
        # (out, in) weight → (P, in, out/P) slices: a view whatever the storage order
        slices = w.t().unflatten(1, (parts, -1)).transpose(0, 1)
        flat = x.reshape(1, rows, self.in_features).expand(parts, rows, self.in_features)
        y = torch.bmm(flat, slices).transpose(0, 1).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def pack_linears(model: nn.Module, include: Callable[[str], bool] | None = None) -> int:
    """Switch the model's CPU `nn.Linear`s to `FastLinear` in place; returns how many changed.
    Idempotent; a no-op for modules on a GPU, where these products are fast already."""
    changed = 0
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module.weight.device.type != "cpu":
            continue
        if include is not None and not include(name):
            continue
        if wants_transposed_storage(module) and module.weight.is_contiguous():
            with torch.no_grad():  # same Parameter, same shape and values, (in, out) storage
                module.weight.data = module.weight.data.t().contiguous().t()
        module.__class__ = FastLinear
        changed += 1
    return changed


def unpack_linears(model: nn.Module) -> int:
    """Undo pack_linears: plain nn.Linear with contiguous (out, in) weights."""
    changed = 0
    for module in model.modules():
        if type(module) is FastLinear:
            with torch.no_grad():
                module.weight.data = module.weight.data.contiguous()
            module.__class__ = nn.Linear
            changed += 1
    return changed
