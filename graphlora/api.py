"""``graphlora.inject``: capture, locate, splice, emit."""

from __future__ import annotations

import os
from typing import Any, Union

from torch import nn

from .capture import capture
from .config import IA3Config, LoHaConfig, LoKrConfig, LoraConfig
from .errors import ConfigError
from .methods import as_config, config_types
from .module import AdaptedGraphModule

__all__ = ["inject", "list_sites"]


def inject(
    model: nn.Module,
    config: Union[LoraConfig, IA3Config, LoHaConfig, LoKrConfig, str, os.PathLike, None] = None,
    *,
    adapter_name: str = "default",
    example_inputs: Any = None,
    is_trainable: bool = False,
    autocast_adapter_dtype: bool = True,
) -> AdaptedGraphModule:
    """Trace ``model`` and splice a LoRA adapter into the linear ops ``config`` selects.

    Args:
        model: any ``nn.Module``; transformers models need no example inputs.
        config: the adapter's :class:`LoraConfig` (DoRA with ``use_dora=True``) or
            :class:`IA3Config` (default: ``LoraConfig()``), or the path of a
            PEFT LoRA adapter directory (``adapter_config.json`` + weights, as PEFT's
            ``save_pretrained`` writes it): its config is used and its weights loaded (frozen, as
            PEFT's ``from_pretrained``, unless ``is_trainable``; see ``AdaptedGraphModule.load_adapter``).
            LoHa and LoKr configs (:class:`LoHaConfig`, :class:`LoKrConfig`) work the same way.
        adapter_name: name of the first adapter.
        example_inputs: a tuple of positional args or a dict of kwargs to trace with
            (needed only for models ``torch.fx.symbolic_trace`` cannot trace that are not
            transformers models).
        is_trainable: with a directory ``config``, load the adapter trainable
            (``PeftModel.from_pretrained(..., is_trainable=True)``); ignored otherwise (a config
            object is trainable unless its ``inference_mode`` is set).

    Returns:
        The regenerated :class:`AdaptedGraphModule`; it shares the model's parameters
        (frozen; only the active adapter trains) and is called like the model.

    Raises:
        TraceError: no frontend could trace the model.
        NoTargetError / ConfigError: the config selects nothing or is invalid. The model is
            left as it was.
    """
    if isinstance(config, (str, os.PathLike)):
        from .peft_io import read_adapter_config

        read_adapter_config(config, adapter_name)  # fail before the (slow) trace on a bad path or config
        gm = AdaptedGraphModule.from_capture(model, capture(model, example_inputs))
        gm.adapter_state.autocast_adapter_dtype = bool(autocast_adapter_dtype)
        gm.load_adapter(config, adapter_name, is_trainable=is_trainable)
        return gm
    config = LoraConfig() if config is None else as_config(config)  # a PEFT config object reads as its file
    if not isinstance(config, config_types()):
        names = ", ".join(f"a {t.__module__.split('.')[0]}.{t.__name__}" for t in config_types())
        raise ConfigError(f"config must be {names} or a PEFT adapter directory, got {type(config).__name__}.")
    gm = AdaptedGraphModule.from_capture(model, capture(model, example_inputs))
    gm.adapter_state.autocast_adapter_dtype = bool(autocast_adapter_dtype)
    gm.add_adapter(adapter_name, config)
    return gm


def list_sites(model: nn.Module, *, example_inputs: Any = None) -> list[str]:
    """Names of every linear site graphlora finds in ``model`` (what ``target_modules`` can name)."""
    gm = AdaptedGraphModule.from_capture(model, capture(model, example_inputs))
    return [s.name for s in gm.sites]
