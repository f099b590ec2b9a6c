"""The one place where graphlora touches torch / transformers APIs that may move between releases.

Tested with torch 2.11 and 2.13, transformers 5.17 and 5.24.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

__all__ = ["export_module", "is_pretrained_model", "dynamic_dims", "adopt_graph"]


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
