"""A quantized frozen base (QLoRA): :func:`quantize_base`, merging into it, and bitsandbytes models.

QLoRA (Dettmers et al., 2023) trains low-rank adapters over a frozen base stored in 4 bits:

.. math::

    y = x \\hat W^\\top + b + \\sum_i g_i \\, (x A_i^\\top) B_i^\\top,
    \\qquad \\hat W = \\mathrm{dequant}(\\mathrm{quant}(W))

with the adapters ``A_i``, ``B_i`` in full precision. :func:`quantize_base` swaps every frozen base
linear weight of an injected module for a :class:`~graphlora.passes.quantize.QuantizedWeight`
(``"nf4"``: NF4 with double-quantized block scales, packed byte for byte as torchao's ``to_nf4``,
0.26x the bytes of bf16;
``"int8"``: weight-only, per output row, 0.5x). The graph does not change: each base ``linear``
reads the new tensor through the same ``get_attr``, and a linear on it dequantizes on the fly (in
the backward too, so no dense copy stays alive). Switching adapters, mixed batches
(``adapter_names=[...]``) and ``torch.compile`` work as before.

**Merging** into a quantized base cannot be exact: ``quant(W + s B A)`` rounds the update away in
part. As PEFT documents for bitsandbytes layers ("merging may give different generations due to
rounding errors"), merging dequantizes, adds the update and requantizes; graphlora does that only
inside :func:`allow_requantize` and otherwise refuses with a :class:`~graphlora.MergeError`.
Unmerging restores the packed bytes saved at the first merge exactly.

**bitsandbytes models** (``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``)
cannot be traced by ``torch.export`` as they come (``Params4bit`` / ``Int8Params`` break fake
tensors); :func:`inject_bnb` traces them with dense stand-ins and serves the bitsandbytes
weights through the same :class:`QuantizedWeight` interface (formats ``"bnb4"``, ``"bnb8"``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

from .errors import GraphLoraError, MergeError
from .passes import run_passes
from .passes.quantize import (FORMATS, ExternalFormat, QuantizeBase, QuantizedWeight, is_quantized, quantize_tensor,
                              swap_tensor)
from .passes.sites import getattr_path

__all__ = ["quantize_base", "inject_bnb", "QuantizeReport", "QuantizationError", "allow_requantize",
           "requantize_allowed", "check_merge_target", "base_weight_bytes", "is_quantized"]


class QuantizationError(GraphLoraError, ValueError):
    """The base cannot be quantized as asked (already quantized, merged, or an unusable format)."""


@dataclass(frozen=True)
class QuantizeReport:
    """What :func:`quantize_base` did.

    Attributes:
        format: ``"nf4"`` or ``"int8"``.
        modules: the site names whose base weight is now quantized.
        skipped: ``(site, reason)`` for each linear site left in full precision.
        dense_bytes: bytes of those weights before (in their dtype).
        packed_bytes: bytes of their quantized form.
        values: how many weight values they hold (``2 * values`` bytes in bf16).
    """

    format: str
    modules: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    dense_bytes: int
    packed_bytes: int
    values: int

    @property
    def ratio(self) -> float:
        """``packed_bytes / dense_bytes``."""
        return self.packed_bytes / self.dense_bytes if self.dense_bytes else 1.0

    @property
    def ratio_vs_bf16(self) -> float:
        """``packed_bytes`` over the bytes of the same weights in bf16."""
        return self.packed_bytes / (2 * self.values) if self.values else 1.0


_REQUANTIZE: ContextVar[bool] = ContextVar("graphlora_allow_requantize", default=False)


@contextlib.contextmanager
def allow_requantize(allowed: bool = True) -> Iterator[None]:
    """Within this block, merging into a quantized base dequantizes, merges and requantizes.

    >>> with graphlora.allow_requantize():
    ...     gm.merge_adapter()
    """
    token = _REQUANTIZE.set(bool(allowed))
    try:
        yield
    finally:
        _REQUANTIZE.reset(token)


def requantize_allowed() -> bool:
    """Whether the caller is inside :func:`allow_requantize`."""
    return _REQUANTIZE.get()


def _foreign_quantized(t: Any) -> Union[str, None]:
    """A name for a weight quantized by another library (bitsandbytes, torchao), else ``None``."""
    if is_quantized(t):
        return f"graphlora {t.fmt}"
    module = type(t).__module__ or ""
    for lib in ("bitsandbytes", "torchao"):
        if module.startswith(lib):
            return f"{lib} {type(t).__name__}"
    if isinstance(t, torch.Tensor) and not t.is_floating_point():
        return f"dtype {t.dtype}"
    return None


def check_merge_target(path: str, adapter: str, weight: torch.Tensor) -> None:
    """Refuse merging ``adapter`` into the quantized weight at ``path`` unless requantizing is allowed.

    Raises:
        MergeError: naming the weight, its format and the two ways on.
    """
    if is_quantized(weight) and weight.external is not None:
        raise MergeError(
            f"cannot merge adapter {adapter!r} into {path!r}: the base weight is bitsandbytes' ({weight.fmt}), which "
            "graphlora does not requantize. Serve it unmerged (graphlora.specialize), or load the base in full "
            "precision and merge there."
        )
    if is_quantized(weight) and not requantize_allowed():
        raise MergeError(
            f"cannot merge adapter {adapter!r} into {path!r}: the base weight is quantized ({weight.fmt}), so "
            "a merge rounds the update (dequantize, add, requantize) and the outputs change. Serve it unmerged "
            "(graphlora.specialize), or allow the rounding: `with graphlora.allow_requantize(): gm.merge_adapter(...)`."
        )


def _output_head(source: nn.Module) -> Union[str, None]:
    get = getattr(source, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((name for name, module in source.named_modules() if module is head), None)


def _skip(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def quantize_base(gm: Any, format: str = "nf4", *, block_size: int = 64, scaler_block_size: int = 256,
                  skip_modules: Union[Iterable[str], None] = None,
                  trace: Iterable[Mapping[str, Any]] = ()) -> QuantizeReport:
    """Store every frozen base linear weight of ``gm`` quantized (see the module docstring).

    Every linear site of the graph is quantized except the output head (``lm_head``, as
    bitsandbytes leaves it), weights tied to another parameter, ``addmm`` sites (GPT-2's
    ``Conv1D``), and modules named in ``skip_modules`` (PEFT's list rule: equal or ending in
    ``"." + entry``). Adapters stay as they are, in full precision.

    Args:
        gm: an :class:`~graphlora.AdaptedGraphModule` (from :func:`graphlora.inject`).
        format: ``"nf4"`` (4-bit NormalFloat, torchao's packing) or ``"int8"`` (weight-only, per row).
        block_size: NF4 values per absmax block (64, as QLoRA).
        scaler_block_size: NF4 blocks per double-quantization group (256; shrunk to a divisor of a
            small layer's block count).
        skip_modules: site names to keep in full precision.
        trace: keyword arguments of calls whose signature should be traced first (for example
            ``{"input_ids": ids, "labels": ids}`` for training): each runs once, under
            ``torch.no_grad()``, on the full-precision base. ``torch.export`` cannot trace a quantized
            base, so a call signature first seen after quantizing raises a ``SignatureError``.

    Returns:
        A :class:`QuantizeReport` (sites, skipped sites, bytes before and after).

    Raises:
        QuantizationError: an unknown ``format``; a base weight that is quantized already
            (graphlora, bitsandbytes, torchao); adapters merged into the base (unmerge first); an
            NF4 weight whose size ``block_size`` does not divide. The module is then unchanged.
    """
    if format not in FORMATS:
        raise QuantizationError(f"unknown format {format!r}; use one of {list(FORMATS)}.")
    if block_size < 2 or block_size % 2:
        raise QuantizationError(f"block_size must be an even number >= 2, got {block_size!r}.")
    state, programs = gm.adapter_state, gm.programs
    if state.merge.merged:
        raise QuantizationError(
            f"adapters {list(state.merge.merged)} are merged into the base weights; quantizing would bake them in. "
            "Call gm.unmerge_adapter() first."
        )
    skip = list(skip_modules or ())
    head = _output_head(programs.source)
    aliases = programs.aliases
    chosen, skipped = [], []
    for name, site in programs.records.items():
        if site.kind == "addmm":
            skipped.append((name, "addmm (Conv1D) site"))
        elif site.kind == "embedding":
            skipped.append((name, "embedding (a lookup, not a matmul)"))
        elif head is not None and name == head:
            skipped.append((name, "output head"))
        elif aliases.get(site.weight):
            skipped.append((name, f"weight tied to {aliases[site.weight]}"))
        elif _skip(name, skip):
            skipped.append((name, "skip_modules"))
        else:
            chosen.append(site)
    done = [(s.name, what) for s in chosen if (what := _foreign_quantized(getattr_path(gm, s.weight)))]
    if done:
        raise QuantizationError(
            f"the base is already quantized: {done[:3]}{' ...' if len(done) > 3 else ''}. Quantize a base once; "
            "to change the format, inject the full-precision model again."
        )
    if not chosen:
        raise QuantizationError(f"no linear base weight to quantize (skipped: {skipped[:5]}).")
    with torch.no_grad():
        for kwargs in trace:
            gm(**kwargs)
    weights: dict[str, QuantizedWeight] = {}
    old: dict[str, torch.Tensor] = {}
    for site in chosen:
        dense = getattr_path(gm, site.weight)
        try:
            weights[site.weight] = quantize_tensor(dense, format, block_size, scaler_block_size)
        except ValueError as exc:
            raise QuantizationError(f"site {site.name!r}: {exc} (or skip_modules=[{site.name!r}])") from exc
        old[site.weight] = dense
    _swap_everywhere(gm, chosen, weights, old)
    return QuantizeReport(
        format, tuple(s.name for s in chosen), tuple(skipped),
        sum(t.numel() * t.element_size() for t in old.values()),
        sum(w.nbytes_packed for w in weights.values()),
        sum(t.numel() for t in old.values()),
    )


def _swap_everywhere(gm: Any, sites: Sequence[Any], weights: Mapping[str, QuantizedWeight],
                     old: Mapping[str, torch.Tensor]) -> None:
    """Put each quantized weight wherever the dense one was: the emitted module and every program's
    modules (through :class:`QuantizeBase`), the source model, and any other slot holding the tensor."""
    modules: list[nn.Module] = [gm]
    for program in gm.programs:
        for module in (program.base, program.module):
            if module is not None and all(module is not m for m in modules):
                modules.append(module)
    for module in modules:
        run_passes(module, [QuantizeBase(sites, weights)])
    by_id = {id(t): weights[p] for p, t in old.items()}
    for tree in (gm.programs.source, *modules):  # other names of the same tensor object
        for owner in tree.modules():
            slots = [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]
            for name, tensor in slots:
                new = by_id.get(id(tensor))
                if new is not None:
                    swap_tensor(owner, name, new)


def base_weight_bytes(module: nn.Module) -> tuple[int, int]:
    """``(quantized weight bytes, full-precision parameter and buffer bytes)`` of ``module``'s tensors."""
    packed, dense, seen = 0, 0, set()
    for t in (*module.parameters(), *module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if is_quantized(t):
            packed += t.nbytes_packed
        else:
            dense += t.numel() * t.element_size()
    return packed, dense



# ---------------------------------------------------------------------------- bitsandbytes models
def _bnb_kind(module: nn.Module) -> Union[str, None]:
    """``"bnb4"`` / ``"bnb8"`` for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, else ``None``."""
    if not (type(module).__module__ or "").startswith("bitsandbytes"):
        return None
    name = type(module).__name__
    return "bnb4" if name == "Linear4bit" else "bnb8" if name == "Linear8bitLt" else None


def _dense_dtype(model: nn.Module) -> torch.dtype:
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return dtypes[0] if dtypes else torch.float32


def _bnb_weight(module: nn.Module, kind: str, dtype: torch.dtype) -> QuantizedWeight:
    """The bitsandbytes layer's weight as an external :class:`QuantizedWeight` (same bytes, same kernel)."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    shape = (module.out_features, module.in_features)
    if kind == "bnb4":
        state = weight.quant_state
        extra = [state.absmax, *(() if state.state2 is None else (state.state2.absmax, state.state2.code))]

        def dequantize() -> torch.Tensor:
            return bnbf.dequantize_4bit(weight.data, state).reshape(shape)
    else:
        extra = [] if getattr(weight, "SCB", None) is None else [weight.SCB]

        def dequantize() -> torch.Tensor:
            return weight.data.float() * weight.SCB.float().unsqueeze(1) / 127.0
    nbytes = weight.numel() * weight.element_size() + sum(t.numel() * t.element_size() for t in extra)
    external = ExternalFormat(module, dequantize, nbytes, weight.device, module.bias)
    return QuantizedWeight(kind, {}, (), shape, dtype, external)


def inject_bnb(model: nn.Module, config: Any = None, *, trace: Iterable[Mapping[str, Any]] = (),
               **inject_kwargs: Any) -> Any:
    """:func:`graphlora.inject` for a model loaded with bitsandbytes (``BitsAndBytesConfig``, 4- or 8-bit).

    ``torch.export`` cannot trace bitsandbytes' parameters, so each ``Linear4bit`` / ``Linear8bitLt``
    is replaced in ``model`` by an ``nn.Linear`` holding a dense stand-in for the trace (zero strides:
    no memory), then by the layer's own weight as an external :class:`QuantizedWeight` that runs
    bitsandbytes' kernel (``matmul_4bit`` / ``matmul``) with the layer's bias: the same base
    function as the bitsandbytes model, so PEFT adapters saved from the result load on the same
    quantized base with equal outputs. Adapters are in the model's dense dtype.

    Args:
        model: a transformers model with bitsandbytes linears.
        config: the adapter config, as for :func:`graphlora.inject`.
        trace: keyword arguments of further call signatures to trace now (``{"input_ids": ids,
            "labels": ids}`` for training); a signature first seen later raises a ``SignatureError``.
        **inject_kwargs: passed to :func:`graphlora.inject`.

    Raises:
        QuantizationError: no bitsandbytes linear in ``model``.
    """
    from .api import inject

    layers = [(name, module, kind) for name, module in model.named_modules() if (kind := _bnb_kind(module))]
    if not layers:
        raise QuantizationError("no bitsandbytes Linear4bit / Linear8bitLt in the model; use graphlora.inject "
                                "(and graphlora.quantize_base to quantize in the graph).")
    dtype = _dense_dtype(model)
    weights: dict[str, QuantizedWeight] = {}
    stand_ins: dict[str, torch.Tensor] = {}
    for name, module, kind in layers:
        weights[f"{name}.weight"] = _bnb_weight(module, kind, dtype)
        plain = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        stand_in = torch.zeros((), dtype=dtype, device=module.weight.device).expand(module.out_features,
                                                                                   module.in_features)
        plain.weight = nn.Parameter(stand_in, requires_grad=False)
        if module.bias is not None:
            plain.bias = module.bias
        stand_ins[f"{name}.weight"] = plain.weight
        parent, _, child = name.rpartition(".")
        (model.get_submodule(parent) if parent else model).add_module(child, plain)
    gm = inject(model, config, **inject_kwargs)
    with torch.no_grad():
        for kwargs in trace:
            gm(**kwargs)
    sites = [s for s in gm.programs.records.values() if s.weight in weights]
    _swap_everywhere(gm, sites, weights, stand_ins)
    return gm
