"""Gradient checkpointing settings: which blocks the programs checkpoint, and how.

:class:`CheckpointSettings` is what :class:`~graphlora.programs.ProgramSet` holds (``None``: off).
When set, every program but the mixed-batch ones gets the pass
:class:`graphlora.passes.CheckpointBlocks` after the splice, over the source model's layer stack
(the largest ``nn.ModuleList`` of same-class layers, :func:`graphlora.repeat.layer_stack`).

- :func:`settings_for` checks what ``gm.gradient_checkpointing_enable(...)`` (transformers'
  arguments) asks for;
- :func:`settings_of_source` reads what the source model had enabled before inject.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from torch import nn

from ._compat import layer_checkpointing
from .errors import ConfigError
from .repeat import layer_stack

__all__ = ["CheckpointSettings", "settings_for", "settings_of_source"]


@dataclass(frozen=True)
class CheckpointSettings:
    """Checkpoint blocks ``0, n, 2n, ...`` of the layer stack at ``prefix``.

    Attributes:
        prefix: the module path of the layer stack (``"model.layers"``).
        every_n_layers: ``n`` (1: every block).
        options: keyword arguments for ``torch.utils.checkpoint.checkpoint`` (default
            ``use_reentrant=False``).
    """

    prefix: str
    every_n_layers: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)


def _prefix(model: nn.Module) -> str:
    found = layer_stack(model, min_layers=1)
    if found is None:
        raise ConfigError(
            f"{type(model).__name__} has no nn.ModuleList of same-class layers, so there is no block to "
            "checkpoint; gradient checkpointing applies to models built as a stack of layers."
        )
    return found[0]


def settings_for(model: nn.Module, kwargs: Union[Mapping[str, Any], None], every_n_layers: int = 1,
                 offload: bool = False) -> CheckpointSettings:
    """The settings for ``gradient_checkpointing_enable(kwargs, every_n_layers, offload)`` on ``model``.

    Raises:
        ConfigError: ``kwargs`` is not a dict, ``every_n_layers`` is not a positive int,
            ``offload=True`` (not supported), or the model has no layer stack.
    """
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigError(f"gradient_checkpointing_kwargs={kwargs!r} must be a dict of checkpoint() arguments or None.")
    if not isinstance(every_n_layers, int) or isinstance(every_n_layers, bool) or every_n_layers < 1:
        raise ConfigError(f"every_n_layers={every_n_layers!r} must be a positive int (1: every layer).")
    if offload:
        raise ConfigError("offload=True (saved activations in host memory) is not supported; pass offload=False.")
    return CheckpointSettings(_prefix(model), every_n_layers, dict(kwargs or {}))


def settings_of_source(model: nn.Module) -> Union[CheckpointSettings, None]:
    """What ``model.gradient_checkpointing_enable()`` set before inject, or ``None``.

    The checkpointed layers give ``every_n_layers`` (the index of the second one; 1 when only the
    first is); the checkpoint function's keyword arguments are kept.
    """
    found = layer_stack(model, min_layers=1)
    if found is None:
        return None
    prefix, layers = found
    flags, options = layer_checkpointing(layers)
    on = [i for i, flag in enumerate(flags) if flag]
    if not on:
        return None
    return CheckpointSettings(prefix, on[1] if len(on) > 1 else 1, options)
