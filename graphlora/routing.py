"""Routing: call an emitted module exactly as the original model, one program per call signature.

With the ``export`` frontend a graph serves one call signature (keyword names, constant values,
tensor ranks and dtypes). :class:`RoutingMixin` binds each call to the original ``forward``'s
parameter names, picks (or traces, on first use) the program for it, writes the mixed-batch row
index when ``adapter_names=`` is given, and calls the program. The routing runs as plain Python
even under ``torch.compile``: dynamo skips ``__call__`` and ``_route`` and compiles only the
program graphs, so no routing state becomes a guard and switching never recompiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
import torch.fx as fx
from torch import nn

from graphlora.passes import locate_sites
from graphlora.passes.sites import getattr_path

from ._checks import check_fx_call
from .capture import call_key, trace_export
from .errors import AdapterNotFoundError, AdapterStateError, ConfigError, SignatureError
from .program import Program, copy_graph, prepare_base

__all__ = ["RoutingMixin"]


class RoutingMixin:
    """Calling, routing and tracing new signatures for :class:`~graphlora.module.AdaptedGraphModule`."""

    def _normalize(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in kwargs.items() if not (v is None and k in self._glora_none_defaults)}
        for key, value in self._glora_call_defaults.items():
            out.setdefault(key, value)
        return out

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        names = self._glora_arg_names
        if len(args) > len(names):
            raise SignatureError(
                f"{self._get_name()} takes at most {len(names)} positional arguments ({', '.join(names)}), "
                f"got {len(args)}; pass the rest by keyword."
            )
        bound = dict(zip(names, args))
        clash = sorted(set(bound) & set(kwargs))
        if clash:
            raise SignatureError(f"got multiple values for argument(s) {clash}.")
        bound.update(kwargs)
        return self._normalize(bound)

    def recompile(self):
        code = super().recompile()
        # GraphModule installs its own __call__ wrapper on each recompile; route first instead,
        # so that torch.compile traces the program graphs, never the routing Python.
        type(self).__call__ = RoutingMixin.__call__
        return code

    @torch.compiler.disable(recursive=False)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call as the original model; ``adapter_names=[...]`` (one per row) mixes adapters in a batch.

        The routing runs as plain Python even under ``torch.compile`` (this frame and ``_route``
        are skipped by dynamo): only the program graphs it calls are compiled, so switching
        adapters or changing row names never recompiles.
        """
        target, args, kwargs = self._route(args, kwargs)
        try:
            if target is None:
                return super().__call__(*args, **kwargs)
            return target(*args, **kwargs)
        except TypeError as exc:  # say what was traced when the arguments do not fit
            if self._glora_frontend == "fx":
                check_fx_call(self.forward, args, kwargs, exc)
            raise

    @torch.compiler.disable
    def _route(self, args: tuple, kwargs: dict) -> tuple[Union[fx.GraphModule, None], tuple, dict]:
        """The program for this call (``None``: this module's own graph) and its arguments."""
        names = kwargs.pop("adapter_names", None)
        if self._glora_frontend == "export":
            kwargs, args = self._bind(args, kwargs), ()
            sig = call_key(kwargs)
        else:
            sig = None
        key = (sig, names is not None)
        if names is not None:
            self._write_row_index(names, args, kwargs)
        if key == self._glora_primary:
            return None, args, kwargs
        program = self._glora_programs.get(key)
        if program is None:
            program = self._new_program(key, kwargs)
        return program.module, args, kwargs

    def adapter_slots(self) -> dict[str, int]:
        """Adapter name -> slot used by mixed batches (``"__base__"``: no adapter)."""
        slots = {name: i for i, name in enumerate(self._glora_configs)}
        slots["__base__"] = len(slots)
        return slots

    def _write_row_index(self, names: Any, args: tuple, kwargs: dict) -> None:
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise ConfigError(f"adapter_names must be a list with one adapter name per batch row, got {names!r}.")
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        if first is not None and first.shape[0] != len(names):
            raise ConfigError(
                f"adapter_names has {len(names)} names but the batch has {first.shape[0]} rows; "
                "give one adapter name (or '__base__') per row."
            )
        if self.training and torch.is_grad_enabled():
            raise AdapterStateError(
                "adapter_names (a mixed-adapter batch) is for inference; call gm.eval() or run under torch.no_grad()."
            )
        if self.merged:
            raise AdapterStateError(
                f"adapter_names cannot be used while adapters {self.merged_adapters} are merged into the base "
                "weights (every row would carry them); call gm.unmerge_adapter() first."
            )
        slots = self.adapter_slots()
        unknown = [n for n in names if n not in slots]
        if unknown:
            raise AdapterNotFoundError(
                f"adapter_names has unknown adapter {unknown[0]!r}; loaded adapters: "
                f"{list(self._glora_configs)} (or '__base__' for the base model)."
            )
        unmixable = [n for n in dict.fromkeys(names) if n != "__base__" and not self._rule(n).mixable(self._glora_configs[n])]
        if unmixable:
            raise ConfigError(
                f"adapter_names has {unmixable[0]!r}, a {self._rule(unmixable[0]).variant(self._glora_configs[unmixable[0]])} "
                "adapter; mixed-adapter batches support plain LoRA adapters only (as in PEFT). Run it with set_adapter instead."
            )
        index = torch.tensor([slots[n] for n in names], dtype=torch.long)
        store = self.graphlora
        current = store._buffers.get("row_index")
        if current is not None and current.shape == index.shape:
            current.copy_(index, non_blocking=True)  # in place: CUDA-graph captures stay valid
        else:
            device = next((p.device for p in store.parameters()), index.device)
            store.register_buffer("row_index", index.to(device), persistent=False)

    def _describe_signatures(self) -> str:
        lines = []
        for sig, mixed in self._glora_programs:
            if sig is None:
                continue
            desc = ", ".join(f"{name}={'<tensor>' if d[0] == 'tensor' else d[-1]!r}" for name, d in sig)
            lines.append(f"({desc}{', adapter_names=...' if mixed else ''})")
        return "; ".join(lines)

    def _trace_signature(self, kwargs: dict[str, Any], key: Any) -> Program:
        """Trace the source model for a new call signature and splice the current adapters in."""
        try:
            gm = prepare_base(trace_export(self._glora_source, kwargs), self._glora_source)
        except Exception as exc:
            given = ", ".join(f"{k}={'<tensor>' if isinstance(v, torch.Tensor) else v!r}" for k, v in kwargs.items())
            raise SignatureError(
                f"this call ({given}) needs a new graph and tracing it failed: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. "
                f"Traced signatures: {self._describe_signatures()}. Call the module with arguments "
                "the original model accepts."
            ) from exc
        self._adopt_attributes(gm, len(self._glora_programs))
        self.train(self.training)  # the new graph's dropout modules follow this module's mode
        program = Program(key, copy_graph(gm.graph), locate_sites(gm, self._glora_aliases))
        self._glora_programs[key] = program
        self._build_variant(program)
        return program

    def _new_program(self, key: Any, kwargs: dict[str, Any]) -> Program:
        """A program for an unseen (signature, mixed) key; traces the signature if needed."""
        sig, mixed = key
        base = self._glora_programs.get((sig, False))
        if base is None:
            base = self._trace_signature(kwargs, (sig, False))
        if not mixed:
            return base
        program = Program(key, copy_graph(base.base_graph), base.sites)
        self._glora_programs[key] = program
        self._build_variant(program)
        return program

    def _adopt_attributes(self, gm: fx.GraphModule, index: int) -> None:
        """Make every attribute ``gm``'s graph reads resolvable on ``self`` (same objects)."""
        for node in gm.graph.nodes:
            if node.op not in ("get_attr", "call_module"):
                continue
            obj = getattr_path(gm, node.target)
            try:
                if getattr_path(self, node.target) is obj:
                    continue
            except AttributeError:
                pass
            name = f"graphlora_sig{index}_{node.target.replace('.', '_')}"
            for owner in (self, gm):  # both resolve the new name to the same object
                if isinstance(obj, nn.Module):
                    owner.add_module(name, obj)
                elif isinstance(obj, nn.Parameter):
                    owner.register_parameter(name, obj)
                elif isinstance(obj, torch.Tensor):
                    owner.register_buffer(name, obj, persistent=False)
                else:
                    setattr(owner, name, obj)
            node.target = name
        gm.recompile()
