"""An adapter pool: many registered LoRA adapters served through a few bank slots (S-LoRA, LoRAX).

:class:`AdapterPool` keeps every *registered* adapter as its config plus CPU tensors (pinned when
CUDA is available) and only the *resident* ones in the emitted module, in its adapter banks
(:mod:`graphlora.banks`). A request (a mixed batch's ``adapter_names``, a ``set_adapter``) first
makes the adapters it needs resident::

    for each needed adapter a (in request order):
        a resident      -> a hit: a becomes the most recently used
        a not resident  -> a miss; the victim v: the least recently used resident this request
                           does not need (none while fewer than ``slots`` are resident)
            v has a's config (same sites, ranks, alphas)
                        -> a takes v's place: its tensors are copied into v's bank slot (which
                           v's parameters are views of; pinned CPU -> slot, non_blocking; a swap)
            otherwise   -> load a under a free module name (gm.load_adapter_tensors: a free bank
                           slot), then delete v (an eviction)

Resident adapters are in the module under the pool's own names (``pool_slot_<k>``, or their own
name for the adapters the module had when the pool was built; :attr:`AdapterPool.placement` maps
them), since a swap keeps the module's adapter and replaces its tensors. A swap is a few tensor
copies; a load and a delete are structural changes of the adapter state (their cost grows with
the number of resident adapters and sites), so pools of adapters with one config are the fast case.

**Why offloaded adapters are not in the module at all.** The training form of the graph (the
``SWITCH`` program, used in training mode or with grad enabled) has one branch per *loaded*
adapter, so loading 256 adapters would make every training call read 256 adapters' parameters.
The serving forms (``BANK``, ``MIXED``) read the banks only, whose shapes are fixed by
``configure_banks``: adding into a free slot and deleting write tensors, never re-splice a serving
program, and never recompile it under ``torch.compile(fullgraph=True)``. The pool reserves
``slots + 1`` bank slots with ``grow=False`` (the spare slot lets a miss load before it evicts, so an
eviction never deletes the module's only adapter) and the largest rank registered.

**Serving only.** Every pool call runs under ``torch.no_grad()``; a call while the module is in
training mode is refused (:class:`~graphlora.errors.AdapterStateError`): a resident adapter is a
copy, and training it would be lost at its eviction.

Limits: plain LoRA on linear sites only (no DoRA, ``lora_bias``, ``modules_to_save``, ``bias``, or
embedding targets: those are never banked, so they would re-splice); the pool owns the module's
adapters (adding or deleting adapters on the module directly bypasses its bookkeeping); the
zero-recompile property holds while residents adapt the same set of sites (a site whose last
adapter is evicted loses its bank, so serving programs re-splice once); a rank above the banks'
rank grows them at ``register`` (one recompile; ``max_rank=`` reserves it).
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from graphlora.passes.splice import site_key

from . import peft_io
from .banks import note_write
from .config import LoraConfig
from .errors import AdapterExistsError, AdapterFileError, AdapterNotFoundError, AdapterStateError, ConfigError
from .peft_format import KEY_PREFIX

__all__ = ["AdapterPool"]

PathLike = Union[str, os.PathLike]
#: the mixed-batch row name of the base model (no adapter; needs no slot)
BASE = "__base__"


@dataclass(frozen=True)
class _Entry:
    """A registered adapter: its config, its PEFT-keyed CPU tensors and where they came from."""

    config: LoraConfig
    tensors: Mapping[str, torch.Tensor]
    source: str
    rank: int


def _offload(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of ``tensors`` of their own, pinned when CUDA is available (so the copy
    into a slot is an asynchronous DMA)."""
    pin = torch.cuda.is_available()
    out = {}
    for key, tensor in tensors.items():
        cpu = tensor.detach().to("cpu", copy=True).contiguous()
        out[key] = cpu.pin_memory() if pin else cpu
    return out


@torch.no_grad()
def _write_slot(gm: Any, inner: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (PEFT keys) into the bank slot of the module's adapter ``inner``, through the
    banks' own slot views (the adapter's parameters are views of that slot too), and tell the serving
    path that the slot changed (:func:`graphlora.banks.note_write`; its next call re-gathers)."""
    state = gm.adapter_state
    banks, slot = state.store.banks, state.banks.slots[inner]
    try:
        for site in state.plans[inner]:
            a, b = (tensors[f"{KEY_PREFIX}{site}.{name}.weight"] for name in ("lora_A", "lora_B"))
            view_a, view_b = banks.site(site_key(site)).slot_views(slot, a.shape[0])
            view_a.copy_(a, non_blocking=True)
            view_b.copy_(b, non_blocking=True)
    finally:
        note_write()  # after the writes, also a partial one (see graphlora.banks.SiteBank.clear)


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer.")
    return value


class AdapterPool:
    """Serve many registered LoRA adapters through ``slots`` resident ones (see the module docstring).

    Args:
        gm: the emitted module (:func:`graphlora.inject`); its adapters become the first registered
            and resident ones (their current tensors are copied to CPU).
        slots: how many adapters are resident at once.
        max_rank: the banks' rank to reserve (default: the largest rank registered so far, growing).

    Attributes:
        hits / misses: counts of needed adapters found resident / not resident; of the misses,
            ``swaps`` replaced a resident's tensors in place and ``evictions`` deleted one.

    Raises:
        ConfigError: ``slots`` or ``max_rank`` not a positive integer, more adapters in ``gm`` than
            ``slots``, or an adapter in ``gm`` that the pool cannot serve.
        AdapterStateError: adapters are merged into the base weights.
    """

    def __init__(self, gm: Any, slots: int = 16, max_rank: Union[int, None] = None) -> None:
        _positive("slots", slots)
        if max_rank is not None:
            _positive("max_rank", max_rank)
        if gm.merged:
            raise AdapterStateError(f"adapters {gm.merged_adapters} are merged into the base weights; "
                                    "call gm.unmerge_adapter() before building an AdapterPool.")
        loaded = list(gm.adapters)
        if len(loaded) > slots:
            raise ConfigError(f"the module holds {len(loaded)} adapters but AdapterPool(slots={slots}); "
                              f"use slots >= {len(loaded)} or delete adapters first.")
        self._gm = gm
        self._slots = slots
        self._entries: dict[str, _Entry] = {}
        #: resident adapter -> its name in the module, least recently used first
        self._lru: OrderedDict[str, str] = OrderedDict()
        self._active: Union[str, None] = gm.active_adapter
        self._run: Any = gm
        self.hits = self.misses = self.swaps = self.evictions = 0
        entries = {}
        for name in loaded:
            config = gm.adapters[name]
            tensors = _offload(gm.get_adapter_state_dict(name))
            entries[name] = self._entry(name, config, tensors, f"adapter {name!r} of the module")
        rank = max([max_rank or 0, *(e.rank for e in entries.values())])
        gm.configure_banks(max_loras=slots + 1, max_lora_rank=rank or None, grow=False)
        self._entries.update(entries)
        self._lru.update((name, name) for name in loaded)
        spare = (f"pool_slot_{k}" for k in range(slots + 1 + len(loaded)))
        self._names = [n for n in spare if n not in loaded][:slots + 1]  # module names for loaded adapters

    # ------------------------------------------------------------------ reading
    @property
    def module(self) -> Any:
        """The emitted module the pool serves from."""
        return self._gm

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def registered(self) -> list[str]:
        """Every registered adapter, in registration order."""
        return list(self._entries)

    @property
    def resident(self) -> list[str]:
        """The resident adapters, least recently used first (the next eviction's candidate first)."""
        return list(self._lru)

    @property
    def placement(self) -> dict[str, str]:
        """Resident adapter -> its adapter name in the module (least recently used first)."""
        return dict(self._lru)

    @property
    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "swaps": self.swaps, "evictions": self.evictions,
                "registered": len(self._entries), "resident": len(self._lru), "slots": self._slots}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ registering
    def register(self, name: str, adapter: Union[PathLike, tuple[LoraConfig, Mapping[str, torch.Tensor]]]) -> None:
        """Register ``name`` without making it resident.

        Args:
            adapter: a PEFT adapter directory (as :meth:`AdaptedGraphModule.load_adapter` reads it:
                ``path/<name>/`` when that holds an adapter, else ``path``), or ``(config, tensors)``
                with the tensors under PEFT's keys (``base_model.model.<site>.lora_A.weight``, ...),
                which are copied.

        Raises:
            AdapterExistsError: ``name`` is registered. AdapterFileError: unreadable files, or
            tensors that do not fit the model (the message names the key). ConfigError: a bad name,
            or an adapter the pool cannot serve.
        On any error the pool and the module are unchanged.
        """
        if name in self._entries:
            raise AdapterExistsError(f"adapter {name!r} is registered already; unregister({name!r}) first.")
        if isinstance(adapter, (str, os.PathLike)):
            source = peft_io.resolve_dir(adapter, name)
            config, tensors = peft_io.read_adapter_dir(source)
        elif isinstance(adapter, tuple) and len(adapter) == 2:
            config, tensors = adapter
            source = f"<tensors of {name!r}>"
        else:
            raise ConfigError(f"register({name!r}, ...) takes a PEFT adapter directory or a (config, tensors) "
                              f"pair, got {type(adapter).__name__}.")
        entry = self._entry(name, config, _offload(tensors), source)
        bank_rank = self._gm.adapter_state.banks.rank
        if entry.rank > bank_rank:
            if bank_rank:
                warnings.warn(f"graphlora: adapter {name!r} has rank {entry.rank} > the banks' {bank_rank}: the banks "
                              "grow now and a compiled graph recompiles once (reserve it with "
                              "AdapterPool(..., max_rank=)).", stacklevel=2)
            self._gm.configure_banks(max_lora_rank=entry.rank)
        self._entries[name] = entry

    def _entry(self, name: str, config: Any, tensors: dict[str, torch.Tensor], source: str) -> _Entry:
        """Check that ``config`` / ``tensors`` load into the module and land in its banks."""
        if not isinstance(config, LoraConfig) or config.use_dora or config.lora_bias:
            kind = type(config).__name__ + (" (DoRA)" if getattr(config, "use_dora", False) else "") + (
                " (lora_bias)" if getattr(config, "lora_bias", False) else "")
            raise ConfigError(f"{source}: an AdapterPool serves plain LoRA adapters only, got a {kind}; "
                              "load it with gm.load_adapter instead.")
        if name == BASE:
            raise ConfigError(f"{BASE!r} is the base model's row name; register the adapter under another name.")
        gm = self._gm
        config, plan, extras, tensors = gm._check_load(source, name, config, tensors)
        if extras.modules or extras.biases or extras.tokens:
            raise ConfigError(f"{source}: an AdapterPool cannot serve modules_to_save, trainable_token_indices or "
                              f"bias={config.bias!r} (they are not in the adapter banks); load it with "
                              "gm.load_adapter instead.")
        kinds = {s.name: s.kind for s in gm.sites}
        embedded = [site for site in plan if kinds.get(site) == "embedding"]
        if embedded:
            raise ConfigError(f"{source}: adapts the embedding {embedded[0]!r}, which adapter banks do not hold; "
                              "an AdapterPool serves LoRA on linear layers only.")
        ranks = [t.shape[0] for key, t in tensors.items() if key.endswith("lora_A.weight")]
        if not ranks:
            raise AdapterFileError(f"{source}: no lora_A tensor.")
        return _Entry(config, tensors, source, max(ranks))

    def unregister(self, name: str) -> None:
        """Forget ``name`` (deleting it from the module if resident).

        Raises:
            AdapterNotFoundError: not registered. AdapterStateError: it is the module's only adapter.
        """
        self._check_registered([name])
        if name in self._lru:
            self._gm.delete_adapter(self._lru[name])
            del self._lru[name]
        del self._entries[name]
        if self._active == name:
            self._active = None

    # ------------------------------------------------------------------ residency
    def ensure(self, names: Iterable[str]) -> list[str]:
        """Make ``names`` resident (``"__base__"`` needs nothing), in LRU order; returns the adapters
        that were loaded.

        Raises:
            AdapterNotFoundError: an unregistered name. ConfigError: more distinct adapters than
            ``slots``. AdapterStateError: the module is in training mode.
        """
        wanted = list(dict.fromkeys(n for n in names if n != BASE))
        self._check_serving()
        self._check_registered(wanted)
        if len(wanted) > self._slots:
            raise ConfigError(
                f"this request needs {len(wanted)} distinct adapters but the pool holds slots={self._slots}; "
                f"build AdapterPool(gm, slots={len(wanted)}) or more, or split the request.")
        gm = self._gm
        for name in [n for n, inner in self._lru.items() if inner not in gm.adapters]:
            del self._lru[name]  # deleted on the module behind the pool's back
        needed = set(wanted)
        loaded = []
        for name in wanted:
            if name in self._lru:
                self.hits += 1
                self._lru.move_to_end(name)
                continue
            entry = self._entries[name]
            victim = next((n for n in self._lru if n not in needed), None) if len(self._lru) >= self._slots else None
            if victim is not None and self._entries[victim].config == entry.config:
                inner = self._lru.pop(victim)
                _write_slot(gm, inner, entry.tensors)  # a tensor write: its parameters are views of the slot
                self.swaps += 1
            else:
                inner = next(n for n in self._names if n not in gm.adapters)
                gm.load_adapter_tensors(entry.config, entry.tensors, inner, activate=False, source=entry.source)
                if victim is not None:
                    gm.delete_adapter(self._lru.pop(victim))
                    self.evictions += 1
            self._lru[name] = inner
            self.misses += 1
            loaded.append(name)
        return loaded

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the adapter of calls without ``adapter_names`` (resident from now on)."""
        self.ensure([name])
        self._active = name
        self._gm.set_adapter(self._lru[name], inference_mode=True)  # serving: residents stay frozen

    def compile(self, **options: Any) -> Any:
        """Run the pool's calls through ``torch.compile(gm, **options)`` (returned); swaps never
        recompile it while the residents adapt the same sites (see the module docstring)."""
        self._run = torch.compile(self._gm, **options)
        return self._run

    # ------------------------------------------------------------------ calling
    def __call__(self, *args: Any, adapter_names: Union[Sequence[str], None] = None, **kwargs: Any) -> Any:
        """Call the module under ``no_grad``: with ``adapter_names`` (one registered name or
        ``"__base__"`` per row) a mixed batch, else the adapter of :meth:`set_adapter`."""
        rows = self._prepare(adapter_names)
        with torch.no_grad():
            if rows is None:
                return self._run(*args, **kwargs)
            return self._run(*args, adapter_names=rows, **kwargs)

    def generate(self, *args: Any, adapter_names: Union[Sequence[str], None] = None, **kwargs: Any) -> Any:
        """``gm.generate`` with each row's registered adapter (or the adapter of :meth:`set_adapter`)."""
        rows = self._prepare(adapter_names)
        with torch.no_grad():
            if rows is None:
                return self._gm.generate(*args, **kwargs)
            return self._gm.generate(*args, adapter_names=rows, **kwargs)

    def _prepare(self, adapter_names: Union[Sequence[str], None]) -> Union[list[str], None]:
        """Make the request's adapters resident; returns the rows' adapter names in the module."""
        if adapter_names is not None:
            if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
                raise ConfigError(f"adapter_names must be a list with one adapter name per row, got {adapter_names!r}.")
            self.ensure(adapter_names)
            return [n if n == BASE else self._lru[n] for n in adapter_names]
        if self._active is None:
            raise AdapterStateError("no adapter chosen: call pool.set_adapter(name) or pass adapter_names=[...].")
        self.ensure([self._active])
        inner = self._lru[self._active]
        if self._gm.active_adapters != [inner]:
            self._gm.set_adapter(inner, inference_mode=True)  # a load, swap or eviction changed it
        return None

    # ------------------------------------------------------------------ checks
    def _check_serving(self) -> None:
        if self._gm.training:
            raise AdapterStateError(
                "an AdapterPool serves in eval mode only (resident adapters are copies; training them would be "
                "lost at eviction): call gm.eval(), or train with gm.load_adapter(..., is_trainable=True).")

    def _check_registered(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self._entries]
        if unknown:
            shown = list(self._entries)[:8]
            raise AdapterNotFoundError(
                f"adapter {unknown[0]!r} is not registered in the pool ({len(self._entries)} registered: "
                f"{shown}{' ...' if len(self._entries) > 8 else ''}); call pool.register({unknown[0]!r}, path) first.")
