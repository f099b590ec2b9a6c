"""Emit: the regenerated GraphModule users get from :func:`graphlora.inject`.

:class:`AdaptedGraphModule` is a ``torch.fx.GraphModule`` whose graph is the traced model
with adapter branches and switch nodes spliced in. It carries the adapter controls of
transformers' ``PeftAdapterMixin``. Switching (``set_adapter``, ``set_adapter_weights``,
``disable_adapters``, ``enable_adapters``) writes gate buffers in place and never touches the
graph; adding or deleting an adapter re-splices from the pristine traced graph.

With the ``export`` frontend a graph is specific to a call signature. The module keeps one
*program* per signature (:mod:`graphlora.program`; the first is this module's own graph, others
are GraphModules that share every parameter, buffer and adapter with it), traced on first use
and chosen per call by :mod:`graphlora.routing`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.fx as fx
from torch import nn

from graphlora.passes import (
    BranchSpec,
    Site,
    is_targeted,
    locate_sites,
    splice_adapters,
    splice_mixed,
)
from graphlora.passes.device import retarget_device
from graphlora.passes.sites import getattr_path
from graphlora.passes.splice import site_key

from ._checks import check_layers_in_range, check_placement, check_target_types
from ._compat import adopt_graph, is_pretrained_model
from .capture import Captured, call_key, forward_params
from .config import ALL_LINEAR, IA3Config, LoraConfig
from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    NoTargetError,
    closest,
)
from .methods import MethodRule, rule_for
from .state import AdapterStore
from .merge import MergeMixin
from .peft_io import PeftFileMixin
from .program import Program, copy_graph, prepare_base
from .routing import RoutingMixin

__all__ = ["AdaptedGraphModule", "SiteInfo"]

STORE = "graphlora"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


@dataclass(frozen=True)
class SiteInfo:
    """A located site as users see it: path, op kind, feature sizes, rank per adapter.

    ``ranks`` has every adapter placed on the site (0 for IA3, which has a vector, not a
    low-rank pair); ``methods`` says which method each uses (``"lora"``, ``"dora"``, ``"ia3"``)
    and ``parameters`` how many parameters each adds here.
    """

    name: str
    kind: str
    in_features: int
    out_features: int
    ranks: Mapping[str, int]
    methods: Mapping[str, str] = dataclasses.field(default_factory=dict)
    parameters: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        """``sum_a r_a * (d_in + d_out)`` for LoRA (``+ d_out`` with DoRA); ``d_out`` or ``d_in`` for IA3."""
        if self.parameters:
            return sum(self.parameters.values())
        return sum(r * (self.in_features + self.out_features) for r in self.ranks.values())


def _param_aliases(model: nn.Module) -> dict[str, list[str]]:
    names: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names[id(param)].append(name)
    return {n: group for group in names.values() if len(group) > 1 for n in group}


def _output_head(model: nn.Module) -> Union[str, None]:
    if not is_pretrained_model(model):
        return None
    head = model.get_output_embeddings()
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


class AdaptedGraphModule(RoutingMixin, PeftFileMixin, MergeMixin, fx.GraphModule):
    """A traced model with adapter branches behind named switch nodes.

    Build it with :func:`graphlora.inject`. It is called exactly as the original model and
    returns the same output type.
    """

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_capture(cls, model: nn.Module, captured: Captured) -> "AdaptedGraphModule":
        base = prepare_base(captured.gm, model)
        self = cls(base, base.graph, class_name=type(model).__name__)
        d = self.__dict__
        d["_glora_source"] = model
        d["_glora_frontend"] = captured.frontend
        names, defaults = forward_params(model) if captured.frontend == "export" else ((), {})
        params = inspect.signature(model.forward).parameters
        d["_glora_arg_names"] = names
        d["_glora_call_defaults"] = defaults
        d["_glora_none_defaults"] = frozenset(
            p.name for p in params.values() if p.default is None and p.name not in defaults
        )
        d["_glora_aliases"] = _param_aliases(model)
        d["_glora_head"] = _output_head(model)
        d["_glora_model_type"] = getattr(getattr(model, "config", None), "model_type", None)
        d["_glora_configs"] = {}
        d["_glora_plans"] = {}
        d["_glora_active"] = []
        d["_glora_weights"] = {}
        d["_glora_enabled"] = True
        d["_glora_trainable"] = True
        devices = {p.device for p in model.parameters()}
        d["_glora_device"] = next(iter(devices)) if len(devices) == 1 else None
        self.add_module(STORE, AdapterStore())
        sig = call_key(self._normalize(captured.kwargs)) if captured.frontend == "export" else None
        key = (sig, False)
        program = Program(key, copy_graph(self.graph), locate_sites(self, self._glora_aliases))
        d["_glora_primary"] = key
        d["_glora_programs"] = {key: program}
        self.train(model.training)
        return self

    # ------------------------------------------------------------------ splicing
    def _rule(self, adapter: str) -> MethodRule:
        return rule_for(self._glora_configs[adapter])

    def _site_records(self) -> dict[str, Site]:
        """site name -> its :class:`Site` record in the primary program (first occurrence)."""
        records: dict[str, Site] = {}
        for site in self._primary.sites:
            records.setdefault(site.name, site)
        return records

    def _branch_specs(self) -> dict[str, list[BranchSpec]]:
        specs: dict[str, list[BranchSpec]] = defaultdict(list)
        records = self._site_records()
        for adapter in self._glora_configs:
            rule = self._rule(adapter)
            for site in self._glora_plans[adapter]:
                key = site_key(site)
                branch = self.graphlora.branch(key, adapter)
                specs[site].append(rule.branch_spec(adapter, f"{STORE}.{key}.{adapter}", branch, records[site]))
        return specs

    def _build_variant(self, program: Program) -> None:
        vm = fx.GraphModule(self, copy_graph(program.base_graph), class_name=self._get_name())
        vm.add_module(STORE, self.graphlora)
        if program.mixed:
            splice_mixed(vm, program.sites, self._mixed_specs(), f"{STORE}.row_index")
        else:
            splice_adapters(vm, program.sites, self._branch_specs())
        program.module = vm

    def _mixed_specs(self) -> dict[str, list[Union[BranchSpec, None]]]:
        """Per site, one entry per adapter in slot order; ``None`` where the adapter is absent."""
        slots = list(self._glora_configs)
        out = {}
        for site, present in self._branch_specs().items():
            by_name = {b.adapter: b for b in present if self._rule(b.adapter).mixable(self._glora_configs[b.adapter])}
            out[site] = [by_name.get(name) for name in slots]
        return out

    def _rebuild(self) -> None:
        """Re-splice every program from its pristine graph with the current adapters."""
        specs = self._branch_specs()
        for key, program in self._glora_programs.items():
            if key == self._glora_primary:
                adopt_graph(self, copy_graph(program.base_graph))  # code regenerated once, below
                if not splice_adapters(self, program.sites, specs).modified:
                    self.recompile()
            else:
                self._build_variant(program)

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half(): variants see new tensors
        before = {name: t for name, t in (*self.named_parameters(), *self.named_buffers())}
        result = super()._apply(fn, recurse)
        programs = self.__dict__.get("_glora_programs", {})
        if programs:
            after = {name: t for name, t in (*self.named_parameters(), *self.named_buffers())}
            self._share_with_source({id(before[n]): t for n, t in after.items() if n in before and before[n] is not t})
            if self._retarget_devices():
                self._rebuild()  # every program re-spliced from its retargeted pristine graph
        for key, program in programs.items():
            if key != self._glora_primary:
                self._build_variant(program)
        if "_glora_configs" in self.__dict__:  # new buffers (to_empty: garbage): rewrite the switch state
            self._sync_state()
        return result

    def _share_with_source(self, replaced: Mapping[int, torch.Tensor]) -> None:
        """Keep the source model on the same tensors after a move that replaced them (``to_empty``).

        New call signatures are traced from the source model, so every slot of it that held a
        replaced tensor (tied aliases included) now holds its replacement.
        """
        if not replaced:
            return
        for module in self._glora_source.modules():
            for slots in (module._parameters, module._buffers):
                for key, tensor in slots.items():
                    if tensor is not None and id(tensor) in replaced:
                        slots[key] = replaced[id(tensor)]

    def _retarget_devices(self) -> bool:
        """After a move to one device, make the traced graphs create their tensors there too.

        Only when every parameter is on a single device (a model spread over devices keeps its
        graphs as traced). Returns True when a pristine graph changed.
        """
        devices = {p.device for p in self.parameters()}
        traced = self.__dict__.get("_glora_device")
        if len(devices) != 1 or traced is None:
            return False
        (new,) = devices
        if new == traced:
            return False
        changed = False
        for program in self._glora_programs.values():
            changed |= retarget_device(program.base_graph, traced, new, root=self)
        self.__dict__["_glora_device"] = new
        return changed

    # ------------------------------------------------------------------ planning
    @property
    def _primary(self) -> Program:
        return self._glora_programs[self._glora_primary]

    def _resolve_targets(self, config: Union[LoraConfig, IA3Config]) -> Any:
        targets = config.target_modules
        candidates = [s.name for s in self._primary.sites]
        if targets is None:
            default = rule_for(config).default_targets(self._glora_model_type)
            if default is None:
                raise ConfigError(
                    f"target_modules is not set and there is no default for model type "
                    f"{self._glora_model_type!r}; set target_modules, e.g. {closest('proj', candidates, 3)} "
                    "or 'all-linear'."
                )
            return default
        if targets == ALL_LINEAR:
            return tuple(n for n in candidates if n != self._glora_head)
        return targets

    def _plan(self, config: Union[LoraConfig, IA3Config]) -> dict[str, Any]:
        """site name -> the method's per-site constants (LoRA: ``(r, alpha, scaling)``) for the
        sites ``config`` selects."""
        rule = rule_for(config)
        targets = self._resolve_targets(config)
        resolved = rule.resolve_config(config, self._glora_model_type)
        plan = {}
        for site in self._primary.sites:
            if site.name in plan or not is_targeted(
                site.name, targets, exclude_modules=config.exclude_modules,
                layers_to_transform=getattr(config, "layers_to_transform", None),
                layers_pattern=getattr(config, "layers_pattern", None),
            ):
                continue
            plan[site.name] = rule.site_plan(resolved, site.name)
        check_target_types(self._glora_source, config, config.target_modules, self._site_records())
        check_layers_in_range(config, self._site_records(), self._glora_source)
        if not plan:
            wanted = targets if isinstance(targets, str) else ", ".join(targets)
            names = list(dict.fromkeys(s.name for s in self._primary.sites))
            probe = targets if isinstance(targets, str) else next(iter(targets), "")
            raise NoTargetError(
                f"target_modules={config.target_modules!r} matched no linear op "
                f"(looked for: {wanted}; exclude_modules={config.exclude_modules!r}, "
                f"layers_to_transform={getattr(config, 'layers_to_transform', None)!r}). "
                f"Closest linear sites: {closest(probe, names)}. "
                f"Use names from gm.sites or graphlora.list_sites(model)."
            )
        return plan

    def _check_new_name(self, name: Any) -> None:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name == "__base__":
            raise ConfigError(
                f"adapter name {name!r} is not usable; use letters, digits, '_' or '-' (no '.'), "
                "and not '__base__'."
            )
        if name in self._glora_configs:
            raise AdapterExistsError(
                f"an adapter named {name!r} already exists (adapters: {list(self._glora_configs)}); "
                "pick another name or delete_adapter it first."
            )

    def _check_known(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self._glora_configs:
                raise AdapterNotFoundError(
                    f"no adapter named {name!r}; loaded adapters: {list(self._glora_configs)}."
                )

    # ------------------------------------------------------------------ adapter controls
    def add_adapter(self, adapter_name: str, config: Union[LoraConfig, IA3Config, None] = None) -> None:
        """Add an adapter (a :class:`LoraConfig`, DoRA included, or an :class:`IA3Config`) and
        make it the active one. Adapters of different methods can be loaded side by side.

        Raises:
            AdapterExistsError: the name is taken.
            NoTargetError: the config selects no site.
            ConfigError: the name or config is unusable.
        On any error the module and its adapters are left as they were.
        """
        config = LoraConfig() if config is None else config
        rule = rule_for(config)
        self._check_new_name(adapter_name)
        plan = self._plan(config)
        check_placement(self, plan, f"add adapter {adapter_name!r}")
        sites = self._site_records()
        branches = {}
        for name, site_plan in plan.items():
            site = sites[name]
            branch = rule.make_branch(config, site, site_plan, getattr_path(self, site.weight))
            branch.train(self.training)
            branches[name] = branch
        previous = dict(self._glora_weights)
        grads = [(param, param.requires_grad) for param in self._base_parameters()]
        try:
            for name, branch in branches.items():
                self.graphlora.add(site_key(name), adapter_name, branch)
            self._glora_configs[adapter_name] = config
            self._glora_plans[adapter_name] = plan
            self._rebuild()
            for param, _ in grads:
                param.requires_grad_(False)
            self.set_adapter(adapter_name)
        except BaseException:  # roll back: graph, store, active set, requires_grad
            self._forget(adapter_name)
            for param, flag in grads:
                param.requires_grad_(flag)
            self._set_active(previous)
            raise

    def _forget(self, adapter_name: str) -> None:
        for key, name, _ in list(self.graphlora.branches(adapter_name)):
            self.graphlora.remove(key, name)
        self._glora_configs.pop(adapter_name, None)
        self._glora_plans.pop(adapter_name, None)
        self._glora_weights.pop(adapter_name, None)
        if adapter_name in self._glora_active:
            self._glora_active.remove(adapter_name)
        self._rebuild()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter, its parameters and its branches from every graph.

        If it was active, the remaining active adapters stay active; if none remain, the first
        remaining adapter becomes active (PEFT's behaviour).

        Raises:
            AdapterNotFoundError: unknown name.
            AdapterStateError: it is the only adapter (use ``disable_adapters()`` instead), or it
                is merged into the base weights (unmerge it first).
        """
        self._check_known([adapter_name])
        if adapter_name in self.merged_adapters:
            raise AdapterStateError(
                f"{adapter_name!r} is merged into the base weights; deleting it would leave its "
                f"contribution there with nothing to undo it. Call unmerge_adapter([{adapter_name!r}]) "
                "first (or merge_and_unload() to keep it in the weights for good)."
            )
        if len(self._glora_configs) == 1:
            raise AdapterStateError(
                f"{adapter_name!r} is the only adapter; deleting it would leave no adapter. "
                "Use disable_adapters() to run the base model, or add another adapter first."
            )
        was_active = list(self._glora_active)
        self._forget(adapter_name)
        remaining = [a for a in was_active if a != adapter_name] or [next(iter(self._glora_configs))]
        self._set_active({a: self._glora_weights.get(a, 1.0) for a in remaining})

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Activate one adapter, or several (their contributions add), each with weight 1."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise ConfigError("set_adapter needs at least one adapter name; use disable_adapters() for none.")
        self._check_known(names)
        self._unmerge_before("set_adapter")
        self._set_active({n: 1.0 for n in names})

    def _unmerge_before(self, action: str) -> None:
        """PEFT's rule: switching adapters while some are merged unmerges them first (with a warning)."""
        if self.merged:
            warnings.warn(f"{action} while adapters {self.merged_adapters} are merged: unmerging them first.",
                          stacklevel=3)
            self.unmerge_adapter()

    def set_adapter_weights(self, weights: Mapping[str, float]) -> None:
        """Activate the given adapters with per-adapter weights: ``y = Wx + sum_a w_a s_a B_a A_a x``."""
        if not weights:
            raise ConfigError("set_adapter_weights needs at least one {name: weight} entry.")
        self._check_known(list(weights))
        for name, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w != w or abs(w) == float("inf"):
                raise ConfigError(f"weight {w!r} for adapter {name!r} must be a finite number.")
        self._unmerge_before("set_adapter_weights")
        self._set_active({n: float(w) for n, w in weights.items()})

    def _set_active(self, weights: Mapping[str, float]) -> None:
        self.__dict__["_glora_active"] = list(weights)
        self.__dict__["_glora_weights"] = dict(weights)
        self._sync_state()

    def disable_adapters(self) -> None:
        """Run the base model: every gate is 0; the active set is kept for ``enable_adapters``.

        Merged adapters are unmerged first (with a warning), as PEFT does.
        """
        self._unmerge_before("disable_adapters")
        self.__dict__["_glora_enabled"] = False
        self._sync_state()

    def enable_adapters(self) -> None:
        """Undo ``disable_adapters``."""
        self.__dict__["_glora_enabled"] = True
        self._sync_state()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: the base model inside, the previous state after."""
        previous = self._glora_enabled
        self.disable_adapters()
        try:
            yield
        finally:
            self.__dict__["_glora_enabled"] = previous
            self._sync_state()

    def _sync_state(self) -> None:
        """Write every branch's switch buffers (``apply_state``) and requires_grad from the switch state.

        An adapter's weight is its active weight, or 0 when it is inactive, disabled or merged.
        """
        active = self._glora_weights if self._glora_enabled else {}
        merged = set(getattr(self, "merged_adapters", ()))
        for _, adapter, branch in self.graphlora.branches():
            weight = active[adapter] if adapter in active and adapter not in merged else 0.0
            branch.apply_state(weight, adapter in merged)
            trainable = (self._glora_trainable and adapter in self._glora_weights
                         and not self._glora_configs[adapter].inference_mode)
            for param in branch.parameters():
                if param.requires_grad != trainable:
                    param.requires_grad_(trainable)

    def requires_grad_(self, requires_grad: bool = True) -> "AdaptedGraphModule":
        """As ``nn.Module.requires_grad_``, and it decides whether active adapters train.

        By default the active adapters' parameters require grad and the others do not
        (PEFT's behaviour), so switching flips ``requires_grad`` and a compiled *training* graph
        recompiles. For serving, ``gm.requires_grad_(False)`` freezes every adapter: switching
        then changes gate values only, and compiled graphs never recompile.
        ``gm.requires_grad_(True)`` makes the base trainable too, as it would on any module.
        """
        super().requires_grad_(requires_grad)
        self.__dict__["_glora_trainable"] = bool(requires_grad)
        self._sync_state()
        return self

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: Union[int, None] = None,
        svd_clamp: Union[float, None] = None,
        svd_full_matrices: bool = True,
        svd_driver: Union[str, None] = None,
    ) -> None:
        """Add ``adapter_name`` made from ``adapters`` with ``weights`` (PEFT's ``add_weighted_adapter``).

        LoRA: ``combination_type`` ``"linear"`` (same ranks; ``A = sum sign(w s) sqrt|w s| A_i``,
        ``B = sum sqrt|w s| B_i``), ``"cat"`` (exact: ``B A = sum w_i s_i B_i A_i`` at rank
        ``sum r_i``) or ``"svd"`` (truncated SVD of that sum at ``svd_rank``, default the largest
        rank). IA3: ``l = sum w_i l_i`` (``"linear"``). The new adapter has scaling 1
        (``lora_alpha = r``), is frozen and is not activated, as in PEFT. See
        :mod:`graphlora.methods.weighted`.

        Raises:
            AdapterNotFoundError: an unknown adapter. AdapterExistsError: the name is taken.
            ConfigError: mixed methods, DoRA adapters, unequal ranks for ``"linear"``, an unknown
                ``combination_type``, or weights that are not one finite number per adapter.
        On any error nothing is added.
        """
        from .methods.weighted import COMBINATIONS

        adapters = [adapters] if isinstance(adapters, str) else list(adapters)
        if not adapters:
            raise ConfigError("adapters is empty; name at least one adapter to combine.")
        self._check_known(adapters)
        weights = list(weights)
        if len(weights) != len(adapters) or any(
            isinstance(w, bool) or not isinstance(w, (int, float)) or w != w or abs(w) == float("inf") for w in weights
        ):
            raise ConfigError(f"weights={weights!r} must be one finite number per adapter ({len(adapters)} adapters).")
        if combination_type not in COMBINATIONS:
            raise ConfigError(
                f"combination_type={combination_type!r} is not supported; use one of {list(COMBINATIONS)} "
                "(PEFT's ties / dare variants are not implemented)."
            )
        self._check_new_name(adapter_name)
        rules = {self._rule(a).name for a in adapters}
        if len(rules) > 1:
            raise ConfigError(f"adapters {adapters} mix methods ({sorted(rules)}); combine adapters of one method.")
        self._rule(adapters[0]).combine(self, adapters, [float(w) for w in weights], adapter_name, combination_type,
                                        svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                                        svd_driver=svd_driver)

    # ------------------------------------------------------------------ introspection
    @property
    def active_adapters(self) -> list[str]:
        """Names of the active adapters (empty while disabled)."""
        return list(self._glora_active) if self._glora_enabled else []

    @property
    def active_adapter(self) -> Union[str, None]:
        """The first active adapter (PEFT's singular form)."""
        active = self.active_adapters
        return active[0] if active else None

    @property
    def adapters(self) -> dict[str, Union[LoraConfig, IA3Config]]:
        """Adapter name -> config, in the order they were added."""
        return dict(self._glora_configs)

    @property
    def peft_config(self) -> dict[str, Union[LoraConfig, IA3Config]]:
        """Alias of :attr:`adapters` (PEFT's name)."""
        return self.adapters

    @property
    def traced_graph(self) -> fx.Graph:
        """The graph as traced (after the base passes), before any adapter was spliced in.

        A copy: editing it changes nothing. ``self.graph`` is the rewritten one.
        """
        return copy_graph(self._primary.base_graph)

    @property
    def sites(self) -> list[SiteInfo]:
        """Every located linear site, with the rank of each adapter placed on it."""
        out = []
        seen = set()
        for site in self._primary.sites:
            if site.name in seen:
                continue
            seen.add(site.name)
            placed = [a for a, plan in self._glora_plans.items() if site.name in plan]
            ranks = {a: self._rule(a).rank(self._glora_plans[a][site.name]) for a in placed}
            methods = {a: self._rule(a).variant(self._glora_configs[a]) for a in placed}
            params = {a: self.graphlora.branch(site_key(site.name), a).num_parameters() for a in placed}
            out.append(SiteInfo(site.name, site.kind, site.in_features, site.out_features, ranks, methods, params))
        return out

    def sites_table(self, adapted_only: bool = True) -> str:
        """The sites as a text table (path, kind, in, out, rank per adapter, added parameters)."""
        rows = [s for s in self.sites if s.ranks or not adapted_only]
        header = ("site", "kind", "in", "out", "adapters (rank)", "params")
        body = [
            (s.name, s.kind, str(s.in_features), str(s.out_features),
             ", ".join(f"{a}:{r}" if s.methods.get(a, "lora") == "lora" else f"{a}:{s.methods[a]}" + (f"/{r}" if r else "")
                       for a, r in s.ranks.items()) or "-", f"{s.num_parameters:,}")
            for s in rows
        ]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        fmt = "  ".join(f"{{:{'>' if i in (2, 3, 5) else '<'}{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in body]
        return "\n".join(lines)

    def _base_parameters(self) -> Iterator[nn.Parameter]:
        adapter_ids = {id(p) for p in self.graphlora.parameters()}
        for param in self.parameters():
            if id(param) not in adapter_ids:
                yield param

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), as PEFT counts them."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P`` (PEFT's format)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
