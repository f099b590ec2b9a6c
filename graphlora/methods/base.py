"""The rule interface: everything graphlora needs to know about one adapter method.

An adapter method (LoRA, DoRA, IA3, ...) is one :class:`MethodRule` subclass in one module of
this package. The rest of graphlora (targeting, splicing, switching, save/load, merge,
weighted combination) is method-agnostic and asks the rule for:

============================  ==============================================================
hook                          what it answers
============================  ==============================================================
``config_class``/``peft_type``  which config builds it, and PEFT's ``peft_type`` string
``default_targets``           PEFT's ``target_modules`` when the config leaves them unset
``site_plan``                 per-site constants after targeting (rank, scaling, feed-forward)
``make_branch``               the ``nn.Module`` holding the site's parameters, init included
``branch_spec``               how the branch enters the site subgraph (its ``emit`` function,
                              and its ``mixed`` attribute paths when mixed batches can run it)
``freeze_steps``              specialize steps for the method's own graph ops (``{}``: none)
``bank_factors``              its ``(A, B, scaling)`` when it can live in an adapter bank
``tensors``/``shapes``        its PEFT file keys (``lora_A.weight``, ``ia3_l``, ...) and shapes
``config_to_peft``/``from``   its ``adapter_config.json`` dict both ways
``merge``                     its merge math on one weight (and bias)
``combine``                   ``add_weighted_adapter`` for adapters of this method
============================  ==============================================================

The switch contract every rule keeps: a branch's contribution depends on tensor state only
(``apply_state(weight, merged)`` writes its buffers in place), is exactly the identity when
``weight == 0`` and at initialisation (with the default init).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from graphlora.passes import BranchSpec, Site
from graphlora.passes.specialize import FreezeStep

__all__ = ["MethodRule"]


class MethodRule:
    """Base class of adapter-method rules (see the module docstring for the hooks)."""

    #: short name shown in tables and errors ("lora", "ia3")
    name: str = ""
    #: the frozen config dataclass this rule serves
    config_class: type = object
    #: PEFT's ``peft_type`` string
    peft_type: str = ""

    # ------------------------------------------------------------------ planning
    def default_targets(self, model_type: Union[str, None]) -> Union[Sequence[str], None]:
        """PEFT's default ``target_modules`` for a model type (``None``: no default)."""
        raise NotImplementedError

    def resolve_config(self, config: Any, model_type: Union[str, None]) -> Any:
        """The config with model-type defaults filled in where PEFT fills them (default: as is)."""
        return config

    def site_plan(self, config: Any, site: str) -> Any:
        """Per-site constants for a targeted site (a small tuple)."""
        raise NotImplementedError

    def variant(self, config: Any) -> str:
        """What the site table shows for this adapter (``"lora"``, ``"dora"``, ``"ia3"``)."""
        return self.name

    def rank(self, plan: Any) -> int:
        """The adapter's rank at a site (0 for methods without low-rank factors)."""
        return 0

    # ------------------------------------------------------------------ state and graph
    def make_branch(self, config: Any, site: Site, plan: Any, weight: torch.Tensor) -> nn.Module:
        """The site's branch module, initialised (``weight`` is the base weight)."""
        raise NotImplementedError

    def branch_spec(self, adapter: str, prefix: str, branch: nn.Module, site: Site) -> BranchSpec:
        """How the branch enters the site subgraph: ``BranchSpec(adapter, prefix, emit, ...)``, with
        ``mixed`` set when mixed-adapter batches can run the branch (``None`` otherwise)."""
        raise NotImplementedError

    def freeze_steps(self) -> dict[Any, FreezeStep]:
        """Specialize steps for the method's own ops, by call target (see
        :class:`graphlora.passes.specialize.FreezeSwitches`); the default has none."""
        return {}

    def bank_factors(self, branch: nn.Module) -> Union[tuple[torch.Tensor, torch.Tensor, float], None]:
        """``(A [r, d_in], B [d_out, r], scaling)`` when the branch's update is ``scaling * x A^T B^T``
        and it can live in an adapter bank (:mod:`graphlora.banks`); ``None`` keeps its own branch."""
        return None

    def autocast(self, config: Any) -> bool:
        """Whether ``autocast_adapter_dtype`` keeps this adapter's fp16/bf16 parameters in float32
        (PEFT's default for every method; here for the methods whose ops compute in the adapter
        dtype and cast back: LoRA and IA3). Default: no, the adapter takes the base dtype."""
        return False

    def mixable(self, config: Any) -> bool:
        """Whether mixed-adapter batches (``adapter_names=``) support this adapter."""
        return False

    # ------------------------------------------------------------------ files
    def tensors(self, branch: nn.Module) -> dict[str, torch.Tensor]:
        """PEFT's per-module tensors: ``{"lora_A.weight": A, ...}`` (suffixes after the site path)."""
        raise NotImplementedError

    def shapes(self, site: Site, plan: Any, config: Any) -> dict[str, tuple[int, ...]]:
        """The shapes :meth:`tensors` has at ``site``, keyed the same way."""
        raise NotImplementedError

    def config_from_peft(self, data: Mapping[str, Any], source: str) -> Any:
        """The config from a PEFT ``adapter_config.json`` dict (refusing what the rule cannot do)."""
        raise NotImplementedError

    def config_to_peft(self, config: Any, sites: Sequence[str], resolved: Any, fan_in_fan_out: bool,
                       *, base_model_name_or_path: Union[str, None] = None,
                       auto_mapping: Union[Mapping[str, str], None] = None) -> dict[str, Any]:
        """The ``adapter_config.json`` dict PEFT would write for ``config`` adapted at ``sites``
        (``resolved``: ``target_modules`` after model-type defaults)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ merge
    def merge(
        self, weight: torch.Tensor, bias: Union[torch.Tensor, None], branch: nn.Module, w: float,
        fan_in_fan_out: bool, original: Union[torch.Tensor, None] = None,
    ) -> tuple[torch.Tensor, Union[torch.Tensor, None]]:
        """Fold the branch (with adapter weight ``w``) into float32 ``weight`` (stored layout) and
        ``bias``; returns the new pair (``bias`` unchanged when the method leaves it alone).
        ``original`` is the unmerged base weight (DoRA's norm is taken on it)."""
        raise NotImplementedError

    def merge_order(self) -> int:
        """Merge position: additive methods (0) fold before scaling methods (1), which wrap them."""
        return 0

    # ------------------------------------------------------------------ weighted combination
    def combine(self, state: Any, facts: Any, records: Any, adapters: Sequence[str], weights: Sequence[float],
                combination_type: str, **options: Any) -> tuple[Any, Any]:
        """``add_weighted_adapter`` for adapters of this method: the new adapter's config and a
        ``fill(site, branch)`` that writes its tensors (nothing is changed here).

        Raises:
            ConfigError: the combination is not defined for these adapters.
        """
        raise NotImplementedError(
            f"add_weighted_adapter does not support {self.name} adapters; combine LoRA adapters instead."
        )

    # ------------------------------------------------------------------ hotswap
    def hotswap(self, branch: nn.Module, config: Any, plan: Any) -> bool:
        """After ``load_adapter`` copied a file's tensors into an existing adapter's ``branch``,
        take the file's other per-site constants from ``config`` / ``plan``. Returns True when the
        branch's structure changed (the graphs are then re-spliced). Default: nothing to take."""
        return False
