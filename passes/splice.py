"""Splice: insert adapter branches and one named switch node per site.

For a site with base op ``y = base(x)`` and adapters ``a_1..a_n`` (each with a module
prefix ``P`` holding ``lora_A``, ``lora_B``, ``gate`` and optionally ``lora_dropout``), the
pass rewrites the graph to::

    y        = base(x)                                  # unchanged node
    h_a      = aten.linear(P.lora_dropout(x), P.lora_A.weight)   # [..., r]
    h_a      = aten.mul(h_a, P.gate)                    # gate folds alpha/r, weight, on/off
    <site>_switch = lora_switch(y, (h_a1, ...), (P1.lora_B.weight, ...))

and reroutes every former user of ``y`` to ``<site>_switch``. Switching adapters only changes
``gate`` values (tensor state): the graph, and so ``gm.code`` and any compiled artefact,
stay as they are. Inserted nodes carry ``meta["graphlora"]`` (role, site, adapter) and the base
node's ``nn_module_stack``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .ops import lora_mixed, lora_switch
from .sites import Site

__all__ = ["BranchSpec", "splice_adapters", "splice_mixed", "site_key"]

aten = torch.ops.aten


@dataclass(frozen=True)
class BranchSpec:
    """One adapter branch at one site.

    Attributes:
        adapter: the adapter's name.
        prefix: attribute path of the module holding ``lora_A``, ``lora_B``, ``gate``.
        dropout: whether ``prefix.lora_dropout`` must be called on the input.
    """

    adapter: str
    prefix: str
    dropout: bool = False


def site_key(name: str) -> str:
    """A site's name as an identifier (``model.layers.0.q_proj`` -> ``model_layers_0_q_proj``)."""
    return name.replace(".", "_")


def _meta(base: fx.Node, role: str, site: str, adapter: str | None = None) -> dict:
    meta = {"graphlora": {"role": role, "site": site, "adapter": adapter}}
    if "nn_module_stack" in base.meta:
        meta["nn_module_stack"] = base.meta["nn_module_stack"]
    return meta


def splice_adapters(
    gm: fx.GraphModule, sites: Sequence[Site], branches: Mapping[str, Sequence[BranchSpec]]
) -> PassResult:
    """Insert ``branches[site.name]`` after each site's base op, behind one switch node.

    Sites without branches are left untouched. The graph is linted and recompiled.
    """
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    modified = False
    for site in sites:
        specs = branches.get(site.name, ())
        if not specs:
            continue
        base = nodes[site.node]
        x = base.args[0] if site.input_index < 0 else base.args[site.input_index]
        key = site_key(site.name)
        cursor = base
        hs, bs = [], []

        def emit(op: str, target, args, name: str, meta: dict) -> fx.Node:
            nonlocal cursor
            with graph.inserting_after(cursor):
                node = graph.create_node(op, target, args, {}, name=name)
            node.meta.update(meta)
            cursor = node
            return node

        for spec in specs:
            meta = _meta(base, "adapter", site.name, spec.adapter)
            tag = f"{key}_{spec.adapter}"
            xin = x
            if spec.dropout:
                xin = emit("call_module", f"{spec.prefix}.lora_dropout", (x,), f"{tag}_lora_dropout", meta)
            a = emit("get_attr", f"{spec.prefix}.lora_A.weight", (), f"{tag}_lora_A_weight", meta)
            h = emit("call_function", aten.linear.default, (xin, a), f"{tag}_lora_A", meta)
            gate = emit("get_attr", f"{spec.prefix}.gate", (), f"{tag}_gate", meta)
            h = emit("call_function", aten.mul.Tensor, (h, gate), f"{tag}_gated", meta)
            b = emit("get_attr", f"{spec.prefix}.lora_B.weight", (), f"{tag}_lora_B_weight", meta)
            hs.append(h)
            bs.append(b)
        switch = emit("call_function", lora_switch, (base, tuple(hs), tuple(bs)), f"{key}_switch",
                      _meta(base, "switch", site.name))
        if "val" in base.meta:
            switch.meta["val"] = base.meta["val"]
        base.replace_all_uses_with(switch, delete_user_cb=lambda user: user is not switch)
        modified = True
    if modified:
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified)


def splice_mixed(
    gm: fx.GraphModule, sites: Sequence[Site], branches: Mapping[str, Sequence[BranchSpec | None]], index: str
) -> PassResult:
    """Mixed-adapter-batch form: one ``lora_mixed`` switch per site, rows routed by ``index``.

    ``index`` is the attribute path of a ``[batch]`` int64 buffer of adapter slots; slot ``i``
    is the ``i``-th entry of ``branches[site]`` (every site lists the adapters in the same order,
    ``None`` where an adapter has no branch: its rows get no contribution there). Inference only:
    adapter dropout is not applied.
    """
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    modified = False
    for site in sites:
        specs = branches.get(site.name, ())
        if not any(specs):
            continue
        base = nodes[site.node]
        x = base.args[0] if site.input_index < 0 else base.args[site.input_index]
        key = site_key(site.name)
        meta = _meta(base, "switch", site.name)
        with graph.inserting_after(base):
            idx = graph.create_node("get_attr", index, (), {}, name=f"{key}_row_index")
        cursor, a_nodes, b_nodes, s_nodes = idx, [], [], []
        for spec in specs:
            if spec is None:  # this adapter has no branch here: its slot contributes zero
                for bucket in (a_nodes, b_nodes, s_nodes):
                    bucket.append(None)
                continue
            for target, bucket, suffix in ((f"{spec.prefix}.lora_A.weight", a_nodes, "lora_A_weight"),
                                           (f"{spec.prefix}.lora_B.weight", b_nodes, "lora_B_weight"),
                                           (f"{spec.prefix}.scale", s_nodes, "scale")):
                with graph.inserting_after(cursor):
                    cursor = graph.create_node("get_attr", target, (), {}, name=f"{key}_{spec.adapter}_{suffix}")
                cursor.meta.update(_meta(base, "adapter", site.name, spec.adapter))
                bucket.append(cursor)
        with graph.inserting_after(cursor):
            switch = graph.create_node(
                "call_function", lora_mixed, (base, x, idx, tuple(a_nodes), tuple(b_nodes), tuple(s_nodes)), {},
                name=f"{key}_switch",
            )
        switch.meta.update(meta)
        if "val" in base.meta:
            switch.meta["val"] = base.meta["val"]
        base.replace_all_uses_with(switch, delete_user_cb=lambda user: user is not switch)
        modified = True
    if modified:
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
