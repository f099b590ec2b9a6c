"""Specialize: freeze the switch state of a spliced graph into the graph itself.

The splice pass (:mod:`.splice`) leaves, per site, gated branches behind one switch node::

    h_a    = lora_down(x', A_a, gate_a)     # x' = x or lora_dropout(x); gate_a: s_a * w_a while active, else 0
    switch = lora_switch(base, (h_a, ...), (B_a, ...))     # or lora_linear(x, W, b, (h_a, ...), (B_a, ...))

so that switching adapters only writes gate buffers. For serving one fixed adapter set this
pass reads every gate's current value ``g`` and rewrites the graph:

- ``g == 0``: the branch is dropped from the switch, and its now-unused nodes (the ``A``
  projection, its dropout, the ``get_attr`` reads) are erased;
- ``g == 1``: ``h_a = aten.linear(x', A_a)``;
- otherwise: ``h_a = aten.mul(aten.linear(x', A_a), g)`` with ``g`` a Python float constant
  (no buffer read; graphs from before ``lora_down`` spell the branch this way already);
- a switch left with no branch is replaced by its base output (``lora_linear``: by
  ``aten.linear(x, W, b)``).

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
from .ops import lora_down, lora_linear, lora_switch
from .result import finish
from .sites import getattr_path

__all__ = ["freeze_switches"]

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


def _constant_gate(graph: fx.Graph, h: fx.Node, value: float) -> fx.Node:
    """``h`` with its gate read replaced by the constant ``value`` (``1``: no multiply at all)."""
    if h.target is lora_down:
        x, a, _ = h.args
        with graph.inserting_before(h):
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


def freeze_switches(gm: fx.GraphModule) -> PassResult:
    """Freeze every ``lora_switch`` of ``gm`` to the current gate values (see the module doc).

    Returns:
        ``PassResult(gm, modified)``; ``modified`` is False when there was no switch.
    """
    graph = gm.graph
    modified = False
    for switch in [n for n in graph.nodes if _is_switch(n)]:
        *head, hs, bs = switch.args  # head: (base,) or, for lora_linear, (x, W, bias)
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
            frozen = _constant_gate(graph, h, value)
            dead += [h, gate] if frozen is not h else [gate]
            keep_h.append(frozen)
            keep_b.append(b)
        modified = True
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
