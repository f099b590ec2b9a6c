"""Prepare: the base passes every traced graph gets before any adapter (the pipeline's second step).

:func:`prepare_base` runs :func:`graphlora.passes.base_passes` through the pass runner with the
attention-window lengths read from the model's config; :func:`copy_graph` copies a pristine graph
for splicing (:mod:`graphlora.programs`).
"""

from __future__ import annotations

import copy
import warnings
from typing import Union

import torch.fx as fx
from torch import nn

from graphlora.passes import base_passes, run_passes
from graphlora.passes.matmul_linear import linear_weights

__all__ = ["copy_graph", "prepare_base", "window_lengths"]


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """``deepcopy`` of a graph (its pytree codegen included), without torch's pytree deprecation noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(graph)


#: Config fields (transformers) that bound how far a token attends: a mask may be causal only below them.
_WINDOW_FIELDS = ("sliding_window", "attention_chunk_size", "window_size", "local_attention", "attention_window")


def window_lengths(model: Union[nn.Module, None]) -> tuple[int, ...]:
    """Sequence lengths just past every attention window or chunk in ``model.config`` (and its text config)."""
    config = getattr(model, "config", None)
    configs = [config]
    try:
        configs.append(config.get_text_config())
    except (AttributeError, ValueError):  # no text config, or several (e.g. MusicgenConfig): read the top level
        pass
    found: set[int] = set()
    for cfg in configs:
        for field in _WINDOW_FIELDS:
            value = getattr(cfg, field, None)
            for w in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(w, int) and not isinstance(w, bool) and w > 0:
                    found.update((w + 1, w + 2))
    return tuple(sorted(found))


def prepare_base(gm: fx.GraphModule, model: Union[nn.Module, None] = None) -> fx.GraphModule:
    """The passes every traced graph gets before adapters (:func:`graphlora.passes.base_passes`,
    run through :func:`graphlora.passes.run_passes`): mode-following dropout, no dtype pins,
    ``is_causal`` attention where the traced mask is shown causal (past ``model``'s windows too).
    Rewrites ``gm`` in place and returns it."""
    weights = linear_weights(model) if model is not None else None
    return run_passes(gm, base_passes(window_lengths(model), weights)).graph_module
