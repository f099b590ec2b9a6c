"""The common end of every rewrite: lint and regenerate the code if anything changed."""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["finish"]


def finish(gm: fx.GraphModule, modified: bool) -> PassResult:
    """``graph.lint()`` and ``recompile()`` when ``modified``; the pass's :class:`PassResult`."""
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
