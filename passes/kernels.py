"""GPU kernel for the switch's rank-r update: ``out = y + h @ B^T`` in one pass over ``y``.

``torch.addmm(y, h, B^T)`` with a rank-16 inner dimension runs far above its bandwidth floor on
Hopper (44 us for a 4096 x 4096 ``y`` on an H200, where reading and writing ``y`` takes ~14 us).
This Triton kernel reads each ``[BM, BN]`` tile of ``y`` once, adds ``h_tile @ B_tile^T``
(accumulated in fp32, as ``addmm`` does) and writes it, so the update costs about one read and
one write of ``y``. Several adapters are handled by concatenating their ``h`` and ``B`` along
the rank dimension. When every gate is 0 (``h == 0``) the result equals ``y`` exactly.

Used for bf16/fp16 CUDA tensors when Triton is importable; everything else takes ``addmm``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["available", "lora_add"]


@functools.lru_cache(maxsize=1)
def _triton():
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed, or no usable backend
        return None

    configs = [
        triton.Config({"BM": bm, "BN": bn}, num_warps=w)
        for bm, bn, w in [(64, 128, 4), (128, 128, 8), (64, 256, 8), (128, 64, 4), (32, 256, 4)]
    ]

    @triton.autotune(configs=configs, key=["M", "N", "BR"])
    @triton.jit
    def lora_add_kernel(y, h, b, out, M, N, R, s_ym, s_yn, s_hm, s_hr, s_bn, s_br, s_om, s_on,
                        BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rr = tl.arange(0, BR)
        mask_m = rm < M
        mask_n = rn < N
        ht = tl.load(h + rm[:, None] * s_hm + rr[None, :] * s_hr, mask=mask_m[:, None] & (rr[None, :] < R), other=0.0)
        bt = tl.load(b + rn[:, None] * s_bn + rr[None, :] * s_br, mask=mask_n[:, None] & (rr[None, :] < R), other=0.0)
        acc = tl.dot(ht, tl.trans(bt))
        mask = mask_m[:, None] & mask_n[None, :]
        yt = tl.load(y + rm[:, None] * s_ym + rn[None, :] * s_yn, mask=mask, other=0.0)
        acc += yt.to(tl.float32)
        tl.store(out + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(out.dtype.element_ty), mask=mask)

    return triton, lora_add_kernel


def available(t: Tensor) -> bool:
    """Whether the kernel serves this tensor: CUDA, bf16/fp16, Triton importable.

    fp32 keeps ``addmm``: Triton's fp32 dot rounds inputs to tf32 (~3e-4 relative error).
    """
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) and _triton() is not None


def lora_add(y: Tensor, hs: Sequence[Tensor], bs: Sequence[Tensor]) -> Tensor:
    """``y + sum_i h_i @ B_i^T`` for 2-D ``y`` ``[M, N]``, ``h_i`` ``[M, r_i]``, ``B_i`` ``[N, r_i]``."""
    triton, kernel = _triton()
    h = hs[0] if len(hs) == 1 else torch.cat(list(hs), dim=1)
    b = bs[0] if len(bs) == 1 else torch.cat(list(bs), dim=1)
    h = h.to(y.dtype)
    b = b.to(y.dtype)
    M, N = y.shape
    R = h.shape[1]
    BR = max(16, triton.next_power_of_2(R))
    out = torch.empty_like(y, memory_format=torch.contiguous_format)

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))

    kernel[grid](y, h, b, out, M, N, R, y.stride(0), y.stride(1), h.stride(0), h.stride(1),
                 b.stride(0), b.stride(1), out.stride(0), out.stride(1), BR=BR)
    return out
