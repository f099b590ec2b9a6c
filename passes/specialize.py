"""Specialize: freeze the switch state of a spliced graph into the graph itself.

The splice pass (:mod:`.splice`) leaves, per site, gated branches behind one switch node::

    h_a    = aten.linear(x', A_a)           # x' = x or lora_dropout(x)
    h_a    = aten.mul(h_a, gate_a)          # get_attr gate_a: s_a * w_a while active, else 0
    switch = lora_switch(base, (h_a, ...), (B_a, ...))

so that switching adapters only writes gate buffers. For serving one fixed adapter set this
pass reads every gate's current value ``g`` and rewrites the graph:

- ``g == 0``: the branch is dropped from the switch, and its now-unused nodes (the ``A``
  projection, its dropout, the ``get_attr`` reads) are erased;
- ``g == 1``: the multiply is removed (``h_a = aten.linear(x', A_a)``);
- otherwise: ``aten.mul(h_a, g)`` with ``g`` a Python float constant (no buffer read);
- a switch left with no branch is replaced by its base output.

The computed function is unchanged for the current state: ``y = base + sum_{a: g_a != 0}
(g_a A_a x') B_a^T``. The pass knows nothing of adapters' names or configs: it recognises the
switch by its target (:func:`.ops.lora_switch`) and the gate as the ``get_attr`` operand of the
multiply feeding it. Branches of any other shape are kept as they are.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .method_ops import dora_residual, scale_switch
from .ops import lora_switch
from .result import finish
from .sites import getattr_path

__all__ = ["freeze_switches"]

_MULS = {torch.ops.aten.mul.Tensor, torch.mul}


def _is_switch(node: fx.Node) -> bool:
    """A ``lora_switch`` call: the Python function, or its custom op ``graphlora::lora_switch``."""
    if node.op != "call_function":
        return False
    return node.target is lora_switch or str(node.target).startswith("graphlora.lora_switch")


def _gate_of(h: fx.Node) -> fx.Node | None:
    """The ``get_attr`` gate node of ``h = mul(x, gate)``, or ``None`` if ``h`` is not that."""
    if h.op != "call_function" or h.target not in _MULS or len(h.args) != 2:
        return None
    gate = h.args[1]
    return gate if isinstance(gate, fx.Node) and gate.op == "get_attr" else None


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


def freeze_switches(gm: fx.GraphModule) -> PassResult:
    """Freeze every ``lora_switch`` of ``gm`` to the current gate values (see the module doc).

    Returns:
        ``PassResult(gm, modified)``; ``modified`` is False when there was no switch.
    """
    graph = gm.graph
    modified = False
    for switch in [n for n in graph.nodes if _is_switch(n)]:
        base, hs, bs = switch.args
        keep_h, keep_b, dead = [], [], []
        for h, b in zip(hs, bs):
            gate = _gate_of(h)
            if gate is None:
                keep_h.append(h)
                keep_b.append(b)
                continue
            value = float(getattr_path(gm, gate.target))
            if value == 0.0:
                dead += [h, b]
                continue
            if value == 1.0:
                keep_h.append(h.args[0])
                dead.append(h)
            else:
                h.args = (h.args[0], value)
                dead.append(gate)
                keep_h.append(h)
            keep_b.append(b)
        modified = True
        if keep_h:
            switch.args = (base, tuple(keep_h), tuple(keep_b))
        else:
            switch.replace_all_uses_with(base)
            dead.append(switch)
        _erase_dead(graph, dead)
    modified = _freeze_method_switches(gm) or modified
    return finish(gm, modified)


def _gate_value(gm: fx.GraphModule, gate) -> float:
    return float(getattr_path(gm, gate.target)) if isinstance(gate, fx.Node) else float(gate)


def _freeze_method_switches(gm: fx.GraphModule) -> bool:
    """Freeze IA3's ``scale_switch`` and DoRA's ``dora_residual`` gates the same way.

    - ``scale_switch(t, (l, ...), (g, ...))``: vectors with ``g == 0`` are dropped, other gates
      become float constants; with no vector left the node is replaced by ``t``.
    - ``dora_residual(..., on)``: ``on == 0`` removes the residual and the ``add`` consuming it
      (its low-rank term is dropped by the ``lora_switch`` freezing above); else ``on`` becomes a
      constant.
    """
    graph = gm.graph
    modified = False
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in (scale_switch, dora_residual)]:
        dead: list[fx.Node] = []
        if node.target is scale_switch:
            t, vectors, gates = node.args
            keep_v, keep_g = [], []
            for vec, gate in zip(vectors, gates):
                value = _gate_value(gm, gate)
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
        else:
            base, wx, bias, factor, on = node.args
            value = _gate_value(gm, on)
            dead += [on] if isinstance(on, fx.Node) else []
            if value == 0.0:
                for add in list(node.users):  # y + residual -> y
                    other = add.args[0] if add.args[1] is node else add.args[1]
                    add.replace_all_uses_with(other)
                    dead.append(add)
                dead.append(node)
            else:
                node.args = (base, wx, bias, factor, value)
        modified = True
        _erase_dead(graph, dead)
    return modified
