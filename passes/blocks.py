"""Block regions: each repeated block's nodes run as one method call of a module of its own.

The emitted graph is flat: every parameter is a ``get_attr`` read, and no decoder block is ever
*called*. Tools that act on a module's call (FSDP2's ``fully_shard``, which all-gathers a module's
parameters in a pre-forward hook and frees them after) need one call per block. :class:`BlockRegions`
gives them that: for each block ``<prefix>.<i>`` (by ``block_of``) it moves the contiguous span of
compute nodes, from the block's first to its last, into a sub-``GraphModule`` (the
``torch.fx.passes.split_module`` idiom: one placeholder per value read from outside, one output
per value read after the span) and replaces the span by

    region = self.block_region_<i>
    out = region.run(<inputs>, <owner modules>)
    x = out[0]; ...

``BlockRegion.run(*args) = body(*args)``, so the numbers are those of the flat graph. A region
owns no tensor: every parameter or buffer the span reads is read inside the body from its owner
module, passed as an argument (``getattr(owner, "weight")`` runs when the body runs, so a tool that
swaps a module's parameter before ``run`` and back after, as FSDP2 does, is seen), and every
module the span calls (dropout) is an argument too. So ``named_parameters()`` and
``state_dict()`` keys stay the same; only the regions join ``named_modules()``.

Each region records ``owners``: the module paths that hold the tensors only its block reads, each
widened to its largest ancestor whose read tensors are all read by this block alone
(``model.layers.3``, an adapter store's ``<site_key>``), so a sharding tool can group them.

When the module already has a region ``block_region_<i>`` (a graph rebuilt after sharding), the
pass reuses it and replaces only its body, so hooks a tool put on the region stay.
A block whose span contains another block's nodes is left as it is.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Union

import torch.fx as fx
from torch import nn

from .outline import outline, replace_span
from .replicate import block_of
from .result import GraphPass

__all__ = ["BlockRegion", "BlockRegions", "BLOCK_PREFIX", "region_calls"]

#: Regions are the module's children ``block_region_<i>``.
BLOCK_PREFIX = "block_region_"

#: the region method the graph calls (a tool may wrap it: ``register_fsdp_forward_method``)
RUN = "run"

_COMPUTE = ("call_function", "call_method", "call_module")


class BlockRegion(nn.Module):
    """One block's nodes, run by :meth:`run` (not ``forward``: calling the region as a module
    would fire hooks meant for the block's owners as a group).

    Attributes:
        body: the block's nodes as a ``GraphModule`` holding no tensor or module of its own.
        owners: module paths (from the root) holding the tensors only this block reads.
    """

    def __init__(self, body: fx.GraphModule, owners: tuple[str, ...]) -> None:
        super().__init__()
        self.body = body
        self.owners = owners

    def run(self, *args: Any) -> tuple:
        """The block's outputs, as the flat graph computed them."""
        return self.body(*args)

    def forward(self, *args: Any) -> tuple:
        return self.run(*args)


def region_calls(gm: fx.GraphModule) -> dict[int, str]:
    """Block index -> region name, for every region ``gm``'s graph calls."""
    found = {}
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target == RUN and node.args and isinstance(node.args[0], fx.Node):
            holder = node.args[0]
            if holder.op == "get_attr" and str(holder.target).startswith(BLOCK_PREFIX):
                found[int(str(holder.target)[len(BLOCK_PREFIX):])] = str(holder.target)
    return found


def _owner(target: str) -> str:
    return target.rpartition(".")[0]


def _widen(gm: fx.GraphModule, path: str, block: int, reader: dict[str, Union[int, None]]) -> str:
    """The largest ancestor of ``path`` (not the root) whose read tensors only ``block`` reads."""
    best = path
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:cut])
        inside = [t for t in reader if t.startswith(candidate + ".")]
        if any(reader[t] != block for t in inside):
            break
        best = candidate
    return best


class BlockRegions(GraphPass):
    """Run each block ``<prefix>.<i>`` as ``block_region_<i>.run(...)`` (see the module doc).

    Args:
        prefix: the module path of the block list (``"model.layers"``).

    A graph that already calls regions is left as it is (``modified=False``).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def rewrite(self, gm: fx.GraphModule) -> bool:
        if region_calls(gm):
            return False
        nodes = list(gm.graph.nodes)
        spans: dict[int, list[int]] = {}
        for pos, node in enumerate(nodes):
            if node.op in _COMPUTE:
                block = block_of(node, self.prefix)
                if block is not None:
                    spans.setdefault(block, [pos, pos])[1] = pos
        reader = self._readers(gm, nodes, spans)
        changed = False
        for block, (first, last) in sorted(spans.items()):
            span = [n for n in nodes[first:last + 1] if n.op in _COMPUTE]
            if any(block_of(n, self.prefix) not in (None, block) for n in span):
                continue
            self._wrap(gm, block, span, reader)
            changed = True
        for node in list(gm.graph.nodes):  # reads of the moved tensors now happen inside the bodies
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        return changed

    @staticmethod
    def _readers(gm: fx.GraphModule, nodes: list[fx.Node], spans: dict[int, list[int]]) -> dict[str, Union[int, None]]:
        """Tensor target -> the one block whose span reads it (``None``: read outside, or by several)."""
        where = {}
        for block, (first, last) in spans.items():
            for node in nodes[first:last + 1]:
                where[node] = block
        blocks: dict[str, set] = defaultdict(set)
        for node in nodes:
            if node.op == "get_attr":
                blocks[str(node.target)].update(where.get(user) for user in node.users)
        return {t: (next(iter(b)) if len(b) == 1 else None) for t, b in blocks.items()}

    def _wrap(self, gm: fx.GraphModule, block: int, span: list[fx.Node], reader: dict) -> None:
        part = outline(span)
        owners = tuple(dict.fromkeys(_widen(gm, _owner(str(a.target)), block, reader)
                                     for a in part.owned if reader.get(str(a.target)) == block))
        name = f"{BLOCK_PREFIX}{block}"
        module = fx.GraphModule(nn.Module(), part.body, class_name=name)
        region = gm._modules.get(name)
        if isinstance(region, BlockRegion):
            region.body = module  # keep the region object (and what a tool attached to it)
            region.owners = owners
        else:
            gm.add_module(name, BlockRegion(module, owners))
        graph = gm.graph

        def call() -> fx.Node:
            holder = graph.get_attr(name)
            args = [graph.get_attr(target) for target in part.modules]
            return graph.call_method(RUN, (holder, *part.inputs, *args))

        replace_span(graph, span, part.outputs, call)
