"""Serving graphs read adapter parameters through detached aliases, so switching never recompiles.

Under ``torch.compile`` dynamo guards every tensor a graph reads on its ``requires_grad``, and
``set_adapter`` toggles the adapters' ``requires_grad`` (PEFT's trainability rules). A serving graph
that reads a DoRA, IA3, LoHa or LoKr adapter's parameters, or a ``modules_to_save`` copy, would
recompile on every switch to a new combination (and fall back to eager past dynamo's cache limit).
Serving graphs run without grad, so :class:`DetachedReads` makes each ``get_attr`` of a parameter
under ``prefix`` read ``p.detach()`` instead: a plain attribute of the graph's module that shares
``p``'s storage and version counter (optimizer steps and in-place loads are seen, no copy is made)
and never requires grad. :func:`refresh_detached` re-aliases any parameter whose tensor was replaced
since (a ``param.data =`` write, ``load_state_dict(assign=True)``).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .result import GraphPass
from .sites import getattr_path

__all__ = ["DetachedReads", "refresh_detached", "DETACHED_PREFIX"]

#: the attribute name prefix of the aliases on a graph's module; the rest of the name is the
#: parameter's path, escaped (:func:`_encode`: ``_`` as ``_u``, ``.`` as ``_d``, so it decodes back)
DETACHED_PREFIX = "_glora_detached__"


def _encode(path: str) -> str:
    return path.replace("_", "_u").replace(".", "_d")


def _decode(name: str) -> str:
    out, i = [], 0
    while i < len(name):
        if name[i] == "_" and i + 1 < len(name):
            out.append("_" if name[i + 1] == "u" else ".")
            i += 2
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def _same(alias: torch.Tensor, param: torch.Tensor) -> bool:
    return (alias.data_ptr() == param.data_ptr() and alias.shape == param.shape and alias.dtype == param.dtype
            and alias.device == param.device and alias.stride() == param.stride())


def _alias(param: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor even when built under inference_mode
        return param.detach()


class DetachedReads(GraphPass):
    """Every ``get_attr`` of an ``nn.Parameter`` under ``prefix`` reads a detached alias of it.

    For graphs that only ever run with grad disabled (graphlora's serving programs); ``modified``
    is False when the graph reads no such parameter.
    """

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix + "."

    def rewrite(self, gm: fx.GraphModule) -> bool:
        changed = False
        for node in gm.graph.nodes:
            target = str(node.target)
            if node.op != "get_attr" or not target.startswith(self.prefix):
                continue
            param = getattr_path(gm, target)
            if not isinstance(param, nn.Parameter):
                continue
            name = DETACHED_PREFIX + _encode(target)
            setattr(gm, name, _alias(param))
            node.target = name
            changed = True
        return changed


def refresh_detached(gm: nn.Module) -> None:
    """Re-alias every parameter ``gm`` reads through :class:`DetachedReads` whose tensor was
    replaced since (the aliases are plain attributes of ``gm``: a look at its ``__dict__``)."""
    for name in [n for n in vars(gm) if n.startswith(DETACHED_PREFIX)]:
        try:
            param = getattr_path(gm, _decode(name[len(DETACHED_PREFIX):]))
        except AttributeError:  # a deleted adapter's: this graph is re-spliced before it runs again
            continue
        if not _same(getattr(gm, name), param):
            setattr(gm, name, _alias(param))
