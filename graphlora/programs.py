"""Programs: one GraphModule per call signature, all built by one pipeline and sharing one store.

A *program* serves one :data:`~graphlora.calls.ProgramKey`: a call signature and a mode
(``SWITCH``: every adapter's own branch, for training; ``BANK``: serving from the adapter banks;
``MIXED``: a mixed-adapter batch; ``BASE``: no branch, while no adapter contributes). Every
program comes from the same forward-only pipeline::

    capture (trace the source model)  →  base passes  →  locate sites  →  splice the adapters

:meth:`ProgramSet.get_or_build` runs it once per key, on first use. The pristine result of the
first three steps (``Program.base``) is kept, so a program can be re-spliced from it, and
delete-then-re-add gives the same code.

**Re-splicing is lazy and only when needed.** Each program keeps its *recipe*: the branch specs
it was spliced with. A structural change (add, delete, a hotswap that changes a branch) only
marks the set stale (:meth:`ProgramSet.invalidate`); the next call of a program compares its
recipe with the current one and re-splices only if they differ. A serving (``BANK``) program's
recipe names the banks, not the adapters in them, so adding a LoRA adapter into a free bank slot
leaves it as it is: no re-splice, no recompilation.

**One store of parameters and buffers.** The emitted module (``root``) owns every parameter,
buffer and adapter; each program's GraphModule reads the very same objects. What a later trace
makes that ``root`` does not have (a tensor constant of its own, a dropout module under a new
path) stays *local* to that program, on its GraphModule only, and is moved with ``root``
(``.to()``) and follows its ``train()``/``eval()``. So a forward call never changes
``root.named_modules()``, ``named_parameters()`` or ``state_dict()`` keys.

The first program's GraphModule is ``root`` itself (``gm.graph``, ``gm.code``); it is built by the
same steps, only spliced in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.fx as fx
from torch import nn

from graphlora.passes import (CheckpointBlocks, DetachedReads, RetargetDevice, Site, SpliceAdapters, locate_sites,
                              release_regions, run_passes)
from graphlora.passes.checkpoint import REGION_PREFIX
from graphlora.passes import fuse_shrink
from graphlora.passes.fuse_linear import AttachBaseLinear
from graphlora.passes.eager import lower_graph
from graphlora.passes.sites import getattr_path

from ._compat import adopt_graph, current_graph, forward_of_graph, has_call_hooks
from .banks import BANKS, STACK_PREFIX
from .calls import BANK, BASE, MIXED, SWITCH, CallSpec, ProgramKey, describe_call, describe_key
from .generation import trace_call
from .modules_to_save import saved_recipe, switch_steps
from .checkpointing import CheckpointSettings, settings_of_source
from .errors import SignatureError
from .prepare import copy_graph, prepare_base
from .state import STORE, AdapterState

__all__ = ["Program", "ProgramSet", "first_records"]


@dataclass
class Program:
    """One call signature's program.

    Attributes:
        key: the call signature and the mode (:data:`~graphlora.calls.MODES`).
        base: the traced GraphModule after the base passes, before any adapter (pristine).
        sites: the linear sites located in ``base``.
        local: ``get_attr`` / ``call_module`` targets held by ``base`` alone, not by the root.
        module: the spliced GraphModule that runs this signature (the root for the first program).
    """

    key: ProgramKey
    base: fx.GraphModule
    sites: list[Site]
    local: frozenset[str] = frozenset()
    module: Union[fx.GraphModule, None] = None
    #: the inputs it was traced on (kept for the first program only: pickling re-traces from them)
    example: Union[Mapping[str, Any], None] = None
    #: what it was spliced with (see the module docstring) and the set's version it was checked at
    recipe: Any = None
    version: int = -1

    @property
    def mode(self) -> str:
        return self.key[1]

    @property
    def mixed(self) -> bool:
        return self.key[1] == MIXED


def first_records(sites: list[Site]) -> dict[str, Site]:
    """site name -> its first :class:`Site` record (a tied weight can be called twice)."""
    records: dict[str, Site] = {}
    for site in sites:
        records.setdefault(site.name, site)
    return records


def _targets(graph: fx.Graph) -> list[str]:
    return list(dict.fromkeys(n.target for n in graph.nodes if n.op in ("get_attr", "call_module")))


def _equivalent(mine: Any, theirs: Any) -> bool:
    """Whether an object of a new trace can be replaced by the root's object at the same path."""
    if mine is theirs:
        return True
    if isinstance(mine, nn.Dropout) and type(mine) is type(theirs):
        return mine.p == theirs.p and mine.inplace == theirs.inplace
    if isinstance(mine, fx.GraphModule) and isinstance(theirs, fx.GraphModule):
        return mine.code == theirs.code and all(
            _equivalent(a, b) for a, b in zip(_named_tensors(mine), _named_tensors(theirs))
        ) and len(_named_tensors(mine)) == len(_named_tensors(theirs))
    if isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor):
        if isinstance(mine, nn.Parameter) or isinstance(theirs, nn.Parameter):
            return False  # parameters are shared objects or nothing
        return (mine.shape == theirs.shape and mine.dtype == theirs.dtype and mine.device == theirs.device
                and (mine.device.type == "meta" or torch.equal(mine, theirs)))
    return False


def _named_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for _, t in (*module.named_parameters(), *module.named_buffers())]


def _float_dtype(module: nn.Module) -> Union[torch.dtype, None]:
    """The one dtype of every floating parameter (``None``: none, or several)."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    return next(iter(dtypes)) if len(dtypes) == 1 else None


def _cast_like(value: Any, param: torch.Tensor) -> Any:
    """An example input on ``param``'s device, floating tensors in its dtype."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(param.device, param.dtype) if value.is_floating_point() else value.to(param.device)


def _install(root: nn.Module, target: str, obj: Any) -> None:
    """Put ``obj`` at ``target`` on ``root``: a module as a submodule, a tensor as the buffer there
    (non-persistent when new), anything else as an attribute."""
    prefix, _, name = target.rpartition(".")
    owner = root.get_submodule(prefix) if prefix else root
    if isinstance(obj, nn.Module):
        owner.add_module(name, obj)
    elif isinstance(obj, torch.Tensor) and not isinstance(obj, nn.Parameter):
        persistent = name not in owner._non_persistent_buffers_set if name in owner._buffers else False
        if name in owner.__dict__:
            delattr(owner, name)
        owner.register_buffer(name, obj, persistent=persistent)
    else:
        setattr(owner, name, obj)


def _set_path(root: nn.Module, target: str, value: torch.Tensor) -> None:
    prefix, _, name = target.rpartition(".")
    owner = root.get_submodule(prefix) if prefix else root
    if name in owner._parameters:
        param = owner._parameters[name]
        if param is not None:
            param.data = value
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


class ProgramSet:
    """Every program of one emitted module (see the module docstring).

    Args:
        root: the emitted module; the first program's GraphModule and the owner of all shared state.
        source: the original model (later signatures are traced from it; it shares every tensor).
        calls: how calls bind to the source model's signature.
        state: the adapter state the splice reads.
        first: the first program, traced at inject time (its ``module`` is ``root``).
        aliases: tied parameter names (for naming sites).
    """

    def __init__(self, root: fx.GraphModule, source: nn.Module, calls: CallSpec, state: AdapterState,
                 first: Program, aliases: Mapping[str, list[str]]) -> None:
        self.root, self.source, self.calls, self.state = root, source, calls, state
        self.aliases = aliases
        self.primary_key = first.key
        first.module = root
        self._programs: dict[ProgramKey, Program] = {first.key: first}
        #: bumped by :meth:`invalidate`; a program checked at an older version re-checks its recipe
        self.version = 0
        self.records = first_records(first.sites)
        devices = {p.device for p in root.parameters()}
        self.device: Union[torch.device, None] = next(iter(devices)) if len(devices) == 1 else None
        self.dtype: Union[torch.dtype, None] = _float_dtype(root)
        #: gradient checkpointing of the non-mixed programs (``None``: off); enabled on the source model
        #: before inject, it carries over
        self.checkpointing: Union[CheckpointSettings, None] = settings_of_source(source)
        #: fuse sibling down-projections in training and serving programs (``fuse_shrink.ENABLED`` when the
        #: module was made: a later flip of the flag does not change this module's next re-splice)
        self.fuse_shrink: bool = fuse_shrink.ENABLED
        #: ``torch.compile`` options the routing runs programs with (:meth:`compiled`; ``None``: eager)
        self._compile: Union[dict[str, Any], None] = None
        self._compile_key: tuple = ()
        #: options -> program key -> (module, its compiled wrapper)
        self._compiled: dict[tuple, dict[ProgramKey, tuple[fx.GraphModule, Any]]] = {}
        #: program key -> (its module's generated forward, the lowered eager callable)
        self._eager: dict[ProgramKey, tuple[Any, Any]] = {}

    @contextlib.contextmanager
    def compiled(self, options: Mapping[str, Any]) -> Iterator[None]:
        """Inside the block, :meth:`runnable` gives programs compiled with ``torch.compile(**options)``
        (one compile per program and options, kept; a re-spliced program compiles again). generate
        uses it for the decode steps transformers asks to compile (:func:`graphlora.generation.generate`)."""
        before = self._compile, self._compile_key
        self._compile = dict(options)
        self._compile_key = tuple(sorted((k, repr(v)) for k, v in options.items()))  # once, not per call
        try:
            yield
        finally:
            self._compile, self._compile_key = before

    @property
    def compiling(self) -> bool:
        """Whether :meth:`runnable` gives compiled programs (inside :meth:`compiled`)."""
        return self._compile is not None

    def module_for(self, key: ProgramKey, kwargs: Mapping[str, Any]) -> Any:
        """What runs a call of ``key`` (:meth:`get_or_build`, then :meth:`runnable`); a serving
        (``BANK``) call first re-gathers the banks' active factors if anything they are made of
        changed since the last call (a training step, a hotswap: :meth:`graphlora.banks.BankSet.gather`)."""
        program = self.get_or_build(key, kwargs)
        if program.mode == BANK:
            self.state.store.banks.gather()
        return self.runnable(program)

    def runnable(self, program: Program) -> Any:
        """What runs ``program``: eagerly, its module's graph with the aten ops lowered to torch's
        public functions (:meth:`eager`); inside :meth:`compiled`, its compiled wrapper."""
        module = program.module
        if self._compile is None:
            return self.eager(program)
        cache = self._compiled.setdefault(self._compile_key, {})
        held = cache.get(program.key)
        if held is None or held[0] is not module:
            held = cache[program.key] = (module, torch.compile(module, **self._compile))
        return held[1]

    def eager(self, program: Program) -> Any:
        """``program``'s graph run through torch's public functions (:mod:`graphlora.passes.eager`:
        the same kernels for less host time per op), made once per generated ``forward`` (a
        re-splice regenerates it, and the lowered copy with it). The module itself where it has
        forward hooks (only calling it runs them)."""
        module = program.module
        if has_call_hooks(module):
            return module
        generated = type(module).forward  # every GraphModule has its own class: a new module, a new forward
        held = self._eager.get(program.key)
        if held is None or held[0] is not generated:
            graph = copy_graph(current_graph(module))
            lower_graph(graph)
            held = self._eager[program.key] = (generated, forward_of_graph(module, graph))
        return held[1]

    # ------------------------------------------------------------------ reading
    @property
    def primary(self) -> Program:
        """The program traced at inject time (its module is the emitted module)."""
        return self._programs[self.primary_key]

    @property
    def primary_example(self) -> Union[Mapping[str, Any], None]:
        """The inputs the first program was traced on (``None``: made from the config, or fx)."""
        return self.primary.example

    def __iter__(self) -> Iterator[Program]:
        return iter(list(self._programs.values()))

    def __len__(self) -> int:
        return len(self._programs)

    def __contains__(self, key: object) -> bool:
        return key in self._programs

    def keys(self) -> list[ProgramKey]:
        return list(self._programs)

    def describe(self) -> str:
        """The traced signatures, for messages."""
        return "; ".join(d for d in (describe_key(k) for k in self._programs if k[1] == SWITCH) if d)

    # ------------------------------------------------------------------ building
    def get_or_build(self, key: ProgramKey, kwargs: Mapping[str, Any]) -> Program:
        """The program for ``key``; on first use, trace (if needed) and splice it.

        Raises:
            SignatureError: the call needs a new trace and tracing it failed.
        """
        program = self._programs.get(key)
        if program is not None:
            if program.version != self.version:
                self.refresh(program)
            return program
        sig, mode = key
        plain = self._programs.get((sig, SWITCH))
        if plain is None:
            plain = self._trace((sig, SWITCH), kwargs)
        elif plain.version != self.version:
            self.refresh(plain)
        if mode == SWITCH:
            return plain
        program = Program(key, plain.base, plain.sites, plain.local)
        self._build(program)
        self._programs[key] = program
        return program

    def invalidate(self) -> None:
        """The adapters' structure changed: each program re-checks its recipe on its next call."""
        self.version += 1

    def refresh(self, program: Program) -> None:
        """Re-splice ``program`` if its recipe is out of date (see the module docstring)."""
        if program.version == self.version:
            return
        program.version = self.version  # first: building reads the root's graph, which refreshes
        try:
            specs = self._specs(program)
            if self._recipe(specs) != program.recipe:
                self._build(program, specs)
        except BaseException:
            program.version = -1  # try again on the next call
            raise

    def _specs(self, program: Program) -> dict:
        if program.mode == BASE:
            return {}
        if program.mode == SWITCH:
            return self.state.branch_specs(self.records)
        return self.state.bank_specs(self.records, mixed=program.mode == MIXED)

    def _recipe(self, specs: Mapping[str, Any]) -> tuple:
        return tuple(sorted((site, tuple(branches)) for site, branches in specs.items() if branches)), (
            self.checkpointing), saved_recipe(self.state)

    def _trace(self, key: ProgramKey, kwargs: Mapping[str, Any]) -> Program:
        try:
            gm = prepare_base(trace_call(self.source, kwargs), self.source)
        except Exception as exc:
            text = str(exc).strip()
            raise SignatureError(
                f"this call ({describe_call(kwargs)}) needs a new graph and tracing it failed: "
                f"{type(exc).__name__}: {text.splitlines()[0].rstrip('.')[:400] if text else ''}. "
                f"Traced signatures: {self.describe()}. Call the module with arguments the original model accepts."
            ) from exc
        local = self._local_targets(gm)
        for target in local:  # a parameter only this signature reads is a base parameter: frozen too
            obj = getattr_path(gm, target)
            if isinstance(obj, nn.Parameter):
                obj.requires_grad_(False)
        program = Program(key, gm, locate_sites(gm, self.aliases), local)
        self._build(program)
        self._programs[key] = program
        return program

    def _local_targets(self, gm: fx.GraphModule) -> frozenset[str]:
        local = set()
        for target in _targets(gm.graph):
            try:
                mine = getattr_path(self.root, target)
            except AttributeError:
                local.add(target)
                continue
            if not _equivalent(mine, getattr_path(gm, target)):
                local.add(target)
        return frozenset(local)

    def _build(self, program: Program, specs: Union[Mapping[str, Any], None] = None) -> None:
        """Splice the current adapters into a copy of ``program.base`` and make it the program's module."""
        program.version = self.version
        specs = self._specs(program) if specs is None else specs
        graph = copy_graph(program.base.graph)
        root = self.root
        if program.key == self.primary_key:
            adopt_graph(root, graph)  # code is generated once, by the runner
            module = root
        else:
            attrs = {t: getattr_path(program.base if t in program.local else root, t) for t in _targets(graph)}
            module = fx.GraphModule(attrs, graph, class_name=root._get_name())
            module.add_module(STORE, self.state.store)
            module.train(root.training)
        steps: list = [SpliceAdapters(program.sites, specs)]
        steps += switch_steps(self.state, program.mode == MIXED)  # modules_to_save: parameter switches
        if program.mode == SWITCH and self.fuse_shrink:  # sibling down-projections as one GEMM
            steps.append(fuse_shrink.FuseShrink())
        if program.mode == BANK and self.fuse_shrink:  # sibling sites' bank shrinks as one GEMM
            steps.append(fuse_shrink.FuseBankShrink(self._stack))
        if program.mode == BANK:  # the updates know their base linear (a fused op at few rows, compiled)
            steps.append(AttachBaseLinear())
        if program.mode in (BANK, BASE):  # grad-free: set_adapter's requires_grad flips never recompile
            steps.append(DetachedReads(STORE))
        release_regions(module)  # checkpoint regions of the graph this one replaces (snapshot keeps them)
        ckpt = self.checkpointing
        if ckpt is not None and program.mode == SWITCH:  # serving programs never checkpoint
            steps.append(CheckpointBlocks(ckpt.prefix, ckpt.every_n_layers, ckpt.options))
        run_passes(module, steps)  # the runner regenerates the module's code once, whatever changed
        program.module = module
        program.recipe = self._recipe(specs)
        self._track_stacks(module)

    def _track_stacks(self, extra: Union[fx.GraphModule, None] = None) -> None:
        """Tell the banks which stacked factors the programs (and ``extra``, one being built) read."""
        prefix = f"{STORE}.{BANKS}."
        modules = [p.module for p in self._programs.values() if p.module is not None]
        graphs = {id(m): current_graph(m) for m in (*modules, *([extra] if extra is not None else []))}
        self.state.store.banks.set_live(frozenset(
            str(n.target)[len(prefix):] for g in graphs.values() for n in g.nodes
            if n.op == "get_attr" and str(n.target).startswith(prefix + STACK_PREFIX)))

    def _stack(self, targets: tuple[str, ...]) -> Union[str, None]:
        """The ``get_attr`` target of the banks' stacked ``a_hat`` of the sites whose ``a_hat``
        targets are ``targets`` (:meth:`graphlora.banks.BankSet.stack`), or ``None``."""
        prefix, suffix = f"{STORE}.{BANKS}.", ".a_hat"
        if not all(t.startswith(prefix) and t.endswith(suffix) for t in targets):
            return None
        name = self.state.store.banks.stack(tuple(t[len(prefix):-len(suffix)] for t in targets))
        return None if name is None else prefix + name

    def set_checkpointing(self, settings: Union[CheckpointSettings, None]) -> None:
        """Turn gradient checkpointing on (``settings``) or off (``None``) and re-splice every program."""
        self.checkpointing = settings
        self.rebuild()

    def rebuild(self) -> None:
        """Re-splice every program from its pristine graph with the current adapters."""
        for program in self:
            self._build(program)

    # ------------------------------------------------------------------ transactions
    def snapshot(self) -> tuple:
        """What :meth:`restore` needs to put every program back (references, no copies)."""
        regions = {name: m for name, m in self.root.named_children() if name.startswith(REGION_PREFIX)}
        built = {k: (p.module, p.recipe, p.version) for k, p in self._programs.items()}
        return dict(self._programs), built, current_graph(self.root), (self.checkpointing, regions, self.version)

    def restore(self, snapshot: tuple) -> None:
        programs, built, graph, (checkpointing, regions, version) = snapshot
        self.checkpointing, self.version = checkpointing, version
        for name in [n for n, _ in self.root.named_children() if n.startswith(REGION_PREFIX)]:
            delattr(self.root, name)
        for name, region in regions.items():
            self.root.add_module(name, region)
        self._programs = dict(programs)
        for key, program in self._programs.items():
            program.module, program.recipe, program.version = built[key]
        if current_graph(self.root) is not graph:
            adopt_graph(self.root, graph)
            self.root.recompile()
        self._track_stacks()

    # ------------------------------------------------------------------ moves
    def after_move(self, fn: Any, replaced: Mapping[int, torch.Tensor]) -> None:
        """After ``root._apply(fn)`` (``.to()``, ``.cuda()``, ``.half()``, ``to_empty``).

        Args:
            fn: the function applied to the root's tensors; applied to local tensors too.
            replaced: ``id(old tensor) -> new tensor`` for every root tensor the move replaced.
        """
        self._share_with_source(replaced)
        for program in self._distinct_bases():
            for target in program.local:
                obj = getattr_path(program.base, target)
                if isinstance(obj, nn.Module):
                    obj._apply(fn)
                elif isinstance(obj, torch.Tensor):
                    _set_path(program.base, target, fn(obj))
        dtype = _float_dtype(self.root)
        if dtype is not None and self.dtype is not None and dtype != self.dtype and self._retrace():
            self.dtype = dtype
            return
        if self._retarget():
            self.rebuild()
        else:
            for program in self:
                if program.key != self.primary_key:
                    self._build(program)

    def _retrace(self) -> bool:
        """After a cast of every floating parameter to a new dtype (``.half()``, ``.to(torch.bfloat16)``):
        trace the first program again from the (now cast) source model and forget the others, which
        trace again on their next call. A trace records each cast as "to this dtype", and cannot tell
        a deliberate upcast (RMSNorm's variance, rotary angles in float32) from a cast back to the
        activation dtype, so rewriting dtype constants would silently change the numbers; a new trace
        is exact. Returns False when there is nothing to re-trace from (the fx frontend's graph
        calls the modules and bakes no dtype; a model traced on user inputs without a record).
        """
        from ._compat import is_pretrained_model
        from .capture import example_inputs_for

        if self.calls.frontend != "export":
            return False
        primary = self.primary
        example = primary.example
        if example is None and is_pretrained_model(self.source):
            example = example_inputs_for(self.source)
        if example is None:
            return False
        param = next(self.root.parameters())
        example = {k: _cast_like(v, param) for k, v in example.items()}
        gm = prepare_base(trace_call(self.source, example), self.source)
        sites = locate_sites(gm, self.aliases)
        if [s.name for s in sites] != [s.name for s in primary.sites]:
            raise RuntimeError(
                "re-tracing after the dtype change found other linear sites "
                f"({len(sites)} against {len(primary.sites)}); cast the model before graphlora.inject instead."
            )
        for target in _targets(gm.graph):  # what the new trace made itself replaces the root's
            obj = getattr_path(gm, target)
            try:
                mine = getattr_path(self.root, target)
            except AttributeError:
                mine = None
            if mine is not None and _equivalent(mine, obj):
                continue
            _install(self.root, target, obj)
        first = Program(self.primary_key, gm, sites, frozenset(), self.root, example=primary.example)
        self._programs = {self.primary_key: first}
        self.records = first_records(sites)
        devices = {p.device for p in self.root.parameters()}
        self.device = next(iter(devices)) if len(devices) == 1 else None
        self._build(first)
        return True

    def _distinct_bases(self) -> list[Program]:
        seen, out = set(), []
        for program in self:
            if id(program.base) not in seen:
                seen.add(id(program.base))
                out.append(program)
        return out

    def _share_with_source(self, replaced: Mapping[int, torch.Tensor]) -> None:
        """Keep the source model on the same tensors after a move that replaced them (``to_empty``).

        New call signatures are traced from the source model, so every slot of it that held a
        replaced tensor (tied aliases included) now holds its replacement.
        """
        if not replaced:
            return
        for module in self.source.modules():
            for slots in (module._parameters, module._buffers):
                for key, tensor in slots.items():
                    if tensor is not None and id(tensor) in replaced:
                        slots[key] = replaced[id(tensor)]

    def _retarget(self) -> bool:
        """After a move to one device, make the traced graphs create their tensors there too.

        Only when every parameter is on a single device (a model spread over devices keeps its
        graphs as traced). Returns True when a pristine graph changed.
        """
        devices = {p.device for p in self.root.parameters()}
        if len(devices) != 1 or self.device is None:
            return False
        (new,) = devices
        if new == self.device:
            return False
        changed = False
        for program in self._distinct_bases():
            changed |= run_passes(program.base, [RetargetDevice(self.device, new)]).modified
        self.device = new
        return changed
