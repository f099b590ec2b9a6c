"""Parameter switch: route every read of a parameter through a node that picks one of its copies.

PEFT's ``modules_to_save`` keeps, per adapter, a trainable copy of a whole module (a
classification head, say) and runs the active adapter's copy instead of the original. In a flat
exported graph a module call is inlined: its parameters are read by ``get_attr`` nodes. So the
rewrite is per parameter ``p`` with copies ``c_1..c_n`` and a 0-dim integer buffer ``k``::

    p' = param_select(k, p, (c_1, ..., c_n)) = p   if k == 0
                                               c_i if k == i

and every former user of ``p`` reads ``p'``. The choice is exact (``torch.where`` on ``k == i``,
never ``p + g (c - p)``): the selected tensor's values pass through bit for bit, gradients reach
only the selected tensor, and switching is a write into ``k`` (no re-trace, no recompilation,
CUDA-graph safe). The switch node is named ``<parameter path>_switch`` (``classifier_weight_switch``)
and carries ``meta["graphlora"] = {"role": "param_switch", "module": ..., "adapters": ...}``.

PEFT's ``trainable_token_indices`` uses the same switch with row deltas (:func:`rows_select`,
``SwitchedParam.rows``): copy ``i`` is ``p.index_copy(0, t_i, delta_i)``, built in the graph.

A module that the graph *calls* (a ``call_module`` node: ``nn.Linear`` in a ``symbolic_trace``
graph) has no ``get_attr`` to rewire; the pass refuses it (``ValueError`` naming the module).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from .result import GraphPass

__all__ = ["SwitchedParam", "SwitchParameters", "param_select", "rows_select"]


def param_select(index: torch.Tensor, base: torch.Tensor, copies: Sequence[torch.Tensor]) -> torch.Tensor:
    """``base`` when ``index == 0``, ``copies[i - 1]`` when ``index == i`` (exact selection)."""
    out = base
    for i, copy in enumerate(copies, start=1):
        out = torch.where(index == i, copy, out)
    return out


def rows_select(index: torch.Tensor, base: torch.Tensor, rows: Sequence[torch.Tensor],
                deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Trainable rows (PEFT's ``trainable_token_indices``): ``base`` when ``index == 0``, else
    ``base.index_copy(0, rows[i - 1], deltas[i - 1])`` (the rows replaced) when ``index == i``.
    Exact, like :func:`param_select`; a delta's gradient is the selected rows' gradient, 0 unless selected."""
    out = base
    for i, (row, delta) in enumerate(zip(rows, deltas), start=1):
        out = torch.where(index == i, base.index_copy(0, row, delta.to(base.dtype)), out)
    return out


@dataclass(frozen=True)
class SwitchedParam:
    """One parameter (or buffer) to switch.

    Attributes:
        module: the path of the module it belongs to (for messages and metadata).
        target: its ``get_attr`` target in the graph (``classifier.weight``).
        copies: the ``get_attr`` targets of its copies, in slot order (slot ``i`` is ``copies[i - 1]``).
        index: the ``get_attr`` target of the 0-dim integer slot buffer.
        adapters: the adapter owning each copy (metadata only).
        rows: when set, the copies are row deltas: the ``get_attr`` targets of each copy's row
            indices (a 1-D long buffer), and the switch is :func:`rows_select`.
    """

    module: str
    target: str
    copies: tuple[str, ...]
    index: str
    adapters: tuple[str, ...] = ()
    rows: tuple[str, ...] = ()


class SwitchParameters(GraphPass):
    """Rewire each read of the listed parameters through a :func:`param_select` node.

    Args:
        params: the parameters to switch (one :class:`SwitchedParam` each).

    Raises:
        ValueError: a listed module is called as a module (``call_module``) in the graph.
    """

    def __init__(self, params: Sequence[SwitchedParam]) -> None:
        super().__init__()
        self.params = tuple(params)

    def rewrite(self, gm: fx.GraphModule) -> bool:
        if not self.params:
            return False
        graph = gm.graph
        modules = {p.module for p in self.params}
        for node in graph.nodes:
            if node.op == "call_module" and any(node.target == m or node.target.startswith(m + ".") for m in modules):
                raise ValueError(
                    f"modules_to_save: module {node.target!r} is called as a module in this graph (a call_module "
                    "node, as symbolic_trace leaves nn.Linear); graphlora switches the parameters of exported "
                    "graphs only. Use the export frontend (transformers models use it) or leave it out of "
                    "modules_to_save."
                )
        by_target = {p.target: p for p in self.params}
        reads = [n for n in graph.nodes if n.op == "get_attr" and n.target in by_target]
        for node in reads:
            spec = by_target[node.target]
            with graph.inserting_after(node):
                index = graph.get_attr(spec.index)
            with graph.inserting_after(index):
                copies = []
                last = index
                for target in spec.copies:
                    with graph.inserting_after(last):
                        last = graph.get_attr(target)
                    copies.append(last)
            rows = []
            for target in spec.rows:
                with graph.inserting_after(last):
                    last = graph.get_attr(target)
                rows.append(last)
            with graph.inserting_after(last):
                if spec.rows:
                    switch = graph.create_node("call_function", rows_select, (index, node, tuple(rows), tuple(copies)),
                                               name=f"{node.target.replace('.', '_')}_switch")
                else:
                    switch = graph.create_node("call_function", param_select, (index, node, tuple(copies)),
                                               name=f"{node.target.replace('.', '_')}_switch")
            for inserted in (index, *copies, *rows, switch):
                inserted.meta["graphlora"] = {"role": "param_switch", "module": spec.module,
                                              "adapters": spec.adapters}
            if "val" in node.meta:
                switch.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(switch, delete_user_cb=lambda user: user is not switch)
        return bool(reads)
