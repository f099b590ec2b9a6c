"""Splice: insert adapter branches and one named switch node per site.

For a site with base op ``y = base(x)`` and adapters ``a_1..a_n``, each adapter's ``emit``
(from its method rule; this pass knows no method by name) adds its nodes through a
:class:`SiteBuilder` and contributes to the site in one of four ways:

- a **low-rank term** ``(h, B)``: ``h`` is the gated down-projection (``[..., r]``), summed by
  ``lora_switch`` as ``h B^T`` (LoRA-style methods);
- a **residual** term added to the base output;
- an **input scale** or **output scale** vector with a gate, applied by ``scale_switch``.

With ``P`` the branch's module prefix and a low-rank branch that reads ``A``, ``B`` and a gate
``g`` there, the site becomes::

    x'       = scale_switch(x, (l, ...), (g, ...))      # only with input scales, feeds base and branches
    y        = base(x')                                 # unchanged node (input rewired when scaled)
    h_a      = lora_down(x', A_a, g_a)                  # the emitter's nodes: g * x A^T, [..., r]
    y'       = y + residual_1 + ...                     # only with residual terms
    y''      = lora_switch(y', (h_a1, ...), (B_a1, ...))
    <site>_switch = scale_switch(y'', (l, ...), (g, ...))   # only with output scales

The gate folds the method's scaling, the adapter's weight and on/off. The last of these nodes is
named ``<site>_switch`` (with low-rank branches only it is the ``lora_switch`` node) and every
former user of ``y`` reads it. When the base op is a plain ``aten.linear`` and there is no
residual term, ``y`` and ``y''`` are one node, ``lora_linear(x', W, b, (h_a1, ...), (B_1, ...))``,
so a GPU can fold the low-rank update into the base GEMM (:mod:`.kernels`). The composition is
fixed and order-independent: scale vectors wrap the whole adapted layer,
``y = l_out * (W' (l_in * x) + b)`` with ``W' = W + sum of the additive updates``. Switching
adapters only changes gate values (tensor state): the graph, and so ``gm.code`` and any compiled
artefact, stay as they are. Inserted nodes carry ``meta["graphlora"]`` (role, site, adapter) and
the base node's ``nn_module_stack``.

One pass, :class:`SpliceAdapters`, builds every program's form: the switch form above (each
adapter its own branch), and the serving and mixed-batch forms, where a site's banked LoRA
adapters enter as one branch reading the site's adapter bank (``graphlora.methods.lora.emit_bank``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.fx as fx

from .method_ops import scale_switch
from .ops import lora_linear, lora_switch
from .result import GraphPass
from .sites import Site

__all__ = ["BranchSpec", "Emitter", "SiteBuilder", "SpliceAdapters", "site_key"]

aten = torch.ops.aten

#: Base ops :func:`lora_linear` can take over (same argument order: x, W, bias).
_PLAIN_LINEAR = (aten.linear.default, torch.nn.functional.linear, torch._C._nn.linear)

#: Branch stages, in the order they are spliced: input scales must exist before the branches that read x.
STAGES = ("input", "additive", "output")

#: ``emit(builder, spec)``: adds one branch's nodes and contributions at a site.
Emitter = Callable[["SiteBuilder", "BranchSpec"], None]


@dataclass(frozen=True)
class BranchSpec:
    """One adapter branch at one site, as its method rule describes it.

    Attributes:
        adapter: the adapter's name.
        prefix: attribute path of the module holding the branch's parameters and gate.
        emit: ``emit(builder, spec)`` adds the branch's nodes and contributions (the method's
            emitter; the splice pass has no default).
        dropout: whether the branch applies dropout to its input (read by ``emit``).
        stage: ``"input"`` for branches that scale the site's input (they run first), else
            ``"additive"`` or ``"output"``.
        options: method-specific constants for ``emit`` (e.g. ``fan_in_fan_out``).
    """

    adapter: str
    prefix: str
    emit: Emitter
    dropout: bool = False
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
        self.updates: list[tuple[Callable, tuple]] = []
        self.output_scales: list[tuple[fx.Node, fx.Node]] = []
        self._bias: Union[fx.Node, None] = None
        self._bias_known = False  # looked up (once, on the first call of bias())

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
        if not self._bias_known:
            base, kind = self.base, self.site.input_index
            if base.op == "call_module":
                module = self.gm.get_submodule(str(base.target))
                has = getattr(module, "bias", None) is not None
                self._bias = self.get_attr(f"{base.target}.bias", f"{self.key}_base_bias", adapter) if has else None
            else:  # addmm(bias, x, W) or linear(x, W, bias=None)
                bias = base.args[0] if kind == 1 else (base.args[2] if len(base.args) > 2 else base.kwargs.get("bias"))
                self._bias = bias if isinstance(bias, fx.Node) else None
            self._bias_known = True
        return self._bias

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

    def add_update(self, fn: Callable, args: tuple, inplace: Union[Callable, None] = None) -> None:
        """``y <- fn(y, *args)``: an update that takes the output so far and returns the new one
        (the adapter banks' ``lora_bank``, which adds into ``y`` in its GEMM). ``inplace``: the
        same update writing into ``y``, used when no branch reads ``y`` (the base op's output, or
        the previous step's, which only this step reads)."""
        self.updates.append((fn, args, inplace))

    def scale_output(self, vector: fx.Node, gate: fx.Node) -> None:
        """``y <- y * (g l + 1 - g)`` after everything else."""
        self.output_scales.append((vector, gate))

    # ----------------------------------------------------------------- assembly
    def build(self, specs: Sequence[BranchSpec]) -> fx.Node:
        ordered = sorted(specs, key=lambda s: STAGES.index(s.stage))
        self._before_base = True
        for spec in ordered:
            if spec.stage == "input":
                spec.emit(self, spec)
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
                spec.emit(self, spec)
        steps: list[tuple[Callable, Callable[[fx.Node], tuple]]] = []
        for term in self.residuals:
            steps.append((aten.add.Tensor, lambda y, t=term: (y, t)))
        read_by_branch = any(user in set(self.inserted) for user in self.base.users)
        # the base output may be written in place when no branch reads it and no hook saw it (a
        # call_module base's output is what the submodule's forward hooks received)
        base_shared = read_by_branch or self.base.op == "call_module"
        for fn, extra, inplace in self.updates:
            # in place on a previous step's output (only this step reads it), or an unshared base output
            if inplace is not None and (steps or not base_shared):
                fn = inplace
            steps.append((fn, lambda y, extra=extra: (y, *extra)))
        if self.low_rank:
            hs, bs = zip(*self.low_rank)
            steps.append((lora_switch, lambda y: (y, tuple(hs), tuple(bs))))
        if self.output_scales:
            vecs, gates = zip(*self.output_scales)
            steps.append((scale_switch, lambda y: (y, tuple(vecs), tuple(gates))))
        y = self.base
        fused = bool(steps) and steps[0][0] is lora_switch and self._plain_linear() and not read_by_branch
        for i, (fn, make_args) in enumerate(steps):
            last = i == len(steps) - 1
            name = f"{self.key}_switch" if last else (
                f"{self.key}_lora_switch" if fn is lora_switch else
                f"{self.key}_residual{i}" if fn is aten.add.Tensor else f"{self.key}_{fn.__name__}{i}")
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


class SpliceAdapters(GraphPass):
    """Insert ``specs[site.name]`` around each site's base op, behind one switch node.

    Sites without branches are left untouched; ``modified`` is False when no site has any.

    Args:
        sites: the located sites (:func:`~graphlora.passes.sites.locate_sites`).
        specs: per site name, its branches (any order: the composition is fixed).
    """

    def __init__(self, sites: Sequence[Site], specs: Mapping[str, Sequence[BranchSpec]]) -> None:
        self.sites, self.specs = tuple(sites), specs

    def rewrite(self, gm: fx.GraphModule) -> bool:
        nodes = {n.name: n for n in gm.graph.nodes}
        modified = False
        for site in self.sites:
            branches = self.specs.get(site.name, ())
            if not branches:
                continue
            SiteBuilder(gm, site, nodes[site.node]).build(branches)
            modified = True
        return modified
