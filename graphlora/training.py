"""Training with transformers' ``Trainer`` (and TRL's ``SFTTrainer``).

**Plain ``Trainer`` trains, evaluates and predicts.** ``Trainer`` reads which dataset columns and
label names to pass from ``inspect.signature(model.forward)`` and of ``type(model).forward``;
:func:`graphlora.signature.show_source_signature` makes both the source model's (``labels``, ``attention_mask``,
``**kwargs``...), called on every recompile of the emitted module. The generated ``forward`` keeps
running the graph; only its ``__signature__`` changes (``torch.fx`` and ``torch.compile`` read
the code, not the signature).

**Checkpoints with the adapter files only** need :class:`AdapterCheckpoints`: ``Trainer`` saves
``save_pretrained`` output only for a ``PreTrainedModel`` or a ``PeftModel`` (by ``isinstance``)
and loads adapter files back only into a ``PeftModel``; anything else gets its whole
``state_dict`` (base weights included) written to ``model.safetensors``. The mixin overrides the
two hooks ``Trainer`` has for this, ``_save`` and ``_load_from_checkpoint``, (and
``_load_best_model``): every adapter is written in PEFT's layout (``adapter_config.json`` +
``adapter_model.safetensors``; adapters other than ``default`` in ``<dir>/<name>/``) and read back
in place (a hotswap: no re-trace). Use :class:`AdapterTrainer`, or mix it into another trainer::

    class MySFTTrainer(AdapterCheckpoints, trl.SFTTrainer): ...
"""

from __future__ import annotations

import os
from typing import Any, Union

from torch import nn
from transformers import Trainer

__all__ = ["AdapterCheckpoints", "AdapterTrainer"]


class AdapterCheckpoints:
    """A ``Trainer`` mixin: checkpoints hold the adapter files only, and resuming reads them back.

    ``trainer.model`` must be a graphlora module (``save_adapter`` / ``load_adapter``).
    """

    def _save(self, output_dir: Union[str, None] = None, state_dict: Any = None) -> None:
        import torch
        from transformers.trainer import TRAINING_ARGS_NAME

        args = self.args
        output_dir = args.output_dir if output_dir is None else output_dir
        if not args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        _graphlora_model(self.model).save_adapter(output_dir, None)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Union[nn.Module, None] = None) -> None:
        _load_adapters(_graphlora_model(self.model if model is None else model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        _load_adapters(_graphlora_model(self.model), self.state.best_model_checkpoint)


def _graphlora_model(model: nn.Module) -> Any:
    if not (hasattr(model, "save_adapter") and hasattr(model, "adapter_state")):
        raise TypeError(
            f"AdapterCheckpoints needs a graphlora model (graphlora.inject(...)) as trainer.model, got "
            f"{type(model).__name__}; use transformers.Trainer for other models."
        )
    return model


def _load_adapters(model: Any, directory: str) -> None:
    """Load every adapter of ``model`` from ``directory`` (as :meth:`save_adapter` wrote it), keeping
    which adapters are trainable."""
    from .errors import AdapterFileError

    if not os.path.isfile(os.path.join(directory, "adapter_model.safetensors")) and not any(
            os.path.isfile(os.path.join(directory, name, "adapter_model.safetensors")) for name in model.adapters):
        raise AdapterFileError(
            f"{directory!r} holds no adapter_model.safetensors; resume from a checkpoint written by "
            "graphlora.training.AdapterTrainer (or AdapterCheckpoints)."
        )
    trainable = {name for name, config in model.adapters.items() if not config.inference_mode}
    for name in model.adapters:
        model.load_adapter(directory, name, is_trainable=name in trainable)


class AdapterTrainer(AdapterCheckpoints, Trainer):
    """transformers' ``Trainer`` whose checkpoints hold a graphlora model's adapter files only."""
