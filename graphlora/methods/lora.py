"""LoRA and its DoRA variant, as one rule.

LoRA at a site with base weight ``W`` (``d_out x d_in``)::

    y = W x + b + w * s * B A dropout(x)                       s = alpha / r (or alpha / sqrt(r))

DoRA (``LoraConfig(use_dora=True)``) adds a magnitude ``m`` (``[d_out]``) and, with
``f = m / ||W + s B A||_row`` (norm detached, per output row, PEFT's math)::

    y = W x + b + w * [ (f - 1) * W dropout?(x) + f * s * B A dropout(x) ]

which at ``w = 1`` is ``f * (W + s B A) x + b``, the DoRA layer. ``W dropout?(x)`` is
``base - b`` without adapter dropout (or in eval mode) and ``W dropout(x)`` with it, as in PEFT.
The LoRA part is the low-rank ``(h, B)`` term of the switch; DoRA contributes ``(h, f * B)`` and a
residual ``(f - 1) * W x`` gated by ``dora_on``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from graphlora.config import DEFAULT_TARGET_MODULES, LoraConfig
from graphlora.passes import BranchSpec, Site
from graphlora.passes.method_ops import dora_factor, dora_residual, row_scale
from graphlora.passes.splice import SiteBuilder, emit_low_rank
from graphlora.passes.targeting import pattern_value
from graphlora.peft_format import config_from_peft, config_to_peft
from graphlora.state import LoraBranch

from .base import MethodRule

__all__ = ["LoraRule", "LoraSitePlan", "emit_dora"]

aten = torch.ops.aten


class LoraSitePlan(NamedTuple):
    """Per-site LoRA constants (unpacks as ``r, alpha, scaling``)."""

    r: int
    alpha: float
    scaling: float


def emit_dora(builder: SiteBuilder, spec: BranchSpec) -> None:
    """The DoRA branch: LoRA's ``h``, ``B`` scaled per row by ``f``, and the residual ``(f - 1) W x``."""
    p, a, tag = spec.prefix, spec.adapter, f"{builder.key}_{spec.adapter}"
    h = emit_low_rank(builder, spec)
    _, b = builder.low_rank.pop()  # re-added below with B scaled by f
    weight = builder.weight(a)
    A = builder.get_attr(f"{p}.lora_A.weight", f"{tag}_dora_A_weight", a)
    scale = builder.get_attr(f"{p}.dora_scale", f"{tag}_dora_scale", a)
    m = builder.get_attr(f"{p}.lora_magnitude_vector", f"{tag}_lora_magnitude_vector", a)
    f = builder.call(dora_factor, (weight, A, b, scale, m, spec.option("fan_in_fan_out")), f"{tag}_dora_factor", a)
    builder.add_low_rank(h, builder.call(row_scale, (b, f), f"{tag}_dora_B", a))
    wx = None
    if spec.dropout:  # PEFT rescales W dropout(x): one more product with W
        x_drop = h.args[0]  # the dropout node feeding lora_down
        w2d = weight if not spec.option("fan_in_fan_out") else builder.call(aten.t.default, (weight,), f"{tag}_dora_Wt", a)
        wx = builder.call(aten.linear.default, (x_drop, w2d), f"{tag}_dora_Wx", a)
    on = builder.get_attr(f"{p}.dora_on", f"{tag}_dora_on", a)
    term = builder.call(dora_residual, (builder.base, wx, builder.bias(a), f, on), f"{tag}_dora_residual", a)
    builder.add_residual(term)


class LoraRule(MethodRule):
    """LoRA (and DoRA with ``use_dora=True``)."""

    name = "lora"
    config_class = LoraConfig
    peft_type = "LORA"

    def default_targets(self, model_type):
        return DEFAULT_TARGET_MODULES.get(model_type or "")

    def site_plan(self, config: LoraConfig, site: str) -> LoraSitePlan:
        r = int(pattern_value(config.rank_pattern, site, config.r))
        alpha = float(pattern_value(config.alpha_pattern, site, config.lora_alpha))
        return LoraSitePlan(r, alpha, config.scaling(r, alpha))

    def variant(self, config: LoraConfig) -> str:
        return "dora" if config.use_dora else "lora"

    def rank(self, plan: LoraSitePlan) -> int:
        return plan.r

    def mixable(self, config: LoraConfig) -> bool:
        return not config.use_dora

    # ------------------------------------------------------------------ state and graph
    def make_branch(self, config: LoraConfig, site: Site, plan: LoraSitePlan, weight: torch.Tensor) -> nn.Module:
        branch = LoraBranch(site.in_features, site.out_features, plan.r, plan.alpha, plan.scaling,
                            config.lora_dropout, use_dora=config.use_dora, dtype=weight.dtype, device=weight.device)
        branch.reset_parameters(config.init_lora_weights)
        if config.use_dora:
            branch.init_magnitude(weight, site.fan_in_fan_out)
        return branch

    def branch_spec(self, adapter: str, prefix: str, branch: nn.Module, site: Site) -> BranchSpec:
        if getattr(branch, "use_dora", False):
            return BranchSpec(adapter, prefix, branch.has_dropout, emit=emit_dora,
                              options=(("fan_in_fan_out", site.fan_in_fan_out),))
        return BranchSpec(adapter, prefix, branch.has_dropout)

    # ------------------------------------------------------------------ files
    def tensors(self, branch: nn.Module) -> dict[str, torch.Tensor]:
        out = {"lora_A.weight": branch.lora_A.weight.detach(), "lora_B.weight": branch.lora_B.weight.detach()}
        if getattr(branch, "use_dora", False):
            out["lora_magnitude_vector"] = branch.lora_magnitude_vector.detach()
        return out

    def shapes(self, site: Site, plan: LoraSitePlan, config: LoraConfig) -> dict[str, tuple[int, ...]]:
        out = {"lora_A.weight": (plan.r, site.in_features), "lora_B.weight": (site.out_features, plan.r)}
        if config.use_dora:
            out["lora_magnitude_vector"] = (site.out_features,)
        return out

    def config_from_peft(self, data, source):
        return config_from_peft(data, source=source)

    def config_to_peft(self, config, sites, resolved, fan_in_fan_out, **meta):
        return config_to_peft(config, sites, resolved_targets=resolved, fan_in_fan_out=fan_in_fan_out, **meta)

    # ------------------------------------------------------------------ merge
    def merge(self, weight, bias, branch, w, fan_in_fan_out, original=None):
        """``W += w s B A``; DoRA: ``W += w [(f - 1) W0 + f s B A]`` with ``f`` from the unmerged ``W0``."""
        A, B = branch.lora_A.weight.detach().float(), branch.lora_B.weight.detach().float()
        delta = (B @ A) * branch.scaling  # [out, in]
        if getattr(branch, "use_dora", False):
            w0 = (weight if original is None else original).float()
            w0 = w0.t() if fan_in_fan_out else w0
            norm = torch.linalg.norm(w0 + delta, dim=1)
            f = (branch.lora_magnitude_vector.detach().float() / norm).unsqueeze(1)
            delta = (f - 1) * w0 + f * delta
        delta = delta * w
        return weight + (delta.t() if fan_in_fan_out else delta), bias

    # ------------------------------------------------------------------ weighted combination
    def combine(self, gm, adapters, weights, adapter_name, combination_type, svd_rank=None, svd_clamp=None,
                svd_full_matrices=True, svd_driver=None, **options):
        from .weighted import combine_lora

        combine_lora(gm, adapters, weights, adapter_name, combination_type, svd_rank=svd_rank, svd_clamp=svd_clamp,
                     svd_full_matrices=svd_full_matrices, svd_driver=svd_driver)
