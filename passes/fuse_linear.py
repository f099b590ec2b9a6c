r"""Serving programs: each bank update carries its base linear's inputs, for a fused few-row op.

After the splice (and :class:`~graphlora.passes.fuse_shrink.FuseBankShrink`) a banked site is::

    y = linear(x, W, b)                              # the base op
    y = lora_expand(y, h, \hat B)                    # or lora_bank(y, x, \hat A, \hat B), in place or not

This pass gives each such update whose ``y`` comes straight from an ``aten.linear`` /
``F.linear`` node with a ``get_attr`` weight the keyword ``linear=(x, W, b)``. The update's value
is unchanged: eager calls ignore it, and so do compiled calls, except where
:func:`graphlora.passes.linear_few.compiled_ok` holds; there the update is one kernel,
``x W^\top + b + h \hat B^\top`` (:mod:`.linear_few`), and the base node, left without a reader,
is dropped by the compiler. The base node stays in the graph (visualization and the sites' records
still find it).

Only updates that are ``y``'s one reader are marked (an in-place update writes the base output;
another reader would see it either way, but a fused op would not write it). ``modified`` is
False when no update qualifies.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from .ops import lora_bank, lora_bank_, lora_expand, lora_expand_
from .result import GraphPass

__all__ = ["AttachBaseLinear"]

_UPDATES = {lora_bank, lora_bank_, lora_expand, lora_expand_}
_LINEARS = {torch.ops.aten.linear.default, F.linear}


class AttachBaseLinear(GraphPass):
    """Mark bank updates with their base linear's ``(x, W, bias)`` (module doc)."""

    def rewrite(self, gm: fx.GraphModule) -> bool:
        modified = False
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in _UPDATES or "linear" in node.kwargs:
                continue
            base = node.args[0]
            if not (isinstance(base, fx.Node) and base.op == "call_function" and base.target in _LINEARS
                    and len(base.users) == 1 and 2 <= len(base.args) <= 3):
                continue
            x, w = base.args[0], base.args[1]
            bias = base.args[2] if len(base.args) == 3 else base.kwargs.get("bias")
            if not (isinstance(w, fx.Node) and w.op == "get_attr") or set(base.kwargs) - {"bias"}:
                continue
            node.kwargs = {**node.kwargs, "linear": (x, w, bias)}
            modified = True
        return modified
