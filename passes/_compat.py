"""The one spot in ``graphlora.passes`` that knows how ``torch.export`` lays out nested graphs.

Non-strict ``torch.export`` turns a region run under ``torch.no_grad()`` / ``torch.enable_grad()``
or ``torch.autocast`` into a higher-order op that calls a nested ``GraphModule`` (a ``get_attr``
argument), e.g. ``wrap_with_set_grad_enabled(enabled, submod, *operands)`` or
``wrap_with_autocast(device_type, dtype, enabled, cache_enabled, submod, *operands)``. Whether a
model has such regions depends on the library version: transformers 5.17's rotary embeddings run
under ``@torch.no_grad()`` (5.24's do not), so there the rotary ops, their dtype asserts included,
live in a nested module and the positions feed the higher-order call.

Also here: :func:`size_hint`, whose torch function moved between releases;
:func:`wrapper_subclass`, the private constructor a tensor subclass that holds other tensors
needs (the quantized base weights of :mod:`.quantize`); :func:`autocast_on`, which asks torch's
private ``_is_any_autocast_enabled`` first; and ``OpOverload`` / ``OpOverloadPacket``, the types of
``torch.ops`` targets (in the private ``torch._ops``).
"""

from __future__ import annotations

from typing import Any, Union

import torch
import torch.fx as fx

__all__ = ["autocast_on", "called_graph_modules", "nested_graph_modules", "size_hint", "wrapper_subclass",
           "OpOverload", "OpOverloadPacket"]

#: the types of ``torch.ops.aten.mul.Tensor`` (an overload) and ``torch.ops.aten.mul`` (a packet)
OpOverload = torch._ops.OpOverload
OpOverloadPacket = torch._ops.OpOverloadPacket


_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_on(t: torch.Tensor) -> bool:
    """Whether ``torch.autocast`` is on for ``t``'s device (``False`` on "meta", which autocast does not
    know: asking raises there). The serving ops ask at every site of every call: the private
    any-device check is one C call (0.1 us on the CPU here), the device's own check 0.7 us."""
    if _ANY_AUTOCAST is not None and not _ANY_AUTOCAST():
        return False
    return t.device.type != "meta" and torch.is_autocast_enabled(t.device.type)


def wrapper_subclass(cls: type, shape: tuple, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """A new instance of the tensor subclass ``cls`` with no storage of its own (its ``__new__``;
    ``Tensor._make_wrapper_subclass``), never requiring grad."""
    return torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device=device, requires_grad=False)


def size_hint(dim: Union[int, torch.SymInt]) -> int:
    """The example value a symbolic int was traced with (an int as is); raises when none is recorded.

    ``symbolic_shapes.optimization_hint`` in torch 2.13, ``size_hint`` in 2.11 (where ``hint_int``
    is its deprecated alias, gone by 2.13). Neither adds a guard.
    """
    from torch.fx.experimental import symbolic_shapes as shapes

    for name in ("optimization_hint", "size_hint"):
        hint = getattr(shapes, name, None)
        if hint is not None:
            return hint(dim)
    raise NotImplementedError("this torch has no size-hint function")


def called_graph_modules(node: fx.Node) -> list[fx.GraphModule]:
    """The nested ``GraphModule`` s a higher-order-op node calls, in argument order.

    Empty for any other node, and for a higher-order op whose modules cannot be resolved (a graph
    with no owning module): callers treat such a node as opaque.
    """
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
        return []
    root = node.graph.owning_module
    if root is None:
        return []
    found = []
    for arg in node.args:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            obj = root
            try:
                for part in arg.target.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                return []
            if isinstance(obj, fx.GraphModule):
                found.append(obj)
    return found


def nested_graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """Every ``GraphModule`` that ``gm``'s higher-order ops call, nested ones included, each once."""
    out: list[fx.GraphModule] = []
    stack = [gm]
    while stack:
        for node in stack.pop().graph.nodes:
            for sub in called_graph_modules(node):
                if all(sub is not seen for seen in out):
                    out.append(sub)
                    stack.append(sub)
    return out


def grouped_mm_ops() -> tuple[Any, ...]:
    """The grouped-matmul ops an expert site can be (:mod:`.sites`): ``aten._grouped_mm`` (private,
    absent from some torch builds) and, when registered, the fallback custom op transformers traces
    on devices / dtypes without it (``transformers::grouped_mm_fallback``, same ``(x, W, offs)``
    arguments)."""
    ops: list[Any] = []
    grouped = getattr(torch.ops.aten, "_grouped_mm", None)
    if grouped is not None:
        ops.append(grouped.default)
    namespace = getattr(torch.ops, "transformers", None)
    fallback = getattr(namespace, "grouped_mm_fallback", None) if namespace is not None else None
    if fallback is not None:
        ops.append(fallback.default)
    return tuple(ops)
