"""Adapter state: everything that says which adapters exist and how they are switched, in one place.

:class:`AdapterState` is the one owner of that state; the emitted module is a thin facade over it
and every mutating call runs inside :func:`graphlora.transaction.transaction`. It holds:

- ``configs``: adapter name -> its frozen config, in the order added (also the mixed-batch slot order);
- ``plans``: adapter name -> {site name -> the method's per-site constants (LoRA: ``(r, alpha, scaling)``)};
- ``weights``: the active set, in order, with each adapter's weight (``set_adapter_weights``);
- ``enabled``: ``False`` after ``disable_adapters()``; ``trainable``: whether active adapters train;
- ``requires_grad``: adapter -> ``requires_grad`` chosen for it by ``set_requires_grad`` /
  ``disable_adapter_layers`` (PEFT's), which wins over the rule below until the next activation
  (``set_adapter``, ``set_adapter_weights``, ``enable_adapter_layers``, ``requires_grad_``);
- ``merge``: which adapters are folded into the base weights, and exact copies of the originals;
- ``store``: the :class:`AdapterStore` module (registered on the emitted module as ``graphlora``),
  which holds the tensors per site. Its layout (every ``get_attr`` target the splice pass writes)::

    graphlora.<site_key>.<adapter>.lora_A.weight   [r, d_in]    trainable
    graphlora.<site_key>.<adapter>.lora_B.weight   [d_out, r]   trainable
    graphlora.<site_key>.<adapter>.gate            []           switch state (non-persistent)
    graphlora.<site_key>.<adapter>.scale           []           alpha / r (non-persistent)
    graphlora.<site_key>.<adapter>.lora_dropout    nn.Dropout   (only when lora_dropout > 0)
    graphlora.<site_key>.<adapter>.lora_magnitude_vector  [d_out]  trainable (DoRA only)
    graphlora.<site_key>.<adapter>.ia3_l           [d_out, 1] or [1, d_in]   trainable (IA3)
    graphlora.row_index                            [batch]      mixed-batch adapter slots
    graphlora._banks.<site_key>.lora_A / lora_B / scale / gate   the site's bank (serving, see graphlora.banks)
    graphlora._banks.active                        [K]          bank slots of the active adapters

Every branch has ``apply_state(weight, merged)``, which writes its switch buffers in place;
:meth:`AdapterState.sync` calls it with each adapter's effective weight::

    w_eff(a) = weights[a]   if enabled and a is active and a is not merged
             = 0            otherwise
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Union, cast

import torch
from torch import nn

from graphlora.passes import BranchSpec, Site
from graphlora.passes.splice import site_key

from . import banks as banking
from .banks import BANKS, BankLayout, BankSet
from .methods import MethodRule, rule_for
from .methods.lora import bank_spec
from .modules_to_save import SAVED, drop_extras, sync_extras
from .trainable_tokens import TOKENS

__all__ = ["AdapterStore", "AdapterState", "MergeState", "STORE"]

#: the attribute name of the store on the emitted module
STORE = "graphlora"


class AdapterStore(nn.Module):
    """``graphlora``: per site key, a ``ModuleDict`` of adapter name -> branch; and ``row_index``."""

    def __init__(self) -> None:
        super().__init__()
        # mixed-adapter batches: one slot per row, written in place before each call
        self.register_buffer("row_index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.add_module(BANKS, BankSet())
        self.register_state_dict_post_hook(_own_storage)

    @property
    def banks(self) -> BankSet:
        return cast(BankSet, self._modules[BANKS])

    def _site(self, key: str) -> nn.ModuleDict:
        return cast(nn.ModuleDict, self._modules[key])

    def branch(self, key: str, adapter: str) -> nn.Module:
        return self._site(key)[adapter]

    def add(self, key: str, adapter: str, branch: nn.Module) -> None:
        if key not in self._modules:
            self.add_module(key, nn.ModuleDict())
        self._site(key)[adapter] = branch

    def remove(self, key: str, adapter: str) -> None:
        site = self._site(key)
        del site[adapter]
        if len(site) == 0:
            del self._modules[key]

    def branches(self, adapter: Union[str, None] = None) -> Iterator[tuple[str, str, nn.Module]]:
        """``(site_key, adapter, branch)`` triples, optionally for one adapter."""
        for key in list(self._modules):
            if key in (BANKS, SAVED, TOKENS):  # SAVED: modules_to_save copies; TOKENS: trainable rows
                continue
            for name, branch in self._site(key).items():
                if adapter is None or name == adapter:
                    yield key, name, branch

    def branches_of(self, adapters: Collection[str]) -> Iterator[tuple[str, str, nn.Module]]:
        """:meth:`branches` of ``adapters`` only (a lookup per site, not a walk over every adapter)."""
        for key, site in self._modules.items():
            if key in (BANKS, SAVED, TOKENS):
                continue
            held = site._modules
            for name in adapters:
                branch = held.get(name)
                if branch is not None:
                    yield key, name, branch


def _own_storage(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """``state_dict()`` of the store: an adapter tensor that is a view of a bank slot is given as a
    contiguous copy of its own, so saving it (``torch.save``, safetensors) writes the adapter's
    ``r x d`` values, not the whole bank, and never a non-contiguous view."""
    for key, tensor in state_dict.items():
        if key.startswith(prefix) and isinstance(tensor, torch.Tensor) and (
                not tensor.is_contiguous()
                or tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size()):
            state_dict[key] = tensor.contiguous().clone() if tensor.is_contiguous() else tensor.contiguous()


@dataclass
class MergeState:
    """What a merge changed, so that it can be undone.

    Attributes:
        originals: weight attribute path -> exact copy of the weight before the first merge.
        merged: adapter -> the weight ``w_a`` it was folded in with (in merge order).
    """

    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    merged: dict[str, float] = field(default_factory=dict)


@dataclass
class AdapterState:
    """The adapters of one emitted module (see the module docstring)."""

    store: AdapterStore
    configs: dict[str, Any] = field(default_factory=dict)
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    enabled: bool = True
    trainable: bool = True
    #: adapter -> requires_grad set by ``set_requires_grad`` (see :meth:`trains`)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    merge: MergeState = field(default_factory=MergeState)
    banks: BankLayout = field(default_factory=BankLayout)
    #: PEFT's ``autocast_adapter_dtype``: new LoRA / IA3 adapters over an fp16 / bf16 base keep float32
    #: parameters (the default of ``inject``)
    autocast_adapter_dtype: bool = True
    #: adapters added since the last :meth:`sync` (their switch state is not written yet)
    fresh: set[str] = field(default_factory=set)
    #: the first adapter's ``task_type``, recorded when a second is added (PEFT's task model class
    #: follows it; :func:`graphlora.modules_to_save.inherit_task_modules`), kept when it is deleted
    task_type: Any = None

    # ------------------------------------------------------------------ reading
    @property
    def active(self) -> list[str]:
        """The active adapters (empty while disabled)."""
        return list(self.weights) if self.enabled else []

    @property
    def contributes(self) -> bool:
        """Whether any adapter changes the output: one with ``w_eff(a) != 0`` (see the module
        docstring). When none does, the base graph computes exactly what the spliced one does."""
        if not self.enabled:
            return False
        merged = self.merge.merged
        return any(weight != 0.0 and adapter not in merged for adapter, weight in self.weights.items())

    def trains(self, adapter: str, chosen: bool = True) -> bool:
        """Whether ``adapter``'s parameters require grad: the value ``set_requires_grad`` gave it, else
        when it is in the active set (enabled or not), ``trainable`` is on, its config is not
        ``inference_mode`` and ``chosen`` (a saved module's copy or trainable rows: this adapter's
        are the ones the active set uses)."""
        flag = self.requires_grad.get(adapter)
        if flag is not None:
            return flag
        return chosen and self.trainable and adapter in self.weights and not self.configs[adapter].inference_mode

    def rule(self, adapter: str) -> MethodRule:
        return rule_for(self.configs[adapter])

    def branch(self, site: str, adapter: str) -> nn.Module:
        """The branch module of ``adapter`` at site ``site`` (a site name, not its key)."""
        return self.store.branch(site_key(site), adapter)

    def branch_specs(self, records: Mapping[str, Site]) -> dict[str, list[BranchSpec]]:
        """site name -> how each adapter's branch enters it, in the order adapters were added."""
        specs: dict[str, list[BranchSpec]] = defaultdict(list)
        for adapter, plan in self.plans.items():
            rule = self.rule(adapter)
            for site in plan:
                key = site_key(site)
                prefix = f"{STORE}.{key}.{adapter}"
                specs[site].append(rule.branch_spec(adapter, prefix, self.store.branch(key, adapter), records[site]))
        return specs

    def slots(self) -> dict[str, int]:
        """Adapter name -> bank slot, for the adapters mixed batches can run (``"__base__"``: the
        banks' zero slot, no adapter)."""
        slots = dict(self.banks.slots)
        slots["__base__"] = self.banks.capacity
        return slots

    def bankable(self) -> dict[str, dict[str, tuple]]:
        """adapter -> site name -> ``(A, B, scaling)`` for every adapter whose method banks it."""
        out: dict[str, dict[str, tuple]] = {}
        dtypes: dict[str, torch.dtype] = {}  # a site's bank has one dtype: the first banked adapter's
        for adapter in self.plans:
            factors = self._bank_factors(adapter)
            if factors is None:
                continue
            if any(dtypes.setdefault(site, f[0].dtype) != f[0].dtype for site, f in factors.items()):
                continue  # another dtype than the adapters banked there (autocast_adapter_dtype=False): own branch
            out[adapter] = factors
        return out

    def _bank_factors(self, adapter: str) -> Union[dict[str, tuple], None]:
        """site name -> ``(A, B, scaling)`` of ``adapter`` if its method banks every one of its sites."""
        rule = self.rule(adapter)
        factors = {site: rule.bank_factors(self.branch(site, adapter)) for site in self.plans[adapter]}
        if not factors or any(f is None for f in factors.values()):
            return None
        return cast(dict[str, tuple], factors)

    def place_banks(self, warn: bool = True, sync: bool = True, added: Union[str, None] = None) -> bool:
        """Slots for every bankable adapter and bound views (see :func:`graphlora.banks.place`);
        True when the set of banked sites changed. ``sync=False``: the caller syncs next.
        ``added``: the one adapter added since the last placement; where it fits the banks as
        they are, only it is placed (:func:`graphlora.banks.place_one`)."""
        if added is not None and self._place_added(added):
            if sync:
                self.sync()
            return False
        bankable = self.bankable()
        for name in [n for n in self.banks.slots if n not in bankable and n in self.plans]:
            self._detach(name)  # leaves the banks (a cast, a shard): its slot is cleared next
        changed = banking.place(self.store.banks, self.banks, bankable,
                                {site: site_key(site) for plan in self.plans.values() for site in plan}, warn)
        if sync:
            self.sync()
        return changed

    def _place_added(self, name: str) -> bool:
        """Place ``name`` alone if :meth:`bankable` would take it and it fits (else False)."""
        factors = self._bank_factors(name)
        if factors is None:
            return False
        keys = {site: site_key(site) for site in factors}
        return banking.place_one(self.store.banks, self.banks, name, factors, keys)

    def restore_banks(self) -> None:
        """After a transaction's restore or a move: bind the parameters again and zero the slots no
        adapter holds (a failed call may have written one; ``to_empty`` leaves garbage)."""
        self.place_banks(warn=False)
        banking.clear_free(self.store.banks, self.banks)

    def bank_specs(self, records: Mapping[str, Site], mixed: bool) -> dict[str, list[BranchSpec]]:
        """site name -> the bank branch (serving: ``active`` slots; ``mixed``: per-row slots),
        followed, when not ``mixed``, by the branches of adapters that are not banked."""
        specs: dict[str, list[BranchSpec]] = defaultdict(list)
        banked = {key for key, _ in self.store.banks.sites()}
        index = f"{STORE}.row_index" if mixed else f"{STORE}.{BANKS}.active"
        for site in records:
            key = site_key(site)
            if key in banked:
                specs[site].append(bank_spec(f"{STORE}.{BANKS}.{key}", index, mixed))
        if not mixed:
            slots = self.banks.slots
            for site, present in self.branch_specs(records).items():
                specs[site].extend(b for b in present if b.adapter not in slots)
        return specs

    # ------------------------------------------------------------------ writing
    def add(self, name: str, config: Any, plan: Mapping[str, Any], branches: Mapping[str, nn.Module]) -> None:
        """Register an adapter's config, plan and branches (inactive until :meth:`set_active`)."""
        for site, branch in branches.items():
            self.store.add(site_key(site), name, branch)
        self.configs[name] = config
        self.plans[name] = dict(plan)
        self.fresh.add(name)

    def _detach(self, name: str) -> None:
        """Give ``name``'s parameters storage of their own before its bank slot is cleared or reused
        (a rolled-back delete rebinds them from these copies; a caller still holding them keeps
        their values instead of reading the next adapter's slot)."""
        for _, _, branch in self.store.branches(name):
            for param in branch.parameters():
                if type(param.data) is torch.Tensor:  # a shard (DTensor) is no bank view
                    param.data = param.data.clone()

    def remove(self, name: str) -> None:
        """Forget an adapter: its branches, config, plan and place in the active set."""
        if name in self.banks.slots:
            self._detach(name)
        for key, adapter, _ in list(self.store.branches(name)):
            self.store.remove(key, adapter)
        drop_extras(self.store, name)
        self.configs.pop(name, None)
        self.plans.pop(name, None)
        self.weights.pop(name, None)
        self.requires_grad.pop(name, None)
        self.fresh.discard(name)

    def set_active(self, weights: Mapping[str, float], reset_grad: bool = False) -> None:
        """Make ``weights`` (adapter -> weight) the active set and write the switch state: only the
        adapters active before or after, and those not synced yet, can change (:meth:`sync`).
        ``reset_grad``: forget every ``set_requires_grad`` choice too (an activation, as PEFT's)."""
        changed = set(self.weights) | set(weights) | self.fresh
        if reset_grad:
            changed |= set(self.requires_grad)
            self.requires_grad = {}
        self.weights = dict(weights)
        self.sync(changed)

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self.sync()

    def sync(self, adapters: Union[Collection[str], None] = None) -> None:
        """Write every branch's switch buffers and ``requires_grad`` from the state.

        An adapter's effective weight is its active weight, or 0 when it is inactive, disabled or
        merged. Its parameters require grad when it is active (or loaded for training and in the
        active set), ``trainable`` is on, and its config is not ``inference_mode``; or as
        ``set_requires_grad`` chose (:meth:`trains`).

        ``adapters``: only these adapters' state can have changed; they must include every active
        adapter (the banks' state is made from them). Only their branches are visited, so switching
        or adding costs what the adapters involved cost, not what every loaded adapter does.
        """
        active = self.weights if self.enabled else {}
        merged = self.merge.merged
        slots = self.banks.slots
        scalings: dict[str, dict[str, float]] = defaultdict(dict)
        watched: dict[str, tuple[torch.Tensor, ...]] = defaultdict(tuple)
        if adapters is None:
            visited = self.store.branches()
            self.fresh.clear()
        else:
            assert set(active) <= set(adapters), "sync(adapters=...) must include every active adapter"
            visited = self.store.branches_of(adapters)
            self.fresh.difference_update(adapters)
        for key, adapter, branch in visited:
            weight = active[adapter] if adapter in active and adapter not in merged else 0.0
            branch.apply_state(weight, adapter in merged)
            params = _own_parameters(branch)
            if adapter in slots:
                scalings[adapter][key] = 0.0 if adapter in merged else branch.scaling
                if weight != 0.0:
                    watched[key] += params
            trainable = self.trains(adapter)
            for param in params:
                if param.requires_grad != trainable:
                    param.requires_grad_(trainable)
        if slots:
            banking.write_state(self.store.banks, self.banks, {a: w for a, w in active.items() if a in slots},
                                scalings, watched)
        sync_extras(self)  # modules_to_save slots and bias requires_grad


def _own_parameters(module: nn.Module) -> tuple[nn.Parameter, ...]:
    """``tuple(module.parameters())`` for a branch, without ``named_modules``' bookkeeping (a sync
    visits every branch of every adapter: this walk is most of an ``add_adapter``'s host time)."""
    out = [p for p in module._parameters.values() if p is not None]
    for child in module._modules.values():
        if child is not None:
            out += _own_parameters(child)
    return tuple(dict.fromkeys(out))
