"""Run an exported program eagerly through torch's public functions, not ``torch.ops.aten``.

A ``torch.export`` graph calls every op as an ``OpOverload`` (``torch.ops.aten.mul.Tensor(a, b)``):
a Python ``__call__`` and a schema-driven argument conversion per op. The model it was traced from
calls ``torch.mul`` / ``Tensor.view`` / ``F.linear``, which go straight into torch's C++ argument
parser. Same kernels, different host cost: measured on this project's 2-core CPU machine,
``aten.view.default`` 9.4 us against ``Tensor.view`` 4.6 us, ``aten.mul.Tensor`` 4.8 against
``torch.mul`` 3.5, ``aten.slice.Tensor`` 7.1 against indexing 3.9. A decode step of a small model
is nothing but such calls (about 300), so the exported program ran a few milliseconds a step slower
than the model it came from while the accelerator waited.

:class:`EagerOps` rewrites a graph's ``call_function`` targets to their public twins, for the ops
in :data:`TWINS` only, and only when the node passes no keyword its twin does not take: the twin
dispatches to the same overload, so outputs are bitwise equal (``tests/test_eager_ops.py``) and
autograd is unchanged. The graph graphlora shows, compiles and exports keeps its aten ops:
:meth:`graphlora.programs.ProgramSet.runnable` runs this rewrite on a copy of each program's graph
and uses the copy for eager calls only.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from .result import GraphPass

__all__ = ["EagerOps", "TWINS", "Twin", "identity_slice", "lower_graph"]

aten = torch.ops.aten


def _slice(x: Tensor, dim: int = 0, start: Any = None, end: Any = None, step: int = 1) -> Tensor:
    """``aten.slice.Tensor`` as basic indexing (a view, as the op gives; bounds clamp the same way)."""
    index = [slice(None)] * (dim % x.dim())
    index.append(slice(start, end, step))
    return x[tuple(index)]


class Twin(NamedTuple):
    """An aten overload's public twin: the function, the keywords it takes under the schema's
    names, and how many positional arguments it takes (``None``: as many as the schema)."""

    fn: Callable[..., Any]
    keywords: frozenset[str] = frozenset()
    max_args: Any = None


_TO = frozenset({"non_blocking", "copy", "memory_format"})

#: aten overload -> its public twin
TWINS: dict[Any, Twin] = {
    aten.view.default: Twin(Tensor.view),
    aten.reshape.default: Twin(torch.reshape),
    aten.transpose.int: Twin(torch.transpose),
    aten.unsqueeze.default: Twin(torch.unsqueeze),
    aten.expand.default: Twin(Tensor.expand),
    aten.permute.default: Twin(torch.permute),
    aten.slice.Tensor: Twin(_slice),
    aten.mul.Tensor: Twin(torch.mul),
    aten.add.Tensor: Twin(torch.add, frozenset({"alpha"})),
    aten.sub.Tensor: Twin(torch.sub, frozenset({"alpha"})),
    aten.div.Tensor: Twin(torch.div),
    aten.neg.default: Twin(torch.neg),
    aten.pow.Tensor_Scalar: Twin(torch.pow),
    aten.rsqrt.default: Twin(torch.rsqrt),
    aten.cos.default: Twin(torch.cos),
    aten.sin.default: Twin(torch.sin),
    aten.silu.default: Twin(F.silu),
    aten.mean.dim: Twin(torch.mean, frozenset({"dtype"})),
    aten.le.Tensor: Twin(torch.le),
    aten.cat.default: Twin(torch.cat),
    aten.split_with_sizes.default: Twin(torch.split_with_sizes),
    aten.chunk.default: Twin(torch.chunk),
    aten.linear.default: Twin(F.linear),
    aten.mm.default: Twin(torch.mm),
    aten.addmm.default: Twin(torch.addmm, frozenset({"beta", "alpha"})),
    aten.embedding.default: Twin(torch.embedding),
    aten.arange.default: Twin(torch.arange, frozenset({"dtype", "layout", "device", "pin_memory"})),
    aten.to.dtype: Twin(Tensor.to, _TO, max_args=4),  # memory_format is keyword-only in Tensor.to
    aten.to.device: Twin(Tensor.to, _TO, max_args=5),
    aten.scaled_dot_product_attention.default: Twin(
        F.scaled_dot_product_attention,
        frozenset({"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}),
    ),
}


class EagerOps(GraphPass):
    """Replace each aten ``call_function`` of :data:`TWINS` by its public twin (see the module
    docstring). ``modified`` is False when the graph calls none of them."""

    def rewrite(self, gm: fx.GraphModule) -> bool:
        return lower_graph(gm.graph)


#: an ``end`` at or past this is "to the end" (export writes ``x[:, i:]`` as ``end = 2**63 - 1``)
_TO_THE_END = 2 ** 62


def identity_slice(node: fx.Node) -> bool:
    """``aten.slice.Tensor(x, dim, 0, end >= 2**62, 1)``: the whole of ``x`` (export writes each ``x[:, ...]``
    of the source as one, a quarter of a Llama block's slices): a view with ``x``'s sizes and strides."""
    if node.op != "call_function" or node.target is not aten.slice.Tensor or node.kwargs:
        return False
    x, _, start, end, step = (*node.args, *(0, None, None, 1)[len(node.args) - 1:])
    return (start in (None, 0) and (end is None or type(end) is int and end >= _TO_THE_END) and step == 1
            and isinstance(x, fx.Node))


def lower_graph(graph: fx.Graph) -> bool:
    """:class:`EagerOps` on a bare graph (in place); True when any target changed. Identity slices
    (:func:`identity_slice`) go: their users read ``x`` itself, the same data through the same
    sizes and strides, one Python call less each (about 4 us on this project's CPU)."""
    modified = False
    for node in list(graph.nodes):
        if identity_slice(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            modified = True
            continue
        if node.op != "call_function":
            continue
        twin = TWINS.get(node.target)
        if twin is None or not set(node.kwargs) <= twin.keywords:
            continue
        if twin.max_args is not None and len(node.args) > twin.max_args:
            continue
        node.target = twin.fn
        modified = True
    return modified
