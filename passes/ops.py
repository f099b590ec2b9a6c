"""Runtime functions called by the nodes that graphlora's passes insert.

They are plain PyTorch (autograd, ``torch.compile`` and CPU work as for any op); a fused
GPU kernel can replace them without changing the graphs' structure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["lora_switch"]


def lora_switch(base: Tensor, hs: Sequence[Tensor], bs: Sequence[Tensor]) -> Tensor:
    """Combine a site's base output with its adapter branches.

    .. math::

        y = \\text{base} + \\sum_i h_i B_i^\\top, \\qquad h_i = g_i \\cdot A_i\\,\\mathrm{dropout}_i(x)

    where ``g_i`` (the gate, folded into ``h_i`` upstream on the rank-``r`` tensor, where it is
    cheap) is ``alpha_i / r_i`` times the adapter's weight while active and 0 otherwise. Each
    term is one ``addmm`` into the running output, so the add costs no extra pass over the
    ``[tokens, out]`` tensor. With every gate at 0 the result equals ``base`` exactly.

    Args:
        base: output of the base linear op, ``[..., out]``.
        hs: gated rank-``r_i`` activations, each ``[..., r_i]`` with ``base``'s leading dims.
        bs: the ``B_i`` weights, each ``[out, r_i]``.
    """
    if not hs:
        return base
    out = base.reshape(-1, base.shape[-1])
    for h, b in zip(hs, bs):
        out = torch.addmm(out, h.reshape(-1, h.shape[-1]), b.t())
    return out.view(base.shape)
