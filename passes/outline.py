"""Outline a span of graph nodes into a body graph that owns no tensor (used by the block regions).

:func:`outline` is the ``torch.fx.passes.split_module`` idiom for one contiguous span: one
placeholder per value read from outside the span, one output per value read after it. A parameter
or buffer the span reads (``get_attr`` of ``owner.name``) and every module it calls are not copied
into the body: the body takes the *owner module* as an argument (a ``module_<i>`` placeholder) and
reads the tensor with ``getattr`` as it runs, so whoever calls the body (a checkpointed region, an
FSDP-sharded region) passes the modules and the emitted module's ``named_parameters()`` keys stay
the same. :func:`replace_span` replaces the span by a call of the body and one ``getitem`` per output.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

__all__ = ["Outline", "outline", "replace_span"]


@dataclass
class Outline:
    """A span as a body graph.

    Attributes:
        body: the graph: placeholders ``inputs`` then ``modules``, returns a tuple of ``outputs``.
        inputs: outside nodes the span reads (tensors and values), in first-use order.
        modules: module paths the body takes as arguments (called modules, then tensor owners).
        owned: the ``get_attr`` nodes read inside the body from their owner module.
        outputs: span nodes read after the span.
    """

    body: fx.Graph
    inputs: list[fx.Node]
    modules: list[str]
    owned: list[fx.Node]
    outputs: list[fx.Node]


def outline(span: list[fx.Node]) -> Outline:
    """The body graph of ``span`` (see the module docstring)."""
    members = set(span)
    reads: dict[fx.Node, None] = {}
    for node in span:
        for arg in node.all_input_nodes:
            if arg not in members:
                reads.setdefault(arg)
    owned = [a for a in reads if a.op == "get_attr" and "." in str(a.target)]
    inputs = [a for a in reads if a not in owned]
    outputs = [n for n in span if any(u not in members for u in n.users)]
    called = [str(n.target) for n in span if n.op == "call_module"]

    body = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for arg in inputs:
        env[arg] = body.placeholder(arg.name)
        env[arg].meta = dict(arg.meta)
    handles: dict[str, fx.Node] = {}
    for target in [*called, *(str(a.target).rpartition(".")[0] for a in owned)]:
        if target not in handles:
            handles[target] = body.placeholder(f"module_{len(handles)}")
    for attr in owned:
        owner, _, name = str(attr.target).rpartition(".")
        env[attr] = body.create_node("call_function", getattr, (handles[owner], name), name=attr.name)
        env[attr].meta = dict(attr.meta)
    for node in span:
        if node.op == "call_module":
            new = body.create_node(
                "call_method", "__call__", (handles[str(node.target)], *fx.map_arg(node.args, env.__getitem__)),
                fx.map_arg(node.kwargs, env.__getitem__), name=node.name)
            new.meta = dict(node.meta)
        else:
            new = body.node_copy(node, env.__getitem__)
        env[node] = new
    body.output(tuple(env[n] for n in outputs))
    body.lint()
    return Outline(body, inputs, list(handles), owned, outputs)


def replace_span(graph: fx.Graph, span: list[fx.Node], outputs: list[fx.Node],
                 make_call: Callable[[], fx.Node]) -> None:
    """Replace ``span`` by the node ``make_call()`` inserts (right after the span, where every input is
    defined) and one ``getitem`` per output, then erase the span."""
    members = set(span)
    with graph.inserting_before(span[-1].next):
        call = make_call()
        for index, node in enumerate(outputs):
            item = graph.call_function(operator.getitem, (call, index))
            item.meta = dict(node.meta)
            node.replace_all_uses_with(item, delete_user_cb=lambda user: user not in members)
    for node in reversed(span):
        graph.erase_node(node)
