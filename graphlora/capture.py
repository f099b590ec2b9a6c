"""Capture: trace a model to a ``torch.fx.GraphModule``.

Two frontends:

- ``fx``: ``torch.fx.symbolic_trace`` for plain modules. The graph keeps ``call_module`` nodes
  for ``nn.Linear`` and works for any call signature.
- ``export``: ``torch.export.export(strict=False)`` with dynamic batch and sequence dims, for
  transformers models and anything fx cannot trace. The graph is specific to the call
  signature it was traced with (which kwargs, and the values of non-tensor ones); the
  emitted module traces again on a new signature (:mod:`graphlora.module`).

Both keep the original parameter tensors (``data_ptr`` equal): nothing is copied.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from . import generation
from ._compat import export_module, is_cache, is_pretrained_model
from .errors import TraceError

__all__ = [
    "Captured",
    "capture",
    "trace_export",
    "example_inputs_for",
    "bind_inputs",
    "call_key",
    "forward_params",
    "widen_for_trace",
]


@dataclass
class Captured:
    """A traced graph and how it was made."""

    gm: fx.GraphModule
    frontend: str  # "fx" or "export"
    kwargs: Mapping[str, Any] | None = None  # the example inputs of an export trace


def forward_params(model: torch.nn.Module) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Names of ``model.forward``'s positional parameters and the call defaults graphlora adds.

    For a transformers model that takes ``use_cache``, calls default to ``use_cache=False``
    (a traced graph has no KV cache).
    """
    sig = inspect.signature(model.forward)
    names = tuple(
        p.name for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    )
    defaults = {"use_cache": False} if is_pretrained_model(model) and "use_cache" in sig.parameters else {}
    return names, defaults


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):  # not the device: graphs follow the module's device
        return ("tensor", value.dtype, value.dim())
    if is_constant(value):
        return ("const", value)
    if is_cache(value):  # a KV cache: its type, layers and filled leaves (one program per pytree spec)
        return generation.describe_cache(value)
    if type(value) is dict:  # a pytree input (Qwen2's per-layer-type attention masks): its structure
        return ("dict", tuple(sorted((str(k), _describe(v)) for k, v in value.items())))
    return ("object", type(value).__qualname__)


def call_key(kwargs: Mapping[str, Any]) -> tuple:
    """What makes two calls need different export graphs: names, tensor ranks/dtypes, constants, and
    for a decode call (a filled KV cache) its shape class (:func:`graphlora.generation.step_key`)."""
    described = [(name, _describe(value)) for name, value in kwargs.items()]
    key = tuple(sorted(described))
    if any(d[0] == "cache" and d[3] > 0 for _, d in described):
        step = generation.step_key(kwargs)
        if step is not None:
            key += ((generation.STEP, ("const", step)),)
    return key


def widen_for_trace(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Copies of the inputs whose batch/sequence dims of size 1 are repeated to 2.

    ``torch.export`` specialises dims whose example size is 0 or 1; tracing on size 2 keeps
    them dynamic, so the graph also serves the original size-1 calls.
    """
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            reps = [2 if (i < 2 and value.shape[i] == 1) else 1 for i in range(value.dim())]
            value = value.repeat(*reps) if any(r > 1 for r in reps) else value
        out[name] = value
    return out


def example_inputs_for(model: torch.nn.Module) -> dict[str, Any]:
    """Example kwargs for a transformers model, made from ``model.config`` (batch 2, sequence 8).

    Raises:
        TraceError: the model's main input is neither token ids nor pixels.
    """
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    main = getattr(model, "main_input_name", "input_ids")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    batch, seq = 2, 8
    generator = torch.Generator().manual_seed(0)
    if main == "input_ids":
        vocab = int(getattr(text, "vocab_size", 2) or 2)
        kwargs: dict[str, Any] = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=generator).to(device)}
        if getattr(config, "is_encoder_decoder", False):
            kwargs["decoder_input_ids"] = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
    elif main == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(config, "num_channels", 3)
        kwargs = {"pixel_values": torch.randn(batch, channels, size, size, generator=generator).to(device, dtype)}
    else:
        raise TraceError(
            f"cannot make example inputs for a model whose main input is {main!r}; "
            "pass example_inputs=(args...) or example_inputs={'name': tensor, ...} to graphlora.inject."
        )
    _, defaults = forward_params(model)
    kwargs.update(defaults)
    return kwargs


def bind_inputs(model: torch.nn.Module, example_inputs: Any) -> dict[str, Any]:
    """Example inputs (tuple of args, dict of kwargs, or one tensor) as kwargs of ``model.forward``."""
    names, defaults = forward_params(model)
    if isinstance(example_inputs, Mapping):
        kwargs = dict(example_inputs)
    else:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        if len(args) > len(names):
            raise TraceError(
                f"example_inputs has {len(args)} positional values but {type(model).__name__}.forward "
                f"takes {len(names)} ({', '.join(names)}); pass a dict of keyword arguments instead."
            )
        kwargs = dict(zip(names, args))
    for key, value in defaults.items():
        kwargs.setdefault(key, value)
    return kwargs


def _export_eval(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> fx.GraphModule:
    was_training = model.training
    model.eval()
    try:
        gm = export_module(model, kwargs)
    finally:
        model.train(was_training)
    # ep.module() starts in training mode and refuses .train()/.eval(); the graph was traced in
    # eval mode, so say so (modules the base passes add inherit this flag)
    gm.training = False
    return gm


def trace_export(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> fx.GraphModule:
    """Export ``model`` in eval mode on ``kwargs`` (size-1 batch/sequence dims widened first).

    Deep models with a stack of identical layers are traced with two layers and replicated
    (:mod:`graphlora.repeat`), checked bit for bit against the model; otherwise a full export.
    """
    from .repeat import trace_repeated

    inputs, fixed = split_var_keyword(model, kwargs)
    inputs = widen_for_trace(inputs)
    with var_keyword_inputs(model, fixed, inputs):
        return trace_repeated(model, inputs, _export_eval) or _export_eval(model, inputs)


def is_constant(value: Any) -> bool:
    """A value a program bakes in (``None``, bool, int, float, str): part of its key, not an input."""
    return value is None or isinstance(value, (bool, int, float, str))


def split_var_keyword(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``kwargs`` split into the traced graph's inputs and the constants it bakes in.

    Inputs: those ``model.forward`` names, and tensors (or pytrees of them) that reach it only
    through ``**kwargs`` (``cache_position=`` on transformers 5.24, whose forward no longer names
    it). Constants: the rest of what reaches it through ``**kwargs`` (``output_hidden_states``,
    ``output_attentions``, ``return_dict``), each value its own program.
    """
    params = inspect.signature(model.forward).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    fixed = {k: v for k, v in kwargs.items() if k not in named and is_constant(v)}
    return {k: v for k, v in kwargs.items() if k not in fixed}, fixed


@contextlib.contextmanager
def var_keyword_inputs(model: torch.nn.Module, fixed: Mapping[str, Any], inputs: Mapping[str, Any]) -> Iterator[None]:
    """Inside: ``model.forward`` passes ``fixed`` on to the real forward, and its signature has no
    ``**kwargs`` (what ``torch.export`` binds inputs to): the ``inputs`` it does not name become
    keyword-only parameters, so a tensor given through ``**kwargs`` is a graph input like any other.
    The instance's own ``forward`` (if any) is put back after."""
    original = model.forward
    sig = inspect.signature(original)
    params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
    extra = [name for name in inputs if name not in sig.parameters]
    if not fixed and not extra:
        yield
        return
    had = "forward" in vars(model)

    def forward(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **kwargs, **fixed)

    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in extra]
    forward.__signature__ = sig.replace(parameters=params)
    model.forward = forward
    try:
        yield
    finally:
        if had:
            model.forward = original
        else:
            del model.forward


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def capture(model: torch.nn.Module, example_inputs: Any = None) -> Captured:
    """Trace ``model`` with the first frontend that works.

    transformers models go to ``export`` (example inputs made from the config when none are
    given); other modules try ``fx`` first, then ``export`` with ``example_inputs``.

    Raises:
        TraceError: every frontend failed; the message lists each one's first error.
    """
    errors: list[str] = []
    was_training = model.training
    model.eval()
    try:
        if not is_pretrained_model(model):
            try:
                return Captured(fx.symbolic_trace(model), "fx")
            except Exception as exc:  # fx raises many types for untraceable code
                errors.append(f"fx.symbolic_trace: {_first_line(exc)}")
        if example_inputs is None and is_pretrained_model(model):
            kwargs = example_inputs_for(model)
        elif example_inputs is None:
            errors.append("torch.export: not tried, it needs example inputs")
            kwargs = None
        else:
            kwargs = bind_inputs(model, example_inputs)
        if kwargs is not None:
            try:
                return Captured(trace_export(model, kwargs), "export", kwargs)
            except Exception as exc:
                errors.append(f"torch.export (strict=False): {_first_line(exc)}")
    finally:
        model.train(was_training)
    raise TraceError(
        f"could not trace {type(model).__name__}. Frontends tried:\n  - " + "\n  - ".join(errors) + "\n"
        "Fix: pass example_inputs=(args...) or {'name': tensor} so torch.export can trace it, or make the "
        "untraceable submodule a leaf (torch.fx.Tracer.is_leaf_module) and call graphlora.inject on the rest."
    )
