"""One transaction for every mutating call: snapshot what it may touch, restore it on any exception.

A call such as ``add_adapter``, ``load_adapter`` (new or hotswap), ``delete_adapter``,
``add_weighted_adapter``, ``merge_adapter`` or ``unmerge_adapter`` runs as::

    with transaction(gm, tensors=[...]):
        ...  # change state, store, programs, tensors

and if anything raises (``BaseException``: a ``KeyboardInterrupt`` too) the module is put back as
it was: the adapter state (configs, plans, active set and weights, enabled, trainable, the
``set_requires_grad`` choices, merge bookkeeping), the store's module tree (which branches exist, each module's attributes and
submodules: a hotswap's new dropout, alpha and scaling), every parameter's ``requires_grad``, the
values of ``tensors`` (what the call writes in place: a hotswap's adapter weights, base weights a
merge or unmerge rewrites), base weights merged for the first time by the call (from the original
the merge recorded, so a first merge costs no extra copy), and every program's graph. Switch buffers are then rewritten from the restored state.

What the snapshot costs: dict copies, one shallow ``__dict__`` copy per store module (none for the
branches of adapters the call names ``untouched``), and clones of ``tensors`` only. Transactions
nest: an inner one (``load_adapter`` calling ``add_adapter``) leaves the restoring to the
outermost, which snapshotted first.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Collection, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from graphlora.passes.sites import getattr_path

__all__ = ["transaction"]


def _modules(root: nn.Module, skip: Collection[int]) -> list[nn.Module]:
    """``root`` and every module under it once (``root.modules()``), not descending into modules
    whose ``id`` is in ``skip``: a walk over ``_modules`` without ``named_modules``' bookkeeping."""
    out, seen, stack = [], set(skip), [root]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        out.append(module)
        stack.extend(reversed([m for m in module._modules.values() if m is not None]))
    return out


def _module_tree(modules: Iterable[nn.Module]) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Each module with a copy of its ``__dict__`` (its three registries copied too)."""
    out = []
    for module in modules:
        saved = dict(module.__dict__)
        for registry in ("_parameters", "_buffers", "_modules"):
            saved[registry] = dict(saved[registry])
        out.append((module, saved))
    return out


def _restore_tree(tree: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    for module, saved in tree:
        module.__dict__.clear()
        module.__dict__.update(saved)


@contextlib.contextmanager
def transaction(gm: Any, *, tensors: Iterable[torch.Tensor] = (), untouched: Collection[str] = ()) -> Iterator[None]:
    """Run the body; on any exception restore ``gm`` (see the module docstring) and re-raise.

    Args:
        gm: the :class:`~graphlora.AdaptedGraphModule`.
        tensors: tensors the body writes in place (they are cloned first).
        untouched: adapters whose branch modules the body leaves as they are (``add_adapter``:
            every adapter loaded before it). Their modules are not snapshot, so the snapshot costs
            what the call changes, not what every loaded adapter holds; their switch buffers and
            ``requires_grad`` follow the restored state anyway (the restore ends with a full sync).
    """
    depth = gm._transaction_depth
    if depth:
        gm._transaction_depth = depth + 1
        try:
            yield
        finally:
            gm._transaction_depth = depth
        return
    state = gm.adapter_state
    saved_state = (dict(state.configs), dict(state.plans), dict(state.weights), state.enabled, state.trainable,
                   dict(state.requires_grad), copy.copy(state.merge), dict(state.merge.originals), dict(state.merge.merged), state.banks.copy())
    skip = {id(branch) for _, _, branch in state.store.branches_of(untouched)} if untouched else set()
    store = _modules(state.store, skip)
    tree = _module_tree(store)
    # the store's modules, then the rest of gm (the store is a child of gm: walked once)
    grads = [(p, p.requires_grad) for p in dict.fromkeys(
        p for m in (*store, *_modules(gm, skip | {id(state.store)})) for p in m._parameters.values() if p is not None)]
    backups = [(t, t.detach().clone()) for t in tensors]
    programs = gm.programs.snapshot()
    gm._transaction_depth = 1
    try:
        yield
    except BaseException:
        (state.configs, state.plans, state.weights, state.enabled, state.trainable, state.requires_grad, merge,
         originals, merged, state.banks) = saved_state
        merge.originals, merge.merged = originals, merged
        with torch.no_grad():
            for path, original in state.merge.originals.items():
                if path not in originals:  # merged for the first time by this call: the original is the backup
                    getattr_path(gm, path).copy_(original)
            for tensor, value in backups:
                tensor.copy_(value)
        state.merge = merge
        _restore_tree(tree)
        for param, flag in grads:
            param.requires_grad_(flag)
        gm.programs.restore(programs)
        state.restore_banks()  # parameters are views of their (restored) bank slots again; switch state
        raise
    finally:
        gm._transaction_depth = 0
