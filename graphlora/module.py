"""Emit: the regenerated GraphModule users get from :func:`graphlora.inject`.

:class:`AdaptedGraphModule` is a ``torch.fx.GraphModule`` whose graph is the traced model with
adapter branches and switch nodes spliced in, and a thin facade over three objects it owns:

- :class:`~graphlora.state.AdapterState` (``gm.adapter_state``): configs, plans, the active set and
  weights, enabled, merged adapters, and the store of adapter tensors (``gm.graphlora``);
- :class:`~graphlora.programs.ProgramSet` (``gm.programs``): one GraphModule per call signature,
  built on first use by one pipeline (capture → base passes → locate → splice); the first is
  this module's own graph;
- :class:`~graphlora.planning.ModelFacts` and :class:`~graphlora.calls.CallSpec`: what was read
  from the source model once (site names, output head, model type, tied weights, ``forward``'s
  signature).

It carries the adapter controls of transformers' ``PeftAdapterMixin``. Switching
(``set_adapter``, ``set_adapter_weights``, ``disable_adapters``, ``enable_adapters``) writes gate
buffers in place and never touches a graph. Every mutating call (add, load, hotswap, delete,
weighted combination, merge, unmerge) runs inside :func:`~graphlora.transaction.transaction`: on
any error the module is as it was. The math lives in functions over the state:
:mod:`graphlora.merge`, :mod:`graphlora.peft_io`, :mod:`graphlora.methods.weighted`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import warnings
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
import torch.fx as fx
from torch import nn

from graphlora.passes import locate_sites
from graphlora.passes.sites import getattr_path
from graphlora.passes.detach_reads import refresh_detached

from . import merge as merging
from . import modules_to_save as saved_modules
from . import peft_io
from . import status
from . import surface
from ._checks import check_fx_call, check_placement
from ._compat import (apply_pre_hooks, assigned_forward, current_graph, has_call_hooks, is_pretrained_model,
                      lend_forward, restore_pre_hooks, return_forward, under_outer_compile)
from .calls import BANK, BASE, MIXED, SWITCH, CallSpec, raise_for_guard, raise_for_runtime_assert
from .capture import Captured
from .checkpointing import settings_for
from .config import IA3Config, LoraConfig
from .errors import AdapterStateError, ConfigError, MergeError
from .generation import (carry_cache, ready_static_cache, sliding_count_input, static_restore,
                         static_snapshot)
from .methods import as_config, rule_for
from .mixed import write_row_index
from .planning import ModelFacts, check_known, check_new_name, plan_adapter
from .prepare import copy_graph, prepare_base
from .programs import Program, ProgramSet, first_records
from .siteinfo import SiteInfo, site_infos, sites_table
from .signature import show_source_signature
from .state import STORE, AdapterState, AdapterStore, _own_parameters
from .transaction import transaction

__all__ = ["AdaptedGraphModule", "SiteInfo"]

AnyConfig = Union[LoraConfig, IA3Config]
PathLike = Union[str, os.PathLike]


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


def _finite(w: Any) -> bool:
    return not isinstance(w, bool) and isinstance(w, (int, float)) and w == w and abs(w) != float("inf")


@torch.compiler.disable
def _refresh_primary(module: "AdaptedGraphModule") -> None:
    module.programs.refresh(module.programs.primary)


def _fresh_forward(cls: type) -> None:
    """Wrap the ``forward`` that ``GraphModule`` just generated on ``cls`` so that a direct call
    (``gm.forward(...)``, ``torch.compile(gm.forward)``) first re-splices a graph an add or delete
    left out of date (re-splicing is lazy, see :mod:`graphlora.programs`): one integer compare when
    it is current."""
    generated = cls.forward

    def forward(self: "AdaptedGraphModule", *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get(_ROUTE_FORWARD):  # an assigned forward calls this one: route the call
            # routed in disabled helpers and the program called from this frame, so that under
            # torch.compile (dynamo breaks the graph at the helper) the program itself is compiled
            before, saved, target, args, kwargs = _routed_enter(self, args, kwargs, torch.compiler.is_compiling())
            try:
                out = type(self).forward(self, *args, **kwargs) if target is self else target(*args, **kwargs)
            except BaseException as exc:
                _routed_failed(self, exc, saved, before, kwargs)
                raise
            return _routed_finish(self, saved, before, kwargs, out)
        programs = self.__dict__.get("_programs")
        if programs is not None and programs.primary.version != programs.version:
            _refresh_primary(self)
            if type(self).forward is not forward:  # the refresh generated new code
                return type(self).forward(self, *args, **kwargs)
        return generated(self, *args, **kwargs)

    functools.update_wrapper(forward, generated)
    cls.forward = forward


@torch.compiler.disable
def _finish_call(saved: list, kwargs: dict, out: Any) -> Any:
    """The call's output with the caller's cache object carried (:func:`carry_cache`); what the
    call allocated is put back if that fails."""
    try:
        return carry_cache(kwargs, out)
    except BaseException:
        static_restore(saved)
        raise


@torch.compiler.disable
def _routed_enter(module: "AdaptedGraphModule", args: tuple, kwargs: dict, compiling: bool) -> tuple:
    """The class ``forward``'s routed call (an assigned ``forward`` called it): the routing flag as
    it was (off for the call: the program may be the module's own generated forward), then
    :meth:`AdaptedGraphModule._enter`'s answer."""
    before = module.__dict__.get(_ROUTE_FORWARD, False)
    object.__setattr__(module, _ROUTE_FORWARD, False)
    try:
        return (before, *module._enter(args, kwargs, compiling))
    except BaseException:
        object.__setattr__(module, _ROUTE_FORWARD, before)
        raise


@torch.compiler.disable
def _routed_failed(module: "AdaptedGraphModule", exc: BaseException, saved: list, before: bool, kwargs: dict) -> None:
    """After the routed program raised ``exc``: the flag put back, then
    :meth:`AdaptedGraphModule._call_failed`."""
    object.__setattr__(module, _ROUTE_FORWARD, before)
    module._call_failed(exc, saved, (), kwargs, signature=False)


@torch.compiler.disable
def _routed_finish(module: "AdaptedGraphModule", saved: list, before: bool, kwargs: dict, out: Any) -> Any:
    object.__setattr__(module, _ROUTE_FORWARD, before)
    return _finish_call(saved, kwargs, out)


#: set on the instance while an assigned ``forward`` runs (see ``AdaptedGraphModule.__call__``)
_ROUTE_FORWARD = "_glora_route_forward"


@contextlib.contextmanager
def _flag(module: nn.Module, value: bool) -> Iterator[None]:
    before = module.__dict__.get(_ROUTE_FORWARD, False)
    object.__setattr__(module, _ROUTE_FORWARD, value)
    try:
        yield
    finally:
        object.__setattr__(module, _ROUTE_FORWARD, before)


def _rebind_banks(module: "AdaptedGraphModule", incompatible: Any) -> None:
    module.adapter_state.restore_banks()
    for program in module.programs:  # the serving programs' detached aliases read the new tensors
        if program.module is not None:
            refresh_detached(program.module)


def _upcast(branch: nn.Module) -> None:
    """PEFT's ``autocast_adapter_dtype``: fp16 / bf16 parameters of a new branch become float32."""
    for param in _own_parameters(branch):  # branch.parameters() without named_modules' bookkeeping
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


def _one_of(method: str, **values: Any) -> Any:
    """The one of ``values`` given (graphlora's keyword and PEFT's for the same argument).

    Raises:
        ConfigError: both are given.
    """
    given = {k: v for k, v in values.items() if v is not None}
    if len(given) > 1:
        raise ConfigError(f"{method} got {' and '.join(f'{k}=' for k in given)} (the same argument under "
                          "graphlora's and PEFT's name); pass one of them.")
    return next(iter(given.values()), None)


def _names(value: Union[str, Iterable[str]]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class AdaptedGraphModule(fx.GraphModule):
    """A traced model with adapter branches behind named switch nodes.

    Build it with :func:`graphlora.inject`. It is called exactly as the original model and
    returns the same output type.
    """

    # ------------------------------------------------------------------ construction
    def __init__(self, model: nn.Module, captured: Captured) -> None:
        base = prepare_base(captured.gm, model)
        super().__init__(base, copy_graph(base.graph), class_name=type(model).__name__)
        store = AdapterStore()
        self.add_module(STORE, store)
        calls = CallSpec.of(model, captured.frontend)
        aliases = _param_aliases(model)
        sites = locate_sites(base, aliases)
        first = Program(calls.key(calls.normalize(captured.kwargs or {}), SWITCH), base, sites,
                        example=captured.kwargs)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        # the only attribute writes of the facade: everything else lives in these objects
        self._calls = calls
        self._adapters = AdapterState(store)
        self._facts = ModelFacts(model, tuple(first_records(sites)), _output_head(model), model_type, aliases)
        self._programs = ProgramSet(self, model, calls, self._adapters, first, aliases)
        self._transaction_depth = 0
        # load_state_dict(assign=True) gives parameters new storage: make them bank views again
        self.register_load_state_dict_post_hook(_rebind_banks)
        show_source_signature(type(self), model)
        self.train(model.training)

    @classmethod
    def from_capture(cls, model: nn.Module, captured: Captured) -> "AdaptedGraphModule":
        """The emitted module for ``model`` traced as ``captured`` (no adapter yet)."""
        return cls(model, captured)

    # ------------------------------------------------------------------ owned objects
    @property
    def adapter_state(self) -> AdapterState:
        """The adapter state (configs, plans, active set, weights, merged adapters, tensors)."""
        return self._adapters

    @property
    def programs(self) -> ProgramSet:
        """The program per call signature (``gm.programs.primary`` is this module's own)."""
        return self._programs

    def get_base_model(self) -> nn.Module:
        """The original model (it shares every parameter with this module; PEFT's name)."""
        return self._facts.source

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate`` through this module's programs, with a KV cache; ``adapter_names=[...]``
        gives each input row its adapter (see :mod:`graphlora.generation`)."""
        from .generation import generate

        return generate(self, *args, **kwargs)

    # ------------------------------------------------------------------ transformers model surface
    # (graphlora/surface.py: the source model's attributes, save_pretrained, unload, pickling)
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules first
        except AttributeError as exc:
            return surface.missing_attribute(self, name, exc)

    @property
    def base_model(self) -> "surface.AdaptedBackbone":
        """The backbone with the adapters (transformers' ``base_model``: ``model.model`` of a
        ``LlamaForCausalLM``): calling it gives ``last_hidden_state`` through this module's programs
        (see :class:`surface.AdaptedBackbone`); other attributes are the source backbone's."""
        return surface.AdaptedBackbone(self)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """transformers' ``num_parameters`` over this module: base and adapter parameters."""
        return surface.num_parameters(self, only_trainable, exclude_embeddings)

    def save_pretrained(self, save_directory: PathLike, selected_adapters: Union[Sequence[str], None] = None,
                        **kwargs: Any) -> list[str]:
        """The adapter files, as ``PeftModel.save_pretrained`` writes them (see :func:`surface.save_pretrained`)."""
        return surface.save_pretrained(self, save_directory, selected_adapters, **kwargs)

    def unload(self) -> nn.Module:
        """The source model without adapters (PEFT's ``unload``): its weights as they are now, so
        merged adapters stay in them. This module keeps working over the same shared weights."""
        return self.get_base_model()

    def __reduce__(self) -> tuple:
        """Pickle as the source model plus the adapter state; loading re-traces (:func:`surface.rebuild`)."""
        return surface.reduce(self)

    def __deepcopy__(self, memo: dict) -> "AdaptedGraphModule":
        """An independent copy: its own source model, parameters and adapters (re-traced)."""
        fn, args = surface.reduce(self)
        return fn(*copy.deepcopy(args, memo))

    @property
    def _records(self) -> dict:
        return self._programs.records

    def _transaction(self, tensors: Iterable[torch.Tensor] = (),
                     untouched: Collection[str] = ()) -> contextlib.AbstractContextManager:
        return transaction(self, tensors=tensors, untouched=untouched)

    # ------------------------------------------------------------------ calling
    def recompile(self):
        code = super().recompile()
        # GraphModule installs its own __call__ wrapper on each recompile; route first instead,
        # so that torch.compile traces the program graphs, never the routing Python.
        type(self).__call__ = AdaptedGraphModule.__call__
        _fresh_forward(type(self))
        facts = self.__dict__.get("_facts")  # Trainer reads the source model's signature (labels, attention_mask)
        show_source_signature(type(self), facts.source if facts is not None else None)
        return code

    @torch.compiler.disable(recursive=False)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call as the original model; ``adapter_names=[...]`` (one per row) mixes adapters in a batch.

        The routing runs as plain Python even under ``torch.compile`` (this frame and ``_route``
        are skipped by dynamo): only the program graphs it calls are compiled, so switching
        adapters or changing row names never recompiles. Forward pre-hooks registered on this
        module run first, so the program is chosen for the arguments they give.

        A ``forward`` assigned on the instance (accelerate's autocast wrapper, TRL's fused LM head,
        which call the ``forward`` they replaced) runs as ``nn.Module.__call__`` runs it, inside
        this module's hooks; the class ``forward`` it calls routes as this method does.
        """
        if self._forward_hooks or self._forward_pre_hooks or "forward" in self.__dict__:
            return self._hooked_call(args, kwargs)
        # the common call, in this one frame: under ``torch.compile(gm)`` dynamo checks each frame of a
        # ``recursive=False`` function on every call (a bytecode walk, ~50 us on a 2-core CPU for
        # ``_serve``), so the routing and the error handling live in fully disabled helpers
        saved, target, args, kwargs = self._enter(args, kwargs, under_outer_compile())
        try:
            out = super().__call__(*args, **kwargs) if target is self else target(*args, **kwargs)
        except BaseException as exc:
            self._call_failed(exc, saved, args, kwargs)  # raises the error that says what went wrong
            raise
        return _finish_call(saved, kwargs, out)

    @torch.compiler.disable
    def _enter(self, args: tuple, kwargs: dict, compiling: bool) -> tuple[list, Any, tuple, dict]:
        """The routed call (:meth:`_route`) and what to put back if it fails (:func:`static_restore`)."""
        saved = static_snapshot((*args, *kwargs.values()))  # a failed guard too leaves it unallocated
        try:
            return (saved, *self._route(args, kwargs, compiling))
        except BaseException:
            static_restore(saved)
            raise

    @torch.compiler.disable
    def _call_failed(self, exc: BaseException, saved: list, args: tuple, kwargs: dict, signature: bool = True) -> None:
        """Put back what the failed call allocated, raising the error that names the cause where one
        applies (the caller re-raises ``exc`` otherwise). ``signature``: a ``TypeError`` is checked
        against the traced signature (not for the class ``forward``'s routed call)."""
        try:
            if isinstance(exc, TypeError):  # say what was traced when the arguments do not fit
                if signature and self._calls.frontend == "fx":
                    check_fx_call(self.forward, args, kwargs, exc)
            elif isinstance(exc, AssertionError):  # an exported program's shape guard, checked before it computes
                raise_for_guard(exc, kwargs)
            elif isinstance(exc, RuntimeError):  # a size relation it checks while it runs
                raise_for_runtime_assert(exc, kwargs)
        finally:
            static_restore(saved)

    @torch.compiler.disable(recursive=False)
    def _hooked_call(self, args: tuple, kwargs: dict) -> Any:
        """:meth:`__call__` with this module's hooks or an assigned ``forward``."""
        if assigned_forward(self) is not None:
            with _flag(self, True):
                return super().__call__(*args, **kwargs)
        if self._forward_pre_hooks:
            token: list = []
            try:
                args, kwargs = apply_pre_hooks(self, args, kwargs, token)
                return self._serve(args, kwargs)
            finally:
                restore_pre_hooks(self, token)
        return self._serve(args, kwargs)

    @torch.compiler.disable(recursive=False)
    def _serve(self, args: tuple, kwargs: dict) -> Any:
        """Route the call (:meth:`_route`) and run the program, this module's hooks around it."""
        saved, target, args, kwargs = self._enter(args, kwargs, under_outer_compile())
        try:
            if target is self:
                out = super().__call__(*args, **kwargs)
            elif has_call_hooks(self):  # this module's hooks run around whichever program serves the call
                token: list = []
                try:
                    lend_forward(self, target, token)
                    out = super().__call__(*args, **kwargs)
                finally:
                    return_forward(self, token)
            else:
                out = target(*args, **kwargs)
        except BaseException as exc:
            self._call_failed(exc, saved, args, kwargs)
            raise
        return _finish_call(saved, kwargs, out)

    @torch.compiler.disable
    def _run(self, args: tuple, kwargs: dict) -> Any:
        """Route and run the program, without this module's hooks or an assigned ``forward``
        (``gm.base_model(...)``): the class ``forward``'s routed branch, in a disabled frame."""
        with _flag(self, True):
            return type(self).forward(self, *args, **kwargs)

    @torch.compiler.disable
    def _route(self, args: tuple, kwargs: dict, compiling: bool = False) -> tuple[Any, tuple, dict]:
        """The program module for this call and its arguments (tracing it on first use);
        ``compiling``: a ``torch.compile``'d caller runs this call (see :meth:`_mode`)."""
        names = kwargs.pop("adapter_names", None)
        if self._calls.frontend == "export":
            kwargs, args = self._calls.bind(args, kwargs), ()
            kwargs = sliding_count_input(kwargs)  # a sliding-window cache past its window: its count too
            # its tensors exist before the key is made (the callers roll this back if the call fails)
            ready_static_cache(self._facts.source, kwargs)
        if names is not None:  # disabled: every row reads the base slot (same program, as PEFT)
            write_row_index(self._adapters, names, args, kwargs, self.training)
        key = self._calls.key(kwargs, self._mode(names, compiling))
        module = self._programs.module_for(key, kwargs)
        return module, args, (self._calls.graph_inputs(kwargs) if self._calls.frontend == "export" else kwargs)

    def _mode(self, names: Any = None, compiling: bool = False) -> str:
        """Which program mode serves this call: a mixed batch (``adapter_names``); with grad
        disabled and no adapter contributing (disabled, merged), the base graph, so that a merged
        or disabled module costs what the base model costs; the serving form (eval mode under
        ``no_grad`` / ``inference_mode``: LoRA from the banks, the other methods' branches and
        ``modules_to_save`` reading detached aliases, so no ``requires_grad`` flip of
        ``set_adapter`` recompiles); else the switch form.

        The base graph is for eager calls only: under a compiled caller (``compiling``, or generate's
        compiled decode) it would be one more graph to compile, and switching must never compile."""
        if names is not None:
            return MIXED
        if torch.is_grad_enabled():
            return SWITCH
        if not self._adapters.contributes and not compiling and not self._programs.compiling:
            return BASE
        if not self.training:
            return BANK
        return SWITCH

    @property
    def graph(self) -> fx.Graph:
        """The rewritten graph (re-spliced first if an add or delete left it out of date)."""
        programs = self.__dict__.get("_programs")
        if programs is not None:
            programs.refresh(programs.primary)
        return current_graph(self)

    @graph.setter
    def graph(self, g: fx.Graph) -> None:
        fx.GraphModule.graph.fset(self, g)

    @property
    def code(self) -> str:
        self.graph  # noqa: B018 (refreshes a stale graph)
        return fx.GraphModule.code.fget(self)

    def train(self, mode: bool = True) -> "AdaptedGraphModule":
        super().train(mode)
        adapters = self.__dict__.get("_adapters")
        if adapters is not None:  # an eval loop after training steps serves the weights trained
            adapters.store.banks.forget_gathered()
        programs = self.__dict__.get("_programs")
        for program in programs if programs is not None else ():
            if program.module is not None and program.module is not self:
                program.module.train(mode)  # its local modules (dropout of a later trace) follow too
                refresh_detached(program.module)  # a parameter replaced (param.data =) is read anew
        return self

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half(), to_empty()
        programs = self.__dict__.get("_programs")
        before = dict((*self.named_parameters(), *self.named_buffers())) if programs is not None else {}
        result = super()._apply(fn, recurse)
        if programs is not None:
            after = dict((*self.named_parameters(), *self.named_buffers()))
            programs.after_move(fn, {id(before[n]): t for n, t in after.items() if n in before and before[n] is not t})
            # adapter parameters are views of their bank slots again; new buffers (to_empty: garbage)
            # get the switch state rewritten and the free slots zeroed
            self._adapters.restore_banks()
        return result

    #: transformers' Trainer passes loss keywords (``num_items_in_batch``) to a forward with ``**kwargs``;
    #: the traced graphs take none, so Trainer averages each batch's loss itself (as without them).
    accepts_loss_kwargs = False

    # ------------------------------------------------------------------ gradient checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Union[Mapping[str, Any], None] = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """Checkpoint each decoder block in training mode (transformers' arguments).

        Every program but the mixed-batch ones is re-spliced with the block regions of the layer
        stack wrapped in ``torch.utils.checkpoint.checkpoint(..., **gradient_checkpointing_kwargs)``
        (default ``use_reentrant=False``; see :mod:`graphlora.passes.checkpoint`). In eval mode, or
        under ``no_grad``, nothing is checkpointed. Enabled on the source model before inject, it
        is on already.

        Raises:
            ConfigError: bad arguments, ``offload=True``, or a model without a layer stack.
        """
        settings = settings_for(self._facts.source, gradient_checkpointing_kwargs, every_n_layers, offload)
        with self._transaction():
            self._programs.set_checkpointing(settings)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Union[Mapping[str, Any], None] = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers' newer name of :meth:`gradient_checkpointing_enable`."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        """Stop checkpointing: every program is re-spliced without regions."""
        with self._transaction():
            self._programs.set_checkpointing(None)

    def activation_checkpointing_disable(self) -> None:
        """transformers' newer name of :meth:`gradient_checkpointing_disable`."""
        self.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the training programs checkpoint their blocks."""
        return self._programs.checkpointing is not None

    @property
    def is_activation_checkpointing(self) -> bool:
        """transformers' newer name of :attr:`is_gradient_checkpointing`."""
        return self.is_gradient_checkpointing

    def enable_input_require_grads(self) -> None:
        """Nothing to do (kept for callers such as PEFT and TRL): each checkpoint region receives
        the adapter parameters as inputs, so even ``use_reentrant=True`` needs no input that
        requires grad."""

    def disable_input_require_grads(self) -> None:
        """Nothing to undo (see :meth:`enable_input_require_grads`)."""

    # ------------------------------------------------------------------ planning
    def _plan(self, config: AnyConfig) -> dict[str, Any]:
        return plan_adapter(config, self._facts, self._records)

    def _base_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter outside the adapter store (all adapter tensors live under ``graphlora``):
        the store's subtree, which grows with every adapter, is not walked."""
        seen: set[int] = set()
        children = [child for name, child in self._modules.items() if name != STORE and child is not None]
        for param in (*self._parameters.values(), *(p for child in children for p in child.parameters())):
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                yield param

    # ------------------------------------------------------------------ adding and deleting
    def add_adapter(self, adapter_name: str, config: Union[AnyConfig, None] = None, *,
                    autocast_adapter_dtype: Union[bool, None] = None, peft_config: Any = None,
                    low_cpu_mem_usage: bool = False) -> None:
        """Add an adapter (a :class:`LoraConfig`, DoRA included, or an :class:`IA3Config`) and
        make it the active one. Adapters of different methods can be loaded side by side.

        Args:
            config: graphlora's config or PEFT's (``peft_config=``, PEFT's keyword, is the same).
            autocast_adapter_dtype: PEFT's switch: over an fp16 / bf16 base, keep the adapter's
                parameters in float32 (LoRA and IA3; DoRA, LoHa and LoKr take the base dtype).
                ``None``: the module's setting (``inject``'s, default True, as PEFT's).
            low_cpu_mem_usage: PEFT's; accepted and ignored (adapters are made on the weights' device).

        Raises:
            AdapterExistsError: the name is taken.
            NoTargetError: the config selects no site.
            ConfigError: the name or config is unusable.
        On any error the module and its adapters are left as they were.
        """
        config = _one_of("add_adapter", config=config, peft_config=peft_config)  # PEFT's keyword name too
        config = LoraConfig() if config is None else as_config(config)  # a PEFT config object reads as its file
        rule = rule_for(config)
        state = self._adapters
        config = saved_modules.inherit_task_modules(config, state)  # a SEQ_CLS model's head, as PEFT
        check_new_name(adapter_name, state.configs)
        plan = self._plan(config)
        check_placement(self, self._records, state.store, plan, f"add adapter {adapter_name!r}")
        extras = saved_modules.plan_extras(config, self._facts, plan, state, self._programs.primary.base.graph)
        if autocast_adapter_dtype is None:
            autocast_adapter_dtype = state.autocast_adapter_dtype
        upcast = bool(autocast_adapter_dtype) and rule.autocast(config)
        branches = {}
        for name, site_plan in plan.items():
            site = self._records[name]
            branch = rule.make_branch(config, site, site_plan, getattr_path(self, site.weight))
            branch.train(self.training)
            if upcast:
                _upcast(branch)
            branches[name] = branch
        with self._transaction(untouched=tuple(state.configs)):  # the loaded adapters' branches stay as they are
            state.add(adapter_name, config, plan, branches)
            saved_modules.install_extras(state, adapter_name, extras, self._facts.source)
            # into a free bank slot (plain LoRA): a tensor write; set_active syncs
            state.place_banks(sync=False, added=adapter_name)
            # each program re-splices on its next call if its recipe changed: the serving programs,
            # which read banks, do not when the adapter went into banks they already have
            self._programs.invalidate()
            for param in self._base_parameters():
                if param.requires_grad:
                    param.requires_grad_(False)
            state.set_active({adapter_name: 1.0})

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter, its parameters and its branches from every graph.

        If it was active, the remaining active adapters stay active; if none remain, the first
        remaining adapter becomes active (PEFT's behaviour).

        Raises:
            AdapterNotFoundError: unknown name.
            AdapterStateError: it is the only adapter (use ``disable_adapters()`` instead), or it
                is merged into the base weights (unmerge it first).
        """
        state = self._adapters
        check_known([adapter_name], state.configs)
        if adapter_name in state.merge.merged:
            raise AdapterStateError(
                f"{adapter_name!r} is merged into the base weights; deleting it would leave its "
                f"contribution there with nothing to undo it. Call unmerge_adapter([{adapter_name!r}]) "
                "first (or merge_and_unload() to keep it in the weights for good)."
            )
        if len(state.configs) == 1:
            raise AdapterStateError(
                f"{adapter_name!r} is the only adapter; deleting it would leave no adapter. "
                "Use disable_adapters() to run the base model, or add another adapter first."
            )
        was_active = dict(state.weights)
        with self._transaction():
            state.remove(adapter_name)
            state.place_banks()  # frees its slot
            self._programs.invalidate()
            remaining = {a: w for a, w in was_active.items() if a != adapter_name} or {next(iter(state.configs)): 1.0}
            state.set_active(remaining)

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
        density: Union[float, None] = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add ``adapter_name`` made from ``adapters`` with ``weights`` (PEFT's ``add_weighted_adapter``).

        LoRA: ``combination_type`` ``"linear"`` (same ranks; ``A = sum sign(w s) sqrt|w s| A_i``,
        ``B = sum sqrt|w s| B_i``), ``"cat"`` (exact: ``B A = sum w_i s_i B_i A_i`` at rank
        ``sum r_i``) or ``"svd"`` (truncated SVD of that sum at ``svd_rank``, default the largest
        rank). IA3: ``l = sum w_i l_i`` (``"linear"``). The new adapter has scaling 1
        (``lora_alpha = r``), is frozen and is not activated, as in PEFT. See
        :mod:`graphlora.methods.weighted`. ``density`` and ``majority_sign_method`` are PEFT's for
        its ties / dare combinations, which graphlora does not implement: accepted so that such a
        call gets the ``ConfigError`` that says so.

        Raises:
            AdapterNotFoundError: an unknown adapter. AdapterExistsError: the name is taken.
            ConfigError: mixed methods, DoRA adapters, unequal ranks for ``"linear"``, an unknown
                ``combination_type``, weights that are not one finite number per adapter, or an
                adapter with ``trainable_token_indices``.
        On any error nothing is added.
        """
        from .methods.weighted import COMBINATIONS

        state = self._adapters
        adapters = _names(adapters)
        if not adapters:
            raise ConfigError("adapters is empty; name at least one adapter to combine.")
        check_known(adapters, state.configs)
        weights = list(weights)
        if len(weights) != len(adapters) or not all(_finite(w) for w in weights):
            raise ConfigError(f"weights={weights!r} must be one finite number per adapter ({len(adapters)} adapters).")
        if combination_type not in COMBINATIONS:
            raise ConfigError(
                f"combination_type={combination_type!r} is not supported; use one of {list(COMBINATIONS)} "
                "(PEFT's ties / dare variants are not implemented)."
            )
        check_new_name(adapter_name, state.configs)
        rules = {state.rule(a).name for a in adapters}
        if len(rules) > 1:
            raise ConfigError(f"adapters {adapters} mix methods ({sorted(rules)}); combine adapters of one method.")
        rows = [a for a in adapters if getattr(state.configs[a], "trainable_token_indices", None)]
        if rows:  # graphlora.trainable_tokens: a combination would start from the original rows
            raise ConfigError(f"adapter {rows[0]!r} trains embedding rows (trainable_token_indices), which "
                              "add_weighted_adapter does not combine; combine adapters without them.")
        config, fill = state.rule(adapters[0]).combine(
            state, self._facts, self._records, adapters, [float(w) for w in weights], combination_type,
            svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver)
        previous = dict(state.weights)
        with self._transaction():
            self.add_adapter(adapter_name, dataclasses.replace(config, inference_mode=True))
            with torch.no_grad():
                for site in state.plans[adapter_name]:
                    fill(site, state.branch(site, adapter_name))
            if previous:
                state.set_active(previous)

    # ------------------------------------------------------------------ switching
    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Activate one adapter, or several (their contributions add), each with weight 1.

        As PEFT's ``set_adapter``: the adapters activated become trainable (an adapter loaded
        frozen too), unless ``inference_mode=True``, which freezes them.
        """
        names = _names(adapter_name)
        if not names:
            raise ConfigError("set_adapter needs at least one adapter name; use disable_adapters() for none.")
        check_known(names, self._adapters.configs)
        saved_modules.check_active(self._adapters, names)
        self._unmerge_before("set_adapter")
        configs = self._adapters.configs
        for name in names:  # PEFT's trainability: the config's inference_mode says whether it trains
            if configs[name].inference_mode != bool(inference_mode):
                configs[name] = dataclasses.replace(configs[name], inference_mode=bool(inference_mode))
        # PEFT's set_adapter resets every adapter's requires_grad (set_requires_grad's choices too)
        self._adapters.set_active({n: 1.0 for n in names}, reset_grad=True)

    def set_adapter_weights(self, weights: Mapping[str, float]) -> None:
        """Activate the given adapters with per-adapter weights: ``y = Wx + sum_a w_a s_a B_a A_a x``."""
        if not weights:
            raise ConfigError("set_adapter_weights needs at least one {name: weight} entry.")
        check_known(list(weights), self._adapters.configs)
        for name, w in weights.items():
            if not _finite(w):
                raise ConfigError(f"weight {w!r} for adapter {name!r} must be a finite number.")
        saved_modules.check_active(self._adapters, list(weights))
        self._unmerge_before("set_adapter_weights")
        self._adapters.set_active({n: float(w) for n, w in weights.items()}, reset_grad=True)  # as set_adapter

    def _unmerge_before(self, action: str) -> None:
        """PEFT's rule: switching adapters while some are merged unmerges them first (with a warning)."""
        if self.merged:
            warnings.warn(f"{action} while adapters {self.merged_adapters} are merged: unmerging them first.",
                          stacklevel=3)
            self.unmerge_adapter()

    def disable_adapters(self) -> None:
        """Run the base model: every gate is 0; the active set is kept for ``enable_adapters``.

        Merged adapters are unmerged first (with a warning), as PEFT does.
        """
        self._unmerge_before("disable_adapters")
        self._adapters.set_enabled(False)

    def enable_adapters(self) -> None:
        """Undo ``disable_adapters``."""
        self._adapters.set_enabled(True)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: the base model inside, the previous state after."""
        previous = self._adapters.enabled
        self.disable_adapters()
        try:
            yield
        finally:
            self._adapters.set_enabled(previous)

    def requires_grad_(self, requires_grad: bool = True) -> "AdaptedGraphModule":
        """As ``nn.Module.requires_grad_``, and it decides whether active adapters train.

        By default the active adapters' parameters require grad and the others do not
        (PEFT's behaviour), so switching flips ``requires_grad`` and a compiled *training* graph
        recompiles. For serving, ``gm.requires_grad_(False)`` freezes every adapter: switching
        then changes gate values only, and compiled graphs never recompile.
        ``gm.requires_grad_(True)`` makes the base trainable too, as it would on any module.
        """
        super().requires_grad_(requires_grad)
        self._adapters.trainable = bool(requires_grad)
        self._adapters.requires_grad.clear()  # set_requires_grad's choices give way
        self._adapters.sync()
        return self

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """PEFT 0.21's ``set_requires_grad``: the parameters of ``adapter_names`` (their branches, saved
        module copies and trainable rows) require grad, or not, whether they are active or not.

        The choice is kept in the adapter state and wins over the usual rule (active adapters train)
        until the next ``set_adapter``, ``set_adapter_weights``, ``enable_adapter_layers`` or
        ``requires_grad_``, which reset every adapter's, as PEFT's ``set_adapter`` does. Adding or
        loading another adapter keeps it. Base parameters (``bias=`` biases included) are not touched.

        Raises:
            AdapterNotFoundError: an unknown name (PEFT ignores it); nothing changes.
            ConfigError: ``requires_grad`` is not a bool, or a name is not a string.
        """
        names = _names(adapter_names)
        if not all(isinstance(n, str) for n in names):
            raise ConfigError(f"set_requires_grad(adapter_names={adapter_names!r}) takes an adapter name or a list "
                              f"of names; loaded adapters: {list(self._adapters.configs)}.")
        if not isinstance(requires_grad, bool):
            raise ConfigError(f"set_requires_grad(requires_grad={requires_grad!r}) takes True or False.")
        check_known(names, self._adapters.configs)
        self._adapters.requires_grad.update(dict.fromkeys(names, requires_grad))
        self._adapters.sync()

    def disable_adapter_layers(self) -> None:
        """PEFT's tuner-model ``disable_adapter_layers``: :meth:`disable_adapters` (the base model; gates
        only, no graph change), and, as PEFT's, every adapter's parameters stop requiring grad (until
        :meth:`enable_adapter_layers`, ``set_adapter`` or ``set_requires_grad``). Warns, as PEFT does,
        when an active adapter trains biases (``bias != "none"``): the model's own biases stay trained.
        """
        state = self._adapters
        for name in state.weights:
            bias = getattr(state.configs[name], "bias", "none")
            if bias != "none":
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not "
                              "produce the same output as the base model would without adaption.", stacklevel=2)
        self._unmerge_before("disable_adapter_layers")
        state.requires_grad = dict.fromkeys(state.configs, False)
        state.set_enabled(False)

    def enable_adapter_layers(self) -> None:
        """PEFT's tuner-model ``enable_adapter_layers``: :meth:`enable_adapters`, and, as PEFT's (which calls
        ``set_adapter(active_adapters)``), the active adapters become trainable, an adapter loaded or
        set frozen included, the others frozen. The weights of the active set are kept."""
        state = self._adapters
        configs = state.configs
        for name in state.weights:
            if configs[name].inference_mode:
                configs[name] = dataclasses.replace(configs[name], inference_mode=False)
        state.requires_grad.clear()
        state.set_enabled(True)

    # ------------------------------------------------------------------ merge
    @property
    def merged_adapters(self) -> list[str]:
        """Names of the adapters currently folded into the base weights, in merge order."""
        return list(self._adapters.merge.merged)

    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into the base weights."""
        return bool(self._adapters.merge.merged)

    def merge_adapter(self, adapter_names: Union[Iterable[str], None] = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights: ``W += w_a s_a B_a A_a`` (see :mod:`graphlora.merge`).

        Args:
            adapter_names: adapters to merge; default: the active ones, each with its current
                weight (an adapter not in the active set merges with weight 1).
            safe_merge: compute every merged weight first and refuse (changing nothing) if any
                value is not finite.

        Raises:
            MergeError: nothing to merge, an adapter already merged, a tied or non-float weight,
                or (``safe_merge``) a non-finite result. The module is then unchanged.
            AdapterNotFoundError: an unknown name.
        """
        state = self._adapters
        if adapter_names is None:
            names = self.active_adapters
            if not names:
                raise MergeError(
                    "no active adapter to merge (adapters are disabled); pass adapter_names=[...] or "
                    "enable_adapters() first."
                )
        else:
            names = _names(adapter_names)
            if not names:
                raise MergeError("adapter_names is empty; name at least one adapter to merge.")
        check_known(names, state.configs)
        again = [n for n in names if n in state.merge.merged]
        if again:
            raise MergeError(
                f"adapter(s) {again} are already merged (merged: {self.merged_adapters}); "
                "unmerge_adapter() first to merge them again."
            )
        merging.check_scaling_merge(state, names)
        weights = {n: float(state.weights.get(n, 1.0)) for n in names}
        new = merging.compute_merge(state, self._records, self, self._facts.aliases, weights, safe_merge)
        with self._transaction(merging.rewritten(state, self, list(new))):
            merging.write_merge(state, self, new, weights)

    def unmerge_adapter(self, adapter_names: Union[Iterable[str], None] = None) -> None:
        """Restore the base weights saved at the first merge (exactly), then re-merge the adapters
        not named in ``adapter_names`` (default: unmerge all). Gates follow the switch state again.
        """
        state = self._adapters
        if not state.merge.merged:
            warnings.warn("no adapter is merged; unmerge_adapter() has nothing to do.", stacklevel=2)
            return
        names = list(state.merge.merged) if adapter_names is None else _names(adapter_names)
        stray = [n for n in names if n not in state.merge.merged]
        if stray:
            raise MergeError(f"adapter(s) {stray} are not merged (merged: {self.merged_adapters}).")
        with self._transaction(merging.rewritten(state, self, list(state.merge.originals))):
            merging.unmerge(state, self._records, self, self._facts.aliases, names)

    def merge_and_unload(
        self, adapter_names: Union[Iterable[str], None] = None, safe_merge: bool = False
    ) -> nn.Module:
        """Merge (the active adapters, by default) and return the model on the merged weights.

        For a transformers model the result is the source model itself (its own class, so
        ``generate``, ``save_pretrained`` and ``from_pretrained`` of what it saves work), as PEFT's
        ``merge_and_unload`` returns the base model. For any other model it is a plain
        ``torch.fx.GraphModule``: the graph as traced (``traced_graph``), no adapter nodes. Either way
        the result shares the (now merged) base parameters, so its outputs equal this module's
        before the merge.

        This module afterwards: it stays in the merged state over the same shared weights (its
        merged adapters are listed in ``merged_adapters``; it still runs and gives the merged
        outputs). ``unmerge_adapter()`` restores the exact original weights, and so changes the
        returned model back too: to keep a merged model and go on with adapters, save (or
        deep-copy) the returned model first.
        """
        merged = self._adapters.merge.merged
        if adapter_names is None:
            pending = [n for n in self.active_adapters if n not in merged]
            if pending or not self.merged:
                self.merge_adapter(pending or None, safe_merge=safe_merge)
        else:
            pending = [n for n in _names(adapter_names) if n not in merged]
            if pending:
                self.merge_adapter(pending, safe_merge=safe_merge)
        saved_modules.fold_active_copies(self)  # modules_to_save: the active copy replaces the module
        source = surface.merged_source(self)
        if source is not None:
            return source
        plain = fx.GraphModule(self, self.traced_graph, class_name=self._get_name())
        plain.train(self.training)
        return plain

    # ------------------------------------------------------------------ PEFT files
    def get_adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's keys (no adapter name in them).

        ``{"base_model.model.<site>.lora_A.weight": A [r, d_in], "...lora_B.weight": B [d_out, r]}``
        per adapted site, in graph order (plus ``...lora_magnitude_vector`` [d_out] for DoRA; IA3:
        ``...ia3_l`` [d_out, 1] or [1, d_in]). The tensors are detached and share storage with the
        parameters: clone them to keep a snapshot.

        Raises:
            AdapterNotFoundError: unknown adapter.
        """
        check_known([adapter_name], self._adapters.configs)
        return peft_io.adapter_state_dict(self._adapters, adapter_name)

    def save_adapter(self, save_directory: PathLike,
                     adapter_name: Union[str, Sequence[str], None] = "default") -> list[str]:
        """Write adapters in PEFT's layout; returns the directories written.

        ``adapter_name`` is one name, a list of names, or ``None`` for every adapter. As with
        PEFT's ``save_pretrained``, ``"default"`` goes into ``save_directory`` and any other
        adapter into ``save_directory/<name>/``. Each directory gets ``adapter_config.json``
        (sorted keys, ``inference_mode: true``) and ``adapter_model.safetensors`` (metadata
        ``{"format": "pt"}``).

        Every file is first written under a temporary name in its directory, then all of them
        are renamed into place. An error (or a crash) before the renames leaves the previous
        files untouched; each rename is atomic, so no file is ever half-written.

        Raises:
            AdapterNotFoundError: an unknown adapter name.
        """
        state = self._adapters
        names = list(state.configs) if adapter_name is None else _names(adapter_name)
        check_known(names, state.configs)
        return peft_io.save_adapters(state, self._facts, self._records, save_directory, names)

    def load_adapter(self, path: Union[PathLike, None] = None, adapter_name: str = "default", *,
                     is_trainable: bool = False, activate: Union[bool, None] = None,
                     autocast_adapter_dtype: Union[bool, None] = None, model_id: Union[PathLike, None] = None
                     ) -> None:
        """Load a PEFT adapter directory (LoRA, DoRA, IA3) under ``adapter_name``.

        Args:
            path: a directory written by PEFT's ``save_pretrained`` or by :meth:`save_adapter`.
                For a name other than ``"default"``, ``path/<adapter_name>/`` is read when it holds
                an adapter (where those functions put it), else ``path`` itself.
            adapter_name: the name to load under. If it exists and the file's tensors have the
                same keys and shapes, the weights are copied in place (hotswap: no graph
                rebuild; the config's alpha / scaling / dropout are updated too).
            is_trainable: as in PEFT, ``False`` loads the adapter frozen (``inference_mode``).
            autocast_adapter_dtype: as in :meth:`add_adapter` (for a new adapter).
            activate: make it the active adapter. ``None``: only if no adapter was active
                (PEFT's ``load_adapter`` does not switch adapters).

        Raises:
            AdapterFileError: missing files, unknown ``peft_type``, unsupported PEFT features,
                missing/unexpected tensor keys, or shapes that do not fit (the message names the
                key and both shapes).
            AdapterStateError: hotswapping into an adapter that is merged.
        On any error the module and every adapter are exactly as before.
        """
        path = _one_of("load_adapter", path=path, model_id=model_id)  # PEFT's keyword name too
        if path is None:
            raise ConfigError("load_adapter needs the adapter's directory (path=, or PEFT's model_id=).")
        directory = peft_io.resolve_dir(path, adapter_name)
        config, tensors = peft_io.read_adapter_dir(directory)
        self.load_adapter_tensors(config, tensors, adapter_name, is_trainable=is_trainable, activate=activate,
                                  autocast_adapter_dtype=autocast_adapter_dtype, source=directory)

    def load_adapter_tensors(self, config: AnyConfig, tensors: Mapping[str, torch.Tensor], adapter_name: str = "default",
                             *, is_trainable: bool = False, activate: Union[bool, None] = None,
                             autocast_adapter_dtype: Union[bool, None] = None, source: str = "<tensors>") -> None:
        """:meth:`load_adapter` from memory: ``config`` and ``tensors`` under PEFT's keys, as
        :func:`graphlora.peft_io.read_adapter_dir` returns them (``source`` names them in errors).
        The tensors are copied with ``non_blocking=True``, so pinned CPU tensors overlap the copy
        to the device. Same arguments, errors and guarantees as :meth:`load_adapter`.
        """
        state = self._adapters
        config, plan, extras, tensors = self._check_load(source, adapter_name, config, tensors, is_trainable)
        if adapter_name in state.configs:
            self._hotswap(source, adapter_name, config, plan, tensors)
            return
        previous = dict(state.weights)
        with self._transaction(saved_modules.base_tensors(extras, self._facts.source)):  # bias=: base biases
            self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
            with torch.no_grad():
                for key, param in peft_io.adapter_state_dict(state, adapter_name).items():
                    param.copy_(tensors[key], non_blocking=True)
            if previous and (activate is False or activate is None):
                state.set_active(previous)
                if is_trainable:  # PEFT's load_adapter(is_trainable=True): it trains though inactive
                    state.requires_grad[adapter_name] = True
                    state.sync()

    def _check_load(self, source: str, adapter_name: str, config: AnyConfig, tensors: Mapping[str, torch.Tensor],
                    is_trainable: bool = False) -> tuple[AnyConfig, dict[str, Any], Any, dict[str, torch.Tensor]]:
        """Everything loading checks before it changes anything: the name (when new), the config's
        sites and extras (``modules_to_save``, ``bias``), the tensors' keys and shapes, placement.

        Returns:
            ``(config with inference_mode = not is_trainable, plan, extras, tensors with canonical bias keys)``.
        Raises:
            AdapterFileError, PlacementError, ConfigError: as :meth:`load_adapter`.
        """
        state = self._adapters
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        if adapter_name not in state.configs:
            check_new_name(adapter_name, state.configs)
        try:
            plan = self._plan(config)
            extras = saved_modules.plan_extras(config, self._facts, plan, state,  # modules_to_save, bias
                                               self._programs.primary.base.graph)
        except ConfigError as exc:  # no site, a non-linear target, layers out of range
            raise peft_io.AdapterFileError(f"{source!r}: {exc}") from exc
        tensors = saved_modules.canonical_tensors(extras, tensors)
        peft_io.check_tensors(source, tensors, {**peft_io.expected_shapes(plan, config, self._records),
                                                **saved_modules.extra_shapes(extras, self._facts.source)})
        check_placement(self, self._records, state.store, plan,
                        f"load adapter {adapter_name!r} from {source!r}", loading=True)
        return config, plan, extras, tensors

    def _hotswap(self, directory: str, adapter_name: str, config: AnyConfig,
                 plan: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` into the existing adapter in place; its method updates the constants."""
        state = self._adapters
        if adapter_name in state.merge.merged:
            raise AdapterStateError(
                f"adapter {adapter_name!r} is merged into the base weights; unmerge_adapter() before "
                "loading new weights into it."
            )
        peft_io.check_hotswap(state, directory, adapter_name, config, plan, tensors, self._records)
        current = peft_io.adapter_state_dict(state, adapter_name)
        with self._transaction(current.values()):
            if peft_io.hotswap(state, adapter_name, config, plan, tensors):
                self._programs.invalidate()
            state.place_banks()  # a new alpha: the bank's scale

    # ------------------------------------------------------------------ introspection
    @property
    def active_adapters(self) -> list[str]:
        """Names of the active adapters (empty while disabled)."""
        return self._adapters.active

    @property
    def active_adapter(self) -> Union[str, None]:
        """The first active adapter (PEFT's singular form)."""
        active = self.active_adapters
        return active[0] if active else None

    @property
    def adapters(self) -> dict[str, AnyConfig]:
        """Adapter name -> config, in the order they were added."""
        return dict(self._adapters.configs)

    @property
    def peft_config(self) -> dict[str, AnyConfig]:
        """Alias of :attr:`adapters` (PEFT's name)."""
        return self.adapters

    def adapter_slots(self) -> dict[str, int]:
        """Adapter name -> its bank slot, used by serving and mixed batches (``"__base__"``: the
        zero slot, no adapter)."""
        return self._adapters.slots()

    def configure_banks(self, max_loras: Union[int, None] = None, max_lora_rank: Union[int, None] = None,
                        max_active: Union[int, None] = None, grow: Union[bool, None] = None,
                        lora_dtype: Union[str, torch.dtype, None] = None) -> None:
        """Reserve adapter-bank room (vLLM's names), so later adds never resize a bank.

        Plain LoRA adapters are served from per-site banks (:mod:`graphlora.banks`): adding one into
        a free slot writes tensors only, and compiled or CUDA-graph-captured serving graphs stay
        valid. A bank that is full grows (a compiled graph recompiles once, with a warning), or with
        ``grow=False`` the add fails with an error naming this call.

        Args:
            max_loras: slots per bank (banks never shrink; 4 until reserved).
            max_lora_rank: the banks' rank (lower ranks are zero-padded).
            max_active: how many banked adapters may be active at once without a recompile (the
                serving update costs ``max_active * max_lora_rank`` columns; default 2, growing).
            grow: whether a full bank grows (default True).
            lora_dtype: the dtype the serving calls (eval mode, no grad) compute the adapter update
                in: ``"adapter"`` (the default) the adapters' own, which gives PEFT's numbers;
                ``"auto"`` the base model's (vLLM's default), or a floating ``torch.dtype``. Float32
                adapters over a bf16 base then cost two GEMMs a site instead of two GEMMs and three
                casts, and the update is rounded to the base dtype's precision (about 3 significant
                digits in bf16). Training and mixed batches keep the adapters' dtype.

        Raises:
            ConfigError: a value that is not a positive integer, or a ``lora_dtype`` that is not one of
                those.
        """
        for name, value in (("max_loras", max_loras), ("max_lora_rank", max_lora_rank), ("max_active", max_active)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} must be a positive integer (or None to keep it).")
        layout = self._adapters.banks
        hat_dtype = layout.lora_dtype if lora_dtype is None else self._serving_dtype(lora_dtype)
        capacity, rank = layout.reserved
        new_grow = layout.grow if grow is None else bool(grow)
        reserved = (max_loras or capacity, max_lora_rank or rank)
        with self._transaction():
            layout.reserved, layout.grow, layout.lora_dtype = reserved, True, hat_dtype
            if max_active is not None:
                layout.reserve_width(self._adapters.store.banks, max_active)
            self._adapters.place_banks(warn=False)
            layout.grow = new_grow

    def _serving_dtype(self, value: Union[str, torch.dtype]) -> Union[torch.dtype, None]:
        """``configure_banks(lora_dtype=)`` as a dtype (``None``: the adapters' own)."""
        if value == "adapter":
            return None
        if value == "auto":
            return self._programs.dtype
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
        raise ConfigError(f"lora_dtype={value!r} is not a dtype graphlora can serve adapters in: pass \"adapter\" "
                          "(the adapters' own, PEFT's numbers), \"auto\" (the base model's) or a floating torch.dtype.")

    @property
    def traced_graph(self) -> fx.Graph:
        """The graph as traced (after the base passes), before any adapter was spliced in.

        A copy: editing it changes nothing. ``self.graph`` is the rewritten one.
        """
        return copy_graph(self._programs.primary.base.graph)

    @property
    def sites(self) -> list[SiteInfo]:
        """Every located linear site, with the rank of each adapter placed on it."""
        return site_infos(self._adapters, self._records)

    def sites_table(self, adapted_only: bool = True) -> str:
        """The sites as a text table (path, kind, in, out, rank per adapter, added parameters)."""
        return sites_table(self.sites, adapted_only)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), as PEFT counts them."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P`` (PEFT's format)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ PEFT's PeftModel surface
    @property
    def active_peft_config(self) -> AnyConfig:
        """The config of :attr:`active_adapter` (PEFT's ``active_peft_config``).

        Raises:
            AdapterStateError: no adapter is active (adapters are disabled).
        """
        name = self.active_adapter
        if name is None:
            raise AdapterStateError("no adapter is active (adapters are disabled), so there is no active_peft_config; "
                                    "enable_adapters() first, or read gm.peft_config[name].")
        return self._adapters.configs[name]

    def get_layer_status(self) -> list["status.TunerLayerStatus"]:
        """PEFT's ``get_layer_status``: one :class:`graphlora.status.TunerLayerStatus` per adapted
        layer (site, ``modules_to_save`` module, trainable-rows table), named and ordered as PEFT's
        (``"model." + <module path>``, the model's module order); see :mod:`graphlora.status`."""
        order = {name: i for i, (name, _) in enumerate(self._facts.source.named_modules())}
        return status.layer_status(self._adapters, self._records, order)

    def get_model_status(self) -> "status.TunerModelStatus":
        """PEFT's ``get_model_status``: a :class:`graphlora.status.TunerModelStatus` aggregating
        :meth:`get_layer_status` as PEFT does (``"irregular"`` where layers disagree)."""
        return status.model_status(self.get_layer_status(), self._adapters, type(self._facts.source).__name__,
                                   self.get_nb_trainable_parameters())

    def load_adapter_state_dict(self, state_dict: Mapping[str, torch.Tensor], adapter_name: str = "default") -> None:
        """Copy PEFT-keyed tensors into the existing adapter ``adapter_name`` in place: graphlora's
        ``peft.set_peft_model_state_dict(model, state_dict, adapter_name)``.

        ``state_dict`` is what :meth:`get_adapter_state_dict` returns, or PEFT's
        ``get_peft_model_state_dict`` of a PEFT model with the same config (the keys of
        ``adapter_model.safetensors``). The adapter's config, active set and ``requires_grad`` stay
        as they are; this is :meth:`load_adapter_tensors` with the adapter's own config (a hotswap).

        Raises:
            AdapterNotFoundError: no adapter ``adapter_name`` (add it first, or use ``load_adapter_tensors``).
            AdapterFileError: a missing or unexpected key, or a shape that does not fit (PEFT's
                function ignores those); nothing changes.
            AdapterStateError: the adapter is merged (unmerge first).
        """
        check_known([adapter_name], self._adapters.configs)
        config = self._adapters.configs[adapter_name]
        self.load_adapter_tensors(config, state_dict, adapter_name, is_trainable=not config.inference_mode,
                                  source=f"state_dict for adapter {adapter_name!r}")
