"""The transformers model surface of the emitted module: what users ask of the model it came from.

``gm`` stands in for its source model, which shares every parameter. These functions back the
one-line methods of :class:`~graphlora.module.AdaptedGraphModule` (its "transformers model surface"
section):

- :func:`missing_attribute`: ``__getattr__``'s fallback. An attribute that ``nn.Module`` does not
  find on ``gm`` (parameter, buffer, submodule) is read from the source model (``config``,
  ``generation_config``, ``device``, ``dtype``, ``get_input_embeddings``, ``can_generate``, ...).
  Dunder names are never forwarded (pickle, copy, fx and dynamo probe them), nor are methods that
  would run or publish the source model without its adapters (:data:`NOT_FORWARDED`). A name found
  nowhere raises an ``AttributeError`` that says what ``gm`` is.
- :func:`num_parameters`: transformers' count over ``gm``'s parameters (adapters included).
- :func:`save_pretrained`: the adapter files, as ``PeftModel.save_pretrained`` writes them.
- :func:`merged_source`: what ``merge_and_unload()`` returns (the source model for a transformers one).
- :func:`reduce` / :func:`rebuild`: pickling and ``deepcopy`` by re-creating the module from the
  source model and the adapter state (the graphs are traced again on load). A merged module is
  refused (unmerge first); gradient-checkpointing settings are not carried. transformers itself
  makes a model unpicklable once it was called with ``output_hidden_states`` / ``output_attentions``
  (local output-capturing hooks on its modules); ``deepcopy`` still works then.

``merge_and_unload`` afterwards: ``gm`` stays merged over the weights it shares with the returned
model; ``unmerge_adapter()`` restores them, in both.

**Dtype casts after inject** (``gm.to(torch.bfloat16)``, ``.half()``) re-trace the first program
from the cast source model (:meth:`graphlora.programs.ProgramSet.after_move`): an fp32 trace bakes
every cast as ``to(float32)`` and cannot tell an intentional upcast (RMSNorm's variance, rotary
angles) from a cast back to the activation dtype, so rewriting dtype constants would run with
wrong numbers. Other signatures trace again on their next call. Not done: PEFT's fp32 adapters over
a bf16 base (``autocast_adapter_dtype=True``, PEFT's default): graphlora's adapters take the base
dtype (PEFT's ``autocast_adapter_dtype=False``), since the switch ops and Triton kernels take one dtype.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any, Union

import torch
from torch import nn

from ._compat import is_pretrained_model
from .errors import AdapterStateError

__all__ = ["NOT_FORWARDED", "AdaptedBackbone", "missing_attribute", "num_parameters", "save_pretrained", "merged_source",
           "reduce", "rebuild"]

#: Source-model attributes ``gm`` does not forward: they would run or publish the model without its adapters.
NOT_FORWARDED = frozenset({"push_to_hub", "generate"})


def describe(gm: nn.Module) -> str:
    """``the adapted graph of a LlamaForCausalLM (graphlora.AdaptedGraphModule)``."""
    facts = gm.__dict__.get("_facts")
    source = type(facts.source).__name__ if facts is not None else "model"
    return f"the adapted graph of a {source} (graphlora.AdaptedGraphModule)"


def missing_attribute(gm: nn.Module, name: str, error: AttributeError) -> Any:
    """``name`` read from ``gm``'s source model, after ``nn.Module.__getattr__`` raised ``error``.

    Raises:
        AttributeError: a dunder name, a name in :data:`NOT_FORWARDED`, or a name the source model
            lacks too; the message names what ``gm`` is.
    """
    facts = gm.__dict__.get("_facts")
    if facts is None or (name.startswith("__") and name.endswith("__")):
        raise error
    if name in NOT_FORWARDED:
        raise AttributeError(
            f"{describe(gm)} does not forward {name!r} to its source model: the source model would run "
            "without the adapters. Call it on gm.merge_and_unload() (adapters merged) or on "
            "gm.get_base_model() (no adapters)."
        ) from None
    try:
        return getattr(facts.source, name)
    except AttributeError:
        pass
    raise AttributeError(
        f"{describe(gm)} has no attribute {name!r}, and neither has its source "
        f"{type(facts.source).__name__}."
    ) from None


class AdaptedBackbone:
    """``gm.base_model``: the source model's backbone (transformers' ``base_model``, the
    ``LlamaModel`` of a ``LlamaForCausalLM``) run with ``gm``'s adapters.

    The source backbone itself has no adapters (they live in ``gm``'s graphs), so calling it would
    silently drop them; TRL's fused LM head calls ``model.base_model(...)`` for the hidden states it
    projects. A call runs ``gm`` with ``output_hidden_states=True`` (and ``logits_to_keep=1`` where
    the source takes it, so the head projects one position) and returns a
    ``BaseModelOutputWithPast`` whose ``last_hidden_state`` is ``hidden_states[-1]``, the
    backbone's output after its final norm in transformers' decoder models. Attributes other than
    the call are the source backbone's (``config``, ``embed_tokens``, ``layers``: no adapters there).
    """

    def __init__(self, gm: Any):
        self._gm = gm

    def _source(self) -> nn.Module:
        source = self._gm.get_base_model()
        return getattr(source, "base_model", source)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return getattr(self._source(), name)

    def __repr__(self) -> str:
        return f"AdaptedBackbone({type(self._source()).__name__} with the adapters of {describe(self._gm)})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        hidden = kwargs.pop("output_hidden_states", None)
        kwargs.pop("return_dict", None)
        if "logits_to_keep" in inspect.signature(type(self._gm.get_base_model()).forward).parameters:
            kwargs.setdefault("logits_to_keep", 1)
        # the program itself: gm's hooks and an assigned forward wrap gm's calls, not its backbone's
        out = self._gm._run(args, {**kwargs, "output_hidden_states": True, "return_dict": True})
        return BaseModelOutputWithPast(
            last_hidden_state=out.hidden_states[-1], past_key_values=getattr(out, "past_key_values", None),
            hidden_states=out.hidden_states if hidden else None, attentions=getattr(out, "attentions", None))


def _embedding_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}


def num_parameters(gm: nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """transformers' ``num_parameters`` over ``gm`` (base and adapters; each tensor counted once).

    Args:
        only_trainable: count only parameters that require grad.
        exclude_embeddings: leave out the weights of ``nn.Embedding`` modules.
    """
    skip = _embedding_ids(gm.get_base_model()) if exclude_embeddings else set()  # gm's own modules are traced copies
    return sum(p.numel() for p in gm.parameters()
               if id(p) not in skip and (p.requires_grad or not only_trainable))


def save_pretrained(gm: Any, save_directory: Union[str, os.PathLike],
                    selected_adapters: Union[Sequence[str], None] = None, **ignored: Any) -> list[str]:
    """The adapter files as ``PeftModel.save_pretrained`` writes them (``gm.save_adapter``).

    ``selected_adapters`` (PEFT's argument): the adapters to save, default all; ``"default"`` goes
    into ``save_directory``, any other into ``save_directory/<name>/``. PEFT's other keyword
    arguments (``safe_serialization``, ``is_main_process``, ...) are accepted and ignored: the files
    are always safetensors. Returns the directories written.
    """
    if ignored.get("is_main_process", True) is False:
        return []
    names = None if selected_adapters is None else list(selected_adapters)
    return gm.save_adapter(save_directory, names)


def merged_source(gm: Any) -> Union[nn.Module, None]:
    """What ``merge_and_unload`` returns once the adapters are merged into the shared base weights,
    when that is the source model: a transformers model is returned itself (its own class,
    ``generate``, ``save_pretrained``), its weights now the merged ones, in ``gm``'s train mode.
    ``None`` for any other model (the caller returns the traced graph on the merged weights)."""
    source = gm.get_base_model()
    if not is_pretrained_model(source):
        return None
    source.train(gm.training)
    return source


# ---------------------------------------------------------------------- pickling and deepcopy
def _adapter_blob(gm: Any) -> dict[str, Any]:
    from . import peft_io

    state = gm.adapter_state
    if state.merge.merged:
        raise AdapterStateError(
            f"{describe(gm)} has merged adapters {list(state.merge.merged)}; pickling or copying it would "
            "lose the exact original weights. Call unmerge_adapter() first (or pickle gm.merge_and_unload())."
        )
    tensors = {n: {k: t.detach().clone() for k, t in peft_io.adapter_state_dict(state, n).items()}
               for n in state.configs}
    upcast = {n: any(p.dtype == torch.float32 for _, _, b in state.store.branches(n) for p in b.parameters())
              for n in state.configs}
    layout = state.banks
    return {
        "configs": dict(state.configs),
        "tensors": tensors,
        "autocast": (state.autocast_adapter_dtype, upcast),
        "banks": (layout.reserved, layout.width, layout.grow),
        "weights": dict(state.weights),
        "enabled": state.enabled,
        "trainable": state.trainable,
        "requires_grad": dict(state.requires_grad),
        "task_type": state.task_type,
        "training": gm.training,
        "example": gm.programs.primary_example,
    }


def reduce(gm: Any) -> tuple:
    """``__reduce__``: re-create from the source model and the adapter state (see :func:`rebuild`).

    Raises:
        AdapterStateError: an adapter is merged (unmerge first).
    """
    return rebuild, (gm.get_base_model(), _adapter_blob(gm))


def rebuild(source: nn.Module, blob: dict[str, Any]) -> Any:
    """A new emitted module over ``source`` with the adapters of ``blob``: traced again, then
    every adapter added with its config, its tensors copied in, and the active set, weights,
    ``enabled``, trainability (``set_requires_grad``'s choices included) and train mode restored."""
    from . import peft_io
    from .capture import capture
    from .module import AdaptedGraphModule

    gm = AdaptedGraphModule.from_capture(source, capture(source, blob["example"]))
    state = gm.adapter_state
    default, upcast = blob["autocast"]
    state.autocast_adapter_dtype = default
    (capacity, rank), width, grow = blob["banks"]
    gm.configure_banks(max_loras=capacity or None, max_lora_rank=rank or None, max_active=width)
    for name, config in blob["configs"].items():
        gm.add_adapter(name, config, autocast_adapter_dtype=upcast[name])
        with torch.no_grad():
            for key, param in peft_io.adapter_state_dict(state, name).items():
                param.copy_(blob["tensors"][name][key])
    state.banks.grow = grow
    state.trainable = blob["trainable"]
    state.task_type = blob.get("task_type")
    state.requires_grad = dict(blob.get("requires_grad", {}))  # set_requires_grad's choices
    state.set_active(blob["weights"])
    state.set_enabled(blob["enabled"])
    gm.train(blob["training"])
    return gm
