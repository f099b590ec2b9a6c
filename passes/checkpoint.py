"""Activation checkpointing per block: each repeated block's nodes run as one checkpointed call.

:class:`CheckpointBlocks(prefix, every_n_layers, options) <CheckpointBlocks>` finds, for each
block ``<prefix>.<i>`` (by ``block_of``: a node's ``nn_module_stack`` or ``get_attr`` target),
the contiguous span of compute nodes from the block's first to its last, and moves it into a
sub-``GraphModule`` (the ``torch.fx.passes.split_module`` idiom: one placeholder per value read
from outside, one output per value read after the span). The span is replaced by one
``call_module`` of a :class:`CheckpointRegion` named ``checkpoint_block_<i>``, followed by a
``getitem`` per output.

The region owns no tensor and no module: every module the span calls (dropout) and the owner
module of every parameter or buffer it reads (base weights, adapter weights, gates) is passed in
as an argument, the tensor read inside with ``getattr``, so the emitted module's
``named_parameters()`` and ``state_dict()`` keys stay the same; only the regions themselves join
``named_modules()``. Of the arguments, only tensors that require grad (the carried hidden state)
are ``checkpoint()``'s inputs, kept for the recompute; the rest is bound, as transformers binds a
layer's keyword arguments, so what is saved for backward is what transformers' checkpointing saves.

At run time a region checkpoints (``torch.utils.checkpoint.checkpoint(body, *args, **options)``,
always ``use_reentrant=False``: the reentrant form would need an input that requires grad in
every block, the first one's included) only when it is in training mode and
grad is enabled; otherwise it runs its body directly. The checkpoint replays the RNG state by
default, so dropout inside a region draws the same mask when recomputed, and gradients equal
those of the unrewritten graph.

A block whose span contains another block's nodes is left as it is (it is not one region).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from .outline import outline, replace_span
from .replicate import block_of
from .result import GraphPass

__all__ = ["CheckpointBlocks", "CheckpointRegion", "release_regions", "REGION_PREFIX"]

#: Regions are the emitted module's children ``checkpoint_block_<i>``.
REGION_PREFIX = "checkpoint_block_"

_COMPUTE = ("call_function", "call_method", "call_module")


class CheckpointRegion(nn.Module):
    """One block's nodes behind an activation checkpoint.

    Args:
        body: the block's nodes as a ``GraphModule`` holding no tensor or module of its own
            (every input, modules included, is an argument); returns a tuple.
        options: keyword arguments for ``torch.utils.checkpoint.checkpoint``.
    """

    def __init__(self, body: fx.GraphModule, options: Mapping[str, Any]) -> None:
        super().__init__()
        self.body = body
        self.options = {**dict(options), "use_reentrant": False}

    def forward(self, *args: Any) -> tuple:
        if not (self.training and torch.is_grad_enabled()):
            return self.body(*args)
        # only what requires grad (the carried hidden state) is checkpoint()'s input, which it keeps for
        # the recompute; the rest (masks, rotary tables, modules) is bound, as transformers binds its kwargs
        carried = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        bound = list(args)

        def run(*tensors: torch.Tensor) -> tuple:
            full = list(bound)
            for i, t in zip(carried, tensors):
                full[i] = t
            return self.body(*full)

        return checkpoint(run, *(args[i] for i in carried), **self.options)


def release_regions(gm: fx.GraphModule) -> bool:
    """Remove ``gm``'s ``checkpoint_block_<i>`` children that its graph no longer calls; True if any."""
    used = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    stale = [name for name in gm._modules if name.startswith(REGION_PREFIX) and name not in used]
    for name in stale:
        delattr(gm, name)
    return bool(stale)


class CheckpointBlocks(GraphPass):
    """Wrap each block ``<prefix>.<i>`` (every ``every_n_layers``-th, from block 0) in a
    checkpointed call.

    Args:
        prefix: the module path of the block list (``"model.layers"``).
        every_n_layers: checkpoint blocks ``0, n, 2n, ...``; the others keep their activations.
        options: keyword arguments for ``torch.utils.checkpoint.checkpoint``.

    Raises:
        ValueError: ``every_n_layers`` is not a positive int.
    """

    def __init__(self, prefix: str, every_n_layers: int = 1, options: Mapping[str, Any] = ()) -> None:
        if not isinstance(every_n_layers, int) or isinstance(every_n_layers, bool) or every_n_layers < 1:
            raise ValueError(f"every_n_layers={every_n_layers!r} must be a positive int (1: every block).")
        self.prefix = prefix
        self.every_n_layers = every_n_layers
        self.options = dict(options)

    def rewrite(self, gm: fx.GraphModule) -> bool:
        release_regions(gm)
        nodes = list(gm.graph.nodes)
        spans: dict[int, list[int]] = {}
        for pos, node in enumerate(nodes):
            if node.op in _COMPUTE:
                block = block_of(node, self.prefix)
                if block is not None:
                    spans.setdefault(block, [pos, pos])[1] = pos
        changed = False
        for block, (first, last) in sorted(spans.items()):
            if block % self.every_n_layers:
                continue
            span = [n for n in nodes[first:last + 1] if n.op in _COMPUTE]
            if any(block_of(n, self.prefix) not in (None, block) for n in span):
                continue
            self._wrap(gm, block, span)
            changed = True
        return changed

    def _wrap(self, gm: fx.GraphModule, block: int, span: list[fx.Node]) -> None:
        part = outline(span)
        name = f"{REGION_PREFIX}{block}"
        gm.add_module(name, CheckpointRegion(fx.GraphModule(nn.Module(), part.body, class_name=name), self.options))
        graph = gm.graph

        def call() -> fx.Node:
            handles = [graph.get_attr(target) for target in part.modules]
            return graph.call_module(name, (*part.inputs, *handles))

        replace_span(graph, span, part.outputs, call)
