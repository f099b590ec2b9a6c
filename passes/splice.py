"""Splice: insert adapter branches and one named switch node per site.

For a site with base op ``y = base(x)`` and adapters ``a_1..a_n``, each adapter contributes to
the site through a :class:`SiteBuilder`, in one of four ways (an adapter method picks its own;
this pass knows none of them by name):

- a **low-rank term** ``(h, B)`` (LoRA, DoRA): ``h = gate * A dropout(x)``, summed by
  ``lora_switch`` as ``h B^T``;
- a **residual** term added to the base output (DoRA's magnitude rescaling);
- an **input scale** or **output scale** vector with a gate (IA3), applied by ``scale_switch``.

The default contribution (a :class:`BranchSpec` without ``emit``) is the low-rank LoRA branch
read from a module prefix ``P`` holding ``lora_A``, ``lora_B``, ``gate`` and optionally
``lora_dropout``::

    x'       = scale_switch(x, (l, ...), (g, ...))      # only with input scales, feeds base and branches
    y        = base(x')                                 # unchanged node (input rewired when scaled)
    h_a      = lora_down(P.lora_dropout(x'), P.lora_A.weight, P.gate)   # gate * x A^T, [..., r]
    y'       = y + residual_1 + ...                     # only with residual terms
    y''      = lora_switch(y', (h_a1, ...), (P1.lora_B.weight, ...))
    <site>_switch = scale_switch(y'', (l, ...), (g, ...))   # only with output scales

The gate folds ``alpha / r``, the adapter's weight and on/off. The last of these nodes is named
``<site>_switch`` (with LoRA branches only it is the ``lora_switch`` node) and every former user
of ``y`` reads it. When the base op is a plain ``aten.linear`` and there is no residual term,
``y`` and ``y''`` are one node, ``lora_linear(x', W, b, (h_a1, ...), (B_1, ...))``, so a GPU can
fold the adapter update into the base GEMM (:mod:`.kernels`). The composition is fixed and
order-independent: scale vectors wrap the whole adapted layer, ``y = l_out * (W' (l_in * x) + b)``
with ``W' = W + sum of the additive updates``. Switching adapters only changes gate values
(tensor state): the graph, and so ``gm.code`` and any compiled artefact, stay as they are.
Inserted nodes carry ``meta["graphlora"]`` (role, site, adapter) and the base node's
``nn_module_stack``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .method_ops import scale_switch
from .ops import lora_down, lora_linear, lora_mixed, lora_switch
from .result import finish
from .sites import Site

__all__ = ["BranchSpec", "SiteBuilder", "splice_adapters", "splice_mixed", "site_key", "emit_low_rank"]

aten = torch.ops.aten

#: Base ops :func:`lora_linear` can take over (same argument order: x, W, bias).
_PLAIN_LINEAR = (aten.linear.default, torch.nn.functional.linear, torch._C._nn.linear)

#: Branch stages, in the order they are spliced: input scales must exist before the branches that read x.
STAGES = ("input", "additive", "output")

@dataclass(frozen=True)
class BranchSpec:
    """One adapter branch at one site.

    Attributes:
        adapter: the adapter's name.
        prefix: attribute path of the module holding the branch's parameters and gate.
        dropout: whether ``prefix.lora_dropout`` must be called on the input.
        emit: ``emit(builder, spec)`` adds the branch's nodes and contributions; ``None`` is the
            low-rank LoRA branch (:func:`emit_low_rank`).
        stage: ``"input"`` for branches that scale the site's input (they run first), else
            ``"additive"`` or ``"output"``.
        options: method-specific constants for ``emit`` (e.g. ``fan_in_fan_out``).
    """

    adapter: str
    prefix: str
    dropout: bool = False
    emit: Union[Callable[["SiteBuilder", "BranchSpec"], None], None] = None
    stage: str = "additive"
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)


def site_key(name: str) -> str:
    """A site's name as an identifier (``model.layers.0.q_proj`` -> ``model_layers_0_q_proj``)."""
    return name.replace(".", "_")


def _meta(base: fx.Node, role: str, site: str, adapter: str | None = None) -> dict:
    meta = {"graphlora": {"role": role, "site": site, "adapter": adapter}}
    if "nn_module_stack" in base.meta:
        meta["nn_module_stack"] = base.meta["nn_module_stack"]
    return meta


class SiteBuilder:
    """Builds one site's adapter subgraph; adapter methods call it from their ``emit``.

    Attributes:
        site: the :class:`Site` record; ``base``: its base op node; ``key``: its identifier;
        ``x``: the input the branches should read (the scaled input once input scales exist).
    """

    def __init__(self, gm: fx.GraphModule, site: Site, base: fx.Node) -> None:
        self.gm, self.graph, self.site, self.base = gm, gm.graph, site, base
        self.key = site_key(site.name)
        self.x: fx.Node = base.args[0] if site.input_index < 0 else base.args[site.input_index]
        self._cursor = base
        self._before_base = False
        self.inserted: list[fx.Node] = []
        self.input_scales: list[tuple[fx.Node, fx.Node]] = []
        self.low_rank: list[tuple[fx.Node, fx.Node]] = []
        self.residuals: list[fx.Node] = []
        self.output_scales: list[tuple[fx.Node, fx.Node]] = []
        self._bias: Union[fx.Node, None, bool] = False  # False: not looked up yet

    # ----------------------------------------------------------------- node creation
    def node(self, op: str, target: Any, args: tuple, name: str, adapter: Union[str, None] = None,
             role: str = "adapter") -> fx.Node:
        """Insert a node (before the base op during the input stage, else after the last one)."""
        ctx = self.graph.inserting_before(self.base) if self._before_base else self.graph.inserting_after(self._cursor)
        with ctx:
            node = self.graph.create_node(op, target, args, {}, name=name)
        node.meta.update(_meta(self.base, role, self.site.name, adapter))
        if not self._before_base:
            self._cursor = node
        self.inserted.append(node)
        return node

    def get_attr(self, target: str, name: str, adapter: Union[str, None] = None) -> fx.Node:
        return self.node("get_attr", target, (), name, adapter)

    def call(self, fn: Callable, args: tuple, name: str, adapter: Union[str, None] = None) -> fx.Node:
        return self.node("call_function", fn, args, name, adapter)

    def weight(self, adapter: Union[str, None] = None) -> fx.Node:
        """A ``get_attr`` of the site's base weight."""
        return self.get_attr(self.site.weight, f"{self.key}_{adapter}_base_weight", adapter)

    def bias(self, adapter: Union[str, None] = None) -> Union[fx.Node, None]:
        """The base op's bias node (``None`` when it has none)."""
        if self._bias is False:
            base, kind = self.base, self.site.input_index
            if base.op == "call_module":
                module = self.gm.get_submodule(base.target)
                has = getattr(module, "bias", None) is not None
                self._bias = self.get_attr(f"{base.target}.bias", f"{self.key}_base_bias", adapter) if has else None
            elif kind == 1:  # addmm(bias, x, W)
                self._bias = base.args[0]
            else:  # linear(x, W, bias=None)
                bias = base.args[2] if len(base.args) > 2 else base.kwargs.get("bias")
                self._bias = bias if isinstance(bias, fx.Node) else None
        return self._bias  # type: ignore[return-value]

    # ----------------------------------------------------------------- contributions
    def scale_input(self, vector: fx.Node, gate: fx.Node) -> None:
        """``x <- x * (g l + 1 - g)`` before the base op and every additive branch."""
        if not self._before_base:
            raise RuntimeError("scale_input is only allowed from an 'input' stage branch")
        self.input_scales.append((vector, gate))

    def add_low_rank(self, h: fx.Node, b: fx.Node) -> None:
        """``y += h B^T`` (``h`` already gated)."""
        self.low_rank.append((h, b))

    def add_residual(self, term: fx.Node) -> None:
        """``y += term`` (a ``[..., out]`` tensor computed from the base output)."""
        self.residuals.append(term)

    def scale_output(self, vector: fx.Node, gate: fx.Node) -> None:
        """``y <- y * (g l + 1 - g)`` after everything else."""
        self.output_scales.append((vector, gate))

    # ----------------------------------------------------------------- assembly
    def build(self, specs: Sequence[BranchSpec]) -> fx.Node:
        ordered = sorted(specs, key=lambda s: STAGES.index(s.stage))
        self._before_base = True
        for spec in ordered:
            if spec.stage == "input":
                (spec.emit or emit_low_rank)(self, spec)
        if self.input_scales:
            vecs, gates = zip(*self.input_scales)
            xs = self.node("call_function", scale_switch, (self.x, tuple(vecs), tuple(gates)),
                           f"{self.key}_input_switch", role="switch")
            args = list(self.base.args)
            args[0 if self.site.input_index < 0 else self.site.input_index] = xs
            self.base.args = tuple(args)
            self.x = xs
        self._before_base = False
        for spec in ordered:
            if spec.stage != "input":
                (spec.emit or emit_low_rank)(self, spec)
        steps: list[tuple[Callable, Callable[[fx.Node], tuple]]] = []
        for term in self.residuals:
            steps.append((aten.add.Tensor, lambda y, t=term: (y, t)))
        if self.low_rank:
            hs, bs = zip(*self.low_rank)
            steps.append((lora_switch, lambda y: (y, tuple(hs), tuple(bs))))
        if self.output_scales:
            vecs, gates = zip(*self.output_scales)
            steps.append((scale_switch, lambda y: (y, tuple(vecs), tuple(gates))))
        y = self.base
        branches = set(self.inserted)
        fused = (bool(steps) and steps[0][0] is lora_switch and self._plain_linear()
                 and not any(user in branches for user in self.base.users))  # a branch reads the base output
        for i, (fn, make_args) in enumerate(steps):
            last = i == len(steps) - 1
            name = f"{self.key}_switch" if last else (
                f"{self.key}_lora_switch" if fn is lora_switch else f"{self.key}_residual{i}")
            args = make_args(y)
            if fused and i == 0:  # base op and low-rank terms as one node
                fn, args = lora_linear, (*self._linear_args(), *args[1:])
            y = self.node("call_function", fn, args, name, role="switch")
            if "val" in self.base.meta:
                y.meta["val"] = self.base.meta["val"]
        if y is not self.base:
            inserted = set(self.inserted)  # branches and the switch nodes just made keep reading the base
            self.base.replace_all_uses_with(y, delete_user_cb=lambda user: user not in inserted)
            if fused:
                self.graph.erase_node(self.base)
        return y

    def _plain_linear(self) -> bool:
        """Whether the base op is ``linear(x, W[, b])`` (aten's or ``F.linear``), positional args only."""
        base = self.base
        return (base.op == "call_function" and base.target in _PLAIN_LINEAR and not base.kwargs
                and self.site.input_index == 0 and not self.site.fan_in_fan_out and 2 <= len(base.args) <= 3)

    def _linear_args(self) -> tuple:
        x, w, *rest = self.base.args
        return x, w, rest[0] if rest else None


def emit_low_rank(builder: SiteBuilder, spec: BranchSpec) -> fx.Node:
    """The LoRA branch: ``h = lora_down(dropout(x), A, gate)``, contributed as ``(h, B)``; returns ``h``."""
    tag = f"{builder.key}_{spec.adapter}"
    xin = builder.x
    if spec.dropout:
        xin = builder.node("call_module", f"{spec.prefix}.lora_dropout", (xin,), f"{tag}_lora_dropout", spec.adapter)
    a = builder.get_attr(f"{spec.prefix}.lora_A.weight", f"{tag}_lora_A_weight", spec.adapter)
    gate = builder.get_attr(f"{spec.prefix}.gate", f"{tag}_gate", spec.adapter)
    h = builder.call(lora_down, (xin, a, gate), f"{tag}_lora_A", spec.adapter)
    b = builder.get_attr(f"{spec.prefix}.lora_B.weight", f"{tag}_lora_B_weight", spec.adapter)
    builder.add_low_rank(h, b)
    return h


def splice_adapters(
    gm: fx.GraphModule, sites: Sequence[Site], branches: Mapping[str, Sequence[BranchSpec]]
) -> PassResult:
    """Insert ``branches[site.name]`` around each site's base op, behind one switch node.

    Sites without branches are left untouched. The graph is linted and recompiled.
    """
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    modified = False
    for site in sites:
        specs = branches.get(site.name, ())
        if not specs:
            continue
        SiteBuilder(gm, site, nodes[site.node]).build(specs)
        modified = True
    return finish(gm, modified)


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
    return finish(gm, modified)
