"""Drop trace-time assertions that pin a tensor's dtype/device.

``torch.export`` records ``aten._assert_tensor_metadata`` checks on the dtype and device seen
at trace time. They compute nothing (no users), but they would make the emitted module fail
after ``.to(torch.bfloat16)`` or a device move, so they are removed.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .result import finish

__all__ = ["strip_tensor_asserts"]

_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}


def strip_tensor_asserts(gm: fx.GraphModule) -> PassResult:
    """Erase every user-less ``_assert_tensor_metadata`` node."""
    modified = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            gm.graph.erase_node(node)
            modified = True
    return finish(gm, modified)
