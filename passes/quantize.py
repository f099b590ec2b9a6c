"""Quantized frozen base weights: the weight tensor, its linear op, and the pass that swaps them in.

A base weight ``W`` (``d_out x d_in``) is stored in one of two formats:

- ``"nf4"`` (QLoRA's NormalFloat-4, Dettmers et al. 2023, packed byte for byte as torchao's ``NF4Tensor``): the
  flattened weight is cut into blocks of ``block_size`` values; block ``j`` keeps its absmax
  ``s_j`` and each value ``w`` as the index of the nearest of 16 NF4 levels ``q_k`` to ``w / s_j``
  (two indices a byte). The absmaxes are quantized again ("double quantization"): ``s_j - mean(s)``
  in int8 with one float factor ``f_i`` per group of ``scaler_block_size`` blocks. Dequantizing::

      W[j, t] = q[code[j, t]] * (int8_j / f_{j // scaler_block_size} + mean(s))

  About ``0.5 + 1/block_size`` bytes a value (0.26x bf16 at ``block_size=64``).
- ``"int8"`` (weight-only, symmetric per output row): ``W[o, :] = q[o, :] * c_o`` with
  ``c_o = max |W[o, :]| / 127`` and ``q`` int8 (0.5x bf16, plus one float a row).

:class:`QuantizedWeight` is a tensor subclass with the weight's shape and its compute dtype, holding
only the packed tensors. ``linear(x, W, b)`` on it (``F.linear``, ``aten.linear``, and graphlora's
fused ``lora_linear`` switch) runs :func:`quant_linear`, whose backward dequantizes again instead of
saving a dense copy, so a training step keeps no full-precision base weight alive. Any other op on
it sees the dequantized weight. Copying a dense tensor into it (``W.copy_(dense)``) requantizes in
place in its own format; copying another :class:`QuantizedWeight` copies the packed bytes exactly.

:class:`QuantizeBase` is the pass: it swaps the weight tensor that each named site of a graph reads
for its quantized form. The graph itself, and so every switch, mixed batch and compiled program
over it, stays as it is: only the tensor behind the ``get_attr`` changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map

from ._compat import wrapper_subclass
from .ops import lora_switch
from .result import GraphPass
from .sites import Site

__all__ = ["QuantizedWeight", "ExternalFormat", "quant_linear", "quantize_tensor", "QuantizeBase", "FORMATS",
           "is_quantized"]

FORMATS = ("nf4", "int8")

aten = torch.ops.aten

#: the 16 NF4 levels (QLoRA, appendix E; the values torchao's NF4Tensor uses)
NF4_LEVELS = (-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
              0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0)


def _scaler_block(n_blocks: int, wanted: int) -> int:
    """The largest divisor of ``n_blocks`` that is at most ``wanted`` (double quantization groups)."""
    for size in range(min(wanted, n_blocks), 0, -1):
        if n_blocks % size == 0:
            return size
    return 1


def quantize_tensor(weight: Tensor, fmt: str, block_size: int = 64, scaler_block_size: int = 256) -> "QuantizedWeight":
    """``weight`` (2-D, floating) in format ``fmt``; see the module docstring for the math.

    NF4 packing is torchao's (``torchao.quantization.to_nf4``, reproduced here: torchao is not
    needed); ``scaler_block_size`` shrinks to the largest divisor of the block count when it does not
    divide it (small layers).

    Raises:
        ValueError: an unknown format, a weight that is not 2-D floating point, or (nf4) a weight
            whose size is not a multiple of ``block_size``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; use one of {list(FORMATS)}.")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"can only quantize 2-D floating-point weights, got shape {tuple(weight.shape)} "
                         f"dtype {weight.dtype}.")
    w = weight.detach()
    if fmt == "int8":
        scale = w.float().abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight("int8", {"qdata": q, "scale": scale.to(w.dtype)}, (), w.shape, w.dtype)
    if w.numel() % block_size:
        raise ValueError(f"nf4: a weight of shape {tuple(w.shape)} ({w.numel()} values) is not a multiple of "
                         f"block_size={block_size}; pass a block_size that divides it or skip that module.")
    n_blocks = w.numel() // block_size
    inner = _pack_nf4(w.contiguous(), block_size, _scaler_block(n_blocks, scaler_block_size))
    return QuantizedWeight("nf4", inner, (block_size, _scaler_block(n_blocks, scaler_block_size)), w.shape, w.dtype)


_CHUNK = 1 << 20  # values per nearest-level search (bounds the [chunk, 16] temporary)


def _pack_nf4(w: Tensor, block: int, scaler_block: int) -> dict[str, Tensor]:
    """NF4 with double-quantized absmaxes, byte for byte as torchao's ``to_nf4`` packs it
    (``tests/test_quantize.py`` checks that), in the weight's dtype."""
    flat = w.reshape(-1)
    absmax = flat.view(-1, block).abs().amax(dim=1)  # s_j
    mean = absmax.mean()
    centred = (absmax - mean).view(-1, scaler_block)
    factor = 256 / (2 * centred.abs().amax(dim=1))  # f_i, one per scaler group
    scalers = (centred * factor.unsqueeze(-1)).round().clamp(-128, 127).to(torch.int8).reshape(-1)
    levels = torch.tensor(NF4_LEVELS, dtype=w.dtype, device=w.device)
    scaled = (flat.view(-1, block) / absmax.unsqueeze(-1)).reshape(-1)
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=w.device)
    for start in range(0, flat.numel(), _CHUNK):
        part = scaled[start:start + _CHUNK]
        codes[start:start + _CHUNK] = (part.unsqueeze(-1) - levels).abs().min(dim=-1).indices.to(torch.uint8)
    data = codes[::2] << 4 | codes[1::2]
    return {"data": data, "scalers": scalers, "factor": factor.contiguous(), "mean": mean.reshape(()),
            "levels": levels}


def _dequantize(fmt: str, inner: Mapping[str, Tensor], params: tuple, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    if fmt == "int8":
        return (inner["qdata"].to(dtype) * inner["scale"].to(dtype)[:, None]).reshape(shape)
    block, scaler_block = params
    data, levels = inner["data"], inner["levels"]
    # two values a byte: the high nibble first; int32 indices (not int64) keep the temporaries small
    values = torch.stack([levels[(data >> 4).int()], levels[(data & 0b1111).int()]], dim=-1)
    scalers = inner["scalers"].reshape(-1, scaler_block) / inner["factor"].unsqueeze(-1)
    scalers = scalers.reshape(-1).to(inner["mean"].dtype) + inner["mean"]
    values = values.reshape(-1, block) * scalers.unsqueeze(-1)
    return values.reshape(shape).to(dtype)


@dataclass(frozen=True)
class ExternalFormat:
    """A weight packed by another library (bitsandbytes): how to run and read it.

    Attributes:
        linear: ``x -> x Ŵᵀ + b`` by the library's own kernel (bias included), differentiable in ``x``.
        dequantize: ``() -> Ŵ`` (dense, the compute dtype).
        nbytes: bytes the library stores for it.
        device: where it lives.
        bias: the layer's bias (``linear`` adds it; a graph's ``linear(x, W, b)`` must pass this one).
    """

    linear: Callable[[Tensor], Tensor]
    dequantize: Callable[[], Tensor]
    nbytes: int
    device: torch.device
    bias: Union[Tensor, None] = None


class QuantizedWeight(Tensor):
    """A frozen base weight stored quantized (``nf4`` or ``int8``); see the module docstring.

    Its ``shape`` is the weight's and its ``dtype`` the compute dtype (the dense weight's); it never
    requires grad. ``dequantize()`` gives the dense weight, ``nbytes_packed`` what it stores. With
    ``external`` (formats ``"bnb4"`` / ``"bnb8"``) the packed data belong to another library, which
    also runs the linear; such a weight cannot be moved, copied into or compiled.
    """

    @staticmethod
    def __new__(cls, fmt: str, inner: Mapping[str, Tensor], params: tuple, shape: Sequence[int],
                dtype: torch.dtype, external: Union[ExternalFormat, None] = None) -> "QuantizedWeight":
        device = external.device if external is not None else next(iter(inner.values())).device
        return wrapper_subclass(cls, tuple(shape), dtype, device)

    def __init__(self, fmt: str, inner: Mapping[str, Tensor], params: tuple, shape: Sequence[int],
                 dtype: torch.dtype, external: Union[ExternalFormat, None] = None) -> None:
        self.fmt, self.params, self.inner, self.external = fmt, tuple(params), dict(inner), external
        for key, tensor in self.inner.items():  # the names __tensor_flatten__ gives
            setattr(self, f"inner_{key}", tensor)

    def dequantize(self, dtype: Union[torch.dtype, None] = None) -> Tensor:
        """The dense weight (in ``dtype``, default the compute dtype)."""
        if self.external is not None:
            return self.external.dequantize().to(dtype or self.dtype)
        return _dequantize(self.fmt, self.inner, self.params, self.shape, dtype or self.dtype)

    @property
    def nbytes_packed(self) -> int:
        """Bytes of the packed tensors (what replaces ``numel * element_size`` of the dense weight)."""
        if self.external is not None:
            return self.external.nbytes
        return sum(t.numel() * t.element_size() for t in self.inner.values())

    def _rebuild(self, fn: Any, dtype: Union[torch.dtype, None] = None) -> "QuantizedWeight":
        return QuantizedWeight(self.fmt, {k: fn(t) for k, t in self.inner.items()}, self.params, self.shape,
                               dtype or self.dtype, self.external)

    def _external_only(self, what: str) -> None:
        if self.external is not None:
            raise NotImplementedError(
                f"cannot {what} a {self.fmt} weight (its bytes belong to bitsandbytes); load the model on the "
                "device and dtype wanted before graphlora.quantize.inject_bnb."
            )

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return (f"QuantizedWeight({self.fmt}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"device={self.device}, params={self.params})")

    # torch.compile / export see the packed tensors
    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        names = sorted(self.inner)
        return [f"inner_{n}" for n in names], (self.fmt, self.params, self.dtype, tuple(self.shape), tuple(names))

    @staticmethod
    def __tensor_unflatten__(inner: Mapping[str, Tensor], meta: tuple, outer_size: Any, outer_stride: Any):
        fmt, params, dtype, shape, names = meta
        return QuantizedWeight(fmt, {n: inner[f"inner_{n}"] for n in names}, params, shape, dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_exporting():
            raise RuntimeError(
                "torch.export cannot trace a quantized base weight (graphlora QuantizedWeight): the trace would "
                "dequantize it inline and lose the linear sites. Trace each call signature before quantizing "
                "(graphlora.quantize_base(gm, ..., trace=[{...call kwargs...}])), or trace the full-precision model."
            )
        if func in _LINEARS:
            x, w, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            if isinstance(w, QuantizedWeight) and not isinstance(x, QuantizedWeight):
                return quant_linear(x, w, bias)
        if func is _lora_linear_op():
            x, w, bias, hs, bs = args
            if isinstance(w, QuantizedWeight):
                return lora_switch(quant_linear(x, w, bias), hs, bs)
        # Tensor's own handler, as for a plain tensor: no re-wrapping of results into this class
        return Tensor.__torch_function__(func, (Tensor,), args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self = args[0] if args else None
        if func in (aten.detach.default, aten.alias.default) and isinstance(self, QuantizedWeight):
            return self._rebuild(lambda t: t)
        if func is aten.clone.default and isinstance(self, QuantizedWeight):
            self._external_only("clone")
            return self._rebuild(lambda t: t.clone())
        if func is aten._to_copy.default and isinstance(self, QuantizedWeight):
            device = kwargs.get("device")
            if device is not None and torch.device(device) != self.device:
                self._external_only("move")
            moved = self._rebuild((lambda t: t.to(device)) if device is not None else (lambda t: t.clone()),
                                  dtype=kwargs.get("dtype"))
            return moved
        if func is aten.copy_.default and isinstance(self, QuantizedWeight):
            self._external_only("copy into")
            src = args[1]
            if not isinstance(src, QuantizedWeight) or src.fmt != self.fmt or src.params != self.params:
                dense = src.dequantize() if isinstance(src, QuantizedWeight) else src
                block, scaler = self.params if self.fmt == "nf4" else (64, 256)
                src = quantize_tensor(dense.to(self.device), self.fmt, block, scaler)
            for key, tensor in self.inner.items():
                tensor.copy_(src.inner[key])
            return self
        # anything else: the op on the dense weight
        dense = tree_map(lambda a: a.dequantize() if isinstance(a, QuantizedWeight) else a, (args, kwargs))
        return func(*dense[0], **dense[1])


def is_quantized(t: Any) -> bool:
    """Whether ``t`` is a :class:`QuantizedWeight`."""
    return isinstance(t, QuantizedWeight)


class _QuantLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W`` dequantized in the forward and again in the backward
    (``dL/dx = g W``); only the packed weight is saved. ``W`` is frozen: no ``dL/dW``."""

    @staticmethod
    def forward(ctx, x: Tensor, w: QuantizedWeight, bias: Union[Tensor, None]) -> Tensor:
        ctx.w = w
        ctx.has_bias = bias is not None
        return F.linear(x, w.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w = ctx.w
        grad_x = grad @ w.dequantize(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_b


def quant_linear(x: Tensor, w: QuantizedWeight, bias: Union[Tensor, None] = None) -> Tensor:
    r"""``x \hat W^\top + b`` for a quantized ``W`` (:class:`QuantizedWeight`), ``\hat W`` its dequantized value.

    An external weight (bitsandbytes) runs its library's kernel, which adds the layer's own bias.
    """
    if w.external is not None:
        if bias is not None and bias is not w.external.bias:
            raise ValueError(f"a {w.fmt} weight runs with its own layer's bias, not another tensor.")
        return w.external.linear(x)
    if torch.compiler.is_compiling():  # Inductor fuses the dequantize; autograd differentiates it
        return F.linear(x, w.dequantize(x.dtype), bias)
    return _QuantLinear.apply(x, w, bias)


_LINEARS = (F.linear, aten.linear.default, torch._C._nn.linear)


def _lora_linear_op() -> Any:
    return torch.ops.graphlora.lora_linear.default


class QuantizeBase(GraphPass):
    """Swap the weight tensors that ``sites`` read in ``gm`` for quantized ones.

    The tensor at each site's weight path on ``gm`` is replaced by ``weights[path]`` (a
    :class:`QuantizedWeight`), registered as a buffer where a parameter was; the graph is unchanged
    (``get_attr`` reads the new tensor). ``modified`` is False: the pass changes no node.

    Args:
        sites: the sites whose weights to swap.
        weights: weight path -> its quantized tensor.
    """

    def __init__(self, sites: Sequence[Site], weights: Mapping[str, QuantizedWeight]) -> None:
        self.sites, self.weights = tuple(sites), weights

    def rewrite(self, gm: fx.GraphModule) -> bool:
        for site in self.sites:
            new = self.weights.get(site.weight)
            if new is None:
                continue
            swap_tensor(gm, site.weight, new)
        return False


def swap_tensor(root: torch.nn.Module, path: str, new: Tensor) -> None:
    """Put ``new`` at ``path`` on ``root`` as a buffer (replacing a parameter or buffer there)."""
    prefix, _, name = path.rpartition(".")
    owner = root.get_submodule(prefix) if prefix else root
    if hasattr(owner, name):
        delattr(owner, name)
    owner.register_buffer(name, new)
