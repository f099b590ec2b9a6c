"""Retarget the devices a trace baked into a graph.

``torch.export`` records the device of tensors created inside the model (``arange(...,
device=cpu)`` for positions, masks, ``aten.to.device``), so a graph traced on one device keeps
creating tensors there after the module's parameters move. :class:`RetargetDevice` rewrites
every ``torch.device`` constant in node arguments that equals ``old`` to ``new``, also inside the
subgraphs of higher-order ops (``wrap_with_autocast``, ``wrap_with_set_grad_enabled``: HF's
rotary embedding runs under ``torch.autocast(enabled=False)``), whose autocast device type
follows the move too.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.fx as fx
from torch import nn

from .result import GraphPass
from .sites import getattr_path

__all__ = ["RetargetDevice"]


def _same(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _autocast_op():
    return getattr(torch.ops.higher_order, "wrap_with_autocast", None)


class RetargetDevice(GraphPass):
    """Replace ``old`` by ``new`` in every node's args and kwargs (see the module doc).

    Nested ``GraphModule`` s that the graph's ``get_attr`` nodes read on the module (higher-order
    op subgraphs) are rewritten, linted and recompiled too. ``modified`` is True when this graph
    or a nested one changed; run again, the pass changes nothing.

    Args:
        old: the device the graph was traced on.
        new: the device it should create tensors on.
    """

    def __init__(self, old: torch.device, new: torch.device) -> None:
        self.old, self.new = torch.device(old), torch.device(new)

    def rewrite(self, gm: fx.GraphModule) -> bool:
        return self._rewrite_graph(gm.graph, gm)

    def _rewrite_graph(self, graph: fx.Graph, root: Union[nn.Module, None]) -> bool:
        old, new = self.old, self.new
        changed = False

        def swap(value):
            nonlocal changed
            if isinstance(value, torch.device) and _same(value, old):
                changed = True
                return new
            return value

        autocast = _autocast_op()
        for node in graph.nodes:
            node.args = fx.node.map_aggregate(node.args, swap)
            node.kwargs = fx.node.map_aggregate(node.kwargs, swap)
            if autocast is not None and node.target is autocast and node.args and node.args[0] == old.type != new.type:
                node.args = (new.type, *node.args[1:])  # wrap_with_autocast(device_type, dtype, enabled, cache, fn)
                changed = True
            if root is not None and node.op == "get_attr":
                sub = getattr_path(root, str(node.target))
                if isinstance(sub, fx.GraphModule) and self.call(sub).modified:
                    changed = True
        return changed
