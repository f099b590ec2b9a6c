"""The one place where graphlora touches torch / transformers APIs that may move between releases.

Tested with torch 2.11 and 2.13, transformers 5.17 and 5.24.
"""

from __future__ import annotations

import functools
import threading
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


def unaliased(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with each tensor that shares storage with an earlier one replaced by a copy.

    ``torch.export`` sees two inputs holding one tensor (``model(input_ids=ids, labels=ids)``, the
    usual causal-LM call) as one input and traces the program to read either for both: a later call
    with different ``labels`` would then embed the labels. Copies trace two inputs, equal values.
    """
    seen: set[int] = set()
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            storage = value.untyped_storage().data_ptr()
            if storage in seen:
                value = value.clone()
            seen.add(storage)
        out[name] = value
    return out


def export_module(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> fx.GraphModule:
    """``torch.export`` (non-strict) with dynamic batch/sequence dims; the unlifted module.

    The returned module shares the model's parameter tensors (no copy). Inputs that alias each
    other are traced as separate inputs (:func:`unaliased`).
    """
    from torch.export import export

    shapes = {name: dynamic_dims(value) for name, value in kwargs.items()}
    program = export(model, (), unaliased(kwargs), dynamic_shapes=shapes, strict=False)
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


def forward_of_graph(module: torch.nn.Module, graph: fx.Graph) -> Any:
    """A callable running ``graph``'s generated code with ``module`` as ``self`` (its ``get_attr`` /
    ``call_module`` targets read from ``module`` on every call, so they never go stale); what
    ``GraphModule.recompile`` makes, without installing it on ``module``'s class."""
    from torch.fx.graph_module import _forward_from_src

    code = graph.python_code(root_module="self")
    return functools.partial(_forward_from_src(code.src, code.globals), module)


def has_call_hooks(module: torch.nn.Module) -> bool:
    """True when ``module`` has forward (pre-)hooks of its own: only ``module(...)`` runs them."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def under_outer_compile() -> bool:
    """True when a ``torch.compile``'d caller is running this frame: dynamo's frame callback is
    set (a frame skipped with ``torch.compiler.disable(recursive=False)`` keeps it; plain eager
    has none). Where this torch cannot say, True: the caller then takes no path that would make
    dynamo compile another graph."""
    return _frame_callback is None or _frame_callback() is not None


try:  # looked up once: the routing asks on every call
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _frame_callback
except ImportError:  # pragma: no cover - other torch builds
    _frame_callback = None


#: serializes :func:`lend_forward` lends (re-entrant: a hook may call the module again)
_LENT_FORWARD = threading.RLock()
_ABSENT = object()
_LENT_NAME = "_glora_lent_forward"  # the instance forward lend_forward lent, if any


@torch.compiler.disable
def lend_forward(module: torch.nn.Module, forward: Any, token: list) -> None:
    """Make ``module.forward`` be ``forward`` until :func:`return_forward` (``nn.Module.__call__``
    runs the module's hooks around whatever ``self.forward`` is, an instance attribute first), so
    calling the module runs its own hooks around another program's forward. ``token``: an empty
    list the caller made before its ``try``; it records what to put back, so the ``finally``'s
    :func:`return_forward` undoes exactly what was done, also when this was interrupted. Lends nest
    (a hook that calls the module again) and other threads wait for the lend to end (one lent
    forward at a time).

    A function pair, not a context manager: its callers are frames dynamo skips but does not trace
    past, and a context manager's generator there is traced (under ``fullgraph=True``, an error)."""
    _LENT_FORWARD.acquire()
    token.append((module.__dict__.get("forward", _ABSENT), module.__dict__.get(_LENT_NAME)))
    object.__setattr__(module, "forward", forward)
    object.__setattr__(module, _LENT_NAME, forward)


@torch.compiler.disable
def return_forward(module: torch.nn.Module, token: list) -> None:
    """Undo :func:`lend_forward` (nothing when it did not get as far as holding the lock): what the
    instance held before (nothing, or a wrapper someone assigned) is put back."""
    if not token:
        return
    previous, lent_before = token.pop()
    try:
        object.__setattr__(module, _LENT_NAME, lent_before)
        if previous is _ABSENT:
            module.__dict__.pop("forward", None)
        else:
            object.__setattr__(module, "forward", previous)
    finally:
        _LENT_FORWARD.release()


def assigned_forward(module: torch.nn.Module) -> Any:
    """The ``forward`` someone assigned on ``module``'s instance (accelerate's autocast wrapper,
    TRL's fused LM head), or ``None``: none is assigned, or the instance one is lent by
    :func:`lend_forward`."""
    forward = module.__dict__.get("forward")
    if forward is None or forward is module.__dict__.get(_LENT_NAME):
        return None
    return forward


@torch.compiler.disable
def apply_pre_hooks(module: torch.nn.Module, args: tuple, kwargs: dict, token: list) -> tuple[tuple, dict]:
    """Run ``module``'s own forward pre-hooks on ``(args, kwargs)`` now, as ``nn.Module.__call__``
    would (a hook registered ``with_kwargs`` gets and may replace both; another gets the positional
    arguments and may replace them), and return the arguments they give. Until
    :func:`restore_pre_hooks` each hook's entry in the module's registry holds a no-op in its
    place (so calling the module does not run them a second time), the hooks recorded in
    ``token`` (as :func:`lend_forward`'s): the registry keeps its entries and its identity, so a
    removal handle used during the call removes its hook for good, and one registered during the
    call stays with a handle that works. Serialized with :func:`lend_forward`'s lock. Global pre-hooks
    (``register_module_forward_pre_hook``) are left to ``nn.Module.__call__``. A function pair for
    the reason :func:`lend_forward` gives."""
    _LENT_FORWARD.acquire()
    token.append(None)  # the lock is held: restore_pre_hooks releases it
    hooks = module._forward_pre_hooks
    with_kwargs = module._forward_pre_hooks_with_kwargs
    for hook_id, hook in list(hooks.items()):
        if hook_id in with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError("forward pre-hook must return None or a tuple of (new_args, new_kwargs), "
                                       f"but got {result}.")
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    token[-1] = dict(hooks)
    for hook_id in token[-1]:
        hooks[hook_id] = _ran_already  # same key, same place: the registry's order is kept
    return args, dict(kwargs)


def _ran_already(*_: Any) -> None:
    """A pre-hook's stand-in while the call it already ran for is running (:func:`apply_pre_hooks`)."""


@torch.compiler.disable
def restore_pre_hooks(module: torch.nn.Module, token: list) -> None:
    """Put back the hooks :func:`apply_pre_hooks` stood in for, except those removed during the call,
    and release its lock (nothing when it did not get as far as holding it)."""
    if not token:
        return
    saved = token.pop()
    try:
        if saved is not None:
            hooks = module._forward_pre_hooks
            for hook_id, hook in saved.items():
                if hooks.get(hook_id) is _ran_already:
                    hooks[hook_id] = hook
    finally:
        _LENT_FORWARD.release()


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
@functools.lru_cache(maxsize=None)
def cache_class(name: str = "Cache") -> Any:
    """``transformers.cache_utils.<name>`` (``None`` without transformers), looked up once: the
    routing asks on every call, where an import statement costs more than the check."""
    try:
        from transformers import cache_utils
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return getattr(cache_utils, name, None)


def is_cache(value: Any) -> bool:
    """True for a transformers ``Cache`` object (``DynamicCache``, ``EncoderDecoderCache``, ...)."""
    cls = cache_class()
    return cls is not None and isinstance(value, cls)


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
    _unflatten_dynamic_cache_from_a_list()
    _register_encoder_decoder_cache()
    _register_static_cache()
    _CACHES_REGISTERED = True


_CACHES_REGISTERED = False


def _unflatten_dynamic_cache_from_a_list() -> None:
    """Re-register transformers' ``DynamicCache`` node with an unflatten that gives the constructor a
    list of ``(keys, values[, window])`` rows, where transformers gives it a ``zip_longest`` iterator,
    and that fills every layer without a copy (:func:`_hold`), sliding-window layers included: they
    hold the keys as given, counting them as the tokens seen, where transformers' fill concatenates
    and trims them to the window (a trace then guards on the trim).

    A program's output cache is unflattened inside the compiled frame under ``torch.compile(gm)``;
    with the iterator, dynamo (torch 2.13) fails while saving the frame's side effects
    (``'LocalGeneratorObjectVariable' object has no attribute 'remaining_items'``). Same flatten, same
    cache built; a no-op when torch has no ``_deregister_pytree_node`` or the node is not transformers'.
    """
    from itertools import zip_longest

    from torch.utils import _pytree as pytree
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer
    from transformers.integrations import executorch

    entry = pytree.SUPPORTED_NODES.get(DynamicCache)
    deregister = getattr(pytree, "_deregister_pytree_node", None)
    if entry is None or deregister is None or entry.unflatten_fn is not getattr(executorch, "_unflatten_dynamic_cache", None):
        return

    def unflatten(values: Any, context: Any) -> Any:
        keys, layout = context
        leaves = pytree._dict_unflatten(values, keys)
        rows = list(zip_longest(leaves["key_cache"], leaves["value_cache"], layout))
        cache = DynamicCache([(None, None)] * len(rows))
        for i, (k, v, window) in enumerate(rows):
            if window is not None:  # a sliding-window layer holding what it is given (no copy, no trim)
                cache.layers[i] = DynamicSlidingWindowLayer(sliding_window=window)
            if k is not None and v is not None:
                _hold(cache.layers[i], k, v)
                if window is not None:  # its count of tokens seen: what it holds (graphlora.generation
                    cache.layers[i].cumulative_length = k.shape[-2]  # gives it the count past the window)
        return cache

    deregister(DynamicCache)
    pytree.register_pytree_node(DynamicCache, entry.flatten_fn, unflatten,
                                serialized_type_name=f"{DynamicCache.__module__}.{DynamicCache.__name__}",
                                flatten_with_keys_fn=entry.flatten_with_keys_fn)


def _hold(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make an empty ``DynamicLayer`` hold ``keys`` / ``values`` as they are.

    transformers' constructor fills a layer through ``update``, which concatenates the tensors onto
    an empty one: a copy of the whole cache on every unflatten (inside each traced decode step, and
    on each step's output in eager), where the base model copies only the new position.
    """
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values


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


def _register_static_cache() -> None:
    """``StaticCache`` (plain ``StaticLayer`` layers) as a pytree node, whose leaves are the tensors it
    updates in place: ``[k_0, v_0, n_0, k_1, v_1, n_1, ...]`` (keys and values ``[B, H, L, D]``, ``n``
    the 0-d ``cumulative_length``); a layer not yet initialized has none.

    transformers ships no registration (its export recipes hold the cache as buffers of a wrapper).
    Unflattening builds the cache without its constructor (which wants the model config), as
    ``StaticLayer.lazy_initialization`` would have left it, with ``max_cache_len`` read from the keys'
    dim 2, so a trace keeps it symbolic. torch.export records ``index_copy_`` / ``add_`` on these
    inputs as in-place ops of the graph: a program writes the caller's cache tensors, no copy.
    """
    from torch.utils import _pytree as pytree
    from transformers.cache_utils import StaticCache

    if StaticCache in pytree.SUPPORTED_NODES:
        return
    pytree.register_pytree_node(
        StaticCache, _flatten_static, _unflatten_static,
        serialized_type_name=f"{StaticCache.__module__}.{StaticCache.__name__}",
        flatten_with_keys_fn=lambda c: ([(pytree.SequenceKey(i), t) for i, t in enumerate(_flatten_static(c)[0])],
                                        _flatten_static(c)[1]),
    )
    torch.fx._pytree.register_pytree_flatten_spec(StaticCache, lambda c, spec: _flatten_static(c)[0])


def static_layers_supported(cache: Any) -> bool:
    """Every layer of ``cache`` is a plain ``StaticLayer`` (not sliding, not indexed) and it does not
    offload: what the pytree node takes. A sliding layer keeps its fill level as a Python int, which a
    trace would bake in; offloading moves layers between devices on a side stream."""
    from transformers.cache_utils import StaticLayer

    return not getattr(cache, "offloading", False) and all(type(layer) is StaticLayer for layer in cache.layers)


class _OpaqueCache:
    """The pytree context of a ``StaticCache`` the node does not take apart (sliding or offloading
    layers): the cache itself, as if it were a leaf-less node, so ``tree_map`` and friends still
    work on it (graphlora's graphs refuse it: :func:`graphlora.generation.describe_cache`)."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache


def _flatten_static(cache: Any) -> tuple[list, Any]:
    if not static_layers_supported(cache):
        return [], _OpaqueCache(cache)
    leaves: list = []
    lengths = []
    for layer in cache.layers:
        if layer.is_initialized:
            leaves += [layer.keys, layer.values, layer.cumulative_length]
            lengths.append(None)
        else:
            lengths.append(layer.max_cache_len)
    return leaves, tuple(lengths)


def _unflatten_static(leaves: Any, context: Any) -> Any:
    from transformers.cache_utils import Cache, StaticCache, StaticLayer

    if isinstance(context, _OpaqueCache):
        return context.cache
    layers, leaves = [], list(leaves)
    for length in context:
        layer = StaticLayer.__new__(StaticLayer)
        layer.keys, layer.values, layer.is_initialized = None, None, False
        if length is None:
            keys, values, count = leaves[:3]
            del leaves[:3]
            layer.keys, layer.values, layer.cumulative_length, layer.is_initialized = keys, values, count, True
            layer.max_cache_len = keys.shape[2]
            layer.dtype, layer.device = keys.dtype, keys.device
            layer.batch_size, layer.num_heads = keys.shape[0], keys.shape[1]
            layer.k_head_dim, layer.v_head_dim = keys.shape[3], values.shape[3]
        else:
            layer.max_cache_len = length
            layer.cumulative_length = torch.tensor(0, dtype=torch.long)
        layers.append(layer)
    cache = StaticCache.__new__(StaticCache)
    Cache.__init__(cache, layers=layers)
    return cache


def cache_dynamic_shapes(cache: Any) -> Any:
    """``dynamic_shapes`` for a registered cache input: ``Dim.AUTO`` on batch (0) and length (2) of each
    4-d leaf (keys, values; a ``StaticCache``'s length is its ``max_cache_len``), none on others (its
    0-d ``cumulative_length``).

    export wants the spec in the shape of the node's children (here ``[[keys...], [values...]]``).
    """
    from torch.export import Dim

    return pytree_shapes(cache, lambda leaf: {0: Dim.AUTO, 2: Dim.AUTO} if leaf.dim() == 4 else None)


def pytree_shapes(value: Any, dims: Any) -> Any:
    """``dynamic_shapes`` for a pytree input: ``dims`` for each leaf (or ``dims(leaf)`` when it is
    callable), in the structure export wants.

    Containers (list, tuple, dict) keep their type; any other registered node (a cache, a
    ``ModelOutput``) is the list of its children.
    """
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten(value)
    per_leaf = iter([dims(leaf) for leaf in leaves] if callable(dims) else [dims] * len(leaves))

    def shapes(spec: Any) -> Any:
        if spec.is_leaf():
            return next(per_leaf)
        children = spec.children() if hasattr(spec, "children") else spec.children_specs  # torch 2.13 / 2.11
        inner = [shapes(child) for child in children]
        if spec.type in (list, tuple):
            return spec.type(inner)
        if spec.type is dict:
            return dict(zip(spec.context, inner))
        return inner

    return shapes(spec)


def export_with_shapes(model: torch.nn.Module, kwargs: Mapping[str, Any], shapes: Mapping[str, Any]) -> fx.GraphModule:
    """``torch.export`` (non-strict) with the given ``dynamic_shapes``; the unlifted module (inputs
    that alias each other traced as separate inputs, :func:`unaliased`)."""
    from torch.export import export

    return export(model, (), unaliased(kwargs), dynamic_shapes=dict(shapes), strict=False).module()
