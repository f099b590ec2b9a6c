"""Drop trace-time assertions that pin a tensor's dtype/device.

``torch.export`` records ``aten._assert_tensor_metadata`` checks on the dtype and device seen
at trace time. They compute nothing (no users), but they would make the emitted module fail
after ``.to(torch.bfloat16)`` or a device move, so they are removed, also from the nested graphs
of higher-order ops (a ``no_grad`` region: transformers 5.17's rotary embedding).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ._compat import nested_graph_modules
from .result import GraphPass

__all__ = ["StripTensorAsserts"]

_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}


class StripTensorAsserts(GraphPass):
    """Erase every user-less ``_assert_tensor_metadata`` node (``modified``: any was erased)."""

    def rewrite(self, gm: fx.GraphModule) -> bool:
        modified = False
        for sub in nested_graph_modules(gm):  # finished here: the caller recompiles gm alone
            if _strip(sub.graph):
                sub.graph.lint()
                sub.recompile()
                modified = True
        return _strip(gm.graph) or modified


def _strip(graph: fx.Graph) -> bool:
    modified = False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            graph.erase_node(node)
            modified = True
    return modified
