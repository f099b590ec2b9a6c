"""Adapter banks: every plain LoRA adapter of a site in stacked slots, for serving.

Per adapted site, a :class:`SiteBank` holds the LoRA factors of every loaded plain-LoRA adapter in
fixed-capacity stacks (the idea of vLLM's ``max_loras`` / ``max_lora_rank`` and S-LoRA's pool)::

    lora_A [S + 1, R, d_in]     slot s: adapter s's A, rows r..R-1 zero (ranks below R are padded)
    lora_B [S + 1, d_out, R]    slot s: its B, columns r..R-1 zero
    scale  [S + 1]              slot s: its alpha / r at this site (mixed batches read it)
    gate   [K]                  per active position k: scale[slot_k] * w_k (0 for unused positions)
    a_hat  [K R, d_in]          the active slots' A, stacked          (gathered once per change:
    b_hat  [d_out, K R]         the active slots' B, gated             :meth:`SiteBank.gather`)

and one :class:`BankSet` (``graphlora._banks``) holds ``active`` ``[K]`` (int64), the slots of the
active adapters, shared by every site. Slot ``S`` is all zeros (the base model's slot: inactive
positions and ``"__base__"`` rows point at it). A site's serving output is then

.. math::

    y = W x + b + \\sum_{k<K} g_k \\, B_{a_k} A_{a_k} x

computed as two GEMMs of width ``K R`` on the gathered factors whatever the number of loaded
adapters (:func:`graphlora.passes.ops.lora_bank`): the cost follows the active adapters, not the loaded
ones, and switching, adding into a free slot or deleting writes tensors only (no re-splice, no
recompilation, CUDA graphs stay valid).

**One copy of each tensor.** An adapter's own parameters (``lora_A.weight`` ``[r, d_in]``,
``lora_B.weight`` ``[d_out, r]``: what training updates, what files hold) are views of its bank
slot (:meth:`BankSet.bind` sets ``param.data``, so the ``Parameter`` objects, and optimizers
holding them, are kept). Writing a parameter in place (an optimizer step, ``copy_``, a hotswap)
is writing the bank. Whatever gives a parameter new storage (``.to()``, ``.half()``, a deep copy,
``load_state_dict(assign=True)``) is undone by the next :meth:`BankSet.bind`, which copies the
parameter into its slot and makes it a view again; the emitted module calls it after every
structural change and move.

**Growth.** Capacity ``S`` and rank ``R`` grow when needed (a warning says a compiled graph
recompiles once, since the bank shapes change); with ``grow=False``
(:meth:`graphlora.AdaptedGraphModule.configure_banks`) a full bank is an error naming the setting.
The width ``K`` (:data:`DEFAULT_WIDTH`, 2) grows silently the first time more adapters are active at
once (one recompile of a compiled serving graph; ``configure_banks(max_active=)`` reserves it).

**One copy, kept honest.** Whatever gives a parameter new storage behind the module's back is
undone by the next bind: the emitted module binds after every structural change, move, restore
and ``load_state_dict`` (a post-hook; ``assign=True`` included). An adapter leaving the banks
(deleted, or no longer bankable) first gets storage of its own, so a rolled-back delete gets its
values back and a caller still holding its parameters never reads the next adapter's slot. The
store's ``state_dict()`` gives each banked tensor as a contiguous copy of its own values.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import ConfigError

__all__ = ["BankLayout", "BankSet", "SiteBank", "BANKS", "DEFAULT_CAPACITY", "STACK_PREFIX"]

#: optimizer steps taken in this process (a fused optimizer writes parameters without bumping their
#: version counters: :meth:`BankSet.gather` re-gathers after any step)
_STEPS = [0]


def _count_step(*_: Any) -> None:
    _STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)

#: writes graphlora itself makes to the slots, gates and active slots outside a sync, counted after
#: each write (a cleared slot, a bound copy, a pool's slot write): :meth:`BankSet.gather` re-gathers
#: after any (their own version counters are not read: a check of a 32-layer model would read a
#: thousand of them every call)
_WRITES = [0]


def note_write() -> None:
    """Tell :meth:`BankSet.gather` that graphlora wrote a slot, a gate or the active slots in place."""
    _WRITES[0] += 1


_VERSION = operator.attrgetter("_version")

#: the bank set's name on the adapter store (``graphlora._banks``)
BANKS = "_banks"
#: the stacked factors' buffer names on the bank set: ``a_stack0``, ``a_stack1``, ... (:meth:`BankSet.stack`)
STACK_PREFIX = "a_stack"
#: slots reserved when the first bankable adapter arrives
DEFAULT_CAPACITY = 4
#: adapters that can be active at once before the serving graphs' shapes change: two (the extra
#: position reads the zero slot, so one active adapter pays ``R`` more zero columns in its GEMMs,
#: negligible beside the base GEMM)
DEFAULT_WIDTH = 2


class SiteBank(nn.Module):
    """One site's stacked LoRA slots (see the module docstring for the layout)."""

    def __init__(self, capacity: int, rank: int, d_in: int, d_out: int, width: int,
                 dtype: torch.dtype, device: Union[torch.device, None],
                 hat_dtype: Union[torch.dtype, None] = None) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        #: the gathered factors' dtype (``None``: the slots'; see ``configure_banks(lora_dtype=)``)
        self.hat_dtype = hat_dtype
        kw = {"dtype": dtype, "device": device}
        with torch.inference_mode(False):  # normal tensors (they keep version counters) even when made in it
            self.register_buffer("lora_A", torch.zeros(capacity + 1, rank, d_in, **kw), persistent=False)
            self.register_buffer("lora_B", torch.zeros(capacity + 1, d_out, rank, **kw), persistent=False)
            self.register_buffer("scale", torch.zeros(capacity + 1, device=device), persistent=False)
            self.register_buffer("gate", torch.zeros(width, device=device), persistent=False)
        #: the active adapters' parameters at this site (:meth:`BankSet.gather` checks them)
        self.watched: tuple[torch.Tensor, ...] = ()
        self._gathered_buffers(width)
        #: what was last written into ``scale`` / ``gate``, with the buffer's identity and version
        #: after the write (skip unchanged writes; any other write or a new buffer forces one)
        self._scales: dict[int, tuple] = {}
        self._gates: tuple = ()

    def _gathered_buffers(self, width: int) -> None:
        """``a_hat [K R, d_in]`` and ``b_hat [d_out, K R]``: the active slots' factors, gated (see :meth:`gather`)."""
        kw = {"dtype": self.hat_dtype or self.lora_A.dtype, "device": self.lora_A.device}
        rank = self.lora_A.shape[1]
        with torch.inference_mode(False):
            self.register_buffer("a_hat", torch.zeros(width * rank, self.d_in, **kw), persistent=False)
            self.register_buffer("b_hat", torch.zeros(self.d_out, width * rank, **kw), persistent=False)

    def sources(self) -> tuple[torch.Tensor, ...]:
        """What :meth:`BankSet.gather` watches of what ``a_hat`` / ``b_hat`` are made of: the active
        adapters' parameters. A write through a parameter (a user's ``copy_``, a hotswap) bumps the
        parameter's version counter, not the bank's (``param.data = view`` shares storage, not the
        counter). The slots and gates are written by graphlora only, which says so
        (:func:`note_write`), or by a sync, which re-gathers."""
        return self.watched

    def gather(self, active: torch.Tensor) -> None:
        r"""Write the active slots' factors into ``a_hat`` / ``b_hat`` in place (:meth:`BankSet.gather`
        calls it when anything they are made of changed).

        .. math::

            \hat A = [A_{s_0}; \dots; A_{s_{K-1}}] \in \mathbb{R}^{K R \times d_{in}}, \qquad
            \hat B = [g_0 B_{s_0}, \dots, g_{K-1} B_{s_{K-1}}] \in \mathbb{R}^{d_{out} \times K R}

        so the serving update is :math:`\hat B \hat A x` (:func:`graphlora.passes.ops.lora_bank`): the
        slot selection and the gates are paid once per change, not on every call.
        """
        k, r = active.shape[0], self.rank
        a_hat, b_hat, bank_a, bank_b = self.a_hat, self.b_hat, self.lora_A, self.lora_B
        with torch.no_grad():
            gate = self.gate.to(bank_b.dtype).view(k, 1, 1)
            if a_hat.dtype == bank_a.dtype and b_hat.dtype == bank_b.dtype:  # written in place: no temporaries
                torch.index_select(bank_a, 0, active, out=a_hat.view(k, r, self.d_in))
                torch.mul(bank_b.index_select(0, active), gate, out=b_hat.view(self.d_out, k, r).permute(1, 0, 2))
                return
            a_hat.copy_(bank_a.index_select(0, active).reshape(k * r, self.d_in))  # lora_dtype: cast as copied
            b_hat.copy_((bank_b.index_select(0, active) * gate).permute(1, 0, 2).reshape(self.d_out, k * r))

    @property
    def capacity(self) -> int:
        return self.lora_A.shape[0] - 1

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    @torch.no_grad()
    def resized(self, capacity: int, rank: int, width: int) -> "SiteBank":
        """A copy with more slots / rank / width, slot contents kept (the zero slot moves to the end)."""
        old = self.capacity
        new = SiteBank(capacity, rank, self.d_in, self.d_out, width, self.lora_A.dtype, self.lora_A.device,
                       self.hat_dtype)
        r = self.rank
        new.lora_A[:old, :r].copy_(self.lora_A[:old])
        new.lora_B[:old, :, :r].copy_(self.lora_B[:old])
        new.scale[:old].copy_(self.scale[:old])
        new._scales = dict(self._scales)
        return new

    def slot_views(self, slot: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``[r, d_in]`` and ``[d_out, r]`` views of slot ``slot`` (an adapter's A and B)."""
        return self.lora_A[slot, :r], self.lora_B[slot, :, :r]

    def holds(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> bool:
        """Whether ``a`` and ``b`` already are :meth:`slot_views` of ``slot`` (same storage
        offset and strides; checked without making the views: every add checks every adapter)."""
        bank_a, bank_b = self.lora_A, self.lora_B
        return (a.data_ptr() == bank_a.data_ptr() + slot * bank_a.stride(0) * bank_a.element_size()
                and b.data_ptr() == bank_b.data_ptr() + slot * bank_b.stride(0) * bank_b.element_size()
                and a.stride() == bank_a.stride()[1:] and b.stride() == bank_b.stride()[1:]
                and a.dtype == bank_a.dtype and b.dtype == bank_b.dtype)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.set_scale(slot, 0.0)
        note_write()  # after the write: a gather in between reads the old count and gathers again

    def set_scale(self, slot: int, value: float) -> None:
        """Write ``scale[slot]`` (only when it changed: every add visits every slot of every site)."""
        scale = self._buffers["scale"]
        if self._scales.get(slot) != (value, id(scale), scale._version):
            with torch.no_grad():
                scale[slot] = value
            self._scales[slot] = (value, id(scale), scale._version)

    def set_gates(self, values: tuple[float, ...]) -> None:
        """Write ``gate`` in place (only when it changed)."""
        if (values, id(self.gate), self.gate._version) != self._gates:
            with torch.no_grad():
                self.gate.copy_(torch.tensor(values, dtype=self.gate.dtype), non_blocking=True)
            note_write()
            self._gates = (values, id(self.gate), self.gate._version)

    @torch.no_grad()
    def set_width(self, width: int) -> None:
        """Room for ``width`` active adapters (a new ``gate`` buffer; the slots are untouched)."""
        with torch.inference_mode(False):
            self.register_buffer("gate", torch.zeros(width, dtype=self.gate.dtype, device=self.gate.device),
                                 persistent=False)
        self._gates = ()
        self._gathered_buffers(width)

    def forget_written(self) -> None:
        """After a move (new buffers with the same values) or a restore: write everything next time."""
        self._scales, self._gates = {}, ()

    def set_hat_dtype(self, dtype: Union[torch.dtype, None]) -> None:
        """Gather the active factors in ``dtype`` from now on (new ``a_hat`` / ``b_hat`` buffers,
        filled by the next :meth:`BankSet.gather` once :meth:`BankSet.forget_gathered` ran)."""
        self.hat_dtype = dtype
        self._gathered_buffers(self.gate.shape[0])


@dataclass
class BankLayout:
    """The bank bookkeeping (part of the adapter state).

    Attributes:
        slots: adapter -> its slot (every bankable adapter has one).
        capacity / rank / width: the banks' ``S``, ``R`` and ``K`` (0 until the first adapter).
        grow: grow when full (``False``: refuse with an error naming ``configure_banks``).
        reserved: what ``configure_banks`` asked for (capacity, rank), kept as lower bounds.
        lora_dtype: the serving factors' dtype (``None``: the adapters' own).
    """

    slots: dict[str, int] = field(default_factory=dict)
    capacity: int = 0
    rank: int = 0
    width: int = DEFAULT_WIDTH
    grow: bool = True
    reserved: tuple[int, int] = (0, 0)
    lora_dtype: Union[torch.dtype, None] = None

    def copy(self) -> "BankLayout":
        return BankLayout(dict(self.slots), self.capacity, self.rank, self.width, self.grow, self.reserved,
                          self.lora_dtype)

    def reserve_width(self, banks: "BankSet", width: int) -> None:
        """Room for ``width`` adapters active at once (a compiled serving graph recompiles when it grows)."""
        if width > self.width:
            self.width = width
            for _, bank in banks.sites():
                bank.set_width(width)

    def free_slot(self) -> Union[int, None]:
        used = set(self.slots.values())
        return next((s for s in range(self.capacity) if s not in used), None)


class BankSet(nn.Module):
    """``graphlora._banks``: a :class:`SiteBank` per banked site and the shared ``active`` slots."""

    def __init__(self) -> None:
        super().__init__()
        with torch.inference_mode(False):
            self.register_buffer("active", torch.zeros(1, dtype=torch.long), persistent=False)
        self._active: tuple = ()
        #: every tensor the gathered factors are made of (rebuilt by :meth:`forget_gathered`) and
        #: what :meth:`gather` last saw of them
        self._sources: list[torch.Tensor] = []
        self._gathered: tuple = ()
        #: sibling sites (one input: q / k / v) -> the buffer holding their ``a_hat`` stacked (:meth:`stack`)
        self._stacks: dict[tuple[str, ...], str] = {}
        #: the stacks some program reads (:meth:`set_live`; ``None``: all): only these are refilled
        self._live: Union[frozenset[str], None] = None

    def site(self, key: str) -> SiteBank:
        module = self._modules[key]
        assert isinstance(module, SiteBank)
        return module

    def sites(self) -> Iterator[tuple[str, SiteBank]]:
        for key, module in self._modules.items():
            assert isinstance(module, SiteBank)
            yield key, module

    def __contains__(self, key: object) -> bool:
        return key in self._modules

    @torch.no_grad()
    def set_active(self, slots: tuple[int, ...]) -> None:
        """Write ``active`` in place (a new buffer only when its size or the banks' device changed)."""
        device = next((bank.lora_A.device for _, bank in self.sites()), self.active.device)
        if (slots, id(self.active), self.active._version) != self._active:
            value = torch.tensor(slots, dtype=torch.long)
            if self.active.shape == value.shape and self.active.device == device:
                self.active.copy_(value, non_blocking=True)
            else:
                with torch.inference_mode(False):  # a normal tensor, also when made in inference mode
                    self.register_buffer("active", torch.tensor(slots, dtype=torch.long, device=device),
                                         persistent=False)
            note_write()
            self._active = (slots, id(self.active), self.active._version)

    def gather(self) -> None:
        """Gather every site's active factors (:meth:`SiteBank.gather`) if anything they are made of
        changed: the serving call's check, one pass over the sources' version counters.

        What is checked: the active adapters' parameters' version counters (a write through one),
        the optimizer steps taken (fused optimizers write parameters without bumping their
        counters) and graphlora's own writes to slots, gates and active slots (:func:`note_write`).
        Every ``train()`` / ``eval()`` of the emitted module and every sync force a gather too. A
        write through ``param.data``, or straight into a bank's buffers, is not seen: call
        ``gm.eval()`` after one.
        """
        stamp = (_STEPS[0], _WRITES[0], *map(_VERSION, self._sources))
        if stamp == self._gathered:
            return
        active = self.active
        for _, bank in self.sites():
            bank.gather(active)
        live = self._live
        for keys, name in self._stacks.items():
            if (live is None or name in live) and all(k in self for k in keys):
                self._fill(keys, name)
        self._gathered = stamp

    def set_live(self, names: frozenset[str]) -> None:
        """Refill only the stacks ``names`` from now on (what the current programs read: a stack of
        a deleted adapter's sites, or of a program re-spliced without it, costs nothing); one that
        becomes live again is refilled by the next :meth:`gather`. The buffers stay registered: a
        transaction's restore may bring back a program that reads one."""
        if self._live is not None and not names <= self._live:
            self._gathered = ()
        self._live = frozenset(names)

    def stack(self, keys: tuple[str, ...]) -> Union[str, None]:
        r"""The name of a buffer holding the sites' gathered ``a_hat`` stacked by rows
        (``[\hat A_1; ...; \hat A_n]``), made now and rewritten by every :meth:`gather`: one shrink GEMM
        serves sibling sites that read one input (:class:`graphlora.passes.fuse_shrink.FuseBankShrink`).
        ``None`` when a site is not banked, or the sites' factors differ in dtype, device or shape
        (every bank has the layout's rank and width, so siblings of one ``d_in`` agree)."""
        if len(keys) < 2 or not all(k in self for k in keys):
            return None
        hats = [self.site(k).a_hat for k in keys]
        if len({(h.dtype, h.device, h.shape) for h in hats}) != 1:
            return None
        name = self._stacks.setdefault(tuple(keys), f"{STACK_PREFIX}{len(self._stacks)}")
        self._fill(tuple(keys), name)
        return name

    @torch.no_grad()
    def _fill(self, keys: tuple[str, ...], name: str) -> None:
        """Write the stacked ``a_hat`` of ``keys`` into buffer ``name`` (a new buffer when the shape,
        dtype or device changed: width, rank or ``lora_dtype``, a move)."""
        hats = [self.site(k).a_hat for k in keys]
        rows, like = sum(h.shape[0] for h in hats), hats[0]
        held = self._buffers.get(name)
        if held is None or held.shape != (rows, like.shape[1]) or held.dtype != like.dtype or held.device != like.device:
            with torch.inference_mode(False):
                self.register_buffer(name, torch.empty(rows, like.shape[1], dtype=like.dtype, device=like.device),
                                     persistent=False)
            held = self._buffers[name]
        assert held is not None
        torch.cat(hats, out=held)

    def forget_gathered(self) -> None:
        """The next :meth:`gather` gathers (new buffers, new active set, a mode change)."""
        self._sources = [t for _, bank in self.sites() for t in bank.sources()]
        self._gathered = ()

    def forget_written(self) -> None:
        self._active = ()
        self.forget_gathered()
        for _, bank in self.sites():
            bank.forget_written()


# ---------------------------------------------------------------------------- placement
def _needed(layout: BankLayout, bankable: Mapping[str, Mapping[str, Any]]) -> tuple[int, int]:
    """The (capacity, rank) the bankable adapters need (``bankable``: adapter -> site -> (A, B, scaling)):
    the current or reserved room (:data:`DEFAULT_CAPACITY` when nothing was reserved), doubled when
    the adapters no longer fit."""
    count = len(bankable)
    rank = max((a.shape[0] for sites in bankable.values() for a, _, _ in sites.values()), default=0)
    capacity = max(layout.capacity, layout.reserved[0] or (DEFAULT_CAPACITY if count else 0))
    if count > capacity:
        capacity = max(count, 2 * capacity)
    return capacity, max(layout.rank, layout.reserved[1], rank)


def place(banks: BankSet, layout: BankLayout, bankable: Mapping[str, Mapping[str, Any]],
          keys: Mapping[str, str], warn: bool = True) -> bool:
    """Give every bankable adapter a slot, each banked site a bank, and bind the parameters.

    Args:
        banks: the bank set (modules are added, resized or removed in it).
        layout: the bookkeeping (updated).
        bankable: adapter -> site name -> ``(A param, B param, scaling)``.
        keys: site name -> site key.
        warn: warn when a bank grows (off when the user asked for the room).

    Returns:
        Whether the set of banked sites changed (the serving graphs must then be re-spliced).

    Raises:
        ConfigError: a bank is full and ``layout.grow`` is off.
    """
    for gone in [a for a in layout.slots if a not in bankable]:
        slot = layout.slots.pop(gone)
        for _, bank in banks.sites():
            bank.clear(slot)
    capacity, rank = _needed(layout, bankable)
    exists = any(True for _ in banks.sites())
    if exists and (capacity, rank) != (layout.capacity, layout.rank):
        if not layout.grow:
            raise ConfigError(
                f"the adapter banks are full: {layout.capacity} slots of rank <= {layout.rank}, and this needs "
                f"{len(bankable)} adapters of rank <= {rank}; call gm.configure_banks(max_loras={len(bankable)}, "
                f"max_lora_rank={rank}) first, or configure_banks(grow=True)."
            )
        if warn:
            warnings.warn(
                f"graphlora: the adapter banks grow from {layout.capacity} slots of rank {layout.rank} to "
                f"{capacity} of rank {rank}; a compiled graph recompiles once (reserve room with "
                "gm.configure_banks(max_loras=..., max_lora_rank=...) to avoid it).", stacklevel=4)
    layout.capacity, layout.rank = capacity, rank
    for adapter in bankable:
        if adapter not in layout.slots:
            free = layout.free_slot()
            assert free is not None  # capacity covers every bankable adapter
            layout.slots[adapter] = free
    wanted: dict[str, tuple[torch.Tensor, ...]] = {}
    for sites in bankable.values():
        for site, (a, b, _) in sites.items():
            wanted.setdefault(keys[site], (a, b))
    changed = set(wanted) != {k for k, _ in banks.sites()}
    for key in [k for k, _ in banks.sites() if k not in wanted]:
        del banks._modules[key]
    for key, (a, b) in wanted.items():
        if key not in banks:
            banks.add_module(key, SiteBank(capacity, rank, a.shape[1], b.shape[0], layout.width, a.dtype, a.device,
                                           layout.lora_dtype))
        elif (banks.site(key).capacity, banks.site(key).rank) != (capacity, rank):
            banks.add_module(key, banks.site(key).resized(capacity, rank, layout.width))
    bind(banks, layout, bankable, keys)
    # a cast of the module (``.to(torch.bfloat16)``) casts the gathered buffers too: a set lora_dtype keeps its dtype
    recast = [bank for _, bank in banks.sites() if bank.hat_dtype != layout.lora_dtype
              or (bank.hat_dtype is not None and bank.a_hat.dtype != bank.hat_dtype)]
    for bank in recast:
        bank.set_hat_dtype(layout.lora_dtype)
    if recast:
        banks.forget_gathered()
    return changed


@torch.no_grad()
def bind(banks: BankSet, layout: BankLayout, bankable: Mapping[str, Mapping[str, Any]],
         keys: Mapping[str, str]) -> None:
    """Make every bankable adapter's A and B views of its slot (copying them in when they are not)."""
    for adapter, sites in bankable.items():
        slot = layout.slots[adapter]
        for site, (a, b, scaling) in sites.items():
            bank = banks.site(keys[site])
            if bank.lora_A.dtype != a.dtype or bank.lora_A.device != a.device:
                # a move or cast gave the parameters new storage: follow them
                banks.add_module(keys[site], bank := _recast(bank, a))
            _bind_slot(bank, slot, a, b, scaling)


def _bind_slot(bank: SiteBank, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
    """Point ``a`` and ``b`` at ``slot``'s views (copying their values in first) and write its scale."""
    if not bank.holds(slot, a, b):
        va, vb = bank.slot_views(slot, a.shape[0])
        for param, view in ((a, va), (b, vb)):
            if param.data_ptr() != view.data_ptr() or param.stride() != view.stride():
                if param.data_ptr() == 0 and param.numel():
                    continue  # meta or storage-less: nothing to bind yet
                if a.shape[0] < bank.rank:
                    bank.lora_A[slot].zero_() if param is a else bank.lora_B[slot].zero_()
                view.copy_(param.detach())
                param.data = view
                note_write()  # after the write (see SiteBank.clear)
    bank.set_scale(slot, float(scaling))


@torch.no_grad()
def place_one(banks: BankSet, layout: BankLayout, adapter: str, sites: Mapping[str, Any],
              keys: Mapping[str, str]) -> bool:
    """:func:`place` for one new adapter where that needs no bank change: a free slot, rank within
    the banks', and every site it covers already banked in its dtype and device. Then only its own
    tensors are bound (an add is a tensor write whatever the number of adapters loaded). Returns
    False, changing nothing, where the whole :func:`place` must run."""
    free = layout.free_slot()
    if free is None or adapter in layout.slots:
        return False
    chosen = []
    for site, (a, b, scaling) in sites.items():
        key = keys[site]
        if key not in banks:
            return False
        bank = banks.site(key)
        if a.shape[0] > bank.rank or bank.lora_A.dtype != a.dtype or bank.lora_A.device != a.device:
            return False
        chosen.append((bank, a, b, scaling))
    layout.slots[adapter] = free
    for bank, a, b, scaling in chosen:
        _bind_slot(bank, free, a, b, scaling)
    return True


def clear_free(banks: BankSet, layout: BankLayout) -> None:
    """Zero every slot no adapter holds, the zero slot included (after a failed call wrote one, or
    ``to_empty`` left garbage: the banks are as before)."""
    used = set(layout.slots.values())
    for _, bank in banks.sites():
        for slot in range(bank.capacity + 1):
            if slot not in used:
                bank.clear(slot)


def _recast(bank: SiteBank, like: torch.Tensor) -> SiteBank:
    moved = SiteBank(bank.capacity, bank.rank, bank.d_in, bank.d_out, bank.gate.shape[0], like.dtype, like.device,
                     bank.hat_dtype)
    moved._scales = {}
    with torch.no_grad():
        moved.scale.copy_(bank.scale.to(like.device))
    return moved


def write_state(banks: BankSet, layout: BankLayout, active: Mapping[str, float],
                scalings: Mapping[str, Mapping[str, float]],
                params: Mapping[str, tuple[torch.Tensor, ...]]) -> None:
    """Write ``active`` (slots) and every site's ``gate`` for the effective weights ``active``
    (adapter -> weight, bankable adapters only; ``scalings``: adapter -> site key -> scaling), then
    gather the active factors (``params``: site key -> the active adapters' parameters there). The
    gather is eager, in place: a serving graph captured outside graphlora's routing (a manual
    ``torch.cuda.graph``) replays the new factors without a call through ``gm``."""
    names = [a for a, w in active.items() if w != 0.0 and a in layout.slots]
    if len(names) > layout.width:  # grows once per new maximum (configure_banks(max_active=) reserves it)
        layout.reserve_width(banks, len(names))
    zero = layout.capacity
    slots = tuple([layout.slots[a] for a in names] + [zero] * (layout.width - len(names)))
    banks.set_active(slots)
    for key, bank in banks.sites():
        gates = tuple([scalings[a].get(key, 0.0) * active[a] for a in names] + [0.0] * (layout.width - len(names)))
        bank.set_gates(gates)
        bank.watched = params.get(key, ())
    banks.forget_gathered()
    banks.gather()
