r"""A base linear with its adapter update as the epilogue, for calls of few rows (CUDA, Triton).

.. math::

    y = x W^\top + b + \Big(\sum_s h_s\Big) B^\top

for a bf16 / fp16 ``x`` ``[M, K]`` and ``W`` ``[N, K]`` (and bias ``b``), and the adapters' ``h``
``[M, R]`` (or a shrink's split-K partials ``[S, M, R]``, :func:`.kernels.shrink_parts`) with
``B`` ``[N, R]``, both float32 (PEFT's default adapters) or both of ``x``'s dtype. One pass: the
``K`` loop accumulates ``x W^\top`` in float32, the epilogue adds ``h B^\top`` (float32 factors:
a float32-accurate ``tf32x3`` dot) and the bias, and rounds once on store.

Why: at few rows (a compiled 8 x 16-token call, 128 rows) a serving site is the base GEMM, then
:func:`.kernels.add_update`'s pass over ``y``: 28 expand kernels of ~4 us each in a 4-layer
Llama-7B-shape call on an H200, 0.12 of its 1.11 ms CUDA time, and 28 launches
(``bench/h200-2026-12-04-s11``). Here the update costs no kernel and no pass over ``y``. It pays
only if this GEMM keeps up with cuBLAS's at these shapes (cuBLAS reads ``W`` at ~2.5 TB/s at
128 x 4096 x 4096): ``bench/bench_kernels.py --few`` measures both. Compiled serving programs
take it (``graphlora::lora_linear_few``) for calls of at most :data:`MAX_ROWS` rows; that is 0,
off, until it has been measured on the GPU (``bench/host_compiled_call.py --linear-few-rows``).
The serving programs' bank updates carry their base linear's inputs for it
(:class:`~graphlora.passes.fuse_linear.AttachBaseLinear`); where it serves, the base linear's
own node is left unused and Inductor drops it.

Rounding differs from the two-kernel form by at most one unit in the last place of ``y``: that
form rounds ``x W^\top + b`` to ``y``'s dtype before adding the update; this adds in float32.

The kernel reads through plain pointers (no TMA descriptors), so it runs under Triton's CPU
interpreter in the tests.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from .kernels import _rank_block, _span

__all__ = ["CONFIG", "MAX_ROWS", "compiled_ok", "linear_few", "linear_few_op"]

#: (BM, BN, BK, num_warps, num_stages): one row block of 128 rows, the programs spread over ``N``
CONFIG = (128, 32, 128, 4, 4)
#: Compiled serving calls of at most this many rows take the fused op (0: never; see the module doc);
#: it comes before the decode steps' broadcast reductions (``ops.FUSIBLE_MAX_ROWS``) where both apply
MAX_ROWS = 0
#: ... and summed ranks up to this (the epilogue's float32 ``h`` and ``B`` tiles)
MAX_RANK = 64


@functools.lru_cache(maxsize=1)
def _kernel():
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed, or no usable backend
        return None

    @triton.jit
    def linear_few_kernel(x, w, h, b, bias, out, M, N, R,
                          s_xm, s_xk, s_wn, s_wk, s_hs, s_hm, s_hr, s_bn, s_br, s_om, s_on,
                          K: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          BR: tl.constexpr, S: tl.constexpr, F32_DOT: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        rr = tl.arange(0, BR)
        mask_m = rm < M
        mask_n = rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):  # K a constant (a site's d_in): one compilation per width
            mask_k = (k0 + rk) < K
            xt = tl.load(x + rm[:, None] * s_xm + (k0 + rk)[None, :] * s_xk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(w + rn[:, None] * s_wn + (k0 + rk)[None, :] * s_wk,
                         mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(xt, tl.trans(wt), acc)
        # the epilogue: (sum_s h_s) B^T for this tile, in float32, then the bias; one rounding
        h_ptr = h + rm[:, None] * s_hm + rr[None, :] * s_hr
        h_mask = mask_m[:, None] & (rr[None, :] < R)
        ht = tl.load(h_ptr, mask=h_mask, other=0.0).to(tl.float32)
        for s in tl.static_range(1, S):
            ht += tl.load(h_ptr + s * s_hs, mask=h_mask, other=0.0).to(tl.float32)
        bt = tl.load(b + rn[:, None] * s_bn + rr[None, :] * s_br, mask=mask_n[:, None] & (rr[None, :] < R), other=0.0)
        if F32_DOT:
            acc = tl.dot(ht, tl.trans(bt.to(tl.float32)), acc, input_precision="tf32x3")
        else:
            acc = tl.dot(ht.to(bt.dtype), tl.trans(bt), acc)
        if HAS_BIAS:
            acc += tl.load(bias + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(out.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    return SimpleNamespace(triton=triton, linear=linear_few_kernel)


def linear_few(x: Tensor, w: Tensor, bias: Optional[Tensor], h: Tensor, b: Tensor,
               config: Optional[tuple] = None, _wrap: bool = False) -> Tensor:
    r"""``x W^\top + bias + h B^\top`` (module doc) for 2-D ``x`` ``[M, K]``, ``W`` ``[N, K]``, ``h``
    ``[M, R]`` or partials ``[S, M, R]``, ``B`` ``[N, R]``; ``h`` may be a column block of a wider
    tensor (any strides). ``config``: (BM, BN, BK, num_warps, num_stages), :data:`CONFIG` by
    default. ``_wrap``: launched from the ``torch.library.triton_op`` (:func:`linear_few_op`)."""
    k = _kernel()
    M, K = x.shape
    N = w.shape[0]
    parts = h if h.dim() == 3 else h[None]
    S, _, R = parts.shape
    BM, BN, BK, warps, stages = CONFIG if config is None else config
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = (k.triton.cdiv(N, BN), k.triton.cdiv(M, BM))
    kernel = torch.library.wrap_triton(k.linear) if _wrap else k.linear
    kernel[grid](x, w, parts, b, bias if bias is not None else x, out, M, N, R,
                 x.stride(0), x.stride(1), w.stride(0), w.stride(1), parts.stride(0), parts.stride(1),
                 parts.stride(2), b.stride(0), b.stride(1), out.stride(0), out.stride(1), K=K,
                 HAS_BIAS=bias is not None, BM=BM, BN=BN, BK=BK, BR=_rank_block(R), S=S,
                 F32_DOT=b.dtype == torch.float32, num_warps=warps, num_stages=stages)
    return out


def _register_op():
    """``graphlora::lora_linear_few``: :func:`linear_few` as a ``torch.library.triton_op`` (Inductor
    launches it from a compiled graph: no Python dispatch, CUDA-graph safe). Registered only where
    CUDA is available, as :mod:`.kernels`' ops are."""
    @torch.library.triton_op("graphlora::lora_linear_few", mutates_args=())
    def lora_linear_few(x: Tensor, w: Tensor, bias: Optional[Tensor], h: Tensor, b: Tensor) -> Tensor:
        return linear_few(x, w, bias, h, b, _wrap=True)

    return lora_linear_few


_OP = _register_op() if torch.cuda.is_available() and _kernel() is not None else None


def _serves(x: Tensor) -> bool:
    """The op is registered (CUDA and Triton here) and ``x`` is on CUDA."""
    return _OP is not None and x.is_cuda


def compiled_ok(base: Tensor, x: Tensor, w: Tensor, bias: Optional[Tensor], h: Tensor, b: Tensor) -> bool:
    """Whether a compiled serving update takes :func:`linear_few_op` for its base linear ``base``
    (``[rows, N]``): at most :data:`MAX_ROWS` rows (a size check on a dynamic row count: a graph
    recompiles when it crosses), ``base`` of ``x``'s dtype (not so under autocast), a CUDA
    bf16 / fp16 ``x`` and a plain ``W`` (no quantized or other tensor subclass) of its dtype,
    factors both float32 or both of its dtype, a summed rank of at most :data:`MAX_RANK`, a
    contiguous bias of ``x``'s dtype if any, int32 offsets, and no grad (the op has no backward).
    Call it inside ``torch.compiler.is_compiling()`` only."""
    if MAX_ROWS <= 0 or not _serves(x) or base.shape[0] > MAX_ROWS:  # off by default: no size looked at
        return False
    return (base.dtype == x.dtype and x.dim() >= 2 and x.dtype in (torch.bfloat16, torch.float16)
            and type(w) in (torch.Tensor, torch.nn.Parameter) and w.dim() == 2 and w.dtype == x.dtype
            and h.dtype == b.dtype and h.dtype in (torch.float32, x.dtype) and h.shape[-1] <= MAX_RANK
            and not torch.is_grad_enabled()
            and (bias is None or (bias.dtype == x.dtype and bias.dim() == 1 and bias.stride(0) == 1))
            and max(_span(x), _span(w), _span(h), _span(b)) < 2 ** 31)


def linear_few_op(x: Tensor, w: Tensor, bias: Optional[Tensor], h: Tensor, b: Tensor) -> Tensor:
    """``x W^T + bias + h B^T`` through ``graphlora::lora_linear_few`` (where :func:`compiled_ok` holds),
    ``[rows, N]`` for ``x`` ``[..., K]``."""
    return _OP(x.reshape(-1, x.shape[-1]), w, bias, h, b)
