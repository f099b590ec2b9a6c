"""``add_weighted_adapter``: a new adapter made from existing ones, with PEFT's semantics.

LoRA adapters ``a_i`` with weights ``w_i`` and scalings ``s_i`` (new adapter: rank ``r``,
``lora_alpha = r``, so its own scaling is 1, as PEFT sets it):

- ``"linear"`` (all ranks equal): ``A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i``,
  ``B = sum_i sqrt|w_i s_i| B_i``. Cross terms make this an approximation of
  ``sum_i w_i s_i B_i A_i`` (PEFT's warning applies).
- ``"cat"`` (rank ``sum r_i``): ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]``, so
  ``B A = sum_i w_i s_i B_i A_i`` exactly.
- ``"svd"`` (rank ``svd_rank`` or ``max r_i``): the truncated SVD of ``sum_i w_i s_i B_i A_i``:
  ``B = U_r diag(S_r)``, ``A = V_r^T`` (optionally clamped at the ``svd_clamp`` quantile).

IA3 adapters (PEFT's ``IA3Model.add_weighted_adapter``): ``l = sum_i w_i l_i``.

Targets of the new adapter are PEFT's: the union of the list targets (``|``-joined regexes for
string targets) and, for IA3, of the feed-forward modules. The new adapter is added frozen and
not activated (PEFT's behaviour); on any error nothing is added.

Each ``combine_*`` is a function of the adapter state: it checks the inputs and returns the new
adapter's config and a ``fill(site, branch)`` that writes its tensors; the emitted module adds
the adapter and fills it inside one transaction.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch

from graphlora.config import ALL_LINEAR
from graphlora.errors import ConfigError

__all__ = ["combine_lora", "combine_ia3", "union_targets", "COMBINATIONS"]

COMBINATIONS = ("linear", "cat", "svd")


def union_targets(values: Sequence[Any], field_name: str) -> Any:
    """PEFT's union of ``target_modules``-like fields: one regex ``(a)|(b)`` or a list union."""
    kinds = {isinstance(v, str) for v in values}
    if len(kinds) > 1:
        raise ConfigError(
            f"the adapters mix a regex string and a list in {field_name} ({list(values)!r}); PEFT refuses "
            "that too. Give them the same form."
        )
    if isinstance(values[0], str):
        return "|".join(f"({v})" for v in values)
    return tuple(sorted(set().union(*values)))


def _targets(state: Any, facts: Any, adapters: Sequence[str]) -> Any:
    from graphlora.planning import resolve_targets

    resolved = []
    for a in adapters:
        config = state.configs[a]
        t = config.target_modules
        resolved.append(tuple(resolve_targets(config, facts)) if t is None or t == ALL_LINEAR else t)
    return union_targets(resolved, "target_modules")


Fill = Callable[[str, Any], None]


def _lora_rank(config: Any) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def combine_lora(state: Any, facts: Any, records: Any, adapters: Sequence[str], weights: Sequence[float],
                 combination_type: str, *, svd_rank: Union[int, None] = None, svd_clamp: Union[float, None] = None,
                 svd_full_matrices: bool = True, svd_driver: Union[str, None] = None) -> tuple[Any, Fill]:
    """Combine LoRA adapters (see the module docstring): the new config and its ``fill``."""
    from graphlora.planning import plan_adapter

    configs = [state.configs[a] for a in adapters]
    dora = [a for a, c in zip(adapters, configs) if c.use_dora]
    if dora:
        raise ConfigError(
            f"add_weighted_adapter cannot combine DoRA adapters ({dora}): their magnitude vectors have no "
            "weighted sum that keeps the DoRA math. Combine plain LoRA adapters."
        )
    kind = "linear" if len(adapters) == 1 else combination_type
    ranks = [_lora_rank(c) for c in configs]
    if kind == "linear":
        if len(set(ranks)) != 1:
            raise ConfigError(
                f"combination_type='linear' needs adapters of one rank, got ranks {dict(zip(adapters, ranks))}; "
                "use combination_type='cat' or 'svd'."
            )
        rank = ranks[0]
    elif kind == "cat":
        rank = sum(ranks)
    else:
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
            raise ConfigError(f"svd_rank={svd_rank!r} must be a positive integer (or None for the largest rank).")
        rank = svd_rank or max(ranks)
    config = dataclasses.replace(configs[0], r=rank, lora_alpha=rank, target_modules=_targets(state, facts, adapters),
                                 alpha_pattern={}, rank_pattern={})
    plan = plan_adapter(config, facts, records)  # fails early (NoTargetError) before anything is added
    sources = {site: [(a, w) for a, w in zip(adapters, weights) if site in state.plans[a]] for site in plan}
    empty = [s for s, found in sources.items() if not found]
    if empty:
        raise ConfigError(
            f"the combined targets select {empty[0]!r}, where none of {list(adapters)} has a branch "
            "(their layers_to_transform / exclude_modules differ); PEFT refuses this too."
        )

    def fill(site: str, branch: Any) -> None:
        parts = [(state.branch(site, a), w) for a, w in sources[site]]
        A_out, B_out = branch.lora_A.weight, branch.lora_B.weight
        A_out.zero_()
        B_out.zero_()
        if kind == "cat":
            As = torch.cat([b.lora_A.weight * (w * b.scaling) for b, w in parts], dim=0)
            Bs = torch.cat([b.lora_B.weight for b, _ in parts], dim=1)
            A_out[: As.shape[0]] = As
            B_out[:, : Bs.shape[1]] = Bs
        elif kind == "linear":
            for b, w in parts:
                ws = w * b.scaling
                A_out += b.lora_A.weight * (math.copysign(math.sqrt(abs(ws)), ws))
                B_out += b.lora_B.weight * math.sqrt(abs(ws))
        else:
            delta = sum((b.lora_B.weight.float() @ b.lora_A.weight.float()) * (w * b.scaling) for b, w in parts)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices, driver=svd_driver)
            U = U[:, :rank] @ torch.diag(S[:rank])
            Vh = Vh[:rank, :]
            if svd_clamp is not None:
                hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), svd_clamp)
                U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
            A_out.copy_(Vh)
            B_out.copy_(U)

    return config, fill


def combine_ia3(state: Any, facts: Any, records: Any, adapters: Sequence[str], weights: Sequence[float],
                combination_type: str) -> tuple[Any, Fill]:
    """Combine IA3 adapters: ``l = sum_i w_i l_i`` (PEFT's only IA3 combination): the new config and its ``fill``."""
    from graphlora.planning import plan_adapter

    if combination_type != "linear" and len(adapters) > 1:
        raise ConfigError(
            f"combination_type={combination_type!r} is not defined for IA3 adapters; PEFT combines IA3 "
            "vectors linearly: use combination_type='linear'."
        )
    configs = [state.configs[a] for a in adapters]
    resolved = [state.rule(a).resolve_config(c, facts.model_type) for a, c in zip(adapters, configs)]
    ff = union_targets([c.feedforward_modules for c in resolved], "feedforward_modules")
    config = dataclasses.replace(configs[0], target_modules=_targets(state, facts, adapters), feedforward_modules=ff)
    plan_adapter(config, facts, records)

    def fill(site: str, branch: Any) -> None:
        branch.ia3_l.zero_()
        for a, w in zip(adapters, weights):
            if site in state.plans[a]:
                source = state.branch(site, a).ia3_l
                if source.shape != branch.ia3_l.shape:
                    raise ConfigError(
                        f"IA3 adapter {a!r} scales the {'input' if source.shape[0] == 1 else 'output'} of {site!r} "
                        "but the combined adapter scales the other side (feedforward_modules differ)."
                    )
                branch.ia3_l += source * w

    return config, fill
