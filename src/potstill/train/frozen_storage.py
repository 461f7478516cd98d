"""A frozen model whose linear layers keep their weights in a narrow dtype and compute in a wide.

On a CPU without fast bf16 math (no avx512_bf16 / AMX: bf16 matmuls are emulated and run slower
than fp32) a bf16 teacher saves memory but costs time. Stored bf16 and computed in fp32, each
linear layer upcasts its weight for the one matmul that needs it, so the model holds half the
bytes while every product and sum runs in fp32: the output differs from the fp32 model's only
by the weights' own rounding to bf16 (8 significand bits), not by any bf16 arithmetic.

The transient fp32 copy is one layer's weight at a time (the largest: an MLP projection), freed
as the matmul returns. The output embedding (the lm_head, and the input embedding when the two
are tied) stays in the compute dtype: the fused distillation loss projects the teacher's hidden
states through it chunk by chunk, and upcasting the whole vocabulary per chunk would cost more
than it saves. Norms, biases and buffers are small and stay wide too.

Every tensor is copied, even one already in its dtype: a checkpoint loaded in its own dtype is
views of one mmap of the file, which stays mapped while any view lives, and every page read
stays in the process's memory: the bf16 embedding read once to upcast it (0.45 GiB for the 1.5B)
then sat beside its fp32 copy. Copied, the mapping goes when narrowing returns (measured on the
1.5B: 4.7 GiB resident after a forward instead of 5.6; the load peaks at 8.0 GiB, file and
copies at once, below the 10.5 GiB of loading it in fp32).

For frozen models only (a teacher under inference mode): autograd through `F.linear` would save
the upcast weight of every layer for backward and hold the fp32 copy after all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NarrowLinear(nn.Linear):
    """nn.Linear whose weight is stored narrower than the inputs it multiplies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


def _head_weight(model: nn.Module) -> nn.Parameter | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return None if head is None else head.weight


def narrow_storage(model: nn.Module, storage: torch.dtype, compute: torch.dtype) -> nn.Module:
    """`model` (frozen, loaded in either dtype), changed in place: the weights of its linear
    layers in `storage`, every other parameter and floating buffer in `compute`; tied
    parameters stay one tensor. Returns it."""
    head = _head_weight(model)
    linears = {
        m for m in model.modules() if type(m) is nn.Linear and m.weight is not head
    }  # exactly nn.Linear: a subclass (a LoRA layer, a quantized one) has a forward of its own
    replaced: dict[int, nn.Parameter] = {}  # id(old) -> new, so that tied weights stay tied
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if id(param) not in replaced:
                    dtype = storage if module in linears and name == "weight" else compute
                    copied = param.to(dtype, copy=True)
                    replaced[id(param)] = nn.Parameter(copied, requires_grad=False)
                setattr(module, name, replaced[id(param)])
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None and buf.is_floating_point():
                    setattr(module, name, buf.to(compute, copy=True))
    for module in linears:
        module.__class__ = NarrowLinear
    return model


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each tied tensor counted once."""
    seen = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.nbytes for t in seen.values())
