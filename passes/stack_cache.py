"""Reuse a value built from a fixed set of tensors until one of those tensors changes.

One job: :func:`~graphlora.passes.ops.lora_mixed` (mixed-adapter batches) stacks every adapter's
``A``, ``B`` and scale at each site on every call, about 13 small kernel launches per site, which
is what an eager GPU forward spends its time on. Those stacks only change when a weight does, so
:data:`STACKS` keeps them between eager calls (under ``torch.compile`` ``lora_mixed`` does not
come here: Inductor fuses the stacking, and Python state would not trace).

**Never stale.** An entry is reused only when the call passes the *same tensor objects* (checked
through weak references, so a recycled ``id`` cannot match) and each tensor's state is unchanged:
``(t._version, t.data_ptr(), t.shape, t.dtype, t.device)``, plus a ``context`` value of the
caller's (``lora_mixed`` passes the activation dtype, which its scale vector is cast to).

- ``_version`` is bumped by every in-place write through the tensor or one of its views:
  optimizer steps, ``copy_`` (``load_state_dict``, ``load_adapter``, hotswap), ``fill_``
  (merge/unmerge writing the scale), ``torch.nn.init``.
- ``.to()`` / ``.cuda()`` / ``param.data = ...`` give the same Python object new storage (new
  ``data_ptr``; PyTorch keeps the object's version counter across ``.data =``, so reused
  addresses do not reset it).
- Not seen: writes through ``param.data`` (``p.data.copy_(w)``), which bypass the version
  counter by design in PyTorch. graphlora never writes that way; code that does should
  write under ``torch.no_grad()`` instead, call :meth:`StackCache.clear`, or set
  ``STACKS.enabled = False``.

**Not cached** (the value is built fresh and nothing is stored): while grad mode is on and a
tensor requires grad (the result must carry a fresh autograd graph); inference tensors (made under
``torch.inference_mode``: they have no version counter); tensor subclasses (``FakeTensor``,
functional tensors: a trace in progress); CUDA stream capture (a CUDA graph must replay the
stacking from the weights' memory, or it would keep reading the first cached copy).
Cached values are built under ``no_grad`` and outside inference mode, so they are plain tensors
usable in any mode.

**Memory.** At most one entry per *anchor*, the first non-``None`` tensor of a call. In graphlora
that is the first adapter's ``A`` at a site, which belongs to that site alone, so a site keeps one
entry however often its adapter list changes: adding an adapter, or deleting one and adding it
back, replaces the entry on the next call. When the anchor or any other tensor of an entry is
garbage-collected (``delete_adapter``, a dropped model) the entry goes at once (weak-reference
callbacks). ``max_entries`` bounds the total as a backstop (oldest built goes first). The cost is
one stacked copy of each site's adapter weights (ranks padded to the largest, plus a zero slot).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["StackCache", "STACKS"]

T = TypeVar("T")

#: Tensor types whose version counter and storage describe their contents; subclasses bypass.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


class _Entry:
    __slots__ = ("refs", "stamp", "value", "serial")

    def __init__(self, refs: tuple, stamp: tuple, value: Any, serial: int) -> None:
        self.refs, self.stamp, self.value, self.serial = refs, stamp, value, serial

    def holds(self, tensors: Sequence[Tensor | None]) -> bool:
        """Whether ``tensors`` are the very objects this entry was built from (same positions)."""
        return all(r is None if t is None else r() is t for r, t in zip(self.refs, tensors))


def _forget(entries: dict, key: int, serial: int) -> Callable[[weakref.ref], None]:
    """Weak-reference callback: drop entry ``serial`` under ``key`` once one of its tensors dies.

    It holds the dict, not the entry, so a replaced entry is freed at once (no reference cycle).
    It takes no lock: it may run inside the cache's own locked section (garbage collection).
    """
    def callback(_: weakref.ref) -> None:
        entry = entries.get(key)
        if entry is not None and entry.serial == serial:
            entries.pop(key, None)
    return callback


class StackCache:
    """Values built from a fixed sequence of tensors, reused until one of the tensors changes.

    Args:
        max_entries: most entries kept; past it the oldest built is dropped.

    Attributes:
        enabled: ``False`` builds every value afresh (benchmarks compare both).
        hits / builds / bypasses: how many calls reused an entry, built and stored one, or
            built without storing (not cacheable, see the module docstring).
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self.enabled = True
        self.hits = self.builds = self.bypasses = 0
        self._entries: dict[int, _Entry] = {}
        self._serials = itertools.count()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry (the next call of each site builds again)."""
        self._entries.clear()

    def get(self, tensors: Sequence[Tensor | None], build: Callable[[], T], context: Hashable = None) -> T:
        """``build()``, or the value it gave last time for these same, unchanged ``tensors``.

        Args:
            tensors: everything ``build`` reads (``None`` entries allowed; their positions count).
            build: makes the value from ``tensors``; it must not depend on anything else but
                ``context``.
            context: any other hashable input the value depends on (an entry built under another
                ``context`` is rebuilt).
        """
        anchor = next((t for t in tensors if t is not None), None)
        stamp = self._stamp(tensors, context) if self.enabled and anchor is not None else None
        if stamp is None or (anchor.is_cuda and torch.cuda.is_current_stream_capturing()):
            self.bypasses += 1
            return build()
        key = id(anchor)
        entry = self._entries.get(key)
        if entry is not None and entry.stamp == stamp and entry.holds(tensors):
            self.hits += 1
            return entry.value
        with torch.no_grad(), torch.inference_mode(False):
            value = build()
        self._store(key, tensors, stamp, value)
        return value

    @staticmethod
    def _stamp(tensors: Sequence[Tensor | None], context: Hashable) -> tuple | None:
        """Everything an entry must match besides object identity; ``None``: do not cache."""
        grad = torch.is_grad_enabled()
        parts: list = [context]
        for t in tensors:
            if t is None:
                parts.append(None)
                continue
            if type(t) not in _PLAIN or (grad and t.requires_grad):
                return None
            try:
                version = t._version
            except RuntimeError:  # an inference tensor: no version counter, changes go unseen
                return None
            parts.append((version, t.data_ptr(), t.shape, t.dtype, t.device))
        return tuple(parts)

    def _store(self, key: int, tensors: Sequence[Tensor | None], stamp: tuple, value: Any) -> None:
        with self._lock:
            serial = next(self._serials)
            forget = _forget(self._entries, key, serial)
            refs = tuple(None if t is None else weakref.ref(t, forget) for t in tensors)
            self._entries.pop(key, None)  # re-inserted last: the bound drops the oldest built
            while len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)), None)
            self._entries[key] = _Entry(refs, stamp, value, serial)
            self.builds += 1


#: The cache :func:`~graphlora.passes.ops.lora_mixed` uses (process-wide).
STACKS = StackCache()
