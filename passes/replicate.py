"""Replicate a repeated block: turn a graph traced with two copies of a layer into one with N.

Tracing cost grows with depth (``torch.export`` of a 32-layer Llama takes ~10 s on 2 cores),
but a decoder stack is one block repeated. Trace the model with its layer list cut to two
layers, check that block 1 is block 0 with its parameter paths renamed and its carried input
(the hidden state) taken from block 0, then stamp out blocks 2..N-1 from block 1:

- an argument produced inside block 1 maps to the same position in the new block;
- an argument produced inside block 0 (the carry) maps to that position in the previous block;
- a parameter ``<prefix>.1.<rest>`` becomes ``<prefix>.i.<rest>``;
- anything else (rotary tables, masks, shapes) is shared, as in the traced graph.

Nodes after block 1 that read block 1 read the last block instead. :class:`ReplicateBlock`
builds a new ``GraphModule`` for the result; it returns the input module unchanged, with
``modified=False``, whenever the two-block graph does not have this shape (or an attribute of
the new blocks cannot be found), and the caller then traces the full model. The caller must
check the result numerically against the model.
"""

from __future__ import annotations

import re
from typing import Any, Union

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .sites import getattr_path

__all__ = ["block_of", "ReplicateBlock"]


def block_of(node: fx.Node, prefix: str) -> Union[int, None]:
    """Index ``i`` when ``node`` runs inside ``<prefix>.<i>`` (by target or ``nn_module_stack``)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)(\.|$)")
    if node.op == "get_attr":
        match = pattern.match(node.target)
        return int(match.group(1)) if match else None
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        match = pattern.match(path or "")
        if match:
            return int(match.group(1))
    return None


def _rename(value: str, prefix: str, old: int, new: int) -> str:
    return re.sub(rf"(^|\W|_){re.escape(prefix)}\.{old}(\.|$)", rf"\g<1>{prefix}.{new}\g<2>", value)


def _retag(meta: dict, prefix: str, old: int, new: int) -> dict:
    meta = dict(meta)
    stack = meta.get("nn_module_stack")
    if stack:
        meta["nn_module_stack"] = {
            key.replace(f"{prefix.replace('.', '_')}_{old}", f"{prefix.replace('.', '_')}_{new}"):
            (_rename(path, prefix, old, new), kind)
            for key, (path, kind) in stack.items()
        }
    return meta


class ReplicateBlock(PassBase):
    """A module with ``count`` blocks under ``prefix``, built from a graph traced with two.

    ``call(gm)`` returns ``PassResult(new_module, True)`` with a new ``GraphModule`` (with
    ``gm``'s training flag) whose attributes are ``gm``'s, and for the blocks ``gm`` lacks
    (``<prefix>.2`` onwards), ``source``'s. It returns ``PassResult(gm, False)``, ``gm`` untouched,
    when the graph does not have the two-block shape (see the module doc), when ``count <= 2``
    (nothing to add) or when an attribute is found on neither module: the pass does not apply.

    Args:
        prefix: the path of the block list (``model.layers``).
        count: the number of blocks wanted.
        source: where the new blocks' parameters live (the full-depth model the two-block trace
            was cut from); ``None``: ``gm`` only.
    """

    def __init__(self, prefix: str, count: int, source: Union[nn.Module, None] = None) -> None:
        self.prefix, self.count, self.source = prefix, int(count), source

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if self.count <= 2:
            return PassResult(graph_module, False)
        graph = _replicate(graph_module.graph, self.prefix, self.count)
        if graph is None:
            return PassResult(graph_module, False)
        root: dict[str, Any] = {}
        for node in graph.nodes:
            if node.op in ("get_attr", "call_module"):
                target = str(node.target)
                try:
                    root[target] = getattr_path(graph_module, target)
                except AttributeError:
                    if self.source is None:
                        return PassResult(graph_module, False)
                    try:
                        root[target] = getattr_path(self.source, target)
                    except AttributeError:
                        return PassResult(graph_module, False)
        out = fx.GraphModule(root, graph)
        out.training = graph_module.training
        return PassResult(out, True)


def _replicate(graph: fx.Graph, prefix: str, count: int) -> Union[fx.Graph, None]:
    """A new graph with ``count`` blocks under ``prefix`` (see module doc), or ``None``."""
    nodes = list(graph.nodes)
    compute = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
    blocks = {i: [n for n in compute if block_of(n, prefix) == i] for i in (0, 1)}
    if not blocks[0] or len(blocks[0]) != len(blocks[1]):
        return None
    if any(block_of(n, prefix) not in (None, 0, 1) for n in compute):
        return None
    # each block is contiguous and block 1 directly follows block 0
    start0 = compute.index(blocks[0][0])
    if compute[start0:start0 + 2 * len(blocks[0])] != blocks[0] + blocks[1]:
        return None
    pos = [{n: k for k, n in enumerate(blocks[i])} for i in (0, 1)]

    # block 1 must be block 0 renamed, reading its carry from block 0
    for a, b in zip(blocks[0], blocks[1]):
        if a.op != b.op or a.target != b.target or len(a.args) != len(b.args) or a.kwargs.keys() != b.kwargs.keys():
            return None
        flat_a = fx.node.map_aggregate((a.args, a.kwargs), lambda x: x)
        flat_b = fx.node.map_aggregate((b.args, b.kwargs), lambda x: x)
        if not _same_shape(flat_a, flat_b, pos, prefix):
            return None

    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    params: dict[str, fx.Node] = {}
    suffix_start = start0 + 2 * len(blocks[0])
    head = [n for n in nodes if n.op in ("placeholder", "get_attr")]
    for node in head:
        env[node] = new.node_copy(node, lambda x: env[x])
        if node.op == "get_attr":
            params[node.target] = env[node]
    for node in compute[:suffix_start]:
        env[node] = new.node_copy(node, lambda x: env[x])
    previous = [env[n] for n in blocks[1]]
    for i in range(2, count):
        current: list[fx.Node] = []

        def remap(x: fx.Node) -> fx.Node:
            if x in pos[1]:
                return current[pos[1][x]]
            if x in pos[0]:
                return previous[pos[0][x]]
            if x.op == "get_attr" and block_of(x, prefix) == 1:
                target = _rename(x.target, prefix, 1, i)
                if target not in params:
                    with new.inserting_before(env[head[-1]].next):
                        params[target] = new.get_attr(target)
                    params[target].meta = dict(x.meta)
                return params[target]
            return env[x]

        for node in blocks[1]:
            copy = new.node_copy(node, remap)
            copy.meta = _retag(node.meta, prefix, 1, i)
            current.append(copy)
        previous = current
    last = {n: previous[k] for n, k in pos[1].items()}
    for node in compute[suffix_start:] + [n for n in nodes if n.op == "output"]:
        env[node] = new.node_copy(node, lambda x: last.get(x, env.get(x)))
    new._codegen = graph._codegen
    new.lint()
    return new


def _same_shape(a: Any, b: Any, pos: list[dict], prefix: str) -> bool:
    """Whether block-1 argument ``b`` corresponds to block-0 argument ``a``."""
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(
            _same_shape(x, y, pos, prefix) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_shape(a[k], b[k], pos, prefix) for k in a)
    if isinstance(a, fx.Node) != isinstance(b, fx.Node):
        return False
    if not isinstance(a, fx.Node):
        return type(a) is type(b) and a == b
    if a in pos[0]:  # internal to block 0: b must be the same position in block 1
        return b in pos[1] and pos[1][b] == pos[0][a]
    if b in pos[0]:  # the carry: block 1 reads block 0's value where block 0 read an outside one
        return True
    if a.op == "get_attr" and block_of(a, prefix) == 0:
        return b.op == "get_attr" and _rename(a.target, prefix, 0, 1) == b.target
    return a is b  # shared input
