"""Triton kernels for the adapter path on CUDA (bf16/fp16); everything else takes plain PyTorch.

Kernels for the update ``y += h B^T`` (``h = g x A^T``, rank ``r``), which cuBLAS runs far
above its bandwidth floor when the inner dimension is ``r`` (16):

- :func:`lora_add`: ``out = y + h B^T`` in one pass over ``y`` (``addmm(y, h, B^T)`` with a
  rank-16 inner dimension took 44 us for a 4096 x 4096 ``y`` on an H200, whose read+write floor
  is ~14 us).
- :func:`lora_linear`: the base GEMM with the rank-``r`` update as its epilogue,
  ``y = x W^T + b + h B^T``: after the ``K`` loop over ``x`` and ``W`` the fp32 accumulator gets
  ``h_tile @ B_tile^T`` before the single store, so the adapter costs no pass over ``y`` at all.
- :func:`expand_into`: ``y += h B^T`` in place with float32 ``h`` and ``B`` over a bf16 / fp16
  ``y`` (the serving banks' update with PEFT's default float32 adapters).

Every kernel accumulates in fp32 and rounds once on store. Several adapters at one site are
handled by concatenating their ``h`` and ``B`` along the rank dimension. Tile configurations are
fixed per shape class (measured on an H200, ``bench/bench_kernels.py``) rather than autotuned at
first call, so two runs of the same model use the same kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import Tensor

__all__ = ["add_update", "available", "compiled_expand_ok", "expand_into", "expand_ok", "expand_op", "fused_linear_ok",
           "lora_add", "lora_linear", "shrink", "shrink_ok", "shrink_parts"]

#: :func:`expand_into` serves calls of at least this many tokens (below, the call is bound by the
#: host, where a Python kernel launch costs more than it saves)
EXPAND_MIN_TOKENS = 512
#: ... and summed ranks (``K R``) up to this: ``[64 + 128, 64]`` float32 tiles, 48 KiB of shared memory
EXPAND_MAX_RANK = 64
#: ``lora_add`` tiles: (BM, BN, num_warps).
ADD_CONFIG = (64, 128, 4)
#: ``shrink_parts`` tiles: (BM, BK, K_PER: the ``K`` each program sums, num_warps).
SHRINK_CONFIG = (64, 64, 512, 4)
#: Calls of at most this many rows take :data:`SHRINK_FEW_CONFIG`: more programs over ``K``, where
#: :data:`SHRINK_CONFIG` leaves 2 x 8 programs at 128 rows. H200, a compiled 8 x 16-token call of
#: the 4-layer Llama-7B-shape benchmark: its 16 shrinks 0.228 -> 0.145 ms of CUDA time
#: (``bench/h200-2026-12-04-s11``; per-shape tiles in ``sweep-few-rows.json``).
SHRINK_FEW_MAX_ROWS = 256
SHRINK_FEW_CONFIG = (32, 64, 256, 4)
#: Compiled calls of at most this many rows hand the shrink's split-K partials ``[S, M, R]`` to the
#: expand kernel, which sums them (:func:`add_update`): one launch less per group of sites (16 in
#: a 4-layer call), but on the GPU the expand's S loads cost more than the sum kernel saves: in
#: the 8 x 16 call above its 28 expands took 0.33-0.37 ms of CUDA time (S = 16) against 0.12 ms
#: (the 16 sums: 0.04 ms). Off (0) by default; launch-bound callers may set it.
PARTS_MAX_ROWS = 0
#: ... and stacked ranks up to this (q / k / v of a bank of rank 32 stack 96 rows)
SHRINK_MAX_RANK = 128
#: ``lora_linear`` tiles: (BM, BN, BK, GROUP_M, num_warps, num_stages, flatten, warp_specialize, programs).
LINEAR_CONFIG = (128, 256, 64, 8, 8, 3, False, False, 0)
#: ``lora_linear`` serves outputs at least this wide: where it measured faster than cuBLAS + ``lora_add``.
FUSED_MIN_OUT = 8192
#: ... and at most this summed rank: its ``h`` / ``B`` epilogue tiles must fit next to the pipelined
#: GEMM stages in shared memory (64: 48 KiB more; 128 would exceed an H200's 227 KiB).
FUSED_MAX_RANK = 64


@functools.lru_cache(maxsize=1)
def _triton():
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed, or no usable backend
        return None

    @triton.jit
    def add_kernel(y, h, b, out, M, N, R, s_ym, s_yn, s_hs, s_hm, s_hr, s_bn, s_br, s_om, s_on,
                   BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, S: tl.constexpr = 1,
                   F32_DOT: tl.constexpr = False):
        # out = y + (sum_s h[s]) @ b^T (out may be y: each program reads its tile of y before it
        # writes it). S > 1: h holds a shrink's split-K partial sums, added here in a fixed order
        # (s = 0, 1, ...) in float32, so no kernel of their own sums them first.
        # F32_DOT: float32 h and b, a float32-accurate dot on tensor cores (tf32x3: hi*hi + hi*lo +
        # lo*hi of a tf32 split, off by ~2^-22 relative; "ieee" runs on CUDA cores, 59 us a site of
        # 2048 x 4096 on an H200); the sum with y in float32, one rounding on store
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rr = tl.arange(0, BR)
        mask_m = rm < M
        mask_n = rn < N
        h_ptr = h + rm[:, None] * s_hm + rr[None, :] * s_hr
        h_mask = mask_m[:, None] & (rr[None, :] < R)
        ht = tl.load(h_ptr, mask=h_mask, other=0.0)
        if S > 1:
            hs = ht.to(tl.float32)
            for s in tl.static_range(1, S):
                hs += tl.load(h_ptr + s * s_hs, mask=h_mask, other=0.0).to(tl.float32)
            ht = hs.to(ht.dtype)
        bt = tl.load(b + rn[:, None] * s_bn + rr[None, :] * s_br, mask=mask_n[:, None] & (rr[None, :] < R), other=0.0)
        if F32_DOT:
            acc = tl.dot(ht, tl.trans(bt), input_precision="tf32x3")
        else:
            acc = tl.dot(ht, tl.trans(bt))
        mask = mask_m[:, None] & mask_n[None, :]
        yt = tl.load(y + rm[:, None] * s_ym + rn[None, :] * s_yn, mask=mask, other=0.0)
        acc += yt.to(tl.float32)
        tl.store(out + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def linear_tma_kernel(x_d, w_d, h_d, b_d, o_d, bias, M, N, K, HAS_BIAS: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                          GROUP_M: tl.constexpr, NUM_PROGS: tl.constexpr, FLATTEN: tl.constexpr, WS: tl.constexpr):
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        k_tiles = tl.cdiv(K, BK)
        per_group = GROUP_M * num_n
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGS, flatten=FLATTEN, warp_specialize=WS):
            first_m = (tile // per_group) * GROUP_M
            group_m = min(num_m - first_m, GROUP_M)
            om = (first_m + (tile % group_m)) * BM
            on = ((tile % per_group) // group_m) * BN
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for ki in range(k_tiles):
                xt = x_d.load([om, ki * BK])
                wt = w_d.load([on, ki * BK])
                acc = tl.dot(xt, wt.T, acc)
            ht = h_d.load([om, 0])
            bt = b_d.load([on, 0])
            acc = tl.dot(ht, bt.T, acc)
            if HAS_BIAS:
                rn = on + tl.arange(0, BN)
                acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            o_d.store([om, on], acc.to(o_d.dtype))

    @triton.jit
    def shrink_kernel(x, a, out, M, K, R, s_xm, s_xk, s_ar, s_ak, s_os, s_om, s_or,
                      BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, K_PER: tl.constexpr):
        # out[s, M, R] (float32) = x[M, k-range s] (bf16 / fp16) @ a[R, k-range s]^T (float32): one
        # split of K per program column; x is exact in tf32, so the tf32x3 dot is float32-accurate
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rr = tl.arange(0, BR)
        mask_m = rm < M
        mask_r = rr < R
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, K_PER, BK):
            rk = pid_s * K_PER + k0 + tl.arange(0, BK)
            mask_k = rk < K
            xt = tl.load(x + rm[:, None] * s_xm + rk[None, :] * s_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            at = tl.load(a + rr[:, None] * s_ar + rk[None, :] * s_ak, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(xt.to(tl.float32), tl.trans(at), acc, input_precision="tf32x3")
        tl.store(out + pid_s * s_os + rm[:, None] * s_om + rr[None, :] * s_or, acc,
                 mask=mask_m[:, None] & mask_r[None, :])

    try:  # host-side TMA descriptors (Triton >= 3.3); without them lora_linear is not offered
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        TensorDescriptor = None
    return SimpleNamespace(triton=triton, add=add_kernel, shrink=shrink_kernel,
                           linear=linear_tma_kernel,
                           descriptor=TensorDescriptor)


def available(t: Tensor) -> bool:
    """Whether the kernels serve this tensor: CUDA, bf16/fp16, Triton importable.

    fp32 keeps PyTorch's ops: Triton's fp32 dot rounds inputs to tf32 (~3e-4 relative error).
    """
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) and _triton() is not None


@functools.lru_cache(maxsize=None)
def _device(device: torch.device):
    return torch.cuda.get_device_properties(device)


def _aligned(t: Tensor) -> bool:
    """TMA's layout rules: unit last stride, 16-byte aligned base and row stride."""
    size = t.element_size()
    return t.stride(-1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0


def fused_linear_ok(x: Tensor, w: Tensor, bias: Tensor | None, rank: int) -> bool:
    """Whether :func:`lora_linear` serves this 2-D ``x`` and ``W`` with adapters of summed ``rank``:
    Hopper or newer (TMA), bf16/fp16 on both, TMA-aligned layouts, an output at least
    :data:`FUSED_MIN_OUT` wide and ``rank`` at most :data:`FUSED_MAX_RANK`.

    On an H200 (4096 tokens, bf16, r=16, ``h`` given) the fused kernel measured 540.8 us at
    4096 -> 11008 against 554.8 us for cuBLAS's base GEMM alone (595.3 us with ``lora_add``), and
    521.9 vs 520.1 us at 11008 -> 4096 (not used: the output is narrow), but 191.4 vs 174.1 us at
    4096 -> 4096, where cuBLAS + ``lora_add`` (219 us) stays ahead (``bench/kernels-h200.log``).
    """
    return (rank <= FUSED_MAX_RANK and available(x) and _triton().descriptor is not None and w.dtype == x.dtype and w.shape[0] >= FUSED_MIN_OUT
            and _device(x.device).major >= 9 and (w.shape[0] * x.element_size()) % 16 == 0
            and _aligned(x) and _aligned(w) and (bias is None or (bias.dtype == x.dtype and bias.stride(0) == 1)))


def _rank_block(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def _concat(hs: Sequence[Tensor], bs: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    h = hs[0] if len(hs) == 1 else torch.cat(list(hs), dim=1)
    b = bs[0] if len(bs) == 1 else torch.cat(list(bs), dim=1)
    return h.to(dtype), b.to(dtype)


def lora_add(y: Tensor, hs: Sequence[Tensor], bs: Sequence[Tensor], config: tuple = ADD_CONFIG) -> Tensor:
    """``y + sum_i h_i @ B_i^T`` for 2-D ``y`` ``[M, N]``, ``h_i`` ``[M, r_i]``, ``B_i`` ``[N, r_i]``."""
    h, b = _concat(hs, bs, y.dtype)
    return add_update(y, h, b, config)


def add_update(y: Tensor, h: Tensor, b: Tensor, config: tuple = ADD_CONFIG, _wrap: bool = False) -> Tensor:
    r"""``out = y + h B^\top`` out of place, in one pass over ``y`` ``[M, N]`` (bf16 / fp16), for
    ``h`` ``[M, R]`` and ``B`` ``[N, R]`` both of ``y``'s dtype or both float32. A 3-D float32 ``h``
    ``[S, M, R]`` is a shrink's split-K partial sums (:func:`shrink_parts`): the kernel adds
    ``h = \sum_s h_s`` itself (in float32, ``s = 0, 1, ...``), so the sum costs no launch.

    The dot accumulates in float32 (float32 factors: a float32-accurate dot on tensor cores,
    ``input_precision="tf32x3"``, ~2^-22 relative, not tf32's 2^-11), the sum with ``y`` is in float32 and rounds once on store: PEFT's
    ``(result + lora(x.float())).to(result.dtype)`` for float32 adapters over a bf16 base. ``h``
    may be a column block of a wider tensor (any strides). ``_wrap``: launched from the
    ``torch.library.triton_op`` (:func:`expand_op`)."""
    k = _triton()
    M, N = y.shape
    parts = h if h.dim() == 3 else h[None]
    S, _, R = parts.shape
    BM, BN, warps = config
    out = torch.empty((M, N), device=y.device, dtype=y.dtype)
    grid = (k.triton.cdiv(M, BM), k.triton.cdiv(N, BN))
    kernel = torch.library.wrap_triton(k.add) if _wrap else k.add
    kernel[grid](y, parts, b, out, M, N, R, y.stride(0), y.stride(1), parts.stride(0), parts.stride(1),
                 parts.stride(2), b.stride(0), b.stride(1), out.stride(0), out.stride(1), BM=BM, BN=BN,
                 BR=_rank_block(R), S=S, F32_DOT=h.dtype == torch.float32, num_warps=warps)
    return out


def _register_expand_op():
    """``graphlora::lora_expand`` as a ``torch.library.triton_op``: :func:`add_update` as Inductor
    calls it from a compiled graph (no Python dispatch, CUDA-graph safe). Registered only where
    CUDA is available (the decorator imports part of Inductor: seconds a CPU process never needs)."""
    @torch.library.triton_op("graphlora::lora_expand", mutates_args=())
    def lora_expand(y: Tensor, h: Tensor, b: Tensor) -> Tensor:
        return add_update(y, h, b, _wrap=True)

    return lora_expand


_EXPAND_OP = _register_expand_op() if torch.cuda.is_available() and _triton() is not None else None


def compiled_expand_ok(y: Tensor, h: Tensor, b: Tensor) -> bool:
    """Whether a compiled serving graph takes ``graphlora::lora_expand`` for ``y + h B^T``: a 2-D
    CUDA bf16 / fp16 ``y`` with unit last stride, factors both of its dtype or both float32, a
    summed rank of at most :data:`EXPAND_MAX_RANK`, int32 offsets, and no grad (the op has no
    backward; serving programs run under ``no_grad``).

    Under ``torch.compile`` the PyTorch forms cost more: ``addmm_`` becomes an out-of-place
    ``addmm`` that first copies ``y`` (28 device copies, 0.33 ms of a 4 x 512 call on an H200,
    ``lora_dtype="auto"``), and float32 factors run cuBLAS's float32 GEMM without tensor cores
    into a float32 ``[M, N]`` temporary (1.2 ms of the same call,
    ``bench/h200-2026-12-03/profile-serving-compiled-before-op.log``)."""
    return (_EXPAND_OP is not None and y.is_cuda and y.dtype in (torch.bfloat16, torch.float16) and y.dim() == 2
            and h.dtype == b.dtype and h.dtype in (torch.float32, y.dtype) and h.shape[-1] <= EXPAND_MAX_RANK
            and (h.dim() == 2 or h.dtype == torch.float32)
            and y.stride(-1) == 1 and not torch.is_grad_enabled()
            and max(_span(y), _span(h), _span(b)) < 2 ** 31)


def expand_op(y: Tensor, h: Tensor, b: Tensor) -> Tensor:
    """``y + h B^T`` through ``graphlora::lora_expand`` (where :func:`compiled_expand_ok` holds)."""
    return _EXPAND_OP(y, h, b)


def shrink_parts(x: Tensor, a: Tensor, config: tuple = SHRINK_CONFIG, _wrap: bool = False) -> Tensor:
    r"""The partial sums of ``h = x A^\top`` for a bf16 / fp16 ``x`` ``[M, K]`` and float32 ``A``
    ``[R, K]``, as ``[S, M, R]`` float32 (``S = ceil(K / K_PER)`` splits of ``K``; ``h`` is their
    sum, :func:`shrink`).

    PEFT's float32 adapters over a bf16 base compute ``lora_A(x.float())``: a float32 copy of
    ``x`` (``[M, K]``, written and read back) and cuBLAS's float32 GEMM, which runs without tensor
    cores (0.5 ms for the 12 fused shrinks of a 4 x 512-token call on an H200, plus 0.56 ms of
    casts eager). This reads ``x`` once in its own dtype and converts it in registers; ``x`` is
    exact in tf32, so the ``tf32x3`` dot is float32-accurate (~2^-22 relative). Splitting ``K``
    keeps every SM busy at few rows; the split sums are added in a fixed order (deterministic)."""
    k = _triton()
    M, K = x.shape
    R = a.shape[0]
    BM, BK, k_per, warps = config
    splits = k.triton.cdiv(K, k_per)
    parts = torch.empty((splits, M, R), device=x.device, dtype=torch.float32)
    kernel = torch.library.wrap_triton(k.shrink) if _wrap else k.shrink
    kernel[(k.triton.cdiv(M, BM), splits)](
        x, a, parts, M, K, R, x.stride(0), x.stride(1), a.stride(0), a.stride(1),
        parts.stride(0), parts.stride(1), parts.stride(2), BM=BM, BK=BK, BR=_rank_block(R), K_PER=k_per,
        num_warps=warps)
    return parts


def _register_shrink_op():
    """``graphlora::lora_shrink_parts``: :func:`shrink_parts` as a ``torch.library.triton_op`` (see
    :func:`_register_expand_op`), with its tile configuration as arguments (constants in a graph)."""
    @torch.library.triton_op("graphlora::lora_shrink_parts", mutates_args=())
    def lora_shrink_parts(x: Tensor, a: Tensor, block_m: int, block_k: int, k_per: int, warps: int) -> Tensor:
        return shrink_parts(x, a, (block_m, block_k, k_per, warps), _wrap=True)

    return lora_shrink_parts


_SHRINK_OP = _register_shrink_op() if torch.cuda.is_available() and _triton() is not None else None


def shrink_ok(x: Tensor, a: Tensor) -> bool:
    """Whether :func:`shrink` serves this 2-D ``x`` and float32 ``A``: CUDA, a bf16 / fp16 ``x``, a
    stacked rank of at most :data:`SHRINK_MAX_RANK`, int32 offsets, no grad (serving programs); eager, at
    least :data:`EXPAND_MIN_TOKENS` rows (below, a Python launch costs more than it saves); under
    ``torch.compile``, any rows (``graphlora::lora_shrink_parts``, launched by Inductor)."""
    compiling = torch.compiler.is_compiling()
    if compiling and _SHRINK_OP is None:  # first: dynamo must not trace into the Triton checks
        return False
    if not compiling and x.shape[0] < EXPAND_MIN_TOKENS:  # the common eager answer (decode), asked first
        return False
    return (a.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda and x.dim() == 2
            and a.dim() == 2 and a.shape[0] <= SHRINK_MAX_RANK and not torch.is_grad_enabled()
            and (compiling or available(x))
            and max(_span(x), _span(a)) < 2 ** 31)


def shrink(x: Tensor, a: Tensor) -> Tensor:
    r"""``h = x A^\top`` ``[M, R]`` in float32 from :func:`shrink_parts` (where :func:`shrink_ok` holds).

    Compiled, for at most :data:`PARTS_MAX_ROWS` rows, the split-K partial sums ``[S, M, R]``
    themselves (``h = \sum_s h_s``), which the compiled expand adds in its own kernel
    (:func:`add_update`; :func:`graphlora.passes.ops.lora_expand` sums them where it cannot)."""
    # compiled with a dynamic row count, a size check: the graph recompiles when a call crosses it
    config = SHRINK_FEW_CONFIG if x.shape[0] <= SHRINK_FEW_MAX_ROWS else SHRINK_CONFIG
    if torch.compiler.is_compiling():
        parts = _SHRINK_OP(x, a, *config)
        if x.shape[0] <= PARTS_MAX_ROWS:
            return parts
    else:
        parts = shrink_parts(x, a, config)
    return parts[0] if parts.shape[0] == 1 else parts.sum(0)


def expand_ok(y: Tensor, h: Tensor, b: Tensor) -> bool:
    """Whether :func:`expand_into` serves this ``y`` ``[M, N]`` and float32 ``h`` / ``B``: CUDA,
    bf16 / fp16 ``y`` with unit last stride, at least :data:`EXPAND_MIN_TOKENS` rows, a rank of at
    most :data:`EXPAND_MAX_RANK` (its float32 tiles in shared memory), int32 offsets, eager (a
    Python launch; under ``torch.compile`` Inductor fuses the add itself)."""
    if torch.compiler.is_compiling():  # first: dynamo must not trace into the Triton checks (a graph break)
        return False
    return (y.shape[0] >= EXPAND_MIN_TOKENS and h.dtype == torch.float32 and b.dtype == torch.float32
            and h.shape[1] <= EXPAND_MAX_RANK and y.stride(-1) == 1 and available(y)
            and max(_span(y), _span(h), _span(b)) < 2 ** 31)


def _span(t: Tensor) -> int:
    """The largest element offset ``t`` reaches (the kernels compute offsets in int32)."""
    return sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1


def expand_into(y: Tensor, h: Tensor, b: Tensor, config: tuple = ADD_CONFIG) -> Tensor:
    r"""``y += h B^\top`` in place for a bf16 / fp16 ``y`` ``[M, N]`` and float32 ``h`` ``[M, R]``,
    ``B`` ``[N, R]``: the update in float32 (a float32-accurate ``tf32x3`` dot), added to ``y`` in float32,
    rounded once into ``y``.

    The float32 adapters over a bf16 base (PEFT's default) otherwise take ``u = mm(h, B^T)`` (a
    float32 ``[M, N]`` written and read back) and ``y += u``, TensorIterator's mixed-dtype add,
    which measured 1.39 ms for the 28 sites of a 4 x 512-token call on an H200, about 2.4x its
    bandwidth floor (``bench/h200-2026-12-02/profile-serving-kernels-fused.log``). This is one pass
    over ``y``. ``h`` may be a column block of a wider tensor (any strides).
    """
    k = _triton()
    M, N = y.shape
    R = h.shape[1]
    BM, BN, warps = config
    grid = (k.triton.cdiv(M, BM), k.triton.cdiv(N, BN))
    k.add[grid](y, h, b, y, M, N, R, y.stride(0), y.stride(1), 0, h.stride(0), h.stride(1), b.stride(0),
                b.stride(1), y.stride(0), y.stride(1), BM=BM, BN=BN, BR=_rank_block(R), F32_DOT=True, num_warps=warps)
    return y


def lora_linear(x: Tensor, w: Tensor, bias: Tensor | None, hs: Sequence[Tensor], bs: Sequence[Tensor],
                config: tuple = LINEAR_CONFIG) -> Tensor:
    """``x @ W^T + bias + sum_i h_i @ B_i^T`` for 2-D ``x`` ``[M, K]``, ``W`` ``[N, K]``, ``h_i`` ``[M, r_i]``.

    A persistent kernel (one program per SM walking the output tiles in L2-friendly groups)
    that reads ``x`` and ``W`` through TMA descriptors. Call only where
    :func:`fused_linear_ok` holds. ``config``: (BM, BN, BK, GROUP_M, num_warps, num_stages,
    flatten, warp_specialize, programs or 0 for one per SM).
    """
    k = _triton()
    TensorDescriptor = k.descriptor
    h, b = _concat(hs, bs, x.dtype)
    M, K = x.shape
    N = w.shape[0]
    R = h.shape[1]
    BM, BN, BK, group, warps, stages, flatten, ws, progs = config
    BR = _rank_block(R)
    if R != BR:  # TMA rows must be 16-byte aligned: pad the rank to the block
        h = torch.nn.functional.pad(h, (0, BR - R))
        b = torch.nn.functional.pad(b, (0, BR - R))
    h, b = h.contiguous(), b.contiguous()
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    tiles = k.triton.cdiv(M, BM) * k.triton.cdiv(N, BN)
    progs = progs or _device(x.device).multi_processor_count
    progs = min(progs, tiles)
    k.linear[(progs,)](
        TensorDescriptor.from_tensor(x, [BM, BK]), TensorDescriptor.from_tensor(w, [BN, BK]),
        TensorDescriptor.from_tensor(h, [BM, BR]), TensorDescriptor.from_tensor(b, [BN, BR]),
        TensorDescriptor.from_tensor(out, [BM, BN]), bias if bias is not None else x, M, N, K,
        HAS_BIAS=bias is not None, BM=BM, BN=BN, BK=BK, BR=BR, GROUP_M=group, NUM_PROGS=progs,
        FLATTEN=flatten, WS=ws, num_warps=warps, num_stages=stages)
    return out
