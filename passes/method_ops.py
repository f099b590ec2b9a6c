"""The scaling switch: the runtime function of adapters that scale a site's input or output.

Kept apart from :mod:`.ops` (the low-rank switches ``lora_switch``, ``lora_bank``) so each file
has one job. Plain PyTorch, so autograd, ``torch.compile`` and CPU work as for any op, and exactly
the identity on its input when its gates are 0 (bit for bit, for finite inputs). Runtime functions
that belong to one method live in that method's module under ``graphlora/methods/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

from torch import Tensor

__all__ = ["scale_switch"]

Gate = Union[Tensor, float]


def scale_switch(t: Tensor, vectors: Sequence[Tensor], gates: Sequence[Gate]) -> Tensor:
    r"""Scale the last dim of ``t`` by gated learned vectors (input or output scaling adapters).

    .. math::

        y = t \odot \prod_i \big(g_i\, l_i + (1 - g_i)\big)

    With ``g_i = 1`` the factor is ``l_i`` exactly and with ``g_i = 0`` it is exactly ``1``
    (``l_i * 0 + 1``), so an inactive vector leaves ``t`` bit for bit as it was; ``g_i = w``
    interpolates between the identity and ``l_i``.

    Args:
        t: ``[..., d]`` (a site's output, or its input for input-scaling branches).
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
