"""Planning: which sites an adapter config selects, with the method's per-site constants.

Pure functions of a config and the located sites (PEFT's selection rules, see
:mod:`graphlora.passes.targeting`), plus the name checks every adding call makes. Nothing here
changes any state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

from graphlora.passes import Site, is_targeted
from graphlora.passes.sites import EMBEDDING, EXPERT

from ._checks import check_embedding_targets, check_layers_in_range, check_target_types
from .config import ALL_LINEAR
from .errors import AdapterExistsError, AdapterNotFoundError, ConfigError, NoTargetError, closest
from .methods import rule_for

__all__ = ["ModelFacts", "resolve_targets", "plan_adapter", "check_new_name", "check_known"]

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


@dataclass(frozen=True)
class ModelFacts:
    """What planning reads from the source model, once, at inject time.

    Attributes:
        source: the original model (its module tree, for the target-type and layer checks).
        site_names: every located site name, in graph order, without repeats.
        head: the output embedding's module path (``"all-linear"`` leaves it out), if any.
        model_type: ``model.config.model_type`` (PEFT's default targets are keyed by it).
        aliases: parameter name -> every name of that tensor (tied weights).
    """

    source: nn.Module
    site_names: tuple[str, ...]
    head: Union[str, None]
    model_type: Union[str, None]
    aliases: Mapping[str, list[str]]


def resolve_targets(config: Any, facts: ModelFacts) -> Any:
    """``config.target_modules`` with ``None`` (the method's default for the model type) and
    ``"all-linear"`` (every site but the output head) resolved.

    Raises:
        ConfigError: no target set and no default for the model type.
    """
    targets = config.target_modules
    if targets is None:
        default = rule_for(config).default_targets(facts.model_type)
        if default is None and getattr(config, "target_parameters", None):
            return ()  # PEFT: target_parameters alone selects no module
        if default is None:
            raise ConfigError(
                f"target_modules is not set and there is no default for model type "
                f"{facts.model_type!r}; set target_modules, e.g. {closest('proj', list(facts.site_names), 3)} "
                "or 'all-linear'."
            )
        return default
    if targets == ALL_LINEAR:  # linear ops only: embedding lookups are sites too, but not linear
        return tuple(n for n in facts.site_names if n != facts.head and not _is_embedding(facts.source, n)
                     and _is_linear_module(facts.source, n))
    return targets


def _is_linear_module(model: nn.Module, name: str) -> bool:
    """Whether ``"all-linear"`` takes site ``name`` (PEFT's rule: ``nn.Linear`` and ``Conv1D``
    modules). A site that names another kind of module (a MoE router calling ``F.linear`` on its
    own weight: ``MixtralTopKRouter``) or a 3-D expert parameter is left out; a site that names no
    module (``F.linear`` on a bare parameter of a plain model) stays in."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        owner, _, param = name.rpartition(".")
        try:
            value = getattr(model.get_submodule(owner), param, None) if owner else getattr(model, param, None)
        except AttributeError:
            return True
        return not (isinstance(value, torch.Tensor) and value.dim() == 3)
    if isinstance(module, nn.Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is optional
        return False
    return isinstance(module, Conv1D)


def _is_embedding(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), nn.Embedding)
    except AttributeError:
        return False


def plan_adapter(config: Any, facts: ModelFacts, records: Mapping[str, Site]) -> dict[str, Any]:
    """site name -> the method's per-site constants (LoRA: ``(r, alpha, scaling)``) for the
    sites ``config`` selects, in graph order.

    Raises:
        NoTargetError: nothing selected. TargetTypeError / ConfigError: a target that is not a
        linear op, layers that do not exist, or a config the method refuses.
    """
    rule = rule_for(config)
    targets = resolve_targets(config, facts)
    resolved = rule.resolve_config(config, facts.model_type)
    plan = {}
    experts = set(_select_parameters(config, facts, records))
    for name in facts.site_names:
        record = records.get(name)
        if record is not None and record.kind == EXPERT:  # only target_parameters adapts expert weights
            if name in experts:
                from .methods.experts import ExpertSitePlan, peft_module_path

                r, alpha, scaling = rule.site_plan(resolved, name)[:3]
                weight = facts.source.get_parameter(name) if _has_parameter(facts.source, name) else None
                count = weight.shape[0] if weight is not None else 1
                plan[name] = ExpertSitePlan(r, alpha, scaling, peft_module_path(facts.source, name, experts), count)
            continue
        if is_targeted(
            name, targets, exclude_modules=config.exclude_modules,
            layers_to_transform=getattr(config, "layers_to_transform", None),
            layers_pattern=getattr(config, "layers_pattern", None),
        ):
            plan[name] = rule.site_plan(resolved, name)
    check_target_types(facts.source, config, config.target_modules, records)
    check_embedding_targets(rule, config, plan, records)
    check_layers_in_range(config, records, facts.source)
    if not plan:
        wanted = targets if isinstance(targets, str) else ", ".join(targets)
        probe = targets if isinstance(targets, str) else next(iter(targets), "")
        raise NoTargetError(
            f"target_modules={config.target_modules!r} matched no linear op "
            f"(looked for: {wanted}; exclude_modules={config.exclude_modules!r}, "
            f"layers_to_transform={getattr(config, 'layers_to_transform', None)!r}). "
            f"Closest linear sites: {closest(probe, _linear_names(facts, records))}. "
            f"Use names from gm.sites or graphlora.list_sites(model)."
        )
    return plan


def _linear_names(facts: ModelFacts, records: Mapping[str, Site]) -> list[str]:
    """The site names that are linear ops (not embedding lookups nor expert weights), for the
    suggestions of a target that matched nothing; every site name when there is none."""
    names = [n for n in facts.site_names if n in records and records[n].kind not in (EMBEDDING, EXPERT)]
    return names or list(facts.site_names)


def _select_parameters(config: Any, facts: ModelFacts, records: Mapping[str, Site]) -> list[str]:
    if not getattr(config, "target_parameters", None):
        return []
    from .methods.experts import select_parameters

    return select_parameters(config, facts.site_names, records, facts.source)


def _has_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


def check_new_name(name: Any, existing: Iterable[str]) -> None:
    """Refuse an adapter name that is unusable or taken.

    Raises:
        ConfigError: not a plain identifier-like name, or ``"__base__"``.
        AdapterExistsError: already loaded.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name == "__base__":
        raise ConfigError(
            f"adapter name {name!r} is not usable; use letters, digits, '_' or '-' (no '.'), "
            "and not '__base__'."
        )
    existing = list(existing)
    if name in existing:
        raise AdapterExistsError(
            f"an adapter named {name!r} already exists (adapters: {existing}); "
            "pick another name or delete_adapter it first."
        )


def check_known(names: Sequence[str], existing: Iterable[str]) -> None:
    """Raises AdapterNotFoundError for the first name not in ``existing``."""
    existing = list(existing)
    for name in names:
        if name not in existing:
            raise AdapterNotFoundError(f"no adapter named {name!r}; loaded adapters: {existing}.")
