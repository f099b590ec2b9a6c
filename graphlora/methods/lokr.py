"""LoKr (Kronecker-product update) as a rule.

At a linear site ``y = W x + b`` (``W``: ``d_out x d_in``) a LoKr adapter with switch weight
``w`` computes, as PEFT's ``LoKrLayer`` does::

    d_out = a * c,  d_in = b * d            (a, c) = factorization(d_out, decompose_factor), same for d_in
    w1 = lokr_w1            [a, b]          or lokr_w1_a [a, r] @ lokr_w1_b [r, b]
                                            (when decompose_both and r < max(a, b) / 2)
    w2 = lokr_w2            [c, d]          or lokr_w2_a [c, r] @ lokr_w2_b [r, d]
                                            (when r < max(c, d) / 2)
    dW = kron(w1, w2) * s                   s = alpha / r  (per site: rank/alpha_pattern)
    y  = W x + b + x dW^T * w               (a residual; exactly + 0 when w = 0)

``factorization(n, f)`` is PEFT's: ``(f, n / f)`` when ``f`` divides ``n``, else the divisor pair
``m <= n / m`` closest to the square root (``m`` at most ``f`` when ``f > 0``). At GPT-2's ``Conv1D``
sites ``dW`` is still ``[d_out, d_in]`` and merging adds ``dW^T``. PEFT's init
(``init_weights=True``): ``w1`` (or ``w1_a``) zeros, the rest Kaiming-uniform (``a = sqrt(5)``);
``"lycoris"``: ``w2`` (or ``w2_b``) zeros instead.

PEFT file format: ``base_model.model.<site>.lokr_w1`` (or ``lokr_w1_a`` / ``lokr_w1_b``) and
``lokr_w2`` (or ``lokr_w2_a`` / ``lokr_w2_b``); ``adapter_config.json`` with ``peft_type: "LOKR"``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphlora.config import DEFAULT_LOKR_MODULES, LoKrConfig
from graphlora.passes import BranchSpec, Site
from graphlora.passes.specialize import FreezeStep
from graphlora.passes.splice import SiteBuilder
from graphlora.passes.targeting import pattern_value

from .base import MethodRule
from .loha import add_delta, freeze_gated_residual, lycoris_config_from_peft, lycoris_config_to_peft

__all__ = ["LoKrRule", "LoKrBranch", "LoKrSitePlan", "factorization", "lokr_residual"]

Gate = Union[Tensor, float]
SLOTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split of ``dimension`` into ``(m, n)``, ``m <= n``, ``m * n = dimension``.

    ``factor > 0`` dividing ``dimension`` gives ``(factor, dimension // factor)``; otherwise the
    divisors are walked up from 1 while the sum ``m + n`` does not grow and ``m`` stays within
    ``factor`` (no bound for ``-1``): the pair nearest the square root.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        cand = m + 1
        while dimension % cand:
            cand += 1
        other = dimension // cand
        if cand + other > m + n or cand > bound:
            break
        m, n = cand, other
    return (n, m) if m > n else (m, n)


# ---------------------------------------------------------------------------- runtime op
def _factor(whole: Union[Tensor, None], a: Union[Tensor, None], b: Union[Tensor, None]) -> Tensor:
    return whole if whole is not None else a @ b


def lokr_delta(w1, w1_a, w1_b, w2, w2_a, w2_b, scale: Gate) -> Tensor:
    """``kron(w1, w2) * scale`` (``[d_out, d_in]``), each factor whole or as a low-rank product."""
    return torch.kron(_factor(w1, w1_a, w1_b), _factor(w2, w2_a, w2_b).contiguous()) * scale


def lokr_residual(x: Tensor, w1, w1_a, w1_b, w2, w2_a, w2_b, gate: Gate) -> Tensor:
    """``x dW^T`` with ``dW = kron(w1, w2) * gate`` (absent factors are ``None``): zero at ``gate = 0``."""
    delta = lokr_delta(w1, w1_a, w1_b, w2, w2_a, w2_b, gate)
    return F.linear(x.to(delta.dtype), delta).to(x.dtype)


# ---------------------------------------------------------------------------- plan and branch
class LoKrSitePlan(NamedTuple):
    """Per-site constants: rank, alpha, scale, the factor shapes ``((a, c), (b, d))`` and which
    factors are stored whole."""

    r: int
    alpha: float
    scaling: float
    out_split: tuple[int, int]
    in_split: tuple[int, int]
    use_w1: bool
    use_w2: bool


def lokr_shapes(plan: LoKrSitePlan) -> dict[str, tuple[int, int]]:
    (a, c), (b, d), r = plan.out_split, plan.in_split, plan.r
    out = {"lokr_w1": (a, b)} if plan.use_w1 else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, b)}
    out.update({"lokr_w2": (c, d)} if plan.use_w2 else {"lokr_w2_a": (c, r), "lokr_w2_b": (r, d)})
    return out


class LoKrBranch(nn.Module):
    """One LoKr adapter at one site: the factors PEFT stores (whole or low-rank) and a ``gate``."""

    has_dropout = False

    def __init__(self, plan: LoKrSitePlan, *, dtype=None, device=None) -> None:
        super().__init__()
        self.r, self.alpha, self.scaling = plan.r, plan.alpha, plan.scaling
        for name, shape in lokr_shapes(plan).items():
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device)))
        self.register_buffer("gate", torch.zeros((), device=device), persistent=False)

    def factors(self) -> tuple[Union[Tensor, None], ...]:
        """The six factor slots in :data:`SLOTS` order (``None`` where absent)."""
        return tuple(self._parameters.get(n) for n in SLOTS)

    @torch.no_grad()
    def reset_parameters(self, init: Union[bool, str] = True) -> None:
        """PEFT's init: Kaiming-uniform (``a = sqrt(5)``) everywhere, then ``True`` zeros ``w1``
        (or ``w1_a``), ``"lycoris"`` zeros ``w2`` (or ``w2_b``); ``False`` zeros nothing."""
        for name in SLOTS:
            if name in self._parameters:
                nn.init.kaiming_uniform_(self._parameters[name], a=math.sqrt(5))
        if init == "lycoris":
            nn.init.zeros_(self._parameters.get("lokr_w2", self._parameters.get("lokr_w2_b")))
        elif init:
            nn.init.zeros_(self._parameters.get("lokr_w1", self._parameters.get("lokr_w1_a")))

    @torch.no_grad()
    def apply_state(self, weight: float, merged: bool = False) -> None:
        self.gate.fill_(self.scaling * weight)

    def delta_weight(self) -> Tensor:
        """``dW`` (``[d_out, d_in]``, float32) at switch weight 1."""
        parts = [None if p is None else p.detach().float() for p in self.factors()]
        return lokr_delta(*parts, self.scaling)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def emit_lokr(builder: SiteBuilder, spec: BranchSpec) -> None:
    """Contribute ``lokr_residual(x, w1, w1_a, w1_b, w2, w2_a, w2_b, gate)`` to the site."""
    tag = f"{builder.key}_{spec.adapter}"
    present = spec.option("factors")
    parts = [builder.get_attr(f"{spec.prefix}.{n}", f"{tag}_{n}", spec.adapter) if n in present else None
             for n in SLOTS]
    gate = builder.get_attr(f"{spec.prefix}.gate", f"{tag}_gate", spec.adapter)
    builder.add_residual(builder.call(lokr_residual, (builder.x, *parts, gate), f"{tag}_lokr", spec.adapter))


# ---------------------------------------------------------------------------- the rule
class LoKrRule(MethodRule):
    """LoKr: see the module docstring."""

    name = "lokr"
    config_class = LoKrConfig
    peft_type = "LOKR"

    def default_targets(self, model_type):
        return DEFAULT_LOKR_MODULES.get(model_type or "")

    def site_plan(self, config: LoKrConfig, site: str) -> Any:
        r = int(pattern_value(config.rank_pattern, site, config.r))
        alpha = float(pattern_value(config.alpha_pattern, site, config.alpha))
        return (r, alpha, config.decompose_factor, config.decompose_both)  # finished in _plan (needs dims)

    @staticmethod
    def _plan(partial: Any, site: Site) -> LoKrSitePlan:
        if isinstance(partial, LoKrSitePlan):
            return partial
        r, alpha, factor, both = partial
        a, c = factorization(site.out_features, factor)
        b, d = factorization(site.in_features, factor)
        use_w1 = not (both and r < max(a, b) / 2)
        use_w2 = not (r < max(c, d) / 2)
        return LoKrSitePlan(r, alpha, alpha / r, (a, c), (b, d), use_w1, use_w2)

    def rank(self, plan) -> int:
        return plan[0]

    def make_branch(self, config: LoKrConfig, site: Site, plan, weight: torch.Tensor) -> nn.Module:
        branch = LoKrBranch(self._plan(plan, site), dtype=weight.dtype, device=weight.device)
        branch.reset_parameters(config.init_weights)
        return branch

    def branch_spec(self, adapter, prefix, branch, site):
        present = tuple(n for n in SLOTS if n in branch._parameters)
        return BranchSpec(adapter, prefix, emit_lokr, options=(("factors", present),))

    def freeze_steps(self) -> dict[Any, FreezeStep]:
        return {lokr_residual: freeze_gated_residual}

    # ------------------------------------------------------------------ files
    def tensors(self, branch):
        return {n: p.detach() for n, p in branch._parameters.items() if n in SLOTS}

    def shapes(self, site, plan, config):
        return lokr_shapes(self._plan(plan, site))

    def config_from_peft(self, data, source):
        return lycoris_config_from_peft(LoKrConfig, data, source)

    def config_to_peft(self, config, sites, resolved, fan_in_fan_out, **meta):
        return lycoris_config_to_peft(config, sites, resolved, **meta)

    # ------------------------------------------------------------------ merge
    def merge(self, weight, bias, branch, w, fan_in_fan_out, original=None):
        """``W += w dW`` (PEFT's LoKr merge)."""
        return add_delta(weight, branch.delta_weight(), w, fan_in_fan_out), bias

    def hotswap(self, branch, config, plan):
        r, alpha = plan[0], plan[1]
        branch.r, branch.alpha, branch.scaling = r, alpha, alpha / r
        return False
