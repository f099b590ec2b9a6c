"""``graphlora.specialize``: the fastest unmerged form of an adapted module, for serving.

It copies the module's graph, runs :class:`graphlora.passes.specialize.FreezeSwitches` on it
through :func:`graphlora.passes.run_passes` with every method rule's specialize steps
(``MethodRule.freeze_steps``): inactive branches and gate reads disappear, scalings become
constants. It returns a plain ``torch.fx.GraphModule`` that shares every parameter with the adapted module (base weights and
trained ``lora_A`` / ``lora_B``: nothing is copied, so later training of the adapters shows up in
the specialized module, while later switching does not: its switch state is frozen).
"""

from __future__ import annotations

import copy
import warnings

import torch.fx as fx

from .methods import RULES
from .passes import FreezeSwitches, run_passes

__all__ = ["specialize"]


def _freeze_steps() -> dict:
    """Every registered method rule's specialize steps, by op (``MethodRule.freeze_steps``)."""
    steps: dict = {}
    for rule in RULES:
        steps.update(rule.freeze_steps())
    return steps


def specialize(gm: fx.GraphModule) -> fx.GraphModule:
    """Freeze ``gm``'s current adapter state into a new graph module.

    For each site, with ``g_a`` the current gate of adapter ``a`` (``s_a * w_a`` if active, else 0)::

        y = W x + sum_{a: g_a != 0} g_a * B_a A_a dropout_a(x)      # g_a a constant in the code

    Args:
        gm: an :class:`~graphlora.AdaptedGraphModule` (or any GraphModule spliced by graphlora).
            With the export frontend, the graph of its first traced call signature is used: call
            the result with exactly those arguments (for a transformers model, include
            ``use_cache=False``).

    Returns:
        A plain ``torch.fx.GraphModule`` computing the same outputs as ``gm`` does now.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    out = fx.GraphModule(gm, graph, class_name=gm._get_name())
    out = run_passes(out, [FreezeSwitches(steps=_freeze_steps())]).graph_module
    out.delete_all_unused_submodules()
    out.train(gm.training)
    return out
