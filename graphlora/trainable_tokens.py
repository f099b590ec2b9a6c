"""PEFT's ``trainable_token_indices``: a LoRA adapter that also trains selected embedding rows.

For an embedding ``E`` with weight ``W`` [V, d] and an adapter ``a`` with token ids
``t_a = (t_1, ..., t_k)`` the adapter owns ``delta_a`` [k, d] (PEFT's ``trainable_tokens_delta``,
initialised to ``W[t_a]``), and the embedding reads

.. math::

    W_{\\text{used}} = W.\\text{index\\_copy}(0, t_a, \\Delta_a) \\text{ if } a \\text{ is the active adapter with rows on } E,
    \\quad W \\text{ otherwise}

(disabled, or no active adapter has rows there; at most one active adapter may, PEFT's rule). In
the flat graph the read of ``E.weight`` becomes ``rows_select(k_E, W, (t_1..), (delta_1..))``
(:mod:`graphlora.passes.param_switch`), ``k_E`` a 0-dim slot buffer written by :func:`sync_tokens`:
switching is a tensor write, never a re-trace. Gradients reach only the selected ``delta_a``.

Which embedding: a list of ids targets the model's input embedding (``get_input_embeddings()``,
else a module ending in ``embed_tokens``); ``{"name": [ids]}`` targets each module whose path ends
with ``name`` (PEFT's rule). Refused (:class:`ConfigError`): a target that is not ``nn.Embedding``
(PEFT also wraps ``nn.Linear``), a tied weight (PEFT's tied ``lm_head`` handling is not
reproduced), a target also in ``modules_to_save`` or adapted by a LoRA site, ids out of range.

Store layout (under the adapter store ``graphlora``)::

    graphlora.trainable_tokens.<module_key>.deltas.<adapter>   [k, d] (trainable)
    graphlora.trainable_tokens.<module_key>.rows.<adapter>     [k] long (not persistent)
    graphlora.trainable_tokens.<module_key>.index              [] long, 0 = the original

PEFT key: ``base_model.model.<embedding path>.token_adapter.trainable_tokens_delta`` [k, d].
``merge_and_unload`` writes the active rows into ``W`` (PEFT merges them too); ``unmerge_adapter``
restores ``W`` exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union, cast

import torch
from torch import nn

from graphlora.passes.param_switch import SwitchedParam
from graphlora.passes.sites import getattr_path

from .errors import ConfigError
from .peft_format import KEY_PREFIX

__all__ = ["TOKENS", "DELTA_KEY", "TokenRows", "plan_tokens", "install_tokens", "drop_tokens", "sync_tokens",
           "token_tensors", "token_shapes", "token_switches", "token_recipe", "check_active_tokens", "fold_tokens"]

#: the container's name on the adapter store (``graphlora.trainable_tokens``)
TOKENS = "trainable_tokens"
#: PEFT's key suffix for the delta rows
DELTA_KEY = "token_adapter.trainable_tokens_delta"

Tokens = tuple[tuple[str, tuple[int, ...]], ...]


class TokenRows(nn.Module):
    """One embedding's trainable rows: ``deltas[adapter]`` [k, d], buffers ``rows.<adapter>`` [k]
    and the slot ``index`` (0: the original weight, ``i``: the ``i``-th adapter in ``deltas`` order)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.deltas = nn.ParameterDict()
        self.rows = nn.Module()
        self.register_buffer("index", torch.zeros((), dtype=torch.long), persistent=False)


def _container(store: nn.Module) -> Union[nn.ModuleDict, None]:
    return cast(Union[nn.ModuleDict, None], store._modules.get(TOKENS))


def _holders(store: nn.Module) -> list[TokenRows]:
    tokens = _container(store)
    return [cast(TokenRows, m) for m in tokens.values()] if tokens is not None else []


def _inside(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def _input_embedding(source: nn.Module) -> str:
    names = {m: n for n, m in source.named_modules()}
    getter = getattr(source, "get_input_embeddings", None)
    if callable(getter):
        try:
            found = getter()
        except (NotImplementedError, AttributeError):
            found = None
        if found is not None and found in names:
            return names[found]
    fallback = [n for n in names.values() if n.endswith("embed_tokens")]
    if not fallback:
        raise ConfigError(
            "trainable_token_indices: this model has no input embedding (get_input_embeddings()) and no module "
            "ending in 'embed_tokens'; name the embedding: trainable_token_indices={'<module>': [ids]}."
        )
    return fallback[0]


def plan_tokens(config: Any, facts: Any, plan: Mapping[str, Any], state: Any, saved: Sequence[str],
                graph: Any = None) -> Tokens:
    """``((embedding path, token ids), ...)`` for ``config`` on this model (nothing is changed).

    Args:
        saved: the modules this adapter saves whole (``modules_to_save``).
        graph: the traced graph, to check it reads the embedding's weight (a ``get_attr``).

    Raises:
        ConfigError: a key naming no module; a target that is not ``nn.Embedding``, is tied, saved
            whole or adapted; an id out of range.
    """
    value = getattr(config, "trainable_token_indices", None)
    if not value:
        return ()
    source: nn.Module = facts.source
    if isinstance(value, Mapping):
        names = [n for n, _ in source.named_modules() if n]
        targets: dict[str, tuple[int, ...]] = {}
        for key, ids in value.items():
            found = [n for n in names if n.endswith(key)]
            if not found:
                raise ConfigError(
                    f"trainable_token_indices: {key!r} names no module of this model (PEFT's rule: a module path "
                    f"ending with the key); embeddings: {[n for n, m in source.named_modules() if isinstance(m, nn.Embedding)]}."
                )
            targets.update({n: tuple(ids) for n in found})
    else:
        targets = {_input_embedding(source): tuple(value)}
    reads = {n.target for n in graph.nodes if n.op == "get_attr"} if graph is not None else None
    taken = {h.path for h in _holders(state.store)}
    for path, ids in targets.items():
        module = source.get_submodule(path)
        if not isinstance(module, nn.Embedding):
            raise ConfigError(
                f"trainable_token_indices: {path!r} is a {type(module).__name__}; graphlora trains rows of "
                "nn.Embedding modules only (PEFT's nn.Linear form, e.g. lm_head, is not supported). Name the "
                "input embedding instead."
            )
        weight = f"{path}.weight"
        tied = [t for t in facts.aliases.get(weight, ()) if t != weight]
        if tied:
            raise ConfigError(
                f"trainable_token_indices: {weight!r} is tied to {tied}; graphlora does not reproduce PEFT's "
                "tied-embedding handling (the lm_head sharing the trained rows). Untie the weights "
                "(tie_word_embeddings=False) or train the rows in PEFT."
            )
        high = [i for i in ids if i >= module.num_embeddings]
        if high:
            raise ConfigError(
                f"trainable_token_indices: token id {high[0]} is out of range for {path!r} "
                f"({module.num_embeddings} rows)."
            )
        if any(_inside(path, m) or _inside(m, path) for m in saved):
            raise ConfigError(
                f"trainable_token_indices: {path!r} is also in modules_to_save; train the embedding whole "
                "(modules_to_save) or some rows (trainable_token_indices), not both (PEFT's rule)."
            )
        sites = [s for s in plan if _inside(s, path)] + [s for p in state.plans.values() for s in p if _inside(s, path)]
        if sites:
            raise ConfigError(
                f"trainable_token_indices: {path!r} is also an adapted site ({sites[0]!r}); graphlora does not "
                "combine a LoRA embedding branch with trainable rows. Leave it out of target_modules."
            )
        if reads is not None and weight not in reads and path not in taken:
            raise ConfigError(
                f"trainable_token_indices: the traced graph does not read {weight!r} as a parameter (a call_module "
                "graph?), so its rows cannot be switched; use the export frontend (transformers models)."
            )
    return tuple(targets.items())


def install_tokens(state: Any, name: str, tokens: Tokens, source: nn.Module) -> None:
    """Make ``name``'s delta rows, each initialised to ``W[ids]`` (inside the caller's transaction)."""
    if not tokens:
        return
    store = state.store
    container = _container(store)
    if container is None:
        container = nn.ModuleDict()
        store.add_module(TOKENS, container)
    for path, ids in tokens:
        key = path.replace(".", "_")
        if key not in container:
            container[key] = TokenRows(path)
        holder = cast(TokenRows, container[key])
        weight = source.get_submodule(path).weight
        rows = torch.tensor(ids, dtype=torch.long, device=weight.device)
        holder.deltas[name] = nn.Parameter(weight.detach()[rows].clone())
        holder.rows.register_buffer(name, rows, persistent=False)


def drop_tokens(store: nn.Module, name: str) -> None:
    """Forget ``name``'s rows."""
    container = _container(store)
    if container is None:
        return
    for key, holder in list(container.items()):
        holder = cast(TokenRows, holder)
        if name in holder.deltas:
            del holder.deltas[name]
            del holder.rows._buffers[name]
        if len(holder.deltas) == 0:
            del container[key]
    if len(container) == 0:
        del store._modules[TOKENS]


def _chosen(holder: TokenRows, adapters: Any) -> Union[str, None]:
    return next((a for a in adapters if a in holder.deltas), None)


def sync_tokens(state: Any) -> None:
    """Write each embedding's slot (the active adapter's rows, or the original weight) and the
    deltas' ``requires_grad`` from the state."""
    live = state.weights if state.enabled else {}
    for holder in _holders(state.store):
        chosen = _chosen(holder, live)
        holder.index.fill_(list(holder.deltas).index(chosen) + 1 if chosen is not None else 0)
        training = _chosen(holder, state.weights)
        for adapter, param in holder.deltas.items():
            flag = state.trains(adapter, chosen=adapter == training)
            if param.requires_grad != flag:
                param.requires_grad_(flag)


def token_tensors(store: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """``name``'s delta rows under PEFT's file keys (detached, sharing storage)."""
    return {f"{KEY_PREFIX}{h.path}.{DELTA_KEY}": h.deltas[name].detach()
            for h in _holders(store) if name in h.deltas}


def token_shapes(tokens: Tokens, source: nn.Module) -> dict[str, tuple[int, ...]]:
    """The file keys and shapes :func:`token_tensors` will have for ``tokens``."""
    return {f"{KEY_PREFIX}{path}.{DELTA_KEY}": (len(ids), source.get_submodule(path).weight.shape[1])
            for path, ids in tokens}


def token_switches(store: nn.Module, prefix: str) -> list[SwitchedParam]:
    """One :class:`SwitchedParam` (with ``rows``) per embedding; ``prefix``: the store's attribute."""
    container = _container(store)
    out = []
    for key, holder in (container.items() if container is not None else ()):
        holder = cast(TokenRows, holder)
        adapters = tuple(holder.deltas)
        base = f"{prefix}.{TOKENS}.{key}"
        out.append(SwitchedParam(holder.path, f"{holder.path}.weight", tuple(f"{base}.deltas.{a}" for a in adapters),
                                 f"{base}.index", adapters, tuple(f"{base}.rows.{a}" for a in adapters)))
    return out


def token_recipe(store: nn.Module) -> tuple:
    """What the switch of a program depends on: each embedding and its adapters."""
    return tuple((h.path, tuple(h.deltas)) for h in _holders(store))


def check_active_tokens(store: nn.Module, names: Sequence[str]) -> None:
    """Refuse activating two adapters with rows on the same embedding (PEFT's rule).

    Raises:
        ConfigError: naming the embedding and both adapters.
    """
    for holder in _holders(store):
        both = [n for n in names if n in holder.deltas]
        if len(both) > 1:
            raise ConfigError(
                f"adapters {both} each train rows of {holder.path!r} (trainable_token_indices); only one of them "
                "can be active at a time. Activate one of them."
            )


def fold_tokens(gm: Any) -> None:
    """``merge_and_unload``: write the active adapter's rows into each embedding weight (PEFT's
    merge: ``W.index_copy(0, ids, delta)``); the original is recorded in the merge bookkeeping, so
    ``unmerge_adapter`` restores it exactly."""
    state = gm.adapter_state
    live = state.weights if state.enabled else {}
    writes = []
    for holder in _holders(state.store):
        chosen = _chosen(holder, live)
        if chosen is not None:
            writes.append((f"{holder.path}.weight", getattr(holder.rows, chosen), holder.deltas[chosen]))
    if not writes:
        return
    originals = state.merge.originals
    with gm._transaction([getattr_path(gm, p) for p, _, _ in writes if p in originals]):
        with torch.no_grad():
            for path, rows, delta in writes:
                target = getattr_path(gm, path)
                if path not in originals:
                    originals[path] = target.detach().clone()
                target.index_copy_(0, rows, delta.to(target.dtype))
