"""PEFT's ``modules_to_save`` and ``bias``: what an adapter trains besides its site branches.

**modules_to_save.** Each listed module ``M`` (PEFT's matching: a module path that *ends with* an
entry, no ``"."`` boundary) gets, per adapter, a trainable copy ``M_a`` (a deep copy made when the
adapter is added, as PEFT's ``ModulesToSaveWrapper`` does). The forward uses

.. math::

    M_{\\text{used}} = M_a \\text{ if } a \\text{ is the active adapter with a copy of } M, \\quad M \\text{ otherwise}

(disabled, or no active adapter has a copy). In the flat graph every parameter ``p`` of ``M`` is
read through ``param_select(k_M, p, (p_{a_1}, ...))`` (:mod:`graphlora.passes.param_switch`),
where ``k_M`` is a 0-dim slot buffer written by :func:`sync_extras`: switching is a tensor write.
At most one active adapter may have a copy of a given module (PEFT's rule). ``task_type``
``SEQ_CLS`` / ``TOKEN_CLS`` add ``classifier`` and ``score``, ``QUESTION_ANS`` adds ``qa_outputs``
(what PEFT's task-specific ``PeftModel`` classes add; an automatic name that matches no module is
skipped, a user's entry that matches none is an error). Merging leaves copies alone (PEFT's
``merge_adapter``); ``merge_and_unload`` writes the active copy into the original module
(:func:`fold_active_copies`; ``unmerge_adapter`` restores it exactly).

Store layout (under the adapter store ``graphlora``)::

    graphlora.modules_to_save.<module_key>.copies.<adapter>.<param>   the copy (trainable)
    graphlora.modules_to_save.<module_key>.index                       [] long, 0 = the original

PEFT keys: ``base_model.model.<module path>.<param>`` in ``adapter_model.safetensors`` (PEFT's
model holds them as ``<module path>.modules_to_save.<adapter>.<param>``).

**bias.** ``"none"``: no base bias trains. ``"all"``: every base parameter whose name contains
``"bias"`` (PEFT's substring rule), ``"lora_only"``: the biases of the adapter's sites. They are
the model's own (shared) biases, not copies: they require grad while the adapter is in the
active set and trainable, and are saved with the adapter under PEFT's keys
(``base_model.model.<path>.bias``; ``<site>.base_layer.bias`` for an adapted site;
``<module>.original_module.bias`` inside a saved module); loading a file writes them into the base.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union, cast

import torch
from torch import nn

from graphlora.passes.param_switch import SwitchedParam, SwitchParameters
from graphlora.passes.sites import getattr_path

from . import trainable_tokens as tokens_
from .errors import ConfigError, closest
from .peft_format import KEY_PREFIX

__all__ = ["SAVED", "AUTO_MODULES", "BIAS_CHOICES", "SavedCopies", "SavedModules", "Extras", "requested_modules",
           "written_modules_to_save", "plan_extras", "install_extras", "drop_extras", "sync_extras",
           "extra_tensors", "extra_shapes", "base_tensors", "canonical_tensors", "switch_steps", "saved_recipe", "check_active",
           "fold_active_copies"]

#: the container's name on the adapter store (``graphlora.modules_to_save``)
SAVED = "modules_to_save"
#: modules PEFT's task-specific model classes add to ``modules_to_save``
AUTO_MODULES: Mapping[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
BIAS_CHOICES = ("none", "all", "lora_only")


class SavedCopies(nn.Module):
    """One saved module: ``copies[adapter]`` and the slot buffer ``index`` (0: the original,
    ``i``: the ``i``-th copy in ``copies`` order)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.copies = nn.ModuleDict()
        self.register_buffer("index", torch.zeros((), dtype=torch.long), persistent=False)


class SavedModules(nn.Module):
    """``graphlora.modules_to_save``: module key -> :class:`SavedCopies`; and ``biases``, adapter ->
    {PEFT key without ``base_model.model.`` -> the base bias parameter} (references, not copies;
    the dict is replaced, never edited, so a transaction's ``__dict__`` snapshot restores it)."""

    def __init__(self) -> None:
        super().__init__()
        self.biases: dict[str, dict[str, nn.Parameter]] = {}

    def saved(self) -> list[SavedCopies]:
        return [cast(SavedCopies, m) for m in self._modules.values()]


@dataclass(frozen=True)
class Extras:
    """What one adapter trains besides its sites (planned; nothing is changed by planning).

    Attributes:
        modules: the paths of the modules it saves a copy of.
        biases: ``(PEFT key without the prefix, source parameter name)`` of each base bias it trains.
        tokens: ``(embedding path, token ids)`` of its trainable rows (``trainable_token_indices``,
            :mod:`graphlora.trainable_tokens`).
    """

    modules: tuple[str, ...] = ()
    biases: tuple[tuple[str, str], ...] = ()
    tokens: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.modules or self.biases or self.tokens)


def _container(store: nn.Module) -> Union[SavedModules, None]:
    return cast(Union[SavedModules, None], store._modules.get(SAVED))


def requested_modules(config: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(the config's own modules_to_save entries, the ones its task_type adds)``."""
    own = tuple(getattr(config, "modules_to_save", None) or ())
    auto = tuple(m for m in AUTO_MODULES.get(str(getattr(config, "task_type", None)), ()) if m not in own)
    return own, auto


def inherit_task_modules(config: Any, state: Any) -> Any:
    """``config`` as PEFT's task models add it: on a model whose first adapter has a task type with
    modules of its own (:data:`AUTO_MODULES`: ``SEQ_CLS`` / ``TOKEN_CLS`` save the head), a new
    adapter's ``modules_to_save`` gains them (``PeftModelForSequenceClassification.add_adapter``), so
    its head copy trains, and is saved, as PEFT's does."""
    import dataclasses

    first = next(iter(state.configs.values()), None)
    if state.task_type is None and first is not None:  # the model's task: its first adapter's
        state.task_type = getattr(first, "task_type", None)
    auto = AUTO_MODULES.get(str(state.task_type), ())
    if not auto or not hasattr(config, "modules_to_save"):
        return config
    own = tuple(config.modules_to_save or ())
    missing = tuple(m for m in auto if m not in own and m not in requested_modules(config)[1])
    return dataclasses.replace(config, modules_to_save=own + missing) if missing else config


def written_modules_to_save(config: Any) -> Union[list[str], None]:
    """``modules_to_save`` as PEFT writes it: the config's entries plus those its task type adds."""
    own, auto = requested_modules(config)
    return list(own + auto) or None


def _matches(path: str, entries: Sequence[str]) -> bool:
    return any(path.endswith(e) for e in entries)


def _inside(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def plan_extras(config: Any, facts: Any, plan: Mapping[str, Any], state: Any, graph: Any = None) -> Extras:
    """The modules ``config`` saves and the biases it trains on this model (``graph``: the traced
    graph, to refuse a saved module it calls as a module, see :mod:`graphlora.passes.param_switch`).

    Raises:
        ConfigError: an entry of ``modules_to_save`` that names no module; a saved module that
            holds an adapted site (this adapter's or another's) or tied weights, or that is
            nested in another saved module, or has no parameters; an unknown ``bias``.
    """
    source: nn.Module = facts.source
    own, auto = requested_modules(config)
    names = [n for n, _ in source.named_modules() if n] if own or auto else []  # nothing saved: no walk
    modules = [n for n in names if _matches(n, own + auto)]
    # PEFT adds a task's heads itself (classifier and score both), so they may not exist
    optional = {m for task in AUTO_MODULES.values() for m in task}
    missing = [e for e in own if e not in optional and not any(n.endswith(e) for n in names)]
    if missing:
        leaves = [n.rsplit(".", 1)[-1] for n in names]
        raise ConfigError(
            f"modules_to_save={list(own)!r}: {missing[0]!r} names no module of this model (PEFT's rule: a module "
            f"path ending with the entry); closest modules: {closest(missing[0], leaves + names, 5)}."
        )
    called = [n.target for n in graph.nodes if n.op == "call_module"] if graph is not None and modules else []
    for m in modules:
        if not any(True for _ in source.get_submodule(m).parameters()):
            raise ConfigError(f"modules_to_save: module {m!r} has no parameters to train and save; leave it out.")
        calls = [c for c in called if _inside(c, m) and _has_parameters(source, c)]
        if calls:
            raise ConfigError(
                f"modules_to_save: {m!r} is called as a module in the traced graph ({calls[0]!r}: a call_module "
                "node, as torch.fx.symbolic_trace leaves nn.Linear), so its parameters cannot be switched; "
                "graphlora supports modules_to_save where the graph reads the module's parameters (exported "
                "graphs: transformers models, or models symbolic_trace cannot trace). Leave it out of modules_to_save."
            )
        outer = [o for o in modules if o != m and _inside(m, o)]
        if outer:
            raise ConfigError(
                f"modules_to_save: {m!r} is inside {outer[0]!r}, which is saved too; list only one of them."
            )
        params = [f"{m}.{p}" for p, _ in source.get_submodule(m).named_parameters()]
        for p in params:
            tied = [t for t in facts.aliases.get(p, ()) if not _inside(t, m)]
            if tied:
                raise ConfigError(
                    f"modules_to_save: parameter {p!r} of {m!r} is tied to {tied}; graphlora cannot keep a separate "
                    "copy of a tied weight. Leave it out of modules_to_save or untie the weights."
                )
        sites = [s for s in plan if _inside(s, m)]
        others = [s for a, p in state.plans.items() for s in p if _inside(s, m)]
        if sites or others:
            raise ConfigError(
                f"modules_to_save: {m!r} holds the adapted site {(sites or others)[0]!r}; a module cannot be both "
                "adapted and saved whole. Remove it from target_modules or from modules_to_save."
            )
    saved = _container(state.store)
    taken = [c.path for c in saved.saved()] if saved is not None else []
    for site in plan:
        holder = next((t for t in taken if _inside(site, t)), None)
        if holder is not None:
            raise ConfigError(
                f"site {site!r} is inside {holder!r}, which another adapter saves whole (modules_to_save); "
                "exclude it (exclude_modules) or delete that adapter first."
            )
    tokens = tokens_.plan_tokens(config, facts, plan, state, modules, graph)  # trainable_token_indices
    return Extras(tuple(modules), _bias_keys(getattr(config, "bias", "none"), source, plan, modules), tokens)


def _has_parameters(source: nn.Module, path: str) -> bool:
    """Whether the module at ``path`` (a ``call_module`` target) holds parameters; a module only
    the trace made (a dropout) holds none."""
    try:
        module = source.get_submodule(path)
    except AttributeError:
        return False
    return any(True for _ in module.parameters())


def _bias_keys(bias: str, source: nn.Module, plan: Mapping[str, Any], modules: Sequence[str]) -> tuple:
    """PEFT's trainable biases for ``bias`` and the key each is saved under."""
    if bias == "none":
        return ()
    params = dict(source.named_parameters())
    out = []
    if bias == "lora_only":
        for site in plan:
            if f"{site}.bias" in params:
                out.append((f"{site}.base_layer.bias", f"{site}.bias"))
        return tuple(out)
    if bias != "all":
        raise ConfigError(f"bias={bias!r} is not one of {list(BIAS_CHOICES)}.")
    for name in params:
        if not (name == "bias" or name.endswith(".bias")):  # PEFT 0.21's rule (not T5's relative_attention_bias)
            continue
        holder = next((m for m in modules if _inside(name, m)), None)
        site = next((s for s in plan if name.startswith(s + ".")), None)
        if holder is not None:
            out.append((f"{holder}.original_module.{name[len(holder) + 1:]}", name))
        elif site is not None:
            out.append((f"{site}.base_layer.{name[len(site) + 1:]}", name))
        else:
            out.append((name, name))
    return tuple(out)


def install_extras(state: Any, name: str, extras: Extras, source: nn.Module) -> None:
    """Make ``name``'s copies and record its biases (inside the caller's transaction)."""
    tokens_.install_tokens(state, name, extras.tokens, source)
    if not (extras.modules or extras.biases):
        return
    store = state.store
    saved = _container(store)
    if saved is None:
        saved = SavedModules()
        store.add_module(SAVED, saved)
    for path in extras.modules:
        key = path.replace(".", "_")
        if key not in saved._modules:
            saved.add_module(key, SavedCopies(path))
        holder = cast(SavedCopies, saved._modules[key])
        holder.copies[name] = copy.deepcopy(source.get_submodule(path))
    if extras.biases:
        params = dict(source.named_parameters())
        saved.biases = {**saved.biases, name: {key: params[n] for key, n in extras.biases}}


def drop_extras(store: nn.Module, name: str) -> None:
    """Forget ``name``'s copies and biases (the biases themselves stay as they are, as in PEFT)."""
    tokens_.drop_tokens(store, name)
    saved = _container(store)
    if saved is None:
        return
    for key, holder in list(saved._modules.items()):
        holder = cast(SavedCopies, holder)
        if name in holder.copies:
            del holder.copies[name]
        if len(holder.copies) == 0:
            del saved._modules[key]
    if name in saved.biases:
        saved.biases = {a: b for a, b in saved.biases.items() if a != name}
    if not saved._modules and not saved.biases:
        del store._modules[SAVED]


def _chosen(holder: SavedCopies, adapters: Any) -> Union[str, None]:
    return next((a for a in adapters if a in holder.copies), None)


def sync_extras(state: Any) -> None:
    """Write each saved module's slot (the active adapter's copy, or the original) and the
    ``requires_grad`` of copies and managed biases from the state (and the trainable rows')."""
    tokens_.sync_tokens(state)
    saved = _container(state.store)
    if saved is None:
        return
    live = state.weights if state.enabled else {}

    def trains(adapter: str) -> bool:  # the model's own biases: set_requires_grad leaves them alone (PEFT)
        return state.trainable and adapter in state.weights and not state.configs[adapter].inference_mode

    for holder in saved.saved():
        chosen = _chosen(holder, live)
        holder.index.fill_(list(holder.copies).index(chosen) + 1 if chosen is not None else 0)
        training = _chosen(holder, state.weights)
        for adapter, module in holder.copies.items():
            flag = state.trains(adapter, chosen=adapter == training)
            for param in module.parameters():
                if param.requires_grad != flag:
                    param.requires_grad_(flag)
    wanted = {id(p) for a, biases in saved.biases.items() if trains(a) for p in biases.values()}
    for biases in saved.biases.values():
        for param in biases.values():
            flag = id(param) in wanted
            if param.requires_grad != flag:
                param.requires_grad_(flag)


def extra_tensors(store: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """``name``'s copies and biases under PEFT's file keys (detached, sharing storage)."""
    saved = _container(store)
    out: dict[str, torch.Tensor] = tokens_.token_tensors(store, name)
    if saved is None:
        return out
    for holder in saved.saved():
        if name in holder.copies:
            for key, tensor in holder.copies[name].state_dict(keep_vars=True).items():
                out[f"{KEY_PREFIX}{holder.path}.{key}"] = tensor.detach()
    for key, param in saved.biases.get(name, {}).items():
        out[f"{KEY_PREFIX}{key}"] = param.detach()
    return out


def extra_shapes(extras: Extras, source: nn.Module) -> dict[str, tuple[int, ...]]:
    """The file keys and shapes :func:`extra_tensors` will have for ``extras``."""
    out = tokens_.token_shapes(extras.tokens, source)
    for path in extras.modules:
        for key, tensor in source.get_submodule(path).state_dict().items():
            out[f"{KEY_PREFIX}{path}.{key}"] = tuple(tensor.shape)
    params = dict(source.named_parameters())
    for key, name in extras.biases:
        out[f"{KEY_PREFIX}{key}"] = tuple(params[name].shape)
    return out


def base_tensors(extras: Extras, source: nn.Module) -> list[torch.Tensor]:
    """The base biases loading ``extras`` writes in place (a transaction backs them up)."""
    params = dict(source.named_parameters())
    return [params[name] for _, name in extras.biases]


def canonical_tensors(extras: Extras, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PEFT file's tensors with bias keys under the names graphlora writes.

    PEFT writes a bias under its path in the PEFT model: with ``.base_layer`` for every module some
    adapter of that model wrapped, ``.original_module`` inside a saved module. Each bias key is
    mapped to this adapter's key for the same parameter; ``<saved module>.modules_to_save.<name>``
    (a second copy of the saved copy's bias that PEFT writes with ``bias="all"``) is dropped.
    """
    if not extras.biases:
        return dict(tensors)
    by_name = {name: key for key, name in extras.biases}
    out = {}
    for key, value in tensors.items():
        rest = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else None
        if rest is None:
            out[key] = value
            continue
        inside = [m for m in extras.modules if rest.startswith(f"{m}.")]
        if any(rest.startswith(f"{m}.modules_to_save.") for m in inside):
            continue
        if inside and ".original_module." not in rest:  # the copy's own tensor
            out[key] = value
            continue
        plain = rest.replace(".base_layer.", ".").replace(".original_module.", ".")
        out[f"{KEY_PREFIX}{by_name[plain]}" if plain in by_name else key] = value
    return out


def switch_steps(state: Any, mixed: bool) -> list:
    """The :class:`SwitchParameters` step for the saved modules (``[]`` when there are none).

    Raises:
        ConfigError: a mixed-adapter batch program while modules are saved (not supported).
    """
    from .state import STORE

    saved = _container(state.store)
    holders = saved.saved() if saved is not None else []
    rows = tokens_.token_switches(state.store, STORE)
    if not holders and not rows:
        return []
    if mixed:
        raise ConfigError(
            f"mixed-adapter batches (adapter_names=...) do not support modules_to_save or trainable_token_indices "
            f"(saved: {[h.path for h in holders]}, rows of: {[r.module for r in rows]}); run one adapter per call, "
            "or use adapters without them."
        )
    params = list(rows)
    for key, holder in saved.named_children() if saved is not None else ():
        holder = cast(SavedCopies, holder)
        adapters = tuple(holder.copies)
        first = holder.copies[adapters[0]]
        prefix = f"{STORE}.{SAVED}.{key}"
        for pname, _ in (*first.named_parameters(), *first.named_buffers()):
            params.append(SwitchedParam(holder.path, f"{holder.path}.{pname}",
                                        tuple(f"{prefix}.copies.{a}.{pname}" for a in adapters),
                                        f"{prefix}.index", adapters))
    return [SwitchParameters(params)]


def saved_recipe(state: Any) -> tuple:
    """What the parameter switch of a program depends on: each saved module and its adapters."""
    saved = _container(state.store)
    copies = tuple((h.path, tuple(h.copies)) for h in saved.saved()) if saved is not None else ()
    return copies + tokens_.token_recipe(state.store)


def check_active(state: Any, names: Sequence[str]) -> None:
    """Refuse activating two adapters that both save the same module (PEFT's rule).

    Raises:
        ConfigError: naming the module and both adapters.
    """
    tokens_.check_active_tokens(state.store, names)
    saved = _container(state.store)
    for holder in saved.saved() if saved is not None else ():
        both = [n for n in names if n in holder.copies]
        if len(both) > 1:
            raise ConfigError(
                f"adapters {both} each have their own copy of {holder.path!r} (modules_to_save); only one of them "
                "can be active at a time. Activate one of them."
            )


def fold_active_copies(gm: Any) -> None:
    """``merge_and_unload``: write each active copy into its original module (PEFT replaces the
    module by the copy). The originals are recorded in the merge bookkeeping, so
    ``unmerge_adapter`` restores them exactly. Trainable rows are written into their embedding
    (:func:`graphlora.trainable_tokens.fold_tokens`)."""
    tokens_.fold_tokens(gm)
    state = gm.adapter_state
    saved = _container(state.store)
    live = state.weights if state.enabled else {}
    writes = []
    for holder in saved.saved() if saved is not None else ():
        chosen = _chosen(holder, live)
        if chosen is not None:
            for key, tensor in holder.copies[chosen].state_dict(keep_vars=True).items():
                writes.append((f"{holder.path}.{key}", tensor))
    if not writes:
        return
    originals = state.merge.originals
    with gm._transaction([getattr_path(gm, p) for p, _ in writes if p in originals]):
        with torch.no_grad():
            for path, tensor in writes:
                target = getattr_path(gm, path)
                if path not in originals:
                    originals[path] = target.detach().clone()
                target.copy_(tensor)
