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
128 x 4096 x 4096): ``bench/bench_kernels.py --few`` measures both. It is not wired into the
serving programs until that has been measured on the GPU.

Rounding differs from the two-kernel form by at most one unit in the last place of ``y``: that
form rounds ``x W^\top + b`` to ``y``'s dtype before adding the update; this adds in float32.

The kernel reads through plain pointers (no TMA descriptors), so it runs under Triton's CPU
interpreter in the tests.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
from torch import Tensor

from .kernels import _rank_block

__all__ = ["CONFIG", "linear_few"]

#: (BM, BN, BK, num_warps, num_stages): one row block of 128 rows, the programs spread over ``N``
CONFIG = (128, 32, 128, 4, 4)


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


def linear_few(x: Tensor, w: Tensor, bias: Tensor | None, h: Tensor, b: Tensor, config: tuple = CONFIG) -> Tensor:
    r"""``x W^\top + bias + h B^\top`` (module doc) for 2-D ``x`` ``[M, K]``, ``W`` ``[N, K]``, ``h``
    ``[M, R]`` or partials ``[S, M, R]``, ``B`` ``[N, R]``; ``h`` may be a column block of a wider
    tensor (any strides). ``config``: (BM, BN, BK, num_warps, num_stages)."""
    k = _kernel()
    M, K = x.shape
    N = w.shape[0]
    parts = h if h.dim() == 3 else h[None]
    S, _, R = parts.shape
    BM, BN, BK, warps, stages = config
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = (k.triton.cdiv(N, BN), k.triton.cdiv(M, BM))
    k.linear[grid](x, w, parts, b, bias if bias is not None else x, out, M, N, R,
                   x.stride(0), x.stride(1), w.stride(0), w.stride(1), parts.stride(0), parts.stride(1),
                   parts.stride(2), b.stride(0), b.stride(1), out.stride(0), out.stride(1), K=K,
                   HAS_BIAS=bias is not None, BM=BM, BN=BN, BK=BK, BR=_rank_block(R), S=S,
                   F32_DOT=b.dtype == torch.float32, num_warps=warps, num_stages=stages)
    return out
