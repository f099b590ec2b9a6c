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

from graphlora.passes import Site, follow_train_mode, strip_tensor_asserts

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


def prepare_base(gm: fx.GraphModule) -> fx.GraphModule:
    """The passes every traced graph gets before adapters: mode-following dropout, no dtype pins."""
    follow_train_mode(gm)
    strip_tensor_asserts(gm)
    return gm
