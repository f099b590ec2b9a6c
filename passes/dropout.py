"""Make dropout follow ``train()`` / ``eval()`` in a traced graph.

A trace freezes the mode: ``torch.export`` records ``aten.dropout(x, p, train)`` with ``train``
baked in, and ``symbolic_trace`` bakes ``F.dropout(..., training=self.training)``. This pass
replaces each such call with a ``call_module`` of an ``nn.Dropout(p)``, so the emitted module's
``train()`` / ``eval()`` switch it. The module is registered at the path of the module that
called dropout (``transformer.h.0.attn.resid_dropout``), reusing an existing ``nn.Dropout``
there, or under ``graphlora_dropout`` when that path is taken by something else.

Dropout inside fused ops (``scaled_dot_product_attention``'s ``dropout_p``) is not a separate
node and keeps its trace-time value.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .result import GraphPass
from .sites import module_path

__all__ = ["FollowTrainMode"]

_DROPOUT_OPS = {torch.ops.aten.dropout.default: ("p", "train"), F.dropout: ("p", "training")}


def _prob(node: fx.Node) -> float | None:
    p_name, _ = _DROPOUT_OPS[node.target]
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get(p_name, 0.5)
    return float(p) if isinstance(p, (int, float)) else None


def _dropout_target(gm: fx.GraphModule, node: fx.Node, p: float) -> str:
    owner = module_path(node)
    if owner:
        try:
            existing = gm.get_submodule(owner)
        except AttributeError:
            existing = None
        if existing is None:
            module = nn.Dropout(p)
            module.train(gm.training)
            gm.add_submodule(owner, module)
            return owner
        if isinstance(existing, nn.Dropout) and existing.p == p:
            return owner
    target = f"graphlora_dropout.{node.name}"
    module = nn.Dropout(p)
    module.train(gm.training)
    gm.add_submodule(target, module)
    return target


class FollowTrainMode(GraphPass):
    """Replace trace-time dropout calls by mode-following ``nn.Dropout`` modules.

    ``modified`` is False when the graph has no dropout call with a constant probability.
    """

    def rewrite(self, gm: fx.GraphModule) -> bool:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _DROPOUT_OPS:
                continue
            p = _prob(node)
            if p is None:
                continue
            target = _dropout_target(gm, node, p)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(target, (node.args[0],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            modified = True
        return modified
