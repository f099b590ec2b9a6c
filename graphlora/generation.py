"""Generation: ``gm.generate(...)`` runs transformers' own loop through the adapted graphs, with a KV cache.

**The loop is transformers'.** :func:`generate` calls the *source model's* ``generate`` (it shares
every parameter with ``gm``) while that model's ``forward`` is shadowed by an instance attribute
that calls ``gm(**kwargs)``; the shadow carries the original signature (``functools.wraps``), so
transformers' argument checks, cache set-up, logits processors, beam search, stopping criteria and
streamers all behave as on the model. The shadow is removed in ``finally``: bad input gets
transformers' own error and leaves adapters and graphs as they were.

**The KV cache is a graph input and output.** ``DynamicCache`` is registered as a pytree node
(:func:`graphlora._compat.register_cache_pytree`), so an exported program takes the cache's key and
value tensors as inputs and returns the updated cache, whose state the caller's cache object then
takes (:func:`carry_cache`: updated as the model updates it). Each distinct shape of call is its own
program, keyed by :func:`describe_cache` (cache type, number of layers, number of filled leaves,
sliding windows): prefill without a cache (``use_cache=True``), prefill with an empty cache object,
decode with a filled cache. Calls the ProgramSet has not seen are traced by :func:`trace_call`:

- a filled cache is traced on synthetic inputs of consistent shapes, batch ``B = 2``, past
  ``P = 3``, ``N = 2`` new tokens (``attention_mask`` ``[B, P + N]``, ``position_ids`` and
  ``cache_position`` counting from ``P``), with ``Dim.AUTO`` on batch and length of every cache
  tensor and on dims 0/1 of every other tensor (a per-layer-type dict of masks, Qwen2's, entry by
  entry). No size is 0 or 1, so torch.export specializes none of them and the graph serves every
  batch size, past length and number of new tokens ``N >= 2``. A one-token call (a decode step) is
  its own program, traced with ``N = 1``: torch.export takes a size it sees as 2 as "2 or more",
  so the ``N = 2`` graph may hold branches and runtime checks an ``N = 1`` call fails
  (transformers' ``is_causal = q_len > 1``; OPT's positions, sliced by the cache's count, checked
  ``>= 2``). The key's :data:`STEP` entry (:func:`step_key`) says which;
- prefill calls are traced on the call's own inputs with size-1 dims widened to 2
  (:func:`graphlora.capture.widen_for_trace`); an empty cache has no leaves, its pytree spec is
  part of the key.

Cache calls skip the two-layer replication of deep models (:mod:`graphlora.repeat`): each layer
writes its own cache slot, so block 1 is not block 0 renamed.

**Encoder-decoder models** (T5): transformers' ``generate`` calls ``get_encoder()(...)`` directly, so
the encoder's ``forward`` is shadowed too and runs its own program, traced from
:class:`EncoderHalf` (the source's children under their own names, so sites and parameters are
named as in the whole model's trace; the key carries ``HALF``). Decoder calls take
``encoder_outputs`` and an ``EncoderDecoderCache`` (registered here as a pytree node) and are always
traced on synthetic inputs (encoder length 4; the first decoder step has one token).

**Static cache** (``cache_implementation="static"``). ``StaticCache`` is a pytree node too, its
leaves the tensors ``StaticLayer.update`` writes in place: per layer the keys and values ``[B, H, L,
D]`` (``L = max_cache_len``) and the 0-d ``cumulative_length`` ``n``. The update is ``n ← n + N``
and ``K[:, :, n:n+N] ← k_new`` (``index_copy_``); torch.export keeps both as in-place ops on the
graph inputs, so a program writes the caller's tensors and copies no cache. Before a call is keyed,
:func:`ready_static_cache` allocates a cache that has no tensors yet (``early_initialization``, as
the first update would), so the prefill and the decode steps are two programs (``N > 1`` and ``N =
1``), traced on synthetic inputs with ``L = P + N + TRACE_ROOM`` and ``Dim.AUTO`` on ``B``, ``N``
and ``L`` (and on dims 0, 2 and 3 of the 4-d ``[B, 1, N, L]`` mask generate builds for a static
cache): new prompt lengths, ``max_new_tokens`` and batch sizes reuse them. A 2-d mask covers the
cached and new positions (a manual loop: the graph's guard is ``L >`` its length), or spans the
whole cache (``[B, L]``: what generate gives Bloom, whose ALiBi bias covers every slot); the key
says which (:func:`step_key`), and the trace follows. A prompt into an empty cache (its 2-d mask
as long as its new tokens) is a program of its own, traced with nothing cached. A model that
slices by the cache's count of tokens seen (OPT's positions when none are given) cannot be traced
for one new token as it is (nor, under torch 2.11, for any masked call); such a call is traced
again reading the count as a size checked equal to the mask's length minus the new tokens
(:func:`_past_from_mask`); without a mask, as a data-dependent size bounded by the cache. The
decode step generate runs has static addresses and no host sync (no ``.item()`` in the graph; OPT's
own position code without ``position_ids`` has one, and so has a retried program), so a CUDA graph
can replay it. transformers' generate compiles the decode step for a static cache on
CUDA by asking the model's ``get_compiled_call``; :func:`generate` shadows that too, so the decode
steps run graphlora's programs compiled with the ``CompileConfig``'s options
(:meth:`graphlora.programs.ProgramSet.compiled`), while the routing stays eager outside them. Sliding-window or offloading static caches and
static caches in encoder-decoder models are refused with a :class:`ConfigError`.

**Sliding-window layers** (``DynamicSlidingWindowLayer``: Mistral, Gemma 2/3, Qwen2's sliding
layers) keep the last ``sliding_window - 1`` positions and count every token seen
(``cumulative_length``), from which the model reads its positions and the mask's offset. Within
the window the count is the kept length, a size the graphs read from the keys; past it, the call
gets one more graph input, :data:`SEEN` (a ``[count, 0]`` tensor: the count as a size;
:func:`sliding_count_input`), whose length the trace gives the layers (:func:`_sliding_trace`). So
there are two programs per shape of call, one within the window and one past it (traced with
``window + 3`` seen, ``window - 1`` kept), never one per length. In a trace the layers keep what
``update`` gives them, untrimmed (the trim to the window is a slice whose length the trace would
guard on); the program returns the kept and the new positions and :func:`carry_cache` trims them
and sets the count (:func:`_count_sliding`), so the caller's cache holds what the model's would. A
layer in neither state (recording its past for ``crop``, cut by hand), an encoder-decoder cache past
its window, or layers of two windows on both sides of theirs are refused with a
:class:`ConfigError`, before anything runs.

**The cache's name.** transformers 5.24 calls ``forward``'s cache argument ``cache``, 5.17
``past_key_values``; :meth:`graphlora.calls.CallSpec.bind` maps either name to the one the model's
``forward`` has.

**Mixed batches.** ``adapter_names=[...]`` (one per input row) flows into every forward call of the
loop; a call whose batch is ``k`` times longer (``num_beams`` or ``num_return_sequences``, expanded
by transformers with ``repeat_interleave``) gets each name repeated ``k`` times, as PEFT does.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import sys
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from ._compat import (cache_class, cache_dynamic_shapes, dynamic_dims, export_with_shapes, is_cache, pytree_shapes,
                      register_cache_pytree, static_layers_supported)
from .errors import ConfigError

__all__ = ["generate", "describe_cache", "step_key", "STEP", "is_cache_call", "trace_call", "example_cache_inputs",
           "ready_static_cache", "static_snapshot", "static_restore", "carry_cache",
           "sliding_count_input", "SEEN"]

#: Synthetic decode trace: batch, past length, new tokens (none 0 or 1: torch.export keeps them dynamic).
TRACE_BATCH, TRACE_PAST, TRACE_NEW = 2, 3, 2
#: A synthetic ``StaticCache`` holds ``TRACE_PAST + TRACE_NEW + TRACE_ROOM`` positions (its
#: ``max_cache_len``; longer than the mask, as in generate, and unlike every other dim).
TRACE_ROOM = 3
#: Synthetic encoder length of an encoder-decoder trace.
TRACE_ENCODER = 4


# ---------------------------------------------------------------------- program keys
def describe_cache(cache: Any) -> tuple:
    """What a cache object contributes to a program key: ``("cache", type, layers, leaves, windows)``.

    Two caches with equal descriptions flatten to the same pytree spec, so one exported graph takes
    both: an empty ``DynamicCache`` (prefill) has 0 leaves, a filled one ``2 · layers``.
    """
    static = _is_static(cache)
    if static:  # a decode loop describes its one cache every step: once its layers hold their tensors, kept
        known = _STATIC_DESCRIPTIONS.get(cache) if _hashable(cache) else None
        if known is not None:
            return known
    register_cache_pytree()
    layers = getattr(cache, "layers", ())
    windows = tuple(getattr(layer, "sliding_window", None) for layer in layers)
    # -1: a cache export cannot take apart (a QuantizedCache, a sliding StaticCache): _export_cache_call refuses it
    if static:  # every decode step is keyed: count its leaves without flattening it
        leaves = 3 * sum(layer.is_initialized for layer in layers) if static_layers_supported(cache) else -1
    else:
        leaves = _dynamic_leaves(cache)
        if leaves is None:
            leaves = len(pytree.tree_flatten(cache)[0]) if type(cache) in pytree.SUPPORTED_NODES else -1
    described = ("cache", type(cache).__qualname__, len(layers), leaves, windows)
    if static and _hashable(cache) and all(layer.is_initialized for layer in layers):  # fixed from now on
        _STATIC_DESCRIPTIONS[cache] = described  # (reset keeps the tensors)
    return described


def _dynamic_leaves(cache: Any) -> Union[int, None]:
    """How many leaves transformers' pytree flatten of a plain ``DynamicCache`` gives, counted without
    flattening it (a decode step describes its cache every call: 9 us flattened for 4 layers, 25 for
    32, on this project's CPU): its ``key_cache`` and ``value_cache`` lists hold the layers' keys and
    values that are not ``None`` (``integrations.executorch._get_cache_dict``). ``None`` for any other
    cache, or a layer type that flatten refuses (then flattening it says so)."""
    if type(cache) is not cache_class("DynamicCache"):
        return None
    plain = _plain_dynamic_layers()
    count = 0
    for layer in cache.layers:
        if type(layer) not in plain:
            return None
        count += (getattr(layer, "keys", None) is not None) + (getattr(layer, "values", None) is not None)
    return count


@functools.lru_cache(maxsize=1)
def _plain_dynamic_layers() -> tuple:
    """The layer types transformers' ``DynamicCache`` flatten takes (``DummyLayer``: 5.25, not 5.17)."""
    from transformers import cache_utils

    names = ("DynamicLayer", "DynamicSlidingWindowLayer", "DummyLayer")
    return tuple(getattr(cache_utils, name) for name in names if hasattr(cache_utils, name))


def _hashable(value: Any) -> bool:
    return type(value).__hash__ is not None


#: :func:`describe_cache` of each live ``StaticCache`` whose layers all hold their tensors: its
#: layers, their types and windows never change after that.
_STATIC_DESCRIPTIONS: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()


#: The program-key entry of a decoder-only call with a filled cache (:func:`step_key`).
STEP = "__graphlora_step__"


def _new_tokens(kwargs: Mapping[str, Any]) -> Union[int, None]:
    """How many new positions a decoder-only call feeds (``input_ids`` / ``inputs_embeds`` dim 1)."""
    first = next((kwargs[k] for k in ("input_ids", "inputs_embeds") if isinstance(kwargs.get(k), torch.Tensor)),
                 None)
    return first.shape[1] if first is not None and first.dim() > 1 else None


def _spans_cache(kwargs: Mapping[str, Any], cache: Any = None) -> bool:
    """A 2-d ``attention_mask`` as long as the ``StaticCache``'s ``max_cache_len`` (what generate gives
    Bloom, whose ALiBi bias is built from the mask and added to scores over every cache slot), rather
    than covering the cached and new positions only (``[batch, past + new]``, a manual decode loop).
    ``cache``: the call's, if the caller found it already."""
    if cache is None:
        _, cache = _cache_item(kwargs)
    mask = kwargs.get("attention_mask")
    if not _is_static(cache) or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return False
    keys = next((layer.keys for layer in cache.layers if getattr(layer, "is_initialized", False)), None)
    return isinstance(keys, torch.Tensor) and mask.shape[1] == keys.shape[-2]


def step_key(kwargs: Mapping[str, Any]) -> Union[tuple, None]:
    """What a decoder-only call with a filled cache adds to its program key: ``(one, spans, empty)``.

    ``one``: the call feeds one new token. Its graph is traced with one (``N = 1``) and a
    multi-token call's with two: torch.export takes every size it sees as 2 or more unless the
    example is 1, so a graph traced on two new tokens may hold branches and runtime checks that an
    ``N = 1`` call fails (transformers' ``is_causal = q_len > 1``; OPT's positions sliced by the
    cache's length, checked ``>= 2``). A decode loop thus runs one program for its prefill (``N >
    1``) and one for its steps. ``spans``: a 2-d mask spans a ``StaticCache`` (:func:`_spans_cache`),
    traced so. ``empty``: a prompt into an empty ``StaticCache`` (:func:`_empty_prompt`), traced with
    nothing cached. ``None`` for encoder-decoder calls (traced on their own synthetic inputs).
    """
    _, cache = _cache_item(kwargs)
    if cache is None or hasattr(cache, "cross_attention_cache") or "encoder_outputs" in kwargs:
        return None
    new = _new_tokens(kwargs)
    return new == 1, _spans_cache(kwargs, cache), _empty_prompt(kwargs, cache, new)


def _empty_prompt(kwargs: Mapping[str, Any], cache: Any, new: Union[int, None] = None) -> bool:
    """A multi-token ``StaticCache`` call whose 2-d mask covers only the new positions: a prompt into
    an empty cache (the mask covers the cached and the new positions), told apart from the shapes
    alone (no read of the cache's count, no sync). Its program is traced with nothing cached: one
    traced with a filled cache may read the count from the mask, ``past = mask length - new``, and
    then holds a guard ``past != 0`` (a contiguity check of OPT's positions sliced by it). ``new``:
    the call's new tokens, if the caller counted them already."""
    mask = kwargs.get("attention_mask")
    new = _new_tokens(kwargs) if new is None else new
    return (new is not None and new > 1 and _is_static(cache) and isinstance(mask, torch.Tensor) and mask.dim() == 2
            and mask.shape[1] == new)


def is_cache_call(kwargs: Mapping[str, Any]) -> bool:
    """A call that takes or returns a KV cache (``use_cache=True`` or a cache object given)."""
    return kwargs.get("use_cache") is True or any(is_cache(v) for v in kwargs.values())


# ---------------------------------------------------------------------- tracing
def _is_static(cache: Any) -> bool:
    cls = cache_class("StaticCache")
    return cls is not None and isinstance(cache, cls)


@torch.compiler.disable
def static_snapshot(values: Any) -> list:
    """The attributes of every not yet initialized ``StaticCache`` layer among ``values``, for
    :func:`static_restore` if the call fails (a call that is refused, fails to trace or fails a
    shape guard leaves the caller's cache as it was, with no tensors, instead of allocated by
    :func:`ready_static_cache`). A function pair, not a context manager: callable from the module's
    ``__call__``, a frame dynamo does not skip the callees of."""
    return [(layer, dict(vars(layer))) for cache in values if _is_static(cache)
            for layer in cache.layers if not layer.is_initialized]


@torch.compiler.disable
def static_restore(saved: list) -> None:
    """Put back what :func:`static_snapshot` saw."""
    for layer, attributes in saved:
        for name in set(vars(layer)) - set(attributes):
            delattr(layer, name)
        for name, value in attributes.items():
            setattr(layer, name, value)


def _cached_kv_heads(config: Any, heads: Union[int, None]) -> Union[int, None]:
    """How many key / value heads the model writes into its cache: ``num_key_value_heads``, else
    ``num_attention_heads``; Falcon's config names neither rightly (``num_kv_heads``; its
    ``multi_query`` attention caches one head; its ``new_decoder_architecture`` caches
    ``num_kv_heads`` where transformers' Falcon splits the fused projection itself, every head where
    it still broadcasts the keys to the query heads first, in ``FalconAttention._split_heads``
    (5.17 does; 5.25 does not)."""
    if getattr(config, "model_type", None) == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            from transformers.models.falcon import modeling_falcon

            broadcasts = hasattr(modeling_falcon.FalconAttention, "_split_heads")
            return heads if broadcasts else getattr(config, "num_kv_heads", None) or heads
        return 1 if getattr(config, "multi_query", False) else getattr(config, "num_kv_heads", None) or heads
    return getattr(config, "num_key_value_heads", None) or heads


def ready_static_cache(model: nn.Module, kwargs: Mapping[str, Any]) -> None:
    """Allocate a ``StaticCache`` argument's tensors now if it has none yet (``early_initialization``).

    transformers allocates them lazily in the first ``update``; doing it before the call gives the
    prefill call the decode call's signature (one program serves both, any number of new tokens)
    and puts the tensors in the caller's cache object, where every later call updates them in place
    (static addresses). Shapes as transformers' own export recipe makes them: ``[batch,
    num_key_value_heads, max_cache_len, head_dim]``, ``head_dim`` defaulting to ``hidden_size /
    num_attention_heads``; the model's dtype, the input's device.

    Raises:
        ConfigError: the model's config does not give the head counts and sizes.
    """
    for name, cache in kwargs.items():
        if not _is_static(cache) or all(layer.is_initialized for layer in cache.layers):
            continue
        config = model.config.get_text_config(decoder=True)
        heads = getattr(config, "num_attention_heads", None)
        kv_heads = _cached_kv_heads(config, heads)
        head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
        first = next((v for k, v in kwargs.items() if k in ("input_ids", "inputs_embeds")
                      and isinstance(v, torch.Tensor)), None)
        if not kv_heads or not head_dim or first is None:
            raise ConfigError(
                f"{name}= is a StaticCache with no tensors yet, and graphlora cannot size them: the call needs "
                "input_ids= or inputs_embeds=, and the config num_attention_heads (or num_key_value_heads) and "
                "hidden_size (or head_dim). Call cache.early_initialization(...) first."
            )
        cache.early_initialization(first.shape[0], kv_heads, head_dim, model.dtype, first.device)
        _reuse_static_tensors(model, cache)


#: Per source model: the last ``StaticCache`` :func:`ready_static_cache` initialized (a weak
#: reference) and its layers' tensors (:func:`_reuse_static_tensors`).
_STATIC_TENSORS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
#: The tensors a ``StaticLayer`` allocates when it initializes (``cumulative_length``: 5.25 has it, not every release).
_LAYER_TENSORS = ("keys", "values", "cumulative_length")


def _layer_tensors(cache: Any) -> list[dict[str, torch.Tensor]]:
    return [{n: getattr(layer, n) for n in _LAYER_TENSORS if isinstance(getattr(layer, n, None), torch.Tensor)}
            for layer in cache.layers]


def _fits(old: list, new: list) -> bool:
    return len(old) == len(new) and all(
        a.keys() == b.keys() and all((a[n].shape, a[n].dtype, a[n].device) == (b[n].shape, b[n].dtype, b[n].device)
                                     for n in a) for a, b in zip(old, new))


def _reuse_static_tensors(model: nn.Module, cache: Any) -> None:
    """Give a just initialized ``StaticCache`` the tensors of the last one initialized for ``model``,
    zeroed, when that cache object is gone and they have the same shapes, dtypes and devices.

    transformers makes a new ``StaticCache`` for every ``generate`` call; its new tensors get new
    addresses, and a CUDA graph that writes the cache in place is recorded anew for them (the
    decode step generate compiles: one more graph kept in the CUDA-graph tree, and its memory, per
    call: ``bench/probe_static_graphs.py``). Reused, the addresses stay, so the recorded graph
    replays. transformers 4.x reused its own cache the same way (``reset`` zeroes it in place). A
    cache that is still referenced never gives its tensors away.
    """
    tensors = _layer_tensors(cache)
    held = _STATIC_TENSORS.get(model)
    if held is not None and held[0]() is None and _fits(held[1], tensors):
        for layer, old in zip(cache.layers, held[1]):
            for name, tensor in old.items():
                tensor.zero_()
                setattr(layer, name, tensor)
        tensors = held[1]
    _STATIC_TENSORS[model] = (weakref.ref(cache), tensors)


@torch.compiler.disable
def carry_cache(kwargs: Mapping[str, Any], out: Any) -> Any:
    """``out`` with the cache object the caller passed in holding what the call returned.

    A program returns a new cache object (its outputs are tensors, unflattened into a fresh
    ``DynamicCache``); transformers' models update the caller's in place, and code that keeps
    calling with one cache object (``cache = DynamicCache(); model(ids, past_key_values=cache)``)
    relies on it. So the passed object takes the returned one's state (its attributes, the layers
    with their new key and value tensors) and stands in the output in its place. A ``StaticCache``
    is written in place by the program itself.
    """
    if not is_cache_call(kwargs):  # a plain forward: nothing to carry
        return out
    name, passed = _cache_item(kwargs)
    if passed is not None and _is_static(passed):
        return out
    _count_sliding(kwargs, passed, out)
    if passed is None:
        return out
    if isinstance(out, tuple):
        return type(out)(_carry(passed, v) for v in out) if not hasattr(out, "_fields") else out
    if isinstance(out, Mapping):
        for key in [k for k, v in out.items() if is_cache(v)]:
            out[key] = _carry(passed, out[key])
    return out


def _sliding_layers(cache: Any) -> list:
    cache = getattr(cache, "self_attention_cache", cache)  # an EncoderDecoderCache's decoder half
    return [layer for layer in getattr(cache, "layers", ()) if getattr(layer, "sliding_window", None)]


def _count_sliding(kwargs: Mapping[str, Any], passed: Any, out: Any) -> None:
    """Give a returned cache's sliding-window layers their count of tokens seen, and trim them.

    A program returns each ``DynamicSlidingWindowLayer``'s kept positions and this call's new ones,
    untrimmed (:func:`_sliding_trace`), and unflattened its count is what it holds, not what it has
    seen. The count is the passed cache's plus this call's new tokens; the kept positions are cut to
    the last ``sliding_window - 1``, as transformers' ``update`` cuts them (a view, no copy), unless
    the passed layer records its past (``activate_past_recording``: transformers' ``crop`` cuts them).
    """
    values = out.values() if isinstance(out, Mapping) else (out if isinstance(out, tuple) else ())
    returned = next((v for v in values if is_cache(v) and v is not passed), None)
    if returned is None:
        return
    names = ("decoder_input_ids", "decoder_inputs_embeds", "input_ids", "inputs_embeds")  # the decoder's first
    first = next((kwargs[k] for k in names if isinstance(kwargs.get(k), torch.Tensor)), None)
    new = first.shape[1] if first is not None and first.dim() > 1 else None
    before = _sliding_layers(passed) if passed is not None else []
    for i, layer in enumerate(_sliding_layers(returned)):
        old = before[i] if i < len(before) else None
        if new is not None and hasattr(layer, "cumulative_length"):
            layer.cumulative_length = getattr(old, "cumulative_length", 0) + new
        if getattr(old, "record_past", False):
            layer.record_past = True
            continue
        keep = layer.sliding_window - 1
        if isinstance(layer.keys, torch.Tensor) and layer.keys.dim() == 4 and 0 < keep < layer.keys.shape[-2]:
            layer.keys, layer.values = layer.keys[:, :, -keep:, :], layer.values[:, :, -keep:, :]


def _window_state(layer: Any) -> Union[bool, None]:
    """Whether a filled sliding-window layer is past its window: ``False`` within it (it keeps every
    token it has seen, fewer than ``sliding_window``), ``True`` past it (it has seen
    ``sliding_window`` or more and keeps the last ``sliding_window - 1``), ``None`` neither (a layer
    recording its past, ``activate_past_recording``, or cropped by hand: no program takes it)."""
    kept, seen, window = layer.keys.shape[-2], getattr(layer, "cumulative_length", 0), layer.sliding_window
    if seen < window:
        return False if kept == seen else None
    return True if kept == window - 1 else None


#: The graph input of a call whose sliding-window cache layers are past their window: a ``[seen, 0]``
#: tensor (no elements) whose length is their count of tokens seen, which their kept keys no longer
#: give (:func:`sliding_count_input`). Named as program-key entries are (hidden in messages).
SEEN = "__graphlora_seen__"


@torch.compiler.disable
def sliding_count_input(kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    """``kwargs`` with :data:`SEEN` added when the cache's sliding-window layers are past their window.

    Such a layer keeps the last ``sliding_window - 1`` positions and counts what it has seen
    (``cumulative_length``); the mask's offset and the positions a model computes from the cache
    (``get_mask_sizes``, ``get_seq_length``) follow the count. Within its window the count is the
    kept length, a size the graphs read from the keys; past it, the count travels as the length of
    the :data:`SEEN` input, which the trace gives the layers (:func:`_sliding_trace`). The input
    also makes the call's program key another one: a cache within its window and one past it are two
    programs (each traced once, whatever the lengths), never one per length.

    Raises:
        ConfigError: a sliding-window layer in a state no program takes (naming its counts and the
            workaround): one that keeps neither every token seen (within its window) nor the last
            ``sliding_window - 1`` (past it), as a cache recording its past for ``crop``
            (``activate_past_recording``) or one cut by hand; an encoder-decoder cache past its window
            (its decoder trace takes no count); layers of different windows, some past theirs, some within.
    """
    name, cache = _cache_item(kwargs)
    layers = [layer for layer in _sliding_layers(cache) if isinstance(getattr(layer, "keys", None), torch.Tensor)
              and layer.keys.dim() == 4] if cache is not None else []
    states = [_window_state(layer) for layer in layers]
    if all(state is False for state in states):
        return kwargs
    layer = layers[next(i for i, state in enumerate(states) if state is not False)]
    counts = (f"{layer.cumulative_length} tokens seen, sliding_window={layer.sliding_window}, "
              f"{layer.keys.shape[-2]} kept")
    if None in states:
        problem = (f"a sliding-window layer that keeps neither every token it has seen nor the last "
                   f"sliding_window - 1 ({counts}), as transformers' update leaves it (a cache recording its past "
                   "for crop, or cut by hand)")
    elif step_key(kwargs) is None:
        problem = f"an encoder-decoder cache past its sliding window ({counts})"
    elif False in states:
        problem = f"sliding-window layers past their window ({counts}) and others within theirs"
    else:
        problem = None
    if problem is not None:
        raise ConfigError(
            f"{name}= has {problem}; graphlora's graphs cannot take such a cache (they would read positions "
            "from the kept keys). Keep prompt plus new tokens within the window, or merge the adapter and "
            "generate with the model itself: gm.merge_adapter(); gm.get_base_model().generate(...)."
        )
    seen = torch.empty((layer.cumulative_length, 0), dtype=torch.uint8, device=layer.keys.device)
    return {**kwargs, SEEN: seen}


def _carry(passed: Any, returned: Any) -> Any:
    if returned is passed or type(returned) is not type(passed):
        return returned
    state = vars(passed)
    state.clear()
    state.update(vars(returned))
    return passed


def _cache_item(kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
    return next(((k, v) for k, v in kwargs.items() if is_cache(v)), (None, None))


def _filled(cache: Any) -> bool:
    return cache is not None and describe_cache(cache)[3] > 0


def _synthetic_cache(cache: Any, batch: int, past: int, encoder: int, new: int = TRACE_NEW) -> Any:
    """A cache of ``cache``'s pytree spec whose leaves are ``[batch, heads, length, head_dim]`` zeros.

    ``length`` is ``past`` for self-attention layers and ``encoder`` for cross-attention ones.
    """
    cross = getattr(cache, "cross_attention_cache", None)
    if cross is not None:  # EncoderDecoderCache(self_attention_cache, cross_attention_cache)
        return type(cache)(_synthetic_cache(cache.self_attention_cache, batch, past, encoder),
                           _synthetic_cache(cross, batch, encoder, encoder))
    leaves, spec = pytree.tree_flatten(cache)
    if _is_static(cache):  # [k, v, cumulative_length] per layer: room for the new tokens, `past` filled
        size = past + new + TRACE_ROOM
        fresh = [torch.zeros((batch, t.shape[1], size, *t.shape[3:]), dtype=t.dtype, device=t.device)
                 if t.dim() == 4 else torch.full_like(t, past) for t in leaves]
        return pytree.tree_unflatten(fresh, spec)
    # a sliding-window layer keeps at most window - 1 positions (keys and values: the same layers, twice)
    kept = [past if not getattr(layer, "sliding_window", None) else min(past, layer.sliding_window - 1)
            for layer in getattr(cache, "layers", ()) if getattr(layer, "keys", None) is not None]
    lengths = kept * 2 if len(kept) * 2 == len(leaves) else [past] * len(leaves)
    fresh = [torch.zeros((batch, t.shape[1], n, *t.shape[3:]), dtype=t.dtype, device=t.device)
             for t, n in zip(leaves, lengths)]
    return pytree.tree_unflatten(fresh, spec)


def _zeros_like_rows(value: Any, batch: int, length: int) -> Any:
    """``value`` (a tensor or a pytree of them, e.g. ``encoder_outputs``) as ``[batch, length, ...]`` zeros."""

    def fresh(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            return t
        return torch.zeros((batch, length, *t.shape[2:]), dtype=t.dtype, device=t.device)

    return pytree.tree_map(fresh, value)


def example_cache_inputs(kwargs: Mapping[str, Any], batch: int = TRACE_BATCH, past: int = TRACE_PAST,
                         new: int = TRACE_NEW, encoder: Union[int, None] = None) -> dict[str, Any]:
    """Consistent synthetic inputs for a KV-cache call: ``batch`` rows, ``past`` cached, ``new`` new positions.

    With ``encoder`` (an encoder-decoder model), ``input_ids`` / ``attention_mask`` /
    ``encoder_outputs`` and the cross-attention cache have ``encoder`` positions, the ``decoder_*``
    inputs and the self-attention cache ``past`` and ``new``.

    Raises:
        ConfigError: a tensor argument whose meaning (and so whose synthetic shape) is unknown.
    """
    out: dict[str, Any] = {}
    steps = {"decoder_input_ids", "decoder_inputs_embeds"} if encoder else {"input_ids", "inputs_embeds"}
    steps |= {"token_type_ids"}
    masks = {"decoder_attention_mask"} if encoder else {"attention_mask"}
    enc_inputs = {"input_ids", "inputs_embeds", "attention_mask"} if encoder else set()
    room = TRACE_ROOM if any(_is_static(v) for v in kwargs.values()) else 0
    spans = _spans_cache(kwargs)

    def mask(value: Any) -> Any:
        if value is None:  # a per-layer-type mask dict's entry transformers left out (Qwen2's, no padding)
            return None
        if value.dim() == 2:  # [B, past + new], or [B, max_cache_len] spanning a StaticCache
            length = past + new + (room if spans else 0)
            return torch.ones((batch, length), dtype=value.dtype, device=value.device)
        # [B, 1, new, kv]: generate's own mask for a StaticCache
        fill = torch.zeros if value.is_floating_point() else torch.ones  # all positions visible
        return fill((batch, value.shape[1], new, past + new + room), dtype=value.dtype, device=value.device)

    for name, value in kwargs.items():
        if is_cache(value):
            out[name] = _synthetic_cache(value, batch, past, encoder or past, new)
        elif name == "encoder_outputs" and encoder:
            out[name] = _zeros_like_rows(value, batch, encoder)
        elif name in masks and type(value) is dict and all(_mask_like(v) for v in value.values()):
            out[name] = {k: mask(v) for k, v in value.items()}  # one mask per layer type (Qwen2, Gemma 2)
        elif not isinstance(value, torch.Tensor):
            out[name] = value
        elif name in steps or name in enc_inputs:
            length = encoder if name in enc_inputs else new
            dtype_shape = (batch, length, *value.shape[2:])
            fill = torch.ones if name == "attention_mask" else torch.zeros
            out[name] = fill(dtype_shape, dtype=value.dtype, device=value.device)
        elif name in masks and value.dim() in (2, 4):
            out[name] = mask(value)
        elif name in ("position_ids", "decoder_position_ids") and value.dim() == 2:
            pos = torch.arange(past, past + new, dtype=value.dtype, device=value.device)
            out[name] = pos.expand(batch, new).contiguous()
        elif name == "cache_position" and value.dim() == 1:
            out[name] = torch.arange(past, past + new, dtype=value.dtype, device=value.device)
        elif name == SEEN:  # the sliding-window layers' count of tokens seen, as a length
            out[name] = torch.empty((past, 0), dtype=value.dtype, device=value.device)
        else:
            raise ConfigError(
                f"cannot trace a KV-cache call with {name}= (a {value.dim()}-d tensor graphlora does not know "
                "how to resize for the decode trace); call without it, or with use_cache=False."
            )
    return out


def _mask_like(value: Any) -> bool:
    """An attention mask entry the synthetic inputs can resize: ``None``, or a 2-d or 4-d tensor."""
    return value is None or (isinstance(value, torch.Tensor) and value.dim() in (2, 4))


def _mask_shapes(value: Any) -> Any:
    """``dynamic_shapes`` of an attention mask: batch and length of a 2-d one; batch, new tokens and
    cache length of a 4-d one (``[B, 1, N, L]``); per entry of a per-layer-type dict of them."""
    from torch.export import Dim

    if type(value) is dict:
        return {k: _mask_shapes(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() == 4:
        return {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}
    return dynamic_dims(value)


def _static_ones(value: Any, dims: Any) -> Any:
    """``dims`` (a tensor's, or a dict of tensors') without the dims of size 1: a one-token trace's
    new-token dims are static (torch.export would specialize them anyway, with a warning each)."""
    if isinstance(value, torch.Tensor) and isinstance(dims, dict):
        return {d: v for d, v in dims.items() if value.shape[d] != 1} or None
    if type(value) is dict and isinstance(dims, dict):
        return {k: _static_ones(value[k], v) for k, v in dims.items()}
    return dims


def _static_inside(cache: Any) -> bool:
    """An ``EncoderDecoderCache`` holding a ``StaticCache`` (not supported: its cross-attention half is
    written once, at the first decoder step, which the synthetic decoder trace does not model)."""
    return any(_is_static(getattr(cache, half, None)) for half in ("self_attention_cache", "cross_attention_cache"))


def _encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _export_cache_call(model: nn.Module, kwargs: Mapping[str, Any]) -> fx.GraphModule:
    from torch.export import Dim

    from .capture import split_var_keyword, var_keyword_inputs, widen_for_trace

    register_cache_pytree()
    name, cache = _cache_item(kwargs)
    if cache is not None and (describe_cache(cache)[3] < 0 or _static_inside(cache)):
        raise ConfigError(
            f"{name}= is a {type(cache).__name__} ({cache!r}), which graphlora's graphs cannot take yet (they take "
            "DynamicCache, EncoderDecoderCache of DynamicCaches, and StaticCache with plain StaticLayer layers "
            "and no offloading); generate with cache_implementation=\"dynamic\" (the default)."
        )
    filled = _filled(cache)
    if _encoder_decoder(model):  # the decoder's first step has one token: always synthetic
        example = example_cache_inputs(kwargs, past=TRACE_PAST if filled else 0, encoder=TRACE_ENCODER)
    elif filled:  # one new token, a prompt into an empty StaticCache: their own traces (see step_key)
        new = 1 if _new_tokens(kwargs) == 1 else TRACE_NEW
        past = 0 if _empty_prompt(kwargs, cache) else _trace_past(kwargs)
        example = example_cache_inputs(kwargs, past=past, new=new)
    else:
        example = widen_for_trace(kwargs)
    shapes = {}
    for name, value in example.items():
        if name == SEEN:
            shapes[name] = {0: Dim.AUTO}
        elif is_cache(value):
            shapes[name] = cache_dynamic_shapes(value)
        elif "attention_mask" in name and (type(value) is dict or isinstance(value, torch.Tensor)):
            shapes[name] = _mask_shapes(value)
        elif isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
            shapes[name] = dynamic_dims(value)
        else:  # encoder_outputs and other pytrees of tensors: batch and length of each leaf
            shapes[name] = pytree_shapes(value, {0: Dim.AUTO, 1: Dim.AUTO})
    shapes = {k: v if is_cache(example[k]) else _static_ones(example[k], v) for k, v in shapes.items()}
    inputs, fixed = split_var_keyword(model, example)  # output_hidden_states=True ... are baked in
    was_training = model.training
    model.eval()
    try:
        with _sliding_trace(model, SEEN in inputs), var_keyword_inputs(model, fixed, inputs):
            shapes = {k: v for k, v in shapes.items() if k in inputs}
            if not _count_retry(kwargs):
                gm = export_with_shapes(model, inputs, shapes)
            else:
                printed = io.StringIO()  # torch prints a failed trace's partial graph: only if it stays failed
                try:
                    with contextlib.redirect_stderr(printed):
                        gm = export_with_shapes(model, inputs, shapes)
                except Exception as exc:  # OPT's positions sliced by the count of tokens seen
                    if "data-dependent" not in str(exc):
                        sys.stderr.write(printed.getvalue())
                        raise
                    with _past_from_mask(model):
                        gm = export_with_shapes(model, inputs, shapes)
    finally:
        model.train(was_training)
    gm.training = False  # traced in eval mode (see graphlora.capture)
    return gm


def _trace_past(kwargs: Mapping[str, Any]) -> int:
    """The synthetic past of a filled-cache trace: :data:`TRACE_PAST`; with sliding-window layers,
    within the smallest window (a count their kept keys give), or, for a call past the window
    (:data:`SEEN`), :data:`TRACE_PAST` past the largest (each sliding layer then holds ``window - 1``)."""
    _, cache = _cache_item(kwargs)
    windows = [layer.sliding_window for layer in _sliding_layers(cache)] if cache is not None else []
    if not windows:
        return TRACE_PAST
    return max(windows) + TRACE_PAST if SEEN in kwargs else max(min(TRACE_PAST, min(windows) - 1), 1)


@contextlib.contextmanager
def _sliding_trace(model: nn.Module, seen: bool) -> Iterator[None]:
    """Inside (a trace only): a ``DynamicSlidingWindowLayer`` keeps what ``update`` gives it, untrimmed,
    and with ``seen``, ``model.forward`` takes the :data:`SEEN` input and gives its length to the
    cache's sliding-window layers as their count of tokens seen.

    transformers' ``update`` cuts the kept positions to the last ``sliding_window - 1``, a slice
    whose length the trace must decide (below or at the window: a guard on the past length that a
    longer one fails); the program returns them uncut, and :func:`carry_cache` cuts them
    (:func:`_count_sliding`). The attention reads what ``update`` returns, the same keys either way.
    """
    from transformers.cache_utils import DynamicSlidingWindowLayer

    def update(self: Any, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    original_update = DynamicSlidingWindowLayer.update
    original, had = model.forward, "forward" in vars(model)
    if seen:
        sig = inspect.signature(original)
        params = list(sig.parameters.values())
        at = next((i for i, p in enumerate(params) if p.kind == p.VAR_KEYWORD), len(params))
        params.insert(at, inspect.Parameter(SEEN, inspect.Parameter.KEYWORD_ONLY))

        def forward(*args: Any, **kwargs: Any) -> Any:
            count = kwargs.pop(SEEN).shape[0]
            _, cache = _cache_item(kwargs)
            for layer in _sliding_layers(cache):
                layer.cumulative_length = count
            return original(*args, **kwargs)

        forward.__signature__ = sig.replace(parameters=params)
        model.forward = forward
    DynamicSlidingWindowLayer.update = update
    try:
        yield
    finally:
        DynamicSlidingWindowLayer.update = original_update
        if seen and had:
            model.forward = original
        elif seen:
            del model.forward


def _count_retry(kwargs: Mapping[str, Any]) -> bool:
    """A ``StaticCache`` call whose trace, if it fails on a data-dependent size, is traced again
    under :func:`_past_from_mask` (only then: reading the count as a size syncs with the host): one
    with a 2-d mask over the cached and new positions (a manual decode loop's prompt, chunk or
    step), or one without a mask (transformers 5.17's generate drops an all-ones one for a
    compileable cache: SDPA's ``is_causal``).

    torch 2.13 slices by the unbacked count (OPT's ``position_ids[:, past:]``), torch 2.11 cannot,
    so there every masked call retries; a one-token step retries on both. A mask as long as the
    cache may be a one-token step's at the last slot (past + new = max_cache_len), where the check
    holds; a multi-token call with a mask spanning the cache (Bloom's in generate) traces without a
    retry and is not retried (the mask's length is not past + new). A prompt into an empty cache
    has its own program (:func:`_empty_prompt`), so a chunk's may assume ``past > 0``."""
    _, cache = _cache_item(kwargs)
    mask = kwargs.get("attention_mask")
    if not _is_static(cache):
        return False
    if mask is None:
        return True
    masked = isinstance(mask, torch.Tensor) and mask.dim() == 2
    return masked and (_new_tokens(kwargs) == 1 or not _spans_cache(kwargs, cache))


@contextlib.contextmanager
def _past_from_mask(model: nn.Module) -> Iterator[None]:
    """Inside (a trace only): a ``StaticLayer``'s count of tokens seen is read as a size, checked
    equal to the 2-d ``attention_mask``'s length minus the new tokens.

    The count is a 0-d tensor (it changes every step), so a model that slices by it (OPT's
    ``position_ids[:, past:]``, its positions when none are given) gets a size the trace cannot
    know; with one new token, ``[B, 1, D] + [B, n, D]`` broadcasts either way and transformers'
    ``is_causal = q_len > 1`` cannot be decided. The call's contract (the mask covers the cached and
    the new positions) says ``n = mask length - new``; the check makes the program assert it at run
    time (a mask of another length fails the call, nothing computed wrongly).

    Without a mask (OPT then builds ``ones(B, n + new)`` itself) the count stays a data-dependent
    size, bounded by the cache: ``0 <= n <= max_cache_len - new``, which decides the padding of that
    mask to the cache's length; the program reads the count every step."""
    from transformers.cache_utils import StaticLayer

    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["mask"], seen["new"] = kwargs.get("attention_mask"), _new_tokens(kwargs)

    original = StaticLayer.get_seq_length

    def get_seq_length(self: Any) -> Any:
        count = original(self)
        mask, new = seen.get("mask"), seen.get("new")
        if not isinstance(count, torch.Tensor) or new is None:
            return count
        if mask is None:
            value = count.item()
            torch._check(value >= 0)
            torch._check(value + new <= self.keys.shape[-2])  # the cache length, a size of the trace
            return value
        if not isinstance(mask, torch.Tensor):
            return count
        past = mask.shape[1] - new
        torch._check(count.item() == past)  # kept in the program as its run-time check
        return past  # a size of the mask's, not the unbacked read: slicing by it needs no guard

    from transformers import masking_utils

    original_pad = getattr(masking_utils, "prepare_padding_mask", None)

    def prepare_padding_mask(attention_mask: Any, kv_length: Any, kv_offset: Any) -> Any:
        # transformers pads only when ``pad > 0``, undecidable for ``pad = L - (n + new) >= 0``; a pad of
        # 0 is the unpadded mask, so the program pads by ``pad`` either way
        if attention_mask is None or seen.get("mask") is not None:
            return original_pad(attention_mask, kv_length, kv_offset)
        pad = kv_length + kv_offset - attention_mask.shape[-1]
        torch._check(pad >= 0)
        return torch.nn.functional.pad(attention_mask, (0, pad))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    StaticLayer.get_seq_length = get_seq_length
    if original_pad is not None:
        masking_utils.prepare_padding_mask = prepare_padding_mask
    try:
        yield
    finally:
        StaticLayer.get_seq_length = original
        if original_pad is not None:
            masking_utils.prepare_padding_mask = original_pad
        handle.remove()


#: marks the program key of an encoder-half call (see :class:`EncoderHalf`)
HALF = "__graphlora_half__"


class EncoderHalf(nn.Module):
    """The encoder of an encoder-decoder model as a module whose paths are the whole model's.

    It holds the source model's children under their own names, so a trace of it names sites and
    parameters exactly as the whole model's trace does (``encoder.block.0.layer.0.SelfAttention.q``)
    and the splice finds the same adapters. ``forward`` is the encoder's, returning a ``ModelOutput``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        encoder = model.get_encoder()
        for name, child in model.named_children():
            self.add_module(name, child)
        self._path = next(name for name, module in model.named_modules() if module is encoder)
        self.train(model.training)

    def forward(self, input_ids: Any = None, attention_mask: Any = None, inputs_embeds: Any = None) -> Any:
        encoder = self.get_submodule(self._path)
        return encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                       return_dict=True)


#: > 0 while :func:`trace_call` runs: generate's shadow forwards then call the model's own forward
#: (export traces the source model, whose ``forward`` generate has shadowed with a call into ``gm``)
_TRACING = [0]


def trace_call(model: nn.Module, kwargs: Mapping[str, Any]) -> fx.GraphModule:
    """Trace ``model`` for the call ``kwargs``: cache calls as in the module docstring, encoder halves
    with :class:`EncoderHalf`, others by :func:`graphlora.capture.trace_export`."""
    _TRACING[0] += 1
    try:
        return _trace_call(model, kwargs)
    finally:
        _TRACING[0] -= 1


def _trace_call(model: nn.Module, kwargs: Mapping[str, Any]) -> fx.GraphModule:
    from .capture import trace_export

    if HALF in kwargs:
        return trace_export(EncoderHalf(model), {k: v for k, v in kwargs.items() if k != HALF})
    if not is_cache_call(kwargs):
        return trace_export(model, kwargs)
    return _export_cache_call(model, kwargs)


def run_encoder(gm: Any, kwargs: Mapping[str, Any], names: Union[Sequence[str], None] = None) -> Any:
    """The source model's encoder on ``kwargs`` through ``gm``'s encoder program (traced on first use)."""
    from .capture import call_key
    from .mixed import write_row_index

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if names is not None:
        write_row_index(gm.adapter_state, names, (), kwargs, gm.training)
    key = (call_key({**kwargs, HALF: "encoder"}), gm._mode(names))
    return gm.programs.module_for(key, {**kwargs, HALF: "encoder"})(**kwargs)


# ---------------------------------------------------------------------- generate
def _row_names(names: Sequence[str], batch: Any) -> list[str]:
    """``names`` (one per input row) repeated for a call of ``batch`` rows (beams, return sequences)."""
    if batch is None or batch == len(names):
        return list(names)
    if batch % len(names):
        raise ConfigError(
            f"adapter_names has {len(names)} names but generate runs {batch} rows, not a multiple; "
            "give one adapter name per input row."
        )
    return [n for n in names for _ in range(batch // len(names))]  # repeat_interleave, as transformers expands


def _batch_of(kwargs: Mapping[str, Any]) -> Any:
    first = next((v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    return None if first is None else first.shape[0]


def generate(gm: Any, *args: Any, **kwargs: Any) -> Any:
    """The source model's ``generate(*args, **kwargs)`` with its forward routed through ``gm``'s programs.

    Takes everything transformers' ``generate`` takes, plus ``adapter_names=[...]`` (one adapter
    name or ``"__base__"`` per input row). Returns what transformers returns.

    Raises:
        AttributeError: the source model has no ``generate`` (it is not a generative model).
        Whatever transformers raises for bad arguments; ``gm`` is left as it was.
    """
    source = gm.get_base_model()
    run = getattr(source, "generate", None)
    if run is None:
        raise AttributeError(
            f"{type(source).__name__} cannot generate (it has no generate method); graphlora's generate runs "
            "the model's own. Use a model with a language-modeling head, e.g. AutoModelForCausalLM."
        )
    names = kwargs.pop("adapter_names", None)
    if names is not None and (isinstance(names, str) or not isinstance(names, Sequence)):
        raise ConfigError(f"adapter_names must be a list with one adapter name per input row, got {names!r}.")
    inputs = {k: kwargs[k] for k in ("input_ids", "inputs_embeds") if k in kwargs} or dict(enumerate(args[:1]))
    rows = _batch_of(inputs)
    if names is not None and rows is not None and rows != len(names):  # PEFT's check, before anything runs
        raise ConfigError(
            f"adapter_names has {len(names)} names but the input has {rows} rows; give one adapter name "
            "(or '__base__') per input row."
        )
    original = source.forward
    encoder = source.get_encoder() if _encoder_decoder(source) and hasattr(source, "get_encoder") else None

    @functools.wraps(original)  # transformers reads forward's signature to check and prepare inputs
    def forward(*call_args: Any, **call_kwargs: Any) -> Any:
        if _TRACING[0]:  # a first call of this signature traces the source model: its own forward
            return original(*call_args, **call_kwargs)
        if call_kwargs.get("return_dict") is True:
            call_kwargs.pop("return_dict")  # the programs return the model's output class already
        if names is not None:
            batch = _batch_of(call_kwargs) or _batch_of(dict(enumerate(call_args)))
            call_kwargs["adapter_names"] = _row_names(names, batch)
        return gm(*call_args, **call_kwargs)

    def get_compiled_call(compile_config: Any = None) -> Any:
        """transformers' ``get_compiled_call`` (static caches on CUDA: it compiles the decode step):
        the decode step runs ``gm``'s programs compiled with ``compile_config``'s options, and the
        routing stays plain Python outside the compiled code (no frame break inside a compiled
        ``__call__``, and switching adapters never recompiles)."""
        from transformers import CompileConfig

        options = (compile_config or getattr(source.generation_config, "compile_config", None)
                   or CompileConfig()).to_dict()

        def call(*call_args: Any, **call_kwargs: Any) -> Any:
            with gm.programs.compiled(options):
                return source(*call_args, **call_kwargs)

        return call

    with contextlib.ExitStack() as stack:
        stack.enter_context(_attribute_as(source, "forward", forward))
        stack.enter_context(_attribute_as(source, "get_compiled_call", get_compiled_call))
        if encoder is not None:
            stack.enter_context(_attribute_as(encoder, "forward", _encoder_forward(gm, encoder.forward, names)))
        return run(*args, **kwargs)


def _encoder_forward(gm: Any, original: Any, names: Any) -> Any:
    """The shadow of an encoder's ``forward``: the encoder program (generate calls ``get_encoder()(...)``)."""
    flags = ("output_attentions", "output_hidden_states")

    @functools.wraps(original)
    def forward(**kwargs: Any) -> Any:
        if _TRACING[0]:  # tracing the encoder program: the encoder's own forward
            return original(**kwargs)
        kwargs.pop("return_dict", None)  # the program returns a ModelOutput
        asked = [f for f in flags if kwargs.pop(f, None)]
        if asked:
            raise ConfigError(
                f"generate with {asked[0]}=True on an encoder-decoder model: the encoder program returns the "
                "last hidden state only; generate without it."
            )
        rows = None if names is None else _row_names(names, _batch_of(kwargs))
        return run_encoder(gm, kwargs, rows)

    return forward


_NONE = object()


@contextlib.contextmanager
def _attribute_as(module: nn.Module, name: str, value: Any) -> Iterator[None]:
    """``module.<name>`` is ``value`` (an instance attribute, over the class's) inside the block."""
    before = module.__dict__.get(name, _NONE)
    setattr(module, name, value)
    try:
        yield
    finally:
        if before is _NONE:
            module.__dict__.pop(name, None)
        else:
            setattr(module, name, before)
