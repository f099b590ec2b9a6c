"""Fast capture of deep models: trace two layers, replicate the block, check against the model.

``torch.export`` time grows with depth. For a model whose largest ``nn.ModuleList`` holds
identical layers, :func:`trace_repeated` temporarily cuts that list to its first two layers,
exports (a fraction of the time), rebuilds the full-depth graph with the pass
:class:`graphlora.passes.replicate.ReplicateBlock` (through :func:`graphlora.passes.run_passes`),
and keeps it only if it reproduces the model's outputs on the example inputs bit for bit. It
applies only when every layer has the same module types and parameter shapes and no per-layer
config list (``layer_types``...) tells layers apart, and block 1 of the two-layer graph is block
0 renamed (so layer-dependent masks or code paths are caught structurally, not only by the
numerical check on short inputs). Anything else falls back to a full export.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from graphlora.passes import ReplicateBlock, run_passes

__all__ = ["layer_stack", "trace_repeated"]

MIN_LAYERS = 4


def layer_stack(model: nn.Module, min_layers: int = MIN_LAYERS) -> Union[tuple[str, nn.ModuleList], None]:
    """The ``nn.ModuleList`` of at least ``min_layers`` same-class layers holding the most parameters."""
    best: Union[tuple[str, nn.ModuleList, int], None] = None
    for name, module in model.named_modules():
        if not name or not isinstance(module, nn.ModuleList) or len(module) < min_layers:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[2]:
            best = (name, module, size)
    return (best[0], best[1]) if best else None


def _signature(layer: nn.Module) -> tuple:
    """What must match between layers: module types, parameter/buffer names, shapes, dtypes."""
    return (
        tuple((name, type(m)) for name, m in layer.named_modules()),
        tuple((name, t.shape, t.dtype) for name, t in layer.state_dict(keep_vars=True).items()),
    )


def _uniform(model: nn.Module, layers: nn.ModuleList) -> bool:
    """Every layer is built alike, and no per-layer config list singles some layers out."""
    first = _signature(layers[0])
    if any(_signature(layer) != first for layer in layers):
        return False
    config = getattr(model, "config", None)
    if config is not None:
        for value in vars(config).values():
            if isinstance(value, (list, tuple)) and len(value) == len(layers) and len(set(map(repr, value))) > 1:
                return False  # e.g. layer_types mixing sliding-window and full attention
    return True


def _same_outputs(a: Any, b: Any) -> bool:
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    if len(leaves_a) != len(leaves_b):
        return False
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and (x.shape != y.shape or not torch.equal(x, y)):
            return False
    return True


def trace_repeated(
    model: nn.Module, kwargs: Mapping[str, Any], export: Callable[[nn.Module, Mapping[str, Any]], fx.GraphModule]
) -> Union[fx.GraphModule, None]:
    """The full-depth graph built from a two-layer trace, or ``None`` when that does not apply.

    Args:
        model: the model (in the mode it should be traced in).
        kwargs: example inputs, already widened for dynamic dims.
        export: the exporter for the cut-down model (``torch.export`` in eval mode).
    """
    found = layer_stack(model)
    if found is None or not _uniform(model, found[1]):
        return None
    path, layers = found
    full = layers._modules
    try:
        layers._modules = dict(list(full.items())[:2])
        small = export(model, kwargs)
    except Exception:
        return None
    finally:
        layers._modules = full
    result = run_passes(small, [ReplicateBlock(path, len(full), source=model)])
    if not result.modified:  # not the two-block shape: the pass does not apply
        return None
    gm = result.graph_module
    gm.training = False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ok = _same_outputs(gm(**kwargs), model(**kwargs))
    except Exception:
        ok = False
    finally:
        model.train(was_training)
    return gm if ok else None
