"""The one place where graphlora touches torch / transformers APIs that may move between releases.

Tested with torch 2.11 and 2.13, transformers 5.17 and 5.24.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

__all__ = ["export_module", "is_pretrained_model", "dynamic_dims", "adopt_graph", "layer_checkpointing"]


def is_pretrained_model(model: torch.nn.Module) -> bool:
    """True for a transformers ``PreTrainedModel`` (imported lazily)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def dynamic_dims(value: Any) -> Any:
    """``Dim.AUTO`` for the batch and sequence dims (0 and 1) of a tensor input, None otherwise."""
    from torch.export import Dim

    if isinstance(value, torch.Tensor) and value.dim() >= 1:
        return {i: Dim.AUTO for i in range(min(value.dim(), 2))}
    return None


def export_module(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> fx.GraphModule:
    """``torch.export`` (non-strict) with dynamic batch/sequence dims; the unlifted module.

    The returned module shares the model's parameter tensors (no copy).
    """
    from torch.export import export

    shapes = {name: dynamic_dims(value) for name, value in kwargs.items()}
    program = export(model, (), dict(kwargs), dynamic_shapes=shapes, strict=False)
    return program.module()


def adopt_graph(gm: fx.GraphModule, graph: fx.Graph) -> None:
    """Give ``gm`` a new graph without regenerating its code yet (the caller recompiles).

    ``gm.graph = graph`` recompiles at once; a rewrite that recompiles anyway right after would
    pay for code generation twice (~0.15 s for a 32-layer model).
    """
    gm._graph = graph
    graph.owning_module = gm


def current_graph(gm: fx.GraphModule) -> fx.Graph:
    """``gm``'s graph as it is now, without the emitted module's refresh of a stale graph."""
    return gm._graph


def layer_checkpointing(layers: "torch.nn.ModuleList") -> tuple[list[bool], dict[str, Any]]:
    """What transformers' ``gradient_checkpointing_enable`` left on a model's layers: one flag per
    layer (its ``gradient_checkpointing``) and the keyword arguments of its checkpoint function
    (``_gradient_checkpointing_func``, a ``functools.partial`` of ``torch.utils.checkpoint.checkpoint``)."""
    import functools

    flags = [bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers]
    kwargs: dict[str, Any] = {}
    for layer, flag in zip(layers, flags):
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if flag and isinstance(func, functools.partial):
            kwargs = dict(func.keywords)
            break
    return flags, kwargs


# ---------------------------------------------------------------------- KV caches (generation)
def is_cache(value: Any) -> bool:
    """True for a transformers ``Cache`` object (``DynamicCache``, ``EncoderDecoderCache``, ...)."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(value, Cache)


def register_cache_pytree() -> None:
    """Make ``DynamicCache`` a pytree node, so ``torch.export`` takes and returns it (idempotent).

    transformers ships the registration (``integrations.executorch``, 5.17 and 5.24); its leaves are
    ``{"key_cache": [k_0, ...], "value_cache": [v_0, ...]}`` (layers not yet filled have none).
    """
    global _CACHES_REGISTERED
    if _CACHES_REGISTERED:  # called on every cache call's program key
        return
    from transformers.integrations.executorch import register_dynamic_cache_export_support

    register_dynamic_cache_export_support()
    _register_encoder_decoder_cache()
    _CACHES_REGISTERED = True


_CACHES_REGISTERED = False


def _register_encoder_decoder_cache() -> None:
    """``EncoderDecoderCache`` as a pytree node: children ``[self_attention_cache, cross_attention_cache]``.

    transformers ships no registration for it; unflattening calls its constructor, which sets
    ``is_updated`` from whether each cross-attention layer is filled.
    """
    from torch.utils import _pytree as pytree
    from transformers.cache_utils import EncoderDecoderCache

    if EncoderDecoderCache in pytree.SUPPORTED_NODES:
        return
    pytree.register_pytree_node(
        EncoderDecoderCache,
        lambda c: ([c.self_attention_cache, c.cross_attention_cache], None),
        lambda children, _: EncoderDecoderCache(*children),
        serialized_type_name=f"{EncoderDecoderCache.__module__}.{EncoderDecoderCache.__name__}",
        flatten_with_keys_fn=lambda c: ([(pytree.GetAttrKey("self_attention_cache"), c.self_attention_cache),
                                         (pytree.GetAttrKey("cross_attention_cache"), c.cross_attention_cache)], None),
    )
    torch.fx._pytree.register_pytree_flatten_spec(
        EncoderDecoderCache, lambda c, spec: [c.self_attention_cache, c.cross_attention_cache])


def cache_dynamic_shapes(cache: Any) -> Any:
    """``dynamic_shapes`` for a registered cache input: ``Dim.AUTO`` on batch (0) and length (2) of each leaf.

    export wants the spec in the shape of the node's children (here ``[[keys...], [values...]]``).
    """
    from torch.export import Dim

    return pytree_shapes(cache, {0: Dim.AUTO, 2: Dim.AUTO})


def pytree_shapes(value: Any, dims: Any) -> Any:
    """``dynamic_shapes`` for a pytree input: ``dims`` for each leaf, in the structure export wants.

    Containers (list, tuple, dict) keep their type; any other registered node (a cache, a
    ``ModelOutput``) is the list of its children.
    """
    from torch.utils import _pytree as pytree

    def shapes(spec: Any) -> Any:
        if spec.is_leaf():
            return dims
        children = spec.children() if hasattr(spec, "children") else spec.children_specs  # torch 2.13 / 2.11
        inner = [shapes(child) for child in children]
        if spec.type in (list, tuple):
            return spec.type(inner)
        if spec.type is dict:
            return dict(zip(spec.context, inner))
        return inner

    return shapes(pytree.tree_flatten(value)[1])


def export_with_shapes(model: torch.nn.Module, kwargs: Mapping[str, Any], shapes: Mapping[str, Any]) -> fx.GraphModule:
    """``torch.export`` (non-strict) with the given ``dynamic_shapes``; the unlifted module."""
    from torch.export import export

    return export(model, (), dict(kwargs), dynamic_shapes=dict(shapes), strict=False).module()
