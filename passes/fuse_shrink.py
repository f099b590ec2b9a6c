r"""Fuse sibling down-projections: low-rank branches that read one input share one GEMM.

After the splice (:mod:`.splice`) every low-rank branch has its own gated down-projection
``h_i = lora_down(x_i, A_i, g_i) = g_i * x_i A_i^T``. In a transformer block several sites read
the same tensor (``q_proj`` / ``k_proj`` / ``v_proj`` the normed hidden state, ``gate_proj`` /
``up_proj`` the next one), and without adapter dropout their branches read exactly that node, so
``x`` is read ``n`` times for ``n`` GEMMs of width ``r``, and in the backward the ``n`` input
gradients ``dh_i A_i`` are ``n`` GEMMs over ``[tokens, d_in]`` and ``n - 1`` adds. This pass
rewrites every group of two or more ``lora_down`` nodes of one adapter that read the same node
``x``, whose ``A_i`` are ``get_attr`` reads of one dtype, device and ``d_in``::

    p   = lora_shrink(x, (A_1, ..., A_n))            # x [A_1; ...; A_n]^T, one GEMM, [..., sum r_i]
    s   = split_with_sizes(p, [r_1, ..., r_n], -1)
    h_i = mul(s[i], g_i)                             # the former lora_down node, same name and users

Per branch it is the same function: ``s[i] = x A_i^T`` exactly (a column block of one GEMM), and
``h_i`` is gated as before. Gradients are those of the unfused graph: ``torch.cat`` of the
parameters (made on every call, ``r x d_in`` each) slices ``dA`` back to each ``A_i``, and ``dx``
is ``dp [A_1; ...; A_n]``, one GEMM of inner size ``sum r_i`` (summed in another order than ``n``
GEMMs and adds, so equal up to rounding).

**In-place writes.** A group is fused only when nothing between its first and last member may
write a tensor in place (an fx-traced model's ``h.mul_(2)`` between ``q`` and ``k`` would change
what ``k`` reads); export graphs are functional.

**Dropout.** A branch with adapter dropout reads its own ``dropout(x)`` node, so it is never in a
group: PEFT draws one mask per site, and fusing would share one. Sites of different ranks are
fused alike (the split sizes follow the ranks; no padding). Each adapter has its own groups, so
every inserted node belongs to one adapter (``meta["graphlora"]["adapter"]``, which the
visualization reads); the first site names the group, ``meta["graphlora"]["sites"]`` lists all.

**Specialize.** ``h_i = mul(s[i], g_i)`` is the gated form that
:class:`~graphlora.passes.specialize.FreezeSwitches` recognises: a zero gate drops the branch
(its ``getitem`` goes with it) and other gates become constants. :func:`freeze_shrink`, the step
for ``lora_shrink`` nodes, then drops the ``A_i`` whose slice nobody reads any more.

The pass knows no adapter method: it recognises ``lora_down`` by its target.

**Serving programs.** :class:`FuseBankShrink` does the same for the adapter banks' updates
``y_i = lora_bank(base_i, x, \hat A_i, \hat B_i)`` (:mod:`graphlora.banks`): sites reading one ``x``
share one :func:`~.ops.bank_shrink` GEMM on their stacked gathered factors (one buffer the bank set
keeps, written when the factors are gathered, so no concatenation per call), then each site's
column block goes through its own expand ``base_i + h_i \hat B_i^\top``::

    p   = bank_shrink(x, [\hat A_1; ...; \hat A_n])  # one cast of x, one GEMM
    s   = chunk(p, n, -1)                          # n blocks of K R columns
    y_i = lora_expand_(base_i, s[i], \hat B_i)        # or lora_expand where base_i is shared

The same function per site (``s[i] = x \hat A_i^\top``, a column block of one GEMM); a
transformer block's seven sites then run five shrinks instead of seven (with float32 adapters
over a bf16 base, five casts of ``x`` instead of seven).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .ops import bank_shrink, lora_bank, lora_bank_, lora_down, lora_expand, lora_expand_, lora_shrink
from .result import GraphPass
from .sites import getattr_path
from .specialize import GateReader

__all__ = ["FuseShrink", "FuseBankShrink", "freeze_shrink", "ENABLED"]

aten = torch.ops.aten

#: Run the pass in the training (``SWITCH``) programs; benchmarks flip it before ``inject`` to compare.
ENABLED = True


def _tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The 2-D tensor a ``get_attr`` node reads, else ``None``."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        value = getattr_path(gm, str(node.target))
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) and value.dim() == 2 else None


#: the adapter ops that write in place, and what: only their first argument (a site's base
#: output), never a shrink's input
_OWN_INPLACE = {lora_bank_, lora_expand_}


def _may_mutate(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` may write a tensor in place (conservatively): an in-place method or
    function (``mul_``, ``setitem``, ``inplace=True``, ``out=``), a mutable aten overload, or a
    leaf module that is not one of torch's own or says ``inplace``. Export graphs are functional
    (none of these); an fx graph keeps the model's in-place ops."""
    if node.op == "call_method":
        return str(node.target).endswith("_") or node.target == "__setitem__"
    if node.op == "call_function":
        target = node.target
        if target in _OWN_INPLACE:
            return False
        if target is operator.setitem or "out" in node.kwargs or node.kwargs.get("inplace"):
            return True
        schema = getattr(target, "_schema", None)
        if schema is not None:
            return bool(schema.is_mutable)
        name = getattr(target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return bool(getattr(module, "inplace", False)) or not type(module).__module__.startswith("torch.nn")
    return False


class _Order:
    """The graph's nodes in order, listed once per pass (a group asks about the nodes between its members)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm, self.nodes = gm, list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}

    def fusable(self, members: list[fx.Node]) -> bool:
        """Whether ``members`` (graph order) can read their input once, at the first of them:
        nothing between the first and the last may write a tensor in place (it could be the input
        or a view of it, which the later members would then read changed)."""
        inside = set(members)
        between = self.nodes[self.index[members[0]] + 1:self.index[members[-1]]]
        return not any(_may_mutate(self.gm, n) for n in between if n not in inside)


def _groups(gm: fx.GraphModule) -> list[list[tuple[fx.Node, torch.Tensor]]]:
    """``lora_down`` nodes (with their ``A``) grouped by input node, adapter, ``A``'s dtype, device and width."""
    groups: dict[tuple, list[tuple[fx.Node, torch.Tensor]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not lora_down or len(node.args) != 3 or node.kwargs:
            continue
        x, a, _ = node.args
        mat = _tensor(gm, a)
        if not isinstance(x, fx.Node) or mat is None:
            continue
        adapter = (node.meta.get("graphlora") or {}).get("adapter")
        groups.setdefault((x, adapter, mat.dtype, mat.device, mat.shape[1]), []).append((node, mat))
    order = _Order(gm)
    return [g for g in groups.values() if len(g) > 1 and order.fusable([d for d, _ in g])]


def _meta(first: fx.Node, downs: list[fx.Node]) -> dict:
    """The new nodes' metadata: the first branch's tag and module stack, with every site in ``sites``."""
    tags = [d.meta.get("graphlora") or {} for d in downs]
    meta: dict[str, Any] = {"graphlora": {
        "role": "adapter", "site": tags[0].get("site"), "adapter": tags[0].get("adapter"),
        "sites": tuple(dict.fromkeys(t.get("site") for t in tags)),
    }}
    if "nn_module_stack" in first.meta:
        meta["nn_module_stack"] = first.meta["nn_module_stack"]
    return meta


def _tag(down: fx.Node) -> str:
    """``<site>_<adapter>`` from a branch's ``<site>_<adapter>_lora_A`` node name (the name itself otherwise)."""
    return down.name[: -len("_lora_A")] if down.name.endswith("_lora_A") else down.name


def _fuse(graph: fx.Graph, group: list[tuple[fx.Node, torch.Tensor]]) -> None:
    downs = [d for d, _ in group]  # graph order
    first = downs[0]
    x = first.args[0]
    mats = [d.args[1] for d in downs]
    for a in mats:  # get_attr reads have no inputs: moving them earlier is always valid
        first.prepend(a)
    meta = _meta(first, downs)
    tag = _tag(first)
    with graph.inserting_before(first):
        shrink = graph.create_node("call_function", lora_shrink, (x, tuple(mats)), {}, name=f"{tag}_lora_shrink")
        sizes = [int(m.shape[0]) for _, m in group]
        split = graph.create_node("call_function", aten.split_with_sizes.default, (shrink, sizes, -1), {},
                                  name=f"{tag}_lora_split")
        items = [graph.create_node("call_function", operator.getitem, (split, i), {}, name=f"{_tag(d)}_lora_slice")
                 for i, d in enumerate(downs)]
    for n in (shrink, split, *items):
        n.meta.update(meta)
    for down, item in zip(downs, items):  # the lora_down node becomes the gate multiply, in place
        down.target = aten.mul.Tensor
        down.args = (item, down.args[2])


class FuseShrink(GraphPass):
    """One ``lora_shrink`` GEMM per group of ``lora_down`` nodes reading one input (module doc).

    ``modified`` is False when no two branches read the same input (adapter dropout everywhere,
    or one adapted site per input).
    """

    def rewrite(self, gm: fx.GraphModule) -> bool:
        groups = _groups(gm)
        for group in groups:
            _fuse(gm.graph, group)
        return bool(groups)


def freeze_shrink(gm: fx.GraphModule, node: fx.Node, read: GateReader) -> list[fx.Node]:
    """The specialize step for ``lora_shrink(x, (A_1, ..., A_n))`` (a :data:`FreezeStep`).

    Runs after the switches are frozen: the slices whose branch had a zero gate are gone. The
    ``A_i`` nobody reads any more leave the concatenation (and the split's sizes); the remaining
    ``getitem`` indices are renumbered. Returns the dropped ``get_attr`` nodes (empty when every
    slice is still read).
    """
    x, mats = node.args
    splits = [u for u in node.users if u.target is aten.split_with_sizes.default]
    if len(splits) != 1 or len(node.users) != 1:
        return []
    (split,) = splits
    items = {int(u.args[1]): u for u in split.users if u.target is operator.getitem}
    if len(items) != len(split.users):
        return []
    keep = sorted(items)
    if len(keep) == len(mats):
        return []
    sizes = split.args[1]
    node.args = (x, tuple(mats[i] for i in keep))
    split.args = (node, [sizes[i] for i in keep], *split.args[2:])
    for new, old in enumerate(keep):
        items[old].args = (split, new)
    return [m for i, m in enumerate(mats) if i not in items]


# ---------------------------------------------------------------------------- serving programs
_BANK_UPDATES = {lora_bank: lora_expand, lora_bank_: lora_expand_}


class FuseBankShrink(GraphPass):
    r"""One :func:`~.ops.bank_shrink` GEMM per group of bank updates reading one input (module doc).

    Args:
        stack: given the ``get_attr`` targets of a group's gathered ``\hat A`` (graph order), the
            ``get_attr`` target of one buffer holding them stacked by rows, kept current by its
            owner (:meth:`graphlora.banks.BankSet.stack`); ``None`` leaves the group unfused.

    ``modified`` is False when no two bank updates read the same input.
    """

    def __init__(self, stack: Any) -> None:
        self.stack = stack

    def rewrite(self, gm: fx.GraphModule) -> bool:
        groups: dict[tuple, list[tuple[fx.Node, torch.Tensor]]] = {}
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in _BANK_UPDATES or len(node.args) != 4 or node.kwargs:
                continue
            _, x, a, _ = node.args
            mat = _tensor(gm, a)
            if isinstance(x, fx.Node) and mat is not None:
                groups.setdefault((x, mat.dtype, mat.device, tuple(mat.shape)), []).append((node, mat))
        modified = False
        order = _Order(gm)  # taken before any rewrite: a fused group inserts nodes only before its own first member
        for group in groups.values():
            if len(group) > 1 and order.fusable([u for u, _ in group]):
                modified |= self._fuse(gm, group)
        return modified

    def _fuse(self, gm: fx.GraphModule, group: list[tuple[fx.Node, torch.Tensor]]) -> bool:
        updates = [u for u, _ in group]
        target = self.stack(tuple(str(u.args[2].target) for u in updates))
        if target is None:
            return False
        graph, first = gm.graph, updates[0]
        x = first.args[1]
        a_name = first.args[2].name  # the splice names it ``<site key>_bank_a_hat``
        tag = a_name[: -len("_bank_a_hat")] if a_name.endswith("_bank_a_hat") else first.name
        meta = {k: first.meta[k] for k in ("nn_module_stack",) if k in first.meta}
        with graph.inserting_before(first):
            stacked = graph.create_node("get_attr", target, (), {}, name=f"{tag}_bank_a_stack")
            shrink = graph.create_node("call_function", bank_shrink, (x, stacked), {}, name=f"{tag}_bank_shrink")
            # equal blocks, by count not size: the factors' width K R may grow without a re-splice
            split = graph.create_node("call_function", aten.chunk.default, (shrink, len(updates), -1), {},
                                      name=f"{tag}_bank_split")
            items = [graph.create_node("call_function", operator.getitem, (split, i), {}, name=f"{tag}_bank_h{i}")
                     for i in range(len(updates))]
        sites = tuple((u.meta.get("graphlora") or {}).get("site") for u in updates)
        for n in (stacked, shrink, split, *items):
            n.meta.update(meta)
            n.meta["graphlora"] = {"role": "adapter", "site": sites[0], "adapter": "bank", "sites": sites}
        for update, item in zip(updates, items):
            base, _, a, b = update.args
            update.target = _BANK_UPDATES[update.target]
            update.args = (base, item, b)
            if not a.users:
                graph.erase_node(a)
        return True
