"""PEFT's status report: ``gm.get_layer_status()`` and ``gm.get_model_status()``.

The same dataclasses as PEFT 0.21's ``peft.peft_model.TunerLayerStatus`` / ``TunerModelStatus`` (same
fields, same meaning; graphlora never imports peft, so they are graphlora's own classes: compare them
with ``dataclasses.asdict``), computed from the adapter state and the sites:

- one :class:`TunerLayerStatus` per adapted site, then one per ``modules_to_save`` module and one
  per embedding with ``trainable_token_indices`` (PEFT's ``ModulesToSaveWrapper`` /
  ``TrainableTokensLayer``), each named as PEFT's ``named_modules()`` of its ``LoraModel`` names
  it: ``"model." + <module path>``;
- :class:`TunerModelStatus` aggregates them exactly as PEFT's ``get_model_status`` does
  (``"irregular"`` where layers disagree).

``active_adapters`` is the active set even while adapters are disabled (PEFT's layers keep it);
``requires_grad`` per adapter is ``True`` / ``False`` / ``"irregular"`` over its parameters there.
``module_type`` is what PEFT prints for its layer class (``"lora.Linear"`` also for DoRA and GPT-2's
``Conv1D``, ``"lora.Embedding"``, ``"loha.Linear"``, ``"lokr.Linear"``, IA3's ``"Linear"``,
``"ModulesToSaveWrapper"``, ``"TrainableTokensLayer"``). Differences from PEFT: an expert-weight site
(``target_parameters``) is named by its parameter path (``"model.<...>.experts.gate_up_proj"``, type
``"lora.ParamWrapper"``) where PEFT names the nested ``ParamWrapper`` module; a site holding adapters
of several methods, which PEFT cannot build, joins their types with ``"+"``; ``quantization_backend`` is
always ``None``; the dataclasses are graphlora's (equal to PEFT's field by field, not by ``==``).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch

from graphlora.passes import Site
from graphlora.passes.sites import EMBEDDING, EXPERT

from .modules_to_save import SAVED
from .state import AdapterState
from .trainable_tokens import TOKENS

__all__ = ["TunerLayerStatus", "TunerModelStatus", "layer_status", "model_status", "TUNER_MODEL_TYPES"]

Irregular = Literal["irregular"]

#: peft_type -> PEFT's tuner model class name (``TunerModelStatus.adapter_model_type``)
TUNER_MODEL_TYPES = {"LORA": "LoraModel", "IA3": "IA3Model", "LOHA": "LoHaModel", "LOKR": "LoKrModel"}


#: peft_type -> how PEFT's layer class prints (``repr(layer).partition("(")[0]``): ``lora.Linear``, but
#: IA3's ``Linear`` (its layers do not prefix their repr)
_REPR_PREFIX = {"IA3": ""}


@dataclass
class TunerLayerStatus:
    """PEFT's ``TunerLayerStatus``: one adapted layer."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None]


@dataclass
class TunerModelStatus:
    """PEFT's ``TunerModelStatus``: the layers' status aggregated."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Irregular]


def _flags(values: Iterable[Union[bool, str]]) -> Union[bool, Irregular]:
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _layer(name: str, module_type: str, state: AdapterState, params: Mapping[str, list[torch.Tensor]],
           merged: list[str]) -> TunerLayerStatus:
    return TunerLayerStatus(
        name=f"model.{name}",
        module_type=module_type,
        enabled=state.enabled,
        active_adapters=list(state.weights),
        merged_adapters=merged,
        requires_grad={a: _flags(p.requires_grad for p in ps) for a, ps in params.items()},
        available_adapters=sorted(params),
        devices={a: sorted({p.device.type for p in ps}) for a, ps in params.items()},
        quantization_backend=None,
    )


def _module_type(state: AdapterState, site: Site, adapters: list[str]) -> str:
    op = {EMBEDDING: "Embedding", EXPERT: "ParamWrapper"}.get(site.kind, "Linear")
    prefixes = dict.fromkeys(_REPR_PREFIX.get(t, f"{t.lower()}.") for t in (str(state.configs[a].peft_type)
                                                                             for a in adapters))
    return "+".join(f"{p}{op}" for p in prefixes)


def layer_status(state: AdapterState, records: Mapping[str, Site],
                 order: Union[Mapping[str, int], None] = None) -> list[TunerLayerStatus]:
    """One status per adapted site, saved module and trainable-rows table, in ``order`` (module path ->
    position: the source model's ``named_modules()``, PEFT's order; else site order).

    Raises:
        ValueError: no adapter layer at all (PEFT's error).
    """
    out = []
    merged_all = list(state.merge.merged)
    for site in records.values():
        adapters = [a for a, plan in state.plans.items() if site.name in plan]
        if not adapters:
            continue
        params = {a: list(state.branch(site.name, a).parameters()) for a in adapters}
        merged = [a for a in merged_all if a in params]
        out.append(_layer(site.name, _module_type(state, site, adapters), state, params, merged))
    saved = state.store._modules.get(SAVED)
    for holder in saved.saved() if saved is not None else ():
        params = {a: list(copy.parameters()) for a, copy in holder.copies.items()}
        out.append(_layer(holder.path, "ModulesToSaveWrapper", state, params, []))
    tokens = state.store._modules.get(TOKENS)
    for holder in tokens.values() if tokens is not None else ():
        params = {a: [delta] for a, delta in holder.deltas.items()}
        out.append(_layer(f"{holder.path}.token_adapter", "TrainableTokensLayer", state, params, []))
    rank = order or {}
    out.sort(key=lambda s: rank.get(s.name[len("model."):].removesuffix(".token_adapter"), len(rank)))
    if not out:
        raise ValueError("No adapter layers found in the model: add an adapter first (gm.add_adapter(name, config)).")
    return out


def model_status(layers: list[TunerLayerStatus], state: AdapterState, base_model_type: str,
                 counts: tuple[int, int]) -> TunerModelStatus:
    """PEFT's aggregation of :func:`layer_status`'s ``layers`` (``counts``: trainable and total parameters)."""
    enabled_set = {s.enabled for s in layers}
    active_set = {tuple(s.active_adapters) for s in layers}
    merged_all = set().union(*(s.merged_adapters for s in layers))
    merged: Union[list[str], Irregular] = sorted(merged_all)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_all for s in layers):
        merged = "irregular"
    grads: dict[str, list[Any]] = collections.defaultdict(list)
    devices: dict[str, list[str]] = collections.defaultdict(list)
    for s in layers:
        for key, value in s.requires_grad.items():
            grads[key].append(value)
        for key, value in s.devices.items():
            devices[key].extend(value)
    types = {name: str(config.peft_type) for name, config in state.configs.items()}
    kinds = set(types.values())
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=TUNER_MODEL_TYPES.get(next(iter(kinds)), "MixedModel") if len(kinds) == 1 else "MixedModel",
        peft_types=types,
        trainable_params=counts[0],
        total_params=counts[1],
        num_adapter_layers=len(layers),
        enabled=enabled_set.pop() if len(enabled_set) == 1 else "irregular",
        active_adapters=list(active_set.pop()) if len(active_set) == 1 else "irregular",
        merged_adapters=merged,
        requires_grad={key: _flags(values) for key, values in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={key: sorted(set(value)) for key, value in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
