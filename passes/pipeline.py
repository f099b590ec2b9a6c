"""The pass runner: every pipeline of graphlora's passes runs through ``PassManager``.

:func:`run_passes` hands the passes to ``torch.fx.passes.infra.pass_manager.PassManager`` with
``run_checks_after_each_pass=True`` and a check that lints the graph, so a pass that leaves a
malformed graph is caught where it ran. ``PassManager`` feeds each pass the ``graph_module`` the
previous one returned (a pass may return a new module), recompiles it after each pass (so the
passes skip their own recompile of that module, :mod:`.result`), and ORs the passes'
``modified`` flags. It wraps any error of a pass in a plain ``Exception`` naming the
pass; :func:`run_passes` re-raises the pass's own exception instead (with that line as a note),
so callers keep catching the error types the passes document.

:func:`base_passes` is the pipeline every traced graph gets before adapters are spliced.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Union

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

from .attention import CausalAttention
from .cleanup import StripTensorAsserts
from .dropout import FollowTrainMode
from .matmul_linear import MatmulAsLinear
from .result import MANAGED

__all__ = ["run_passes", "base_passes", "lint_check"]


def lint_check(module: nn.Module) -> None:
    """The runner's check before and after each pass: ``graph.lint()`` of a ``GraphModule``."""
    if isinstance(module, fx.GraphModule):
        module.graph.lint()


#: A pass: a ``PassBase`` instance, or any ``GraphModule -> PassResult`` callable.
Pass = Callable[[fx.GraphModule], PassResult]


def _managed(p: Pass) -> Callable[[nn.Module], PassResult]:
    """``p`` told that the manager recompiles the module it is given right after it returns."""

    def run(module: nn.Module) -> PassResult:
        token = MANAGED.set(module if isinstance(module, fx.GraphModule) else None)
        try:
            return p(module)
        finally:
            MANAGED.reset(token)

    name = p.__name__ if inspect.isfunction(p) else type(p).__name__
    run.__name__ = run.__qualname__ = name  # PassManager's messages name the pass
    return run


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass]) -> PassResult:
    """Run ``passes`` in order on ``gm`` through ``PassManager``, linting after each.

    Returns:
        ``PassResult(graph_module, modified)``: the module the last pass returned (``gm`` itself
        when every pass rewrites in place) and whether any pass changed it.

    Raises:
        whatever a pass raises (unwrapped from ``PassManager``'s ``Exception``), or the lint's
        ``RuntimeError`` for a graph left malformed.
    """
    manager = PassManager([_managed(p) for p in passes], run_checks_after_each_pass=True)
    manager.add_checks(lint_check)
    try:
        return manager(gm)
    except Exception as wrapped:
        cause = wrapped.__cause__
        if type(wrapped) is not Exception or cause is None:
            raise
        if hasattr(cause, "add_note"):  # Python 3.11+
            cause.add_note(str(wrapped))
        raise cause


def base_passes(lengths: Iterable[int] = (), linear_weights: Union[Collection[str], None] = None) -> list[PassBase]:
    """The passes every traced graph gets before adapters, in order: mode-following dropout
    (:class:`FollowTrainMode`), no dtype/device pins (:class:`StripTensorAsserts`),
    ``is_causal`` attention where the traced mask is shown causal, also at ``lengths``
    (:class:`CausalAttention`), and hand-written linears ``x @ W.T (+ b)`` as one
    ``matmul_linear`` node that the site finder reads (:class:`MatmulAsLinear`; ``linear_weights``:
    the paths of the model's ``nn.Linear`` weights, which alone may be such a ``W``)."""
    return [FollowTrainMode(), StripTensorAsserts(), CausalAttention(lengths), MatmulAsLinear(linear_weights)]
