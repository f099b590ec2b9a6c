"""Programs: one traced call signature each, kept pristine so adapters can be re-spliced.

A *program* holds the graph as traced (after the base passes), the linear sites located in it,
and, for every signature but the emitted module's own, the GraphModule that runs it.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Union

import torch.fx as fx
from torch import nn

from graphlora.passes import Site, causal_attention, follow_train_mode, strip_tensor_asserts

__all__ = ["Program", "copy_graph", "prepare_base"]


@dataclass
class Program:
    """One traced call signature: its pristine graph, sites, and (for variants) module."""

    key: Any  # (signature key or None for fx, mixed: bool)
    base_graph: fx.Graph
    sites: list[Site]
    module: Union[fx.GraphModule, None] = None

    @property
    def mixed(self) -> bool:
        return self.key[1]


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
    """The passes every traced graph gets before adapters: mode-following dropout, no dtype pins,
    ``is_causal`` attention where the traced mask is shown causal (past ``model``'s windows too)."""
    follow_train_mode(gm)
    strip_tensor_asserts(gm)
    causal_attention(gm, window_lengths(model))
    return gm
