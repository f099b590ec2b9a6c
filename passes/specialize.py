"""Specialize: freeze the switch state of a spliced graph into the graph itself.

The splice pass (:mod:`.splice`) leaves, per site, gated branches behind one switch node::

    h_a    = lora_down(x', A_a, gate_a)     # x' = x or dropout(x); gate_a: the scaling times w_a while active, else 0
    switch = lora_switch(base, (h_a, ...), (B_a, ...))     # or lora_linear(x, W, b, (h_a, ...), (B_a, ...))
    y      = scale_switch(t, (l_a, ...), (g_a, ...))       # input / output scaling branches

so that switching adapters only writes gate buffers. For serving one fixed adapter set,
:class:`FreezeSwitches` reads every gate's current value ``g`` and rewrites the graph:

- ``g == 0``: the branch is dropped from the switch, and its now-unused nodes (the ``A``
  projection, its dropout, the ``get_attr`` reads) are erased;
- ``g == 1``: ``h_a = aten.linear(x', A_a)``;
- otherwise: ``h_a = aten.mul(aten.linear(x', A_a), g)`` with ``g`` a Python float constant
  (no buffer read; graphs from before ``lora_down`` spell the branch this way already);
- a switch left with no branch is replaced by its base output (``lora_linear``: by
  ``aten.linear(x, W, b)``);
- ``scale_switch``: vectors with ``g == 0`` are dropped, other gates become float constants;
  with no vector left the node is replaced by ``t``.

The computed function is unchanged for the current state: ``y = base + sum_{a: g_a != 0}
(g_a A_a x') B_a^T`` (scaled by the kept vectors). The pass knows nothing of adapters' names,
configs or methods: it recognises the switches by their targets (:func:`.ops.lora_switch`,
:func:`.method_ops.scale_switch`) and the gate as the ``get_attr`` operand of the multiply
feeding it. Nodes of a method's own ops are frozen by the **steps** the caller passes (each
method rule supplies its own), and left as they are otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
import torch.fx as fx

from .method_ops import scale_switch
from .ops import lora_down, lora_linear, lora_switch
from .result import GraphPass
from .sites import getattr_path

__all__ = ["FreezeSwitches", "FreezeStep", "GateReader"]

#: ``read(gate)``: a gate argument's current value (a ``get_attr`` node's buffer, or a constant).
GateReader = Callable[[Any], float]
#: ``step(gm, node, read) -> dead``: freeze one node of a method's op in place, returning the
#: nodes the rewrite left unused (they and their newly unused inputs are erased); an empty list
#: when nothing changed.
FreezeStep = Callable[[fx.GraphModule, fx.Node, GateReader], list]

_MULS = {torch.ops.aten.mul.Tensor, torch.mul}


def _is_switch(node: fx.Node) -> bool:
    """A ``lora_switch`` / ``lora_linear`` call: the Python function, or its custom op."""
    if node.op != "call_function":
        return False
    if node.target in (lora_switch, lora_linear):
        return True
    return str(node.target).startswith(("graphlora.lora_switch", "graphlora.lora_linear"))


def _gate_of(h: fx.Node) -> fx.Node | None:
    """The ``get_attr`` gate of ``h = lora_down(x, A, gate)`` or ``h = mul(x, gate)``, else ``None``."""
    if h.op != "call_function":
        return None
    if h.target is lora_down:
        gate = h.args[2]
    elif h.target in _MULS and len(h.args) == 2:
        gate = h.args[1]
    else:
        return None
    return gate if isinstance(gate, fx.Node) and gate.op == "get_attr" else None


def _attr_dtype(graph: fx.Graph, node: Any) -> Union[torch.dtype, None]:
    """The dtype of the tensor a ``get_attr`` node reads (``None``: not a readable ``get_attr``)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or graph.owning_module is None:
        return None
    try:
        value = getattr_path(graph.owning_module, str(node.target))
    except AttributeError:
        return None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _constant_gate(graph: fx.Graph, h: fx.Node, value: float) -> fx.Node:
    """``h`` with its gate read replaced by the constant ``value`` (``1``: no multiply at all)."""
    if h.target is lora_down:
        x, a, _ = h.args
        with graph.inserting_before(h):
            dtype = _attr_dtype(graph, a)
            if dtype is not None:  # as lora_down: x in the adapter's dtype (float32 adapters over bf16)
                x = graph.call_method("to", (x, dtype))
            proj = graph.call_function(torch.ops.aten.linear.default, (x, a))
            proj.meta.update({k: v for k, v in h.meta.items() if k != "val"})
            if value == 1.0:
                return proj
            out = graph.call_function(torch.ops.aten.mul.Tensor, (proj, value))
            out.meta.update(proj.meta)
            return out
    if value == 1.0:
        return h.args[0]
    h.args = (h.args[0], value)
    return h


def _erase_dead(graph: fx.Graph, roots: list[fx.Node]) -> None:
    """Erase ``roots`` and, transitively, their inputs once they have no users.

    Only nodes made dead by this pass are reached: the walk starts at dropped branch nodes and
    stops at any node that still has users (the site's input ``x`` feeds the base op).
    """
    work = list(roots)
    erased: set[fx.Node] = set()
    while work:
        node = work.pop()
        if node in erased or node.users or node.op in ("placeholder", "output"):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        work.extend(inputs)


def _gate_value(gm: fx.GraphModule, gate: Any) -> float:
    return float(getattr_path(gm, str(gate.target))) if isinstance(gate, fx.Node) else float(gate)


def _freeze_low_rank(gm: fx.GraphModule, switch: fx.Node) -> bool:
    """Freeze one ``lora_switch`` / ``lora_linear`` node; True when it changed."""
    graph = gm.graph
    *head, hs, bs = switch.args  # head: (base,) or, for lora_linear, (x, W, bias)
    keep_h, keep_b, dead = [], [], []
    for h, b in zip(hs, bs):
        gate = _gate_of(h)
        if gate is None:
            keep_h.append(h)
            keep_b.append(b)
            continue
        value = _gate_value(gm, gate)
        if value == 0.0:
            dead += [h, b]
            continue
        frozen = _constant_gate(graph, h, value)
        dead += [h, gate] if frozen is not h else [gate]
        keep_h.append(frozen)
        keep_b.append(b)
    if not dead and keep_h:
        return False  # every gate already a constant
    if keep_h:
        switch.args = (*head, tuple(keep_h), tuple(keep_b))
    else:
        if len(head) == 1:
            base = head[0]
        else:  # lora_linear with no branch left: the plain linear it stood for
            with graph.inserting_before(switch):
                base = graph.call_function(torch.ops.aten.linear.default, tuple(head))
            base.meta.update(switch.meta)
        switch.replace_all_uses_with(base)
        dead.append(switch)
    _erase_dead(graph, dead)
    return True


def _freeze_scale(gm: fx.GraphModule, node: fx.Node, read: GateReader) -> list:
    """``scale_switch(t, (l, ...), (g, ...))``: drop ``g == 0`` vectors, other gates become constants."""
    t, vectors, gates = node.args
    if not any(isinstance(g, fx.Node) or read(g) == 0.0 for g in gates):
        return []  # already frozen
    keep_v, keep_g, dead = [], [], []
    for vec, gate in zip(vectors, gates):
        value = read(gate)
        dead += [g for g in (gate,) if isinstance(g, fx.Node)]
        if value == 0.0:
            dead.append(vec)
            continue
        keep_v.append(vec)
        keep_g.append(value)
    if keep_v:
        node.args = (t, tuple(keep_v), tuple(keep_g))
    else:
        node.replace_all_uses_with(t)
        dead.append(node)
    return dead


class FreezeSwitches(GraphPass):
    """Freeze every switch of a spliced graph to the current gate values (see the module doc).

    The low-rank switches go first, then, in graph order, every ``scale_switch`` and every node
    whose target has a step in ``steps``. ``modified`` is False when nothing was frozen (no
    switch, or every gate already a constant).

    Args:
        steps: per call target of a method-specific op, its :data:`FreezeStep` (collected from
            the method rules' ``freeze_steps()``); nodes of other ops are kept as they are.
    """

    def __init__(self, steps: Union[Mapping[Any, FreezeStep], None] = None) -> None:
        self.steps = dict(steps or {})

    def rewrite(self, gm: fx.GraphModule) -> bool:
        graph = gm.graph
        modified = False
        for switch in [n for n in graph.nodes if _is_switch(n)]:
            modified = _freeze_low_rank(gm, switch) or modified

        def read(gate: Any) -> float:
            return _gate_value(gm, gate)

        steps: dict[Any, FreezeStep] = {scale_switch: _freeze_scale, **self.steps}
        for node in [n for n in graph.nodes if n.op == "call_function" and n.target in steps]:
            dead = steps[node.target](gm, node, read)
            if dead:
                _erase_dead(graph, dead)
                modified = True
        return modified
