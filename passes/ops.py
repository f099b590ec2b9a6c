"""Runtime functions called by the nodes that graphlora's passes insert.

They are plain PyTorch (autograd, ``torch.compile`` and CPU work as for any op); a fused
GPU kernel can replace them without changing the graphs' structure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels

__all__ = ["lora_switch", "lora_mixed"]


def _switch_math(base: Tensor, hs: Sequence[Tensor], bs: Sequence[Tensor]) -> Tensor:
    """The switch's forward without autograd bookkeeping: the fused GPU kernel or ``addmm``."""
    out = base.reshape(-1, base.shape[-1])
    if kernels.available(out):
        return kernels.lora_add(out, [h.reshape(-1, h.shape[-1]) for h in hs], bs).view(base.shape)
    for h, b in zip(hs, bs):
        out = torch.addmm(out, h.reshape(-1, h.shape[-1]), b.t())
    return out.view(base.shape)


def _needs_grad(base: Tensor, hs: Sequence[Tensor], bs: Sequence[Tensor]) -> bool:
    return torch.is_grad_enabled() and (base.requires_grad or any(t.requires_grad for t in (*hs, *bs)))


def _switch_eager(base: Tensor, hs: Sequence[Tensor], bs: Sequence[Tensor]) -> Tensor:
    if not base.is_cuda:  # plain addmm: autograd, CPU
        return _switch_math(base, hs, bs)
    if _needs_grad(base, hs, bs):  # the custom op carries the backward for the GPU kernel
        return _switch_op(base, list(hs), list(bs))
    return _switch_math(base, hs, bs)


@torch.library.custom_op("graphlora::lora_switch", mutates_args=())
def _switch_op(base: Tensor, hs: list[Tensor], bs: list[Tensor]) -> Tensor:
    return _switch_math(base, hs, bs)


@_switch_op.register_fake
def _switch_fake(base: Tensor, hs: list[Tensor], bs: list[Tensor]) -> Tensor:
    return base.new_empty(base.shape)


def _switch_setup(ctx, inputs, output) -> None:
    _, hs, bs = inputs
    ctx.count = len(hs)
    ctx.save_for_backward(*hs, *bs)


def _switch_backward(ctx, grad: Tensor):
    saved = ctx.saved_tensors
    hs, bs = saved[: ctx.count], saved[ctx.count:]
    g = grad.reshape(-1, grad.shape[-1])
    grad_hs = [(g @ b).view(h.shape) for h, b in zip(hs, bs)]
    grad_bs = [g.t() @ h.reshape(-1, h.shape[-1]) for h in hs]
    return grad, grad_hs, grad_bs


_switch_op.register_autograd(_switch_backward, setup_context=_switch_setup)


def lora_switch(base: Tensor, hs: Sequence[Tensor], bs: Sequence[Tensor]) -> Tensor:
    r"""Combine a site's base output with its adapter branches.

    .. math::

        y = \text{base} + \sum_i h_i B_i^\top, \qquad h_i = g_i \cdot A_i\,\mathrm{dropout}_i(x)

    where ``g_i`` (the gate, folded into ``h_i`` upstream on the rank-``r`` tensor, where it is
    cheap) is ``alpha_i / r_i`` times the adapter's weight while active and 0 otherwise. Each
    term is one ``addmm`` into the running output (on CUDA, one Triton kernel for all terms,
    :mod:`graphlora.passes.kernels`), so the add costs no extra pass over the ``[tokens, out]``
    tensor. With every gate at 0 the result equals ``base`` exactly.

    Under ``torch.compile`` the same math is the custom op ``graphlora::lora_switch`` with its own
    backward: Inductor treats it as one opaque op (the seam where a fused kernel would plug in).
    On an H200 this measured the same speed as letting Inductor trace the ``addmm`` calls
    (bench/profile-h200.log).

    Args:
        base: output of the base linear op, ``[..., out]``.
        hs: gated rank-``r_i`` activations, each ``[..., r_i]`` with ``base``'s leading dims.
        bs: the ``B_i`` weights, each ``[out, r_i]``.
    """
    if not hs:
        return base
    if torch.compiler.is_compiling() and COMPILE_AS_CUSTOM_OP:
        return _switch_op(base, list(hs), list(bs))
    return _switch_eager(base, hs, bs)


#: Use the opaque custom op under torch.compile (benchmarks flip it to compare).
COMPILE_AS_CUSTOM_OP = True


def lora_mixed(
    base: Tensor,
    x: Tensor,
    index: Tensor,
    a_weights: Sequence[Tensor | None],
    b_weights: Sequence[Tensor | None],
    scales: Sequence[Tensor | None],
) -> Tensor:
    r"""A site's output when each batch row picks its own adapter (mixed-adapter batch).

    Row ``b`` uses adapter ``index[b]`` (slot ``len(a_weights)`` means no adapter):

    .. math::

        y_b = \text{base}_b + s_{i_b} \, x_b A_{i_b}^\top B_{i_b}^\top

    The adapters' ``A`` / ``B`` are stacked (ranks zero-padded to the largest, plus a zero slot
    for base rows) and gathered per row, so the whole batch costs two batched matmuls of rank
    ``r_max``, whatever the number of adapters (the BGMV idea). Base rows get an exact zero.

    Args:
        base: the base op's output, ``[batch, ..., out]`` or ``[batch * seq, out]``.
        x: the base op's input with the same leading layout, ``[..., in]``.
        index: ``[batch]`` int64 adapter slots.
        a_weights / b_weights: each adapter's ``A`` ``[r_i, in]`` and ``B`` ``[out, r_i]``, ``None``
            for an adapter without a branch at this site.
        scales: each adapter's 0-dim ``alpha / r`` tensor (``None`` likewise).
    """
    present = [i for i, a in enumerate(a_weights) if a is not None]
    ref_a, ref_b, ref_s = a_weights[present[0]], b_weights[present[0]], scales[present[0]]
    rank = max(a_weights[i].shape[0] for i in present)
    zero_a = ref_a.new_zeros(rank, ref_a.shape[1])
    zero_b = ref_b.new_zeros(ref_b.shape[0], rank)

    def padded(t: Tensor, dim: int) -> Tensor:  # eager launches matter here: pad only when needed
        missing = rank - t.shape[dim]
        if not missing:
            return t
        return F.pad(t, (0, 0, 0, missing) if dim == 0 else (0, missing))

    a_stack = torch.stack([zero_a if a is None else padded(a, 0) for a in a_weights] + [zero_a])
    b_stack = torch.stack([zero_b if b is None else padded(b, 1) for b in b_weights] + [zero_b])
    zero_s = ref_s.new_zeros(())
    scale = torch.stack([zero_s if t is None else t for t in scales] + [zero_s]).to(x.dtype)
    rows = index.shape[0]
    x3 = x.reshape(rows, -1, x.shape[-1])
    h = torch.bmm(x3, a_stack[index].transpose(1, 2)) * scale[index].view(rows, 1, 1)
    delta = torch.bmm(h, b_stack[index].transpose(1, 2))
    return base + delta.view(base.shape)
