"""(IA)³ as a rule: a learned vector scaling a site's output, or its input at feed-forward sites.

At a site ``y = W x + b`` an IA3 adapter with vector ``l`` and switch weight ``w`` computes::

    y = v * (W x + b)         (output sites, l: [d_out, 1])
    y = W (v * x) + b         (feed-forward sites, l: [1, d_in])
    v = w * l + (1 - w)       (v = l when active, exactly 1 when inactive)

Several active IA3 adapters multiply their vectors (PEFT's rule). With other methods at the same
site the vectors wrap the whole adapted layer: ``y = v_out * (W' (v_in * x) + b)`` where
``W' = W + sum of the additive (LoRA/DoRA) updates``; additive branches read the scaled input.
Merging folds ``v_out`` into the rows of ``W`` and into ``b``, or ``v_in`` into the columns of ``W``.

PEFT file format: one tensor per site, ``base_model.model.<site>.ia3_l`` shaped ``[d_out, 1]`` or
``[1, d_in]``; ``adapter_config.json`` with ``peft_type: "IA3"``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, NamedTuple, Union

import torch
from torch import nn

from graphlora.config import ALL_LINEAR, DEFAULT_IA3_MODULES, IA3Config
from graphlora.errors import AdapterFileError, ConfigError
from graphlora.passes import BranchSpec, Site
from graphlora.passes.splice import SiteBuilder
from graphlora.peft_format import INERT_FIELDS, _is_empty

from .base import MethodRule

__all__ = ["IA3Rule", "IA3Branch", "IA3SitePlan", "emit_ia3", "is_feedforward"]


class IA3SitePlan(NamedTuple):
    """Per-site IA3 constants."""

    feedforward: bool


def is_feedforward(feedforward_modules: Any, site: str) -> bool:
    """PEFT's test: ``re.fullmatch`` for a string, else the path *ends with* an entry (no ``"."`` boundary)."""
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, site) is not None
    return any(site.endswith(entry) for entry in feedforward_modules)


class IA3Branch(nn.Module):
    """One IA3 vector at one site: ``ia3_l`` (``[d_out, 1]`` or ``[1, d_in]``) and its ``gate``.

    ``gate`` holds the adapter's weight while active and 0 otherwise; the switch computes
    ``gate * l + (1 - gate)``, exactly ``1`` at gate 0.
    """

    def __init__(self, features: int, feedforward: bool, *, dtype=None, device=None) -> None:
        super().__init__()
        self.feedforward = feedforward
        shape = (1, features) if feedforward else (features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=dtype, device=device))
        self.register_buffer("gate", torch.zeros((), device=device), persistent=False)

    has_dropout = False

    @torch.no_grad()
    def reset_parameters(self, init: bool = True, generator: Union[torch.Generator, None] = None) -> None:
        """PEFT's init: ones (``init_ia3_weights=True``), else ``N(0, 1)`` (not the identity)."""
        if init:
            self.ia3_l.fill_(1.0)
        else:
            self.ia3_l.copy_(torch.randn(self.ia3_l.shape, generator=generator))

    @torch.no_grad()
    def apply_state(self, weight: float, merged: bool = False) -> None:
        self.gate.fill_(weight)

    def num_parameters(self) -> int:
        return self.ia3_l.numel()


def emit_ia3(builder: SiteBuilder, spec: BranchSpec) -> None:
    """Contribute ``(ia3_l, gate)`` as an input or output scale of the site."""
    tag = f"{builder.key}_{spec.adapter}"
    vec = builder.get_attr(f"{spec.prefix}.ia3_l", f"{tag}_ia3_l", spec.adapter)
    gate = builder.get_attr(f"{spec.prefix}.gate", f"{tag}_gate", spec.adapter)
    (builder.scale_input if spec.stage == "input" else builder.scale_output)(vec, gate)


class IA3Rule(MethodRule):
    """(IA)³: see the module docstring."""

    name = "ia3"
    config_class = IA3Config
    peft_type = "IA3"

    def default_targets(self, model_type):
        entry = DEFAULT_IA3_MODULES.get(model_type or "")
        return entry[0] if entry else None

    def resolve_config(self, config: IA3Config, model_type) -> IA3Config:
        if config.feedforward_modules is not None:
            return config
        entry = DEFAULT_IA3_MODULES.get(model_type or "")
        if entry is None:
            if config.target_modules is None:
                return config  # the target error comes first
            raise ConfigError(
                f"feedforward_modules is not set and there is no default for model type {model_type!r}; "
                "set feedforward_modules (a list of names, possibly empty, or a regex)."
            )
        return dataclasses.replace(config, feedforward_modules=entry[1])

    def site_plan(self, config: IA3Config, site: str) -> IA3SitePlan:
        return IA3SitePlan(is_feedforward(config.feedforward_modules, site))

    def make_branch(self, config: IA3Config, site: Site, plan: IA3SitePlan, weight: torch.Tensor) -> nn.Module:
        features = site.in_features if plan.feedforward else site.out_features
        branch = IA3Branch(features, plan.feedforward, dtype=weight.dtype, device=weight.device)
        branch.reset_parameters(config.init_ia3_weights)
        return branch

    def autocast(self, config: IA3Config) -> bool:
        return True  # scale_switch casts the factor to the activation's dtype

    def branch_spec(self, adapter, prefix, branch, site):
        return BranchSpec(adapter, prefix, emit=emit_ia3, stage="input" if branch.feedforward else "output")

    # ------------------------------------------------------------------ files
    def tensors(self, branch):
        return {"ia3_l": branch.ia3_l.detach()}

    def shapes(self, site, plan, config):
        return {"ia3_l": (1, site.in_features) if plan.feedforward else (site.out_features, 1)}

    def config_from_peft(self, data: Mapping[str, Any], source: str) -> IA3Config:
        known = {f.name for f in dataclasses.fields(IA3Config)}
        for name, value in data.items():
            if name not in known and name not in INERT_FIELDS and not _is_empty(value):
                raise AdapterFileError(
                    f"{source}: {name}={value!r} is not an IA3Config field graphlora implements (peft_type is "
                    f"'IA3'); it may change the adapter's outputs, so it is refused. Check peft_type, or use an "
                    f"adapter saved without {name}."
                )
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            return IA3Config(**kwargs)
        except (TypeError, ValueError) as exc:
            raise AdapterFileError(f"{source}: not a usable IA3 config: {exc}") from exc

    def config_to_peft(self, config: IA3Config, sites, resolved, fan_in_fan_out, *, base_model_name_or_path=None,
                       auto_mapping=None):
        out = config.to_dict()
        targets = sorted(sites) if config.target_modules == ALL_LINEAR else (
            resolved if config.target_modules is None else config.target_modules)
        out["target_modules"] = list(targets) if isinstance(targets, (list, tuple)) else targets
        ff = config.feedforward_modules
        out["feedforward_modules"] = list(ff) if isinstance(ff, (list, tuple)) else ff
        out["fan_in_fan_out"] = bool(config.fan_in_fan_out) if config.fan_in_fan_out is not None else fan_in_fan_out
        out["inference_mode"] = True
        out["base_model_name_or_path"] = config.base_model_name_or_path or base_model_name_or_path
        out.setdefault("revision", None)
        if config.task_type is None and auto_mapping is not None:
            out["auto_mapping"] = dict(auto_mapping)
        return out

    # ------------------------------------------------------------------ merge
    def merge_order(self) -> int:
        return 1

    def merge(self, weight, bias, branch, w, fan_in_fan_out, original=None):
        """``W <- diag(v) W``, ``b <- v * b`` (output sites) or ``W <- W diag(v)`` (feed-forward)."""
        v = branch.ia3_l.detach().float().reshape(-1) * w + (1 - w)
        if branch.feedforward:  # scale the input features: columns of [out, in], rows of [in, out]
            return (weight * v.unsqueeze(1) if fan_in_fan_out else weight * v), bias
        weight = weight * v if fan_in_fan_out else weight * v.unsqueeze(1)
        return weight, (None if bias is None else bias * v)

    def combine(self, state, facts, records, adapters, weights, combination_type, **options):
        from .weighted import combine_ia3

        return combine_ia3(state, facts, records, adapters, weights, combination_type)
