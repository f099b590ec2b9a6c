"""Retarget the devices a trace baked into a graph.

``torch.export`` records the device of tensors created inside the model (``arange(...,
device=cpu)`` for positions, masks, ``aten.to.device``), so a graph traced on one device keeps
creating tensors there after the module's parameters move. This rewrites every ``torch.device``
constant in node arguments that equals ``old`` to ``new``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["retarget_device"]


def _same(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def retarget_device(graph: fx.Graph, old: torch.device, new: torch.device) -> bool:
    """Replace ``old`` by ``new`` in every node's args and kwargs; True when anything changed."""
    changed = False

    def swap(value):
        nonlocal changed
        if isinstance(value, torch.device) and _same(value, old):
            changed = True
            return new
        return value

    for node in graph.nodes:
        node.args = fx.node.map_aggregate(node.args, swap)
        node.kwargs = fx.node.map_aggregate(node.kwargs, swap)
    return changed
