"""Hand-written linears: ``x @ W.T (+ b)`` on a weight parameter as one linear-like node.

Some models write a linear layer out instead of calling ``F.linear``: Falcon's
``FalconLinear(nn.Linear)`` computes ``input @ self.weight.T`` (then ``+ self.bias``), so its
trace holds ``matmul(x, numpy_T(W))`` and ``add(·, b)``, not ``linear(x, W, b)``, and no site
would be found there. :class:`MatmulAsLinear` (a base pass) turns each such pattern into one node::

    y = matmul_linear(x, W, b)        # W: [d_out, d_in] parameter, b: [d_out] parameter or None

which :mod:`.sites` reads as a linear site of the module that owns ``W`` (input 0, weight 1, bias 2,
like ``linear``), so every method, merge and PEFT file works on it as on an ``nn.Linear``.

The pattern, for both frontends (``torch.export``'s aten ops and ``symbolic_trace``'s Python ones):

- a matmul (``aten.matmul`` / ``aten.mm``, ``torch.matmul`` / ``torch.mm``, ``@``, ``Tensor.matmul``)
  whose second operand is the transposed view of a 2-D parameter read by ``get_attr``: ``W.T``,
  ``W.mT``, ``W.t()``, ``W.permute(1, 0)``, ``W.transpose(0, 1)`` (any spelling of the two dims);
- when the pass is given the model's ``nn.Linear`` weights (:func:`linear_weights`; graphlora
  always gives them), the weight of an ``nn.Linear`` (a subclass that writes its own ``forward``,
  as Falcon's does): PEFT adapts only those, so a learned 2-D parameter multiplied in
  (``q @ self.keys.T``) or a tied head written as ``h @ self.embed.weight.T`` is no site, as in PEFT;
- optionally followed by ``+ b``: the matmul's only user is an ``add`` (no ``alpha``) of a 1-D
  ``d_out`` parameter read by ``get_attr``, called from the same module (``nn_module_stack``).

A matmul whose output is read elsewhere too keeps its bias add outside the site. ``matmul_linear``
runs the very ops the pattern traced (``matmul`` on the transposed view, then ``add``), so the
rewritten graph gives the traced outputs bit for bit.
"""

from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass
from collections.abc import Collection
from typing import Any, Union

import torch
import torch.fx as fx

from .result import GraphPass

__all__ = ["linear_weights", "matmul_linear", "MatmulAsLinear", "match_matmul_linear", "MatmulLinear"]

aten = torch.ops.aten

#: ``call_function`` targets of ``a @ b``.
_MATMUL_FUNCTIONS = frozenset({aten.matmul.default, aten.mm.default, torch.matmul, torch.mm, operator.matmul})
#: ``call_method`` names of ``a @ b``.
_MATMUL_METHODS = frozenset({"matmul", "mm", "__matmul__"})
#: ``call_function`` targets of ``a + b``.
_ADD_FUNCTIONS = frozenset({aten.add.Tensor, torch.add, operator.add})
#: transposes of a 2-D tensor that take no dims (``W.T``, ``W.t()``).
_T_FUNCTIONS = frozenset({aten.numpy_T.default, aten.mT.default, aten.t.default, torch.t})


def matmul_linear(x: torch.Tensor, weight: torch.Tensor, bias: Union[torch.Tensor, None] = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)``, computed as a hand-written linear traces it: ``matmul`` on the
    transposed view, then ``add``, so the result is bit for bit the traced one.

    Args:
        x: ``[..., d_in]``. weight: ``[d_out, d_in]``. bias: ``[d_out]`` or ``None``.
    """
    y = torch.matmul(x, weight.t())
    return y if bias is None else y + bias


@dataclass(frozen=True)
class MatmulLinear:
    """One matched pattern: the matmul node, its input ``x``, the transposed view of the ``get_attr``
    ``weight``, and the bias ``add`` with its ``get_attr`` ``bias`` (both ``None`` without a bias)."""

    matmul: fx.Node
    x: fx.Node
    transpose: fx.Node
    weight: fx.Node
    add: Union[fx.Node, None]
    bias: Union[fx.Node, None]

    @property
    def output(self) -> fx.Node:
        """The node whose value the rewritten ``matmul_linear`` replaces."""
        return self.add if self.add is not None else self.matmul


def _attr(gm: fx.GraphModule, node: Any) -> Any:
    """The tensor a ``get_attr`` node reads (``None`` for anything else)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj


def _is_parameter(value: Any, dim: int) -> bool:
    return isinstance(value, torch.nn.Parameter) and value.dim() == dim


def _swaps_two_dims(order: Any) -> bool:
    """Whether permute's ``order`` swaps the two dims of a matrix (``(1, 0)``, ``[-1, -2]``, ...)."""
    if not isinstance(order, (list, tuple)) or len(order) != 2 or not all(isinstance(d, int) for d in order):
        return False
    return (order[0] % 2, order[1] % 2) == (1, 0)


def _transposed_source(node: Any) -> Union[fx.Node, None]:
    """``W`` when ``node`` is a transposed view of ``W`` (any spelling), else ``None``."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src, rest = node.args[0], tuple(node.args[1:])
    if node.kwargs:
        return None
    if node.op == "call_function":
        if node.target in _T_FUNCTIONS and not rest:
            return src
        if node.target is builtins.getattr and rest in (("T",), ("mT",)):
            return src
        if node.target in (aten.permute.default, torch.permute) and len(rest) == 1:
            return src if _swaps_two_dims(rest[0]) else None
        if node.target in (aten.transpose.int, torch.transpose) and len(rest) == 2:
            return src if _is_swap(rest) else None
        return None
    if node.op == "call_method":
        if node.target == "t" and not rest:
            return src
        if node.target == "permute":
            order = rest[0] if len(rest) == 1 else rest
            return src if _swaps_two_dims(order) else None
        if node.target in ("transpose", "swapaxes", "swapdims") and len(rest) == 2:
            return src if _is_swap(rest) else None
    return None


def _is_swap(pair: tuple) -> bool:
    """Whether transpose's two dims name both dims of a matrix (``(0, 1)``, ``(-1, -2)``, ...)."""
    return all(isinstance(d, int) for d in pair) and {d % 2 for d in pair} == {0, 1}


def _is_matmul(node: fx.Node) -> bool:
    if node.kwargs or len(node.args) != 2:
        return False
    return ((node.op == "call_function" and node.target in _MATMUL_FUNCTIONS)
            or (node.op == "call_method" and node.target in _MATMUL_METHODS))


def _module_of(node: fx.Node) -> Any:
    """The innermost module recorded for ``node`` by export (``None`` when none is recorded)."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def _bias_add(gm: fx.GraphModule, matmul: fx.Node, d_out: int) -> tuple[Union[fx.Node, None], Union[fx.Node, None]]:
    """``(add, b)`` when the matmul's only user adds a ``[d_out]`` parameter ``b`` to it, else ``(None, None)``."""
    if len(matmul.users) != 1:
        return None, None
    add = next(iter(matmul.users))
    is_add = ((add.op == "call_function" and add.target in _ADD_FUNCTIONS)
              or (add.op == "call_method" and add.target == "add"))
    if not is_add or len(add.args) != 2 or any(k != "alpha" for k in add.kwargs) or add.kwargs.get("alpha", 1) != 1:
        return None, None
    bias = add.args[1] if add.args[0] is matmul else add.args[0]
    value = _attr(gm, bias)
    if bias is matmul or not _is_parameter(value, 1) or value.shape[0] != d_out:
        return None, None
    if _module_of(add) != _module_of(matmul):  # a bias of another module (or a residual) is not this layer's
        return None, None
    return add, bias


def linear_weights(model: torch.nn.Module) -> frozenset[str]:
    """The paths of the ``weight`` of every ``nn.Linear`` in ``model`` (subclasses included)."""
    return frozenset(f"{name}.weight" if name else "weight" for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear))


def match_matmul_linear(gm: fx.GraphModule, node: fx.Node,
                        weights: Union[Collection[str], None] = None) -> Union[MatmulLinear, None]:
    """``node`` as the start of a hand-written linear ``x @ W.T (+ b)`` (see the module docstring),
    or ``None`` when it is not one. ``weights``: the paths of the ``nn.Linear`` weights that may be
    ``W`` (``None``: any 2-D parameter)."""
    if not _is_matmul(node):
        return None
    x, transposed = node.args
    weight = _transposed_source(transposed)
    value = _attr(gm, weight)
    if not isinstance(x, fx.Node) or not _is_parameter(value, 2):
        return None
    if weights is not None and str(weight.target) not in weights:
        return None
    add, bias = _bias_add(gm, node, value.shape[0])
    return MatmulLinear(node, x, transposed, weight, add, bias)


class MatmulAsLinear(GraphPass):
    """Rewrite every hand-written linear ``x @ W.T (+ b)`` to one ``matmul_linear(x, W, b)`` node.

    The new node takes the output node's metadata (``val``, ``nn_module_stack``: the module that
    owns ``W``); the matmul, the transposed view and the add go when nothing else reads them.
    ``modified`` is False when the graph has no such pattern.

    Args:
        weights: the parameter paths (as the graph's ``get_attr`` targets name them) of the model's
            ``nn.Linear`` weights (:func:`linear_weights` of the traced model: what graphlora
            passes); ``None``: any 2-D parameter (the pattern alone).
    """

    def __init__(self, weights: Union[Collection[str], None] = None) -> None:
        super().__init__()
        self.weights = None if weights is None else frozenset(weights)

    def rewrite(self, gm: fx.GraphModule) -> bool:
        modified = False
        weights = self.weights
        # one at a time: a match may read an earlier one's output (erased nodes left in the list are
        # bias adds, which match nothing)
        for node in list(gm.graph.nodes):
            match = match_matmul_linear(gm, node, weights)
            if match is not None:
                _replace(gm.graph, match)
                modified = True
        return modified


def _replace(graph: fx.Graph, match: MatmulLinear) -> None:
    out = match.output
    args = (match.x, match.weight) if match.bias is None else (match.x, match.weight, match.bias)
    with graph.inserting_before(out):
        new = graph.call_function(matmul_linear, args)
    new.meta.update(out.meta)
    if "nn_module_stack" not in new.meta and "nn_module_stack" in match.matmul.meta:
        new.meta["nn_module_stack"] = match.matmul.meta["nn_module_stack"]
    out.replace_all_uses_with(new)
    for node in (match.add, match.matmul, match.transpose):
        if node is not None and not node.users:
            graph.erase_node(node)
