"""Multi-process training of an emitted module: DDP as it is, FSDP2 through :func:`shard`.

**DDP.** ``torch.nn.parallel.DistributedDataParallel(gm)`` needs nothing from graphlora: the
frozen base does not require grad, so DDP registers (and all-reduces) the active adapters'
parameters only; the inactive adapters' branches stay in the graph behind a zero gate, so every
registered parameter gets a gradient and ``find_unused_parameters`` is not needed. Choose the
trainable adapters before wrapping (DDP fixes its parameter list at construction), and save on
one rank (``gm.save_pretrained`` there).

**FSDP2.** ``torch.distributed.fsdp.fully_shard`` all-gathers a module's parameters in a hook
that runs when that module is *called*, and the emitted graph calls no decoder block: it reads
every parameter with ``get_attr``. :func:`shard` first runs the pass
:class:`graphlora.passes.blocks.BlockRegions`, which moves each block ``<layers>.<i>`` of the layer
stack into one call ``block_region_<i>.run(...)`` whose body reads the block's tensors from their
owner modules when it runs. Then, per block, one FSDP group holds the region and the modules that
own the block's tensors (the block ``model.layers.i`` and the adapter store's entries for its
sites), with ``run`` registered as the group's forward (``register_fsdp_forward_method``); the
rest (embeddings, final norm, head) is the root group, ``fully_shard(gm)``. Parameters: a rank
keeps ``1/world`` of each (``Shard(0)``) and all-gathers a block's just before its region runs
(and again for its backward); gradients of the trainable adapters are reduce-scattered, the
frozen base gets none.

The flow of torchtune's LoRA recipe::

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    gm = graphlora.inject(model, LoraConfig(...))          # traced on meta: no memory
    shard(gm)                                               # 1/world of every parameter, on meta
    materialize(gm, "cuda", full_state_dict)                # allocate the shards, load the weights
    ...train (call gm with the inject-time signature: input_ids -> logits)...
    save_adapter(gm, "out")                                 # rank 0 writes PEFT files

Limits: a sharded module runs the program traced at inject time (``gm(input_ids=...)``: compute
the loss from the logits); a call with another signature, and any call that re-splices the graph
after :func:`shard` (adding or deleting adapters, gradient checkpointing, a dtype cast) are not
supported (:func:`rewire` puts the regions back after a rebuild that keeps the parameters).
"""

from __future__ import annotations

import itertools
import json
import os
import weakref
from collections.abc import Mapping
from typing import Any, Union

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from graphlora.passes import run_passes
from graphlora.passes.blocks import BLOCK_PREFIX, RUN, BlockRegion, BlockRegions, region_calls

from ._atomic import AtomicWriter
from .banks import note_write
from .errors import ConfigError
from .peft_format import CONFIG_NAME, WEIGHTS_NAME, adapter_subdir
from .repeat import layer_stack
from .state import STORE

__all__ = [
    "shard",
    "rewire",
    "is_sharded",
    "materialize",
    "full_state_dict",
    "load_full_state_dict",
    "adapter_state_dict",
    "save_adapter",
    "load_adapter",
]

#: sharded module -> the graph its regions were wired into (a rebuild replaces it)
_WIRED: "weakref.WeakKeyDictionary[nn.Module, fx.Graph]" = weakref.WeakKeyDictionary()


def _dtensor_type() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def _prefix(gm: Any) -> str:
    found = layer_stack(gm.get_base_model(), min_layers=1)
    if found is None:
        raise ConfigError(
            f"{type(gm.get_base_model()).__name__} has no nn.ModuleList of same-class layers, so there is no "
            "block to shard; shard a model built as a stack of layers, or use fully_shard(gm) alone."
        )
    return found[0]


def _regions(gm: nn.Module) -> dict[int, BlockRegion]:
    return {int(name[len(BLOCK_PREFIX):]): m for name, m in gm.named_children()
            if name.startswith(BLOCK_PREFIX) and isinstance(m, BlockRegion)}


def is_sharded(gm: nn.Module) -> bool:
    """Whether :func:`shard` was applied to ``gm``."""
    return gm in _WIRED


def _wire(gm: Any, prefix: str) -> dict[int, BlockRegion]:
    run_passes(gm, [BlockRegions(prefix)])
    regions = _regions(gm)
    if not region_calls(gm):
        raise ConfigError(
            f"no block of {prefix!r} could be made one region of the graph (each block's nodes must be "
            "contiguous and read no other block's); shard with fully_shard(gm) alone instead."
        )
    return regions


def shard(gm: Any, *, reshard_after_forward: Union[bool, int] = True, **fsdp_kwargs: Any) -> Any:
    """Apply FSDP2's ``fully_shard`` to each decoder block of ``gm``'s graph and to ``gm``.

    Args:
        gm: an :class:`~graphlora.AdaptedGraphModule` with its adapters added, called with one
            signature only so far (its inject-time one); on any device, ``meta`` included.
        reshard_after_forward: ``fully_shard``'s argument for the blocks (the root keeps its own
            default).
        **fsdp_kwargs: more ``fully_shard`` arguments for every group (``mesh``, ``mp_policy``,
            ``offload_policy``).

    Returns:
        ``gm``, now an ``FSDPModule`` too; its parameters are ``DTensor`` shards.

    Raises:
        ConfigError: no process group, more than one traced signature, gradient checkpointing on,
            no layer stack, a block whose tensors another block reads, or ``gm`` already sharded.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("shard(gm) needs a process group: call torch.distributed.init_process_group first "
                          "(torchrun sets the environment it reads).")
    if is_sharded(gm):
        raise ConfigError("gm is sharded already; shard a module once.")
    if len({program.key[0] for program in gm.programs}) != 1:
        raise ConfigError(
            f"gm has traced {len(gm.programs)} call signatures ({gm.programs.describe()}); a sharded module runs "
            "its inject-time program only. Shard a freshly injected module and compute the loss from its logits."
        )
    if getattr(gm, "is_gradient_checkpointing", False):
        raise ConfigError("gm checkpoints its blocks (gradient_checkpointing_enable); sharding runs each block as "
                          "its own region instead: call gm.gradient_checkpointing_disable() before shard(gm).")
    prefix = _prefix(gm)
    regions = _wire(gm, prefix)
    claimed: dict[str, int] = {}
    for block, region in sorted(regions.items()):
        for path in region.owners:
            if path in claimed:
                raise ConfigError(f"{path!r} holds tensors of blocks {claimed[path]} and {block}; a module can be "
                                  "in one FSDP group only.")
            claimed[path] = block
    before = dict(gm.named_parameters())
    for block, region in sorted(regions.items()):
        fully_shard([region, *(gm.get_submodule(p) for p in region.owners)],
                    reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
        register_fsdp_forward_method(region, RUN)
    fully_shard(gm, **fsdp_kwargs)
    _share_shards(gm, {id(before[n]): p for n, p in gm.named_parameters() if n in before and before[n] is not p})
    gm.adapter_state.place_banks()  # sharded adapters leave the banks: serving runs the (sharded) switch form
    _WIRED[gm] = gm.graph
    gm.register_forward_pre_hook(_check_wired)
    return gm


def _share_shards(gm: Any, replaced: Mapping[int, nn.Parameter]) -> None:
    """Point the source model and every program's pristine trace at the shards too, so the full
    tensors they shared with ``gm`` are freed (with a meta-device init they were meta already)."""
    holders = [gm.get_base_model(), *(program.base for program in gm.programs)]
    for holder in holders:
        for module in holder.modules():
            for key, param in list(module._parameters.items()):
                if param is not None and id(param) in replaced:
                    module._parameters[key] = replaced[id(param)]


def _check_wired(gm: nn.Module, args: Any) -> None:
    if _WIRED.get(gm) is not gm.graph:
        raise ConfigError(
            "gm's graph was rebuilt after shard() (an adapter added or deleted, checkpointing toggled, a cast), "
            "so its blocks no longer run as sharded regions; call graphlora.distributed.rewire(gm) first."
        )


def rewire(gm: Any) -> None:
    """Put the block regions back into ``gm``'s graph after a rebuild (:func:`materialize` does it).

    The regions (and their FSDP groups) are kept; only their bodies are rebuilt.

    Raises:
        ConfigError: ``gm`` is not sharded, or a block now reads tensors outside its FSDP group.
    """
    if not is_sharded(gm):
        raise ConfigError("gm is not sharded; call graphlora.distributed.shard(gm) first.")
    before = {b: r.owners for b, r in _regions(gm).items()}
    if not region_calls(gm):
        _wire(gm, _prefix(gm))
    after = {b: r.owners for b, r in _regions(gm).items()}
    if after != before:
        raise ConfigError(f"the blocks' modules changed since shard() ({before} -> {after}); shard a fresh module.")
    _WIRED[gm] = gm.graph


# ---------------------------------------------------------------------------- full tensors in, out


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` plus its non-persistent buffers (rotary tables): everything
    :func:`load_full_state_dict` fills after a meta-device init."""
    out = dict(model.state_dict())
    for name, buffer in model.named_buffers():
        out.setdefault(name, buffer)
    return out


def _fill(target: torch.Tensor, full: torch.Tensor, name: str) -> None:
    if tuple(full.shape) != tuple(target.shape):
        raise ConfigError(f"{name!r}: the given tensor has shape {tuple(full.shape)}, the module's "
                          f"{tuple(target.shape)}.")
    if isinstance(target, _dtensor_type()):
        from torch.distributed.tensor import distribute_tensor

        full = full.to(device=target.to_local().device, dtype=target.dtype)
        target.copy_(distribute_tensor(full, target.device_mesh, target.placements))
    else:
        target.copy_(full.to(device=target.device, dtype=target.dtype))


@torch.no_grad()
def load_full_state_dict(gm: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Copy full (unsharded) tensors into ``gm``'s parameters and buffers, each rank its shard.

    Every rank passes the same full tensors (read from the checkpoint with ``mmap``, say); each
    copies the slice it owns (``distribute_tensor`` with the parameter's mesh and placements).
    Keys are ``gm``'s ``state_dict`` keys (the source model's, and ``graphlora.*`` for adapters).
    The adapter store's buffers (gates) are written from the adapter state, not from here.

    Args:
        strict: raise when a parameter or buffer outside the adapter store has no tensor here.

    Returns:
        the names filled.

    Raises:
        ConfigError: a missing key (``strict``), an unknown key, or a shape that does not fit.
    """
    tensors = dict(itertools.chain(gm.named_parameters(), gm.named_buffers()))
    unknown = sorted(set(state_dict) - set(tensors))
    if unknown:
        raise ConfigError(f"{len(unknown)} key(s) name no parameter or buffer of gm, e.g. {unknown[:3]}.")
    missing = [n for n in tensors if n not in state_dict and not n.startswith(STORE + ".")]
    if strict and missing:
        raise ConfigError(f"{len(missing)} tensor(s) of gm have no value given, e.g. {missing[:3]}; pass "
                          "full_state_dict(model) of a materialized model (it includes the rotary buffers).")
    filled = []
    for name, target in tensors.items():
        if name in state_dict:
            _fill(target, state_dict[name], name)
            filled.append(name)
    if any(name.startswith(STORE + ".") for name in filled):
        note_write()  # bank slots or gates written in place: the next serving call gathers anew
    return filled


def materialize(gm: Any, device: Union[str, torch.device], state_dict: Union[Mapping[str, torch.Tensor], None] = None,
                *, strict: bool = True) -> Any:
    """Allocate a sharded, meta-device ``gm`` on ``device`` and fill it.

    ``gm.to_empty(device=device)`` (each rank allocates only its shards), :func:`rewire` (the move
    re-splices the graph for the new device), then :func:`load_full_state_dict` when
    ``state_dict`` is given. Adapters whose tensors are missing from it get their method's init
    (PEFT's: ``init_lora_weights`` and the like), each rank drawing its own shard.

    Returns:
        ``gm``.
    """
    gm.to_empty(device=device)
    if is_sharded(gm):
        rewire(gm)
    given = load_full_state_dict(gm, state_dict, strict=strict) if state_dict is not None else []
    _init_adapters(gm, set(given))
    gm.adapter_state.sync()
    return gm


#: the config field each method's init is read from (PEFT's names)
_INIT_FIELDS = ("init_lora_weights", "init_ia3_weights", "init_weights")


@torch.no_grad()
def _init_adapters(gm: Any, given: set[str]) -> None:
    """Each adapter branch none of whose parameters were given: its method's init, from its config.

    Raises:
        ConfigError: a DoRA branch (its magnitude is computed from the whole base weight).
    """
    state = gm.adapter_state
    for key, adapter, branch in state.store.branches():
        names = [f"{STORE}.{key}.{adapter}.{n}" for n, _ in branch.named_parameters()]
        if not names or any(n in given for n in names):
            continue
        if getattr(branch, "use_dora", False):
            raise ConfigError(f"adapter {adapter!r} is DoRA, whose magnitude is computed from the whole base "
                              "weight; pass its tensors in state_dict (graphlora.* keys of an unsharded module).")
        config = state.configs[adapter]
        init = next((getattr(config, f) for f in _INIT_FIELDS if hasattr(config, f)), True)
        branch.reset_parameters(init)


# ---------------------------------------------------------------------------- adapters


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, _dtensor_type()) else tensor


def adapter_state_dict(gm: Any, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's full tensors under PEFT's keys, gathered from every rank (a collective: call
    it on every rank). Unsharded modules give ``gm.get_adapter_state_dict`` as it is."""
    return {k: _full(v).detach() for k, v in gm.get_adapter_state_dict(adapter_name).items()}


def save_adapter(gm: Any, save_directory: Union[str, os.PathLike], adapter_name: str = "default",
                 rank: int = 0) -> Union[str, None]:
    """Gather the adapter and write it in PEFT's layout on ``rank`` (a collective: call it on every rank).

    The files are the ones ``gm.save_adapter`` writes unsharded (``adapter_config.json`` and
    ``adapter_model.safetensors``), so PEFT, graphlora at any world size, or :func:`load_adapter`
    read them.

    Returns:
        the directory written on ``rank``, ``None`` on the others.
    """
    from safetensors.torch import save as safetensors_bytes

    from . import peft_io

    tensors = adapter_state_dict(gm, adapter_name)
    me = dist.get_rank() if dist.is_initialized() else 0
    written = None
    if me == rank:
        root = os.fspath(save_directory)
        directory = os.path.join(root, adapter_subdir(adapter_name)) if adapter_subdir(adapter_name) else root
        os.makedirs(directory, exist_ok=True)
        config = peft_io.peft_config_dict(gm.adapter_state, adapter_name, gm._facts, gm._records)
        blob = safetensors_bytes({k: v.to("cpu").contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
        with AtomicWriter() as writer:
            writer.stage(os.path.join(directory, WEIGHTS_NAME), blob)
            writer.stage(os.path.join(directory, CONFIG_NAME), json.dumps(config, indent=2, sort_keys=True).encode())
        written = directory
    if dist.is_initialized():
        dist.barrier()
    return written


@torch.no_grad()
def load_adapter(gm: Any, path: Union[str, os.PathLike], adapter_name: str = "default") -> None:
    """Copy a PEFT adapter directory's tensors into ``gm``'s existing adapter ``adapter_name``, each
    rank its shard (any world size wrote it). Unsharded modules: use ``gm.load_adapter``.

    Raises:
        AdapterFileError: missing files, or keys or shapes that are not the adapter's.
    """
    from . import peft_io

    directory = peft_io.resolve_dir(path, adapter_name)
    _, tensors = peft_io.read_adapter_dir(directory)
    mine = gm.get_adapter_state_dict(adapter_name)
    if set(tensors) != set(mine):
        stray, lacking = sorted(set(tensors) - set(mine)), sorted(set(mine) - set(tensors))
        raise peft_io.AdapterFileError(f"{directory!r} does not hold adapter {adapter_name!r}'s tensors: "
                                       f"unexpected {stray[:3]}, missing {lacking[:3]}.")
    for key, target in mine.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise peft_io.AdapterFileError(f"{directory!r}: {key} has shape {tuple(tensors[key].shape)}, the "
                                           f"adapter's is {tuple(target.shape)}.")
    for key, target in mine.items():
        _fill(target, tensors[key], key)
