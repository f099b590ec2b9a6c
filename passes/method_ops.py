"""Runtime functions for the adapter methods other than plain LoRA (IA3, DoRA).

Kept apart from :mod:`.ops` (``lora_switch``, ``lora_mixed``) so each file has one job. Every
function is plain PyTorch, so autograd, ``torch.compile`` and CPU work as for any op, and each is
exactly the identity on its input when its gates are 0 (bit for bit, for finite inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

__all__ = ["scale_switch", "dora_factor", "dora_residual", "row_scale"]

Gate = Union[Tensor, float]


def scale_switch(t: Tensor, vectors: Sequence[Tensor], gates: Sequence[Gate]) -> Tensor:
    r"""Scale the last dim of ``t`` by gated learned vectors (IA3).

    .. math::

        y = t \odot \prod_i \big(g_i\, l_i + (1 - g_i)\big)

    With ``g_i = 1`` the factor is ``l_i`` exactly and with ``g_i = 0`` it is exactly ``1``
    (``l_i * 0 + 1``), so an inactive vector leaves ``t`` bit for bit as it was; ``g_i = w``
    interpolates between the identity and ``l_i``.

    Args:
        t: ``[..., d]`` (a site's output, or its input for feed-forward IA3).
        vectors: each a ``d``-element learned vector (any shape, flattened: PEFT stores
            ``[d, 1]`` or ``[1, d]``).
        gates: 0-dim tensors or floats, one per vector.
    """
    scale = None
    for vec, gate in zip(vectors, gates):
        factor = vec.reshape(-1) * gate + (1 - gate)
        scale = factor if scale is None else scale * factor
    if scale is None:
        return t
    return t * scale.to(t.dtype)


def dora_factor(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: Gate, magnitude: Tensor, fan_in_fan_out: bool
) -> Tensor:
    r"""DoRA's per-output-row factor ``f = m / ||W + s B A||_row`` with the norm detached.

    .. math::

        f_o = \frac{m_o}{\big\lVert W_{o,:} + s\,(B A)_{o,:} \big\rVert_2}

    The norm is computed from detached tensors (DoRA paper §4.3, as PEFT does), so only ``m``
    receives a gradient through ``f``.

    Args:
        weight: the base weight, ``[out, in]`` (``[in, out]`` when ``fan_in_fan_out``).
        lora_A / lora_B: ``[r, in]`` / ``[out, r]``.
        scale: ``s`` (``alpha / r`` or rsLoRA's), a 0-dim tensor or float.
        magnitude: ``m``, ``[out]``.
        fan_in_fan_out: the weight is stored (in, out) (GPT-2 ``Conv1D``).
    """
    with torch.no_grad():
        w = weight.detach()
        w = w.t() if fan_in_fan_out else w
        lora_weight = (lora_B.detach() @ lora_A.detach()).to(w.dtype)
        norm = torch.linalg.norm(w + scale * lora_weight, dim=1).to(w.dtype)
    return magnitude / norm


def dora_residual(base: Tensor, wx: Union[Tensor, None], bias: Union[Tensor, None], factor: Tensor, on: Gate) -> Tensor:
    r"""DoRA's rescaling of the base output: ``on * (f - 1) * W x``.

    ``W x`` is ``wx`` when given (with adapter dropout, PEFT rescales ``W dropout(x)``), else
    ``base - bias`` (the base op's output without its bias). With ``on = 0`` it is exactly 0.
    """
    if wx is None:
        wx = base if bias is None else base - bias
    return wx * ((factor - 1) * on).to(wx.dtype)


def row_scale(matrix: Tensor, factor: Tensor) -> Tensor:
    """``matrix * factor[:, None]``: scale each row (output feature) of ``B`` by DoRA's ``f``."""
    return matrix * factor.to(matrix.dtype).unsqueeze(-1)
