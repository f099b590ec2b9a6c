"""LoHa (low-rank Hadamard product, FedPara) as a rule: a full-rank-capable update from two
low-rank factor pairs.

At a linear site ``y = W x + b`` (``W``: ``d_out x d_in``) a LoHa adapter with switch weight
``w`` computes, as PEFT's ``LoHaLayer`` does::

    dW = ((w1a @ w1b) * (w2a @ w2b)) * s          s = alpha / r  (per site: rank/alpha_pattern)
    y  = W x + b + x dW^T * w                      (a residual; exactly + 0 when w = 0)

``w1a``, ``w2a`` are ``[d_out, r]``, ``w1b``, ``w2b`` ``[r, d_in]``, also at GPT-2's ``Conv1D``
sites (``W`` stored ``(in, out)``): ``dW`` is always ``[d_out, d_in]`` and merging adds ``dW^T``
there. PEFT's init (``init_weights=True``): ``w1a``, ``w1b``, ``w2a`` Kaiming-uniform
(``a = sqrt(5)``), ``w2b`` zeros, so the adapter starts as the identity.

PEFT file format: ``base_model.model.<site>.hada_w1_a`` / ``hada_w1_b`` / ``hada_w2_a`` /
``hada_w2_b``; ``adapter_config.json`` with ``peft_type: "LOHA"``. Linear sites only (PEFT's
``hada_t1`` / ``hada_t2`` belong to convolutions).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from graphlora.config import ALL_LINEAR, DEFAULT_LOHA_MODULES, LoHaConfig
from graphlora.errors import AdapterFileError, ConfigError
from graphlora.passes import BranchSpec, Site
from graphlora.passes.specialize import FreezeStep, GateReader
from graphlora.passes.splice import SiteBuilder
from graphlora.passes.targeting import pattern_value
from graphlora.peft_format import INERT_FIELDS, _is_empty

from .base import MethodRule

__all__ = ["LoHaRule", "LoHaBranch", "LycorisSitePlan", "loha_residual", "freeze_gated_residual",
           "lycoris_config_from_peft", "lycoris_config_to_peft"]

Gate = Union[Tensor, float]
PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


# ---------------------------------------------------------------------------- runtime op
def loha_delta(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scale: Gate) -> Tensor:
    """``((w1a w1b) * (w2a w2b)) * scale``, ``[d_out, d_in]`` (PEFT's order of operations)."""
    return ((w1a @ w1b) * (w2a @ w2b)) * scale


def loha_residual(x: Tensor, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, gate: Gate) -> Tensor:
    """``x dW^T`` with ``dW = ((w1a w1b) * (w2a w2b)) * gate``: exactly zero at ``gate = 0``."""
    delta = loha_delta(w1a, w1b, w2a, w2b, gate)
    return F.linear(x.to(delta.dtype), delta).to(x.dtype)


def freeze_gated_residual(gm: fx.GraphModule, node: fx.Node, read: GateReader) -> list[fx.Node]:
    """Specialize step for a residual op whose *last* argument is its gate (``loha_residual``,
    ``lokr_residual``): gate 0 removes the op and the ``add`` consuming it, any other gate
    becomes a constant. Returns the nodes left unused."""
    gate = node.args[-1]
    if not isinstance(gate, fx.Node):
        return []
    value = read(gate)
    dead: list[fx.Node] = [gate]
    if value == 0.0:
        for add in list(node.users):  # y + residual -> y
            add.replace_all_uses_with(add.args[0] if add.args[1] is node else add.args[1])
            dead.append(add)
        dead.append(node)
    else:
        node.args = (*node.args[:-1], value)
    return dead


# ---------------------------------------------------------------------------- branch module
class LoHaBranch(nn.Module):
    """One LoHa adapter at one site: PEFT's four factors and a ``gate`` buffer (``s * w``)."""

    has_dropout = False

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, *, dtype=None,
                 device=None) -> None:
        super().__init__()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device))
        self.hada_w2_b = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.register_buffer("gate", torch.zeros((), device=device), persistent=False)

    @torch.no_grad()
    def reset_parameters(self, init: bool = True) -> None:
        """PEFT's init: Kaiming-uniform (``a = sqrt(5)``) for all four, ``w2b`` zeros with ``init``."""
        for name in PARTS:
            nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
        if init:
            nn.init.zeros_(self.hada_w2_b)

    @torch.no_grad()
    def apply_state(self, weight: float, merged: bool = False) -> None:
        self.gate.fill_(self.scaling * weight)

    def delta_weight(self) -> Tensor:
        """``dW`` (``[d_out, d_in]``, float32) at switch weight 1."""
        parts = [getattr(self, n).detach().float() for n in PARTS]
        return loha_delta(*parts, self.scaling)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def emit_loha(builder: SiteBuilder, spec: BranchSpec) -> None:
    """Contribute ``loha_residual(x, w1a, w1b, w2a, w2b, gate)`` to the site."""
    tag = f"{builder.key}_{spec.adapter}"
    parts = [builder.get_attr(f"{spec.prefix}.{n}", f"{tag}_{n}", spec.adapter) for n in PARTS]
    gate = builder.get_attr(f"{spec.prefix}.gate", f"{tag}_gate", spec.adapter)
    builder.add_residual(builder.call(loha_residual, (builder.x, *parts, gate), f"{tag}_loha", spec.adapter))


# ---------------------------------------------------------------------------- shared LyCORIS file I/O
class LycorisSitePlan(NamedTuple):
    """Per-site rank, alpha and scale ``alpha / r`` (PEFT's LyCORIS scaling)."""

    r: int
    alpha: float
    scaling: float


def lycoris_site_plan(config: Any, site: str) -> LycorisSitePlan:
    r = int(pattern_value(config.rank_pattern, site, config.r))
    alpha = float(pattern_value(config.alpha_pattern, site, config.alpha))
    return LycorisSitePlan(r, alpha, alpha / r)


def lycoris_config_from_peft(cls: type, data: Mapping[str, Any], source: str) -> Any:
    """``cls`` (LoHaConfig / LoKrConfig) from an ``adapter_config.json`` dict, refusing fields it
    does not implement (the message names the field)."""
    known = {f.name for f in dataclasses.fields(cls)}
    for name, value in data.items():
        if name not in known and name not in INERT_FIELDS and not _is_empty(value):
            raise AdapterFileError(
                f"{source}: {name}={value!r} is not a {cls.__name__} field graphlora implements (peft_type is "
                f"{cls.peft_type!r}); it may change the adapter's outputs, so it is refused. Use an adapter "
                f"saved without {name}."
            )
    kwargs = {k: v for k, v in data.items() if k in known}
    for k in ("rank_pattern", "alpha_pattern"):
        if kwargs.get(k) is None:
            kwargs.pop(k, None)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ConfigError) as exc:
        raise AdapterFileError(f"{source}: not a usable {cls.peft_type} config: {exc}") from exc


def lycoris_config_to_peft(config: Any, sites, resolved, *, base_model_name_or_path=None,
                           auto_mapping=None) -> dict[str, Any]:
    """The ``adapter_config.json`` dict PEFT writes for a LoHa / LoKr config adapted at ``sites``."""
    out = config.to_dict()
    targets = sorted(sites) if config.target_modules == ALL_LINEAR else (
        resolved if config.target_modules is None else config.target_modules)
    out["target_modules"] = list(targets) if isinstance(targets, (list, tuple)) else targets
    if isinstance(config.exclude_modules, tuple):
        out["exclude_modules"] = list(config.exclude_modules)
    out["inference_mode"] = True
    out["base_model_name_or_path"] = config.base_model_name_or_path or base_model_name_or_path
    out.setdefault("revision", None)
    if config.task_type is None and auto_mapping is not None:
        out["auto_mapping"] = dict(auto_mapping)
    return out


def add_delta(weight: Tensor, delta: Tensor, w: float, fan_in_fan_out: bool) -> Tensor:
    """``W + w dW`` in the stored layout (``dW^T`` for ``(in, out)`` weights)."""
    delta = delta * w
    return weight + (delta.t() if fan_in_fan_out else delta)


# ---------------------------------------------------------------------------- the rule
class LoHaRule(MethodRule):
    """LoHa: see the module docstring."""

    name = "loha"
    config_class = LoHaConfig
    peft_type = "LOHA"

    def default_targets(self, model_type):
        return DEFAULT_LOHA_MODULES.get(model_type or "")

    def site_plan(self, config: LoHaConfig, site: str) -> LycorisSitePlan:
        return lycoris_site_plan(config, site)

    def rank(self, plan: LycorisSitePlan) -> int:
        return plan.r

    def make_branch(self, config: LoHaConfig, site: Site, plan: LycorisSitePlan, weight: torch.Tensor) -> nn.Module:
        branch = LoHaBranch(site.in_features, site.out_features, plan.r, plan.alpha,
                            dtype=weight.dtype, device=weight.device)
        branch.reset_parameters(config.init_weights)
        return branch

    def branch_spec(self, adapter, prefix, branch, site):
        return BranchSpec(adapter, prefix, emit_loha)

    def freeze_steps(self) -> dict[Any, FreezeStep]:
        return {loha_residual: freeze_gated_residual}

    # ------------------------------------------------------------------ files
    def tensors(self, branch):
        return {n: getattr(branch, n).detach() for n in PARTS}

    def shapes(self, site, plan, config):
        r, d_in, d_out = plan.r, site.in_features, site.out_features
        return {"hada_w1_a": (d_out, r), "hada_w1_b": (r, d_in), "hada_w2_a": (d_out, r), "hada_w2_b": (r, d_in)}

    def config_from_peft(self, data, source):
        return lycoris_config_from_peft(LoHaConfig, data, source)

    def config_to_peft(self, config, sites, resolved, fan_in_fan_out, **meta):
        return lycoris_config_to_peft(config, sites, resolved, **meta)

    # ------------------------------------------------------------------ merge
    def merge(self, weight, bias, branch, w, fan_in_fan_out, original=None):
        """``W += w dW`` (PEFT's LoHa merge)."""
        return add_delta(weight, branch.delta_weight(), w, fan_in_fan_out), bias

    def hotswap(self, branch, config, plan):
        branch.r, branch.alpha, branch.scaling = plan.r, plan.alpha, plan.scaling
        return False
