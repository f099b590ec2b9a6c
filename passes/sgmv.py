r"""Segmented mixed-adapter LoRA kernels: every batch row runs its own adapter from a stacked bank.

For row ``b`` of a batch (tokens ``[b * seq, (b + 1) * seq)``, the row's *segment*) with slot
``s_b = row_slots[b]``:

.. math::

    y_b = \text{base}_b + \sigma_{s_b} \; x_b A_{s_b}^\top B_{s_b}^\top

where ``A_s = a_bank[s]`` ``[R, d_in]``, ``B_s = b_bank[s]`` ``[d_out, R]`` (lower ranks zero-padded
to the bank's rank ``R``) and ``sigma_s = scales[s]`` (``alpha / r``; the base slot has scale 0 and
zero weights). The work is two launches, as in Punica / S-LoRA / vLLM, but segmented by *row*:
rows are contiguous, so no token sorting is needed, and many rows may share a slot.

- :func:`lora_shrink`: ``h = sigma_s x A_s^T`` ``[tokens, R]`` in fp32, split over ``d_in`` into
  ``split`` partial sums (``[tokens, split, R]``; ``h`` is their sum) so that even a small batch
  fills the GPU, with no atomics (the result does not depend on scheduling).
- :func:`lora_expand`: ``y = base + h B_s^T``: sums the partials, multiplies by the row's ``B`` tile
  and adds the base tile in fp32, one read of ``base`` and one write of ``y``.

Each has two kernels: SGMV for prefill (a block of a row's tokens against one ``A`` / ``B`` tile, on
tensor cores) and BGMV for decode (``seq == 1``: one token per row, a vector against the tile). A row
whose scale is 0 (the base slot) skips the loads and returns ``base`` bit for bit.

The launch grids come from shapes only and nothing reads a tensor on the host, so the op is
CUDA-graph safe. Under ``torch.compile`` the kernels are the ``torch.library.triton_op``
``graphlora::sgmv_mixed_lora``, which Inductor decomposes into direct kernel calls (no Python op
dispatch on the hot path); in eager mode the launches are made directly. On the CPU, for fp64, or
when Triton is missing, :func:`mixed_lora_reference` (gather per row + ``bmm``) runs instead; under
the Triton interpreter (``TRITON_INTERPRET=1``) the kernels run on CPU tensors too.

Inference only: the kernels have no autograd formula. When autograd would need one (grad mode on
and an input that requires grad), :func:`mixed_lora` takes the reference path, which is
differentiable, so training never silently loses a gradient.

Measured on an H200 (``bench/bench_sgmv.py``, torch 2.11, Triton 3.6, bf16, R = 16, 16 adapters,
CUDA-graph replay, base linear included): 16 x 128 tokens 1.26 x the base linear at 4096 -> 4096
(110 vs 87 us; one plain LoRA 1.40 x, gather + ``bmm`` 4.26 x) and 1.30 x at 4096 -> 11008;
decode 32 x 1 1.60 x at 4096 -> 4096 (17.0 vs 10.6 us; plain LoRA 2.17 x) and 1.37 x at
4096 -> 11008. In eager mode each call pays two Triton launches on the host (60 to 130 us there).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

__all__ = ["SgmvConfig", "kernels_serve", "lora_expand", "lora_shrink", "mixed_lora", "mixed_lora_reference",
           "plan"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------- the kernels
@functools.lru_cache(maxsize=1)
def _kernels():
    """Build the Triton kernels (lazily: ``TRITON_INTERPRET`` is read when they are built)."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed, or no usable backend
        return None

    # Layouts (contiguous): x [tokens, K], a [S, R, K], b [S, N, R], base / out [tokens, N], parts
    # [tokens, SPLIT, R] fp32. K, N, R (a site's shape) are compile-time constants, so the kernels
    # take few runtime arguments (the launch is cheap) and every stride is known to the compiler.
    @triton.jit(do_not_specialize=["seq"])
    def shrink_sgmv(x, a, slots, scales, parts, seq, K: tl.constexpr, R: tl.constexpr, SPLIT: tl.constexpr,
                    K_PER: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                    F32: tl.constexpr, PREC: tl.constexpr):
        # grid (cdiv(seq, BM), batch, SPLIT): a BM-token block of row b against slot s_b's A, d_in slice pid_k
        pid_m = tl.program_id(0)
        row = tl.program_id(1)
        pid_k = tl.program_id(2)
        slot = tl.load(slots + row).to(tl.int64)
        scale = tl.load(scales + slot).to(tl.float32)
        rm = pid_m * BM + tl.arange(0, BM)
        mask_m = rm < seq
        tok = row.to(tl.int64) * seq + rm
        rr = tl.arange(0, BR)
        mask_r = rr < R
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        if scale != 0:
            a_slot = a + slot * (R * K)
            k0 = pid_k * K_PER
            for kk in range(0, K_PER, BK):
                rk = k0 + kk + tl.arange(0, BK)
                mask_k = rk < K
                xt = tl.load(x + tok[:, None] * K + rk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                at = tl.load(a_slot + rr[None, :] * K + rk[:, None], mask=mask_k[:, None] & mask_r[None, :], other=0.0)
                if F32:  # fp32 operands at the given input precision ("ieee" or "tf32")
                    acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc, input_precision=PREC)
                else:  # same 16-bit dtypes: the native tensor-core dot
                    acc = tl.dot(xt, at, acc)
            acc = acc * scale
        tl.store(parts + tok[:, None] * (SPLIT * R) + pid_k * R + rr[None, :], acc,
                 mask=mask_m[:, None] & mask_r[None, :])

    @triton.jit
    def shrink_bgmv(x, a, slots, scales, parts, K: tl.constexpr, R: tl.constexpr, SPLIT: tl.constexpr,
                    K_PER: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
        # grid (batch, SPLIT): row b's one token against slot s_b's A, d_in slice pid_k (fp32 FMA)
        row = tl.program_id(0)
        pid_k = tl.program_id(1)
        slot = tl.load(slots + row).to(tl.int64)
        scale = tl.load(scales + slot).to(tl.float32)
        rr = tl.arange(0, BR)
        mask_r = rr < R
        acc = tl.zeros((BR,), dtype=tl.float32)
        if scale != 0:
            a_slot = a + slot * (R * K)
            x_row = x + row.to(tl.int64) * K
            k0 = pid_k * K_PER
            wide = tl.zeros((BR, BK), dtype=tl.float32)
            for kk in range(0, K_PER, BK):
                rk = k0 + kk + tl.arange(0, BK)
                mask_k = rk < K
                xv = tl.load(x_row + rk, mask=mask_k, other=0.0).to(tl.float32)
                at = tl.load(a_slot + rr[:, None] * K + rk[None, :], mask=mask_r[:, None] & mask_k[None, :],
                             other=0.0).to(tl.float32)
                wide += at * xv[None, :]
            acc = tl.sum(wide, axis=1) * scale
        tl.store(parts + row.to(tl.int64) * (SPLIT * R) + pid_k * R + rr, acc, mask=mask_r)

    @triton.jit(do_not_specialize=["seq"])
    def expand_sgmv(base, parts, b, slots, scales, out, seq, N: tl.constexpr, R: tl.constexpr,
                    SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                    F32: tl.constexpr, PREC: tl.constexpr, FOLD: tl.constexpr):
        # grid (cdiv(N, BN), cdiv(seq, BM), batch): a BM x BN output tile of row b.
        # FOLD: the base tile is the dot's accumulator; else it is added to the dot's result.
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        row = tl.program_id(2)
        slot = tl.load(slots + row).to(tl.int64)
        scale = tl.load(scales + slot)
        rm = pid_m * BM + tl.arange(0, BM)
        mask_m = rm < seq
        tok = row.to(tl.int64) * seq + rm
        rn = pid_n * BN + tl.arange(0, BN)
        mask_n = rn < N
        mask = mask_m[:, None] & mask_n[None, :]
        if FOLD:
            y = tl.load(base + tok[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            y = tl.zeros((BM, BN), dtype=tl.float32)
        if scale != 0:
            rr = tl.arange(0, BR)
            mask_r = rr < R
            h = tl.zeros((BM, BR), dtype=tl.float32)
            for i in tl.static_range(SPLIT):
                h += tl.load(parts + tok[:, None] * (SPLIT * R) + i * R + rr[None, :],
                             mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            bt = tl.load(b + slot * (N * R) + rr[:, None] + rn[None, :] * R,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            if F32:
                y = tl.dot(h, bt.to(tl.float32), y, input_precision=PREC)
            else:
                y = tl.dot(h.to(bt.dtype), bt, y)
        if not FOLD:
            y += tl.load(base + tok[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out + tok[:, None] * N + rn[None, :], y.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def expand_bgmv(base, parts, b, slots, scales, out, N: tl.constexpr, R: tl.constexpr,
                    SPLIT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
        # grid (cdiv(N, BN), batch): BN outputs of row b's one token (fp32 FMA)
        pid_n = tl.program_id(0)
        row = tl.program_id(1)
        slot = tl.load(slots + row).to(tl.int64)
        scale = tl.load(scales + slot)
        rn = pid_n * BN + tl.arange(0, BN)
        mask_n = rn < N
        tok = row.to(tl.int64)
        y = tl.load(base + tok * N + rn, mask=mask_n, other=0.0).to(tl.float32)
        if scale != 0:
            rr = tl.arange(0, BR)
            mask_r = rr < R
            h = tl.load(parts + tok * (SPLIT * R) + rr, mask=mask_r, other=0.0)
            for i in tl.static_range(1, SPLIT):
                h += tl.load(parts + tok * (SPLIT * R) + i * R + rr, mask=mask_r, other=0.0)
            bt = tl.load(b + slot * (N * R) + rn[:, None] * R + rr[None, :],
                         mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            y += tl.sum(bt * h[None, :], axis=1)
        tl.store(out + tok * N + rn, y.to(out.dtype.element_ty), mask=mask_n)

    return SimpleNamespace(triton=triton, interpret=bool(triton.knobs.runtime.interpret), shrink_sgmv=shrink_sgmv, shrink_bgmv=shrink_bgmv,
                           expand_sgmv=expand_sgmv, expand_bgmv=expand_bgmv)


def _interpreting() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "yes", "on"):
        return False  # checked first, so that CPU calls do not import Triton
    k = _kernels()
    return k is not None and k.interpret


def kernels_serve(x: Tensor, a_bank: Tensor, b_bank: Tensor) -> bool:
    """Whether the Triton kernels serve these operands: fp32/bf16/fp16, Triton importable, and CUDA
    tensors (or CPU ones under the Triton interpreter)."""
    if x.dtype not in _KERNEL_DTYPES or a_bank.dtype not in _KERNEL_DTYPES or b_bank.dtype not in _KERNEL_DTYPES:
        return False
    if x.is_cuda:
        return _kernels() is not None
    return x.device.type == "cpu" and _interpreting()


# ---------------------------------------------------------------------------- launch plans
@dataclass(frozen=True)
class SgmvConfig:
    """Tiles of one mixed-LoRA call (measured on an H200: ``bench/bench_sgmv.py --tune``).

    ``bgmv``: the one-token-per-row kernels (decode); otherwise ``shrink_bm`` / ``expand_bm`` tokens
    per program; ``bk``: ``d_in`` per shrink step; ``split``: ``d_in`` slices of the shrink (partial
    sums); ``bn``: outputs per expand program; warps / stages: Triton launch settings; ``fold_base``:
    the SGMV expand starts its dot from the base tile (else adds the tile to the dot's result).
    """

    bgmv: bool
    bk: int
    split: int
    bn: int
    shrink_bm: int = 64
    expand_bm: int = 64
    shrink_warps: int = 4
    shrink_stages: int = 2
    expand_warps: int = 4
    fold_base: bool = True


def _rank_block(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def plan(seq: int, d_in: int, d_out: int, rank: int) -> SgmvConfig:
    """The tiles for segments of ``seq`` tokens, decided from shapes only (``bench/bench_sgmv.py
    --tune`` on an H200: bf16, R = 16, d_in 4096, d_out 4096 / 11008, 16 x 128, 8 x 16, 32 x 1, 64 x 1).

    ``seq == 1`` takes the BGMV kernels: the shrink splits ``d_in`` into 256-wide slices (16
    programs a row), the expand gives one warp 256 outputs per 16 of rank (shrink and expand
    each about 3 to 5 us at 32 and 64 rows). Otherwise the shrink's token block grows with the
    segment (16, 32, 64 tokens) and ``d_in`` is split in 4 (8 for short segments): 5.4 us at
    16 x 128, ``x`` read once; the expand takes 16 x 256 output tiles and adds the base tile after
    the dot (14.8 us at 2048 x 4096, 47.7 us at 2048 x 11008: about 2 TB/s of base read + output
    written, the part of the kernels that is furthest from its floor).
    """
    br = _rank_block(rank)
    if seq == 1:
        return SgmvConfig(bgmv=True, bk=128 if br <= 16 else 64, split=max(1, min(16, d_in // 256)), bn=256,
                          shrink_warps=4, expand_warps=max(1, br // 16))
    bm = 16 if seq <= 16 else 32 if seq <= 32 else 64
    return SgmvConfig(bgmv=False, bk=128 if seq > 32 else 64, split=max(1, min(4 if seq > 32 else 8, d_in // 512)),
                      bn=256, shrink_bm=bm, expand_bm=16, shrink_stages=3 if seq > 32 else 4, shrink_warps=4,
                      expand_warps=4, fold_base=False)


def _dot_mode(act: torch.dtype, weight: torch.dtype) -> tuple[bool, str]:
    """(operands in fp32?, fp32 input precision): fp32 activations keep fp32 ("ieee"); a 16-bit
    activation with an fp32 (or other 16-bit) bank goes through tf32, which holds either exactly
    enough for a 16-bit result; same 16-bit dtypes use the native tensor-core dot. (Triton 3.6's
    interpreter computes a bf16 ``tl.dot`` wrongly, so there bf16 goes through fp32 operands.)"""
    if act == torch.float32 or (act == torch.bfloat16 and _interpreting()):
        return True, "ieee"
    if weight != act:
        return True, "tf32"
    return False, "ieee"


def _launcher(kernel, wrap: bool):
    return torch.library.wrap_triton(kernel) if wrap else kernel


# ---------------------------------------------------------------------------- shrink / expand
def lora_shrink(x: Tensor, row_slots: Tensor, a_bank: Tensor, scales: Tensor,
                config: SgmvConfig | None = None, *, _wrap: bool = False) -> Tensor:
    r"""Scaled down-projection of every row by its own adapter, as ``split`` partial sums.

    .. math::

        h_t = \sigma_{s_b} \, x_t A_{s_b}^\top \quad (t \text{ in row } b\text{'s segment}),
        \qquad h = \textstyle\sum_{i} \text{parts}_i

    Args (not checked here: :func:`mixed_lora` checks them):
        x: ``[tokens, d_in]``, row ``b``'s tokens at ``[b * seq, (b + 1) * seq)``.
        row_slots: ``[batch]`` int64 slots; a_bank: ``[S, R, d_in]``; scales: ``[S]``.
        config: the tiles (default :func:`plan`'s).

    Returns:
        fp32 ``[tokens, split, R]``: partial sums over ``split`` slices of ``d_in`` (``h = parts.sum(1)``).
    """
    k = _kernels()
    x, a_bank, row_slots, scales = x.contiguous(), a_bank.contiguous(), row_slots.contiguous(), scales.contiguous()
    tokens, d_in = x.shape
    batch = row_slots.shape[0]
    seq = tokens // batch
    rank = a_bank.shape[1]
    cfg = config or plan(seq, d_in, 0, rank)
    k_per = k.triton.cdiv(k.triton.cdiv(d_in, cfg.split), cfg.bk) * cfg.bk
    parts = torch.empty(tokens, cfg.split, rank, device=x.device, dtype=torch.float32)
    shape = dict(K=d_in, R=rank, SPLIT=cfg.split, K_PER=k_per, BR=_rank_block(rank), BK=cfg.bk)
    if cfg.bgmv:
        _launcher(k.shrink_bgmv, _wrap)[(batch, cfg.split)](
            x, a_bank, row_slots, scales, parts, **shape, num_warps=cfg.shrink_warps)
    else:
        f32, prec = _dot_mode(x.dtype, a_bank.dtype)
        _launcher(k.shrink_sgmv, _wrap)[(k.triton.cdiv(seq, cfg.shrink_bm), batch, cfg.split)](
            x, a_bank, row_slots, scales, parts, seq, **shape, BM=cfg.shrink_bm, F32=f32, PREC=prec,
            num_warps=cfg.shrink_warps, num_stages=cfg.shrink_stages)
    return parts


def lora_expand(base: Tensor, parts: Tensor, row_slots: Tensor, b_bank: Tensor, scales: Tensor,
                config: SgmvConfig | None = None, *, _wrap: bool = False) -> Tensor:
    r"""Up-projection of every row by its own adapter, added to the base output (a new tensor).

    .. math::

        y_t = \text{base}_t + h_t B_{s_b}^\top, \qquad h = \textstyle\sum_i \text{parts}_i

    Rows whose slot has scale 0 get ``base`` bit for bit.

    Args (not checked here: :func:`mixed_lora` checks them):
        base: ``[tokens, d_out]``; parts: :func:`lora_shrink`'s ``[tokens, split, R]``;
        row_slots: ``[batch]`` int64; b_bank: ``[S, d_out, R]``; scales: ``[S]``.
        config: the tiles (default :func:`plan`'s; ``split`` is read from ``parts``).

    Returns:
        ``[tokens, d_out]`` in ``base``'s dtype, contiguous.
    """
    k = _kernels()
    base, b_bank, row_slots, scales = base.contiguous(), b_bank.contiguous(), row_slots.contiguous(), scales.contiguous()
    tokens, d_out = base.shape
    batch = row_slots.shape[0]
    seq = tokens // batch
    _, split, rank = parts.shape
    cfg = config or plan(seq, 0, d_out, rank)
    out = torch.empty(tokens, d_out, device=base.device, dtype=base.dtype)
    shape = dict(N=d_out, R=rank, SPLIT=split, BN=cfg.bn, BR=_rank_block(rank))
    if cfg.bgmv:
        _launcher(k.expand_bgmv, _wrap)[(k.triton.cdiv(d_out, cfg.bn), batch)](
            base, parts, b_bank, row_slots, scales, out, **shape, num_warps=cfg.expand_warps)
    else:
        f32, prec = _dot_mode(base.dtype, b_bank.dtype)
        _launcher(k.expand_sgmv, _wrap)[(k.triton.cdiv(d_out, cfg.bn), k.triton.cdiv(seq, cfg.expand_bm), batch)](
            base, parts, b_bank, row_slots, scales, out, seq, **shape, BM=cfg.expand_bm, F32=f32, PREC=prec,
            FOLD=cfg.fold_base, num_warps=cfg.expand_warps)
    return out


def _mixed_kernels(base: Tensor, x: Tensor, row_slots: Tensor, a_bank: Tensor, b_bank: Tensor, scales: Tensor,
                   wrap: bool) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    base2 = base.reshape(-1, base.shape[-1])
    if base2.shape[0] == 0:
        return base.clone()
    cfg = plan(base2.shape[0] // row_slots.shape[0], x2.shape[1], base2.shape[1], a_bank.shape[1])
    parts = lora_shrink(x2, row_slots, a_bank, scales, cfg, _wrap=wrap)
    return lora_expand(base2, parts, row_slots, b_bank, scales, cfg, _wrap=wrap).view(base.shape)


def _register_op():
    """``graphlora::sgmv_mixed_lora`` as a ``torch.library.triton_op`` (what ``torch.compile`` calls).

    Registered at import only where CUDA is available: the decorator imports Triton and part of
    Inductor to find the kernels (seconds), which a CPU-only process never needs.
    """
    @torch.library.triton_op("graphlora::sgmv_mixed_lora", mutates_args=())
    def sgmv_mixed_lora(base: Tensor, x: Tensor, row_slots: Tensor, a_bank: Tensor, b_bank: Tensor,
                        scales: Tensor) -> Tensor:
        return _mixed_kernels(base, x, row_slots, a_bank, b_bank, scales, wrap=True)

    return sgmv_mixed_lora


_MIXED_OP = _register_op() if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------- public entry points
def _check(base: Tensor, x: Tensor, row_slots: Tensor, a_bank: Tensor, b_bank: Tensor, scales: Tensor) -> None:
    """Shape / dtype checks (shapes only: no host sync)."""
    if a_bank.dim() != 3 or b_bank.dim() != 3:
        raise ValueError(f"a_bank must be [S, R, d_in] and b_bank [S, d_out, R]; got {tuple(a_bank.shape)} and "
                         f"{tuple(b_bank.shape)}")
    slots, rank, d_in = a_bank.shape
    if tuple(b_bank.shape[::2]) != (slots, rank) or tuple(scales.shape) != (slots,):
        raise ValueError(f"banks disagree: a_bank {tuple(a_bank.shape)} needs b_bank [{slots}, d_out, {rank}] and "
                         f"scales [{slots}]; got {tuple(b_bank.shape)} and {tuple(scales.shape)}")
    if x.shape[-1] != d_in or base.shape[-1] != b_bank.shape[1]:
        raise ValueError(f"x [..., {x.shape[-1]}] and base [..., {base.shape[-1]}] do not fit banks of d_in {d_in} "
                         f"and d_out {b_bank.shape[1]}")
    if x.shape[:-1] != base.shape[:-1] or x.dim() not in (2, 3):
        raise ValueError(f"x {tuple(x.shape)} and base {tuple(base.shape)} must share their leading dims, "
                         f"[batch, seq] or [tokens]")
    if row_slots.dim() != 1 or row_slots.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"row_slots must be a 1-D int64 tensor of slots, got {tuple(row_slots.shape)} "
                         f"{row_slots.dtype}")
    devices = {name: t.device for name, t in (("base", base), ("row_slots", row_slots), ("a_bank", a_bank),
                                              ("b_bank", b_bank), ("scales", scales))}
    if any(d != x.device for d in devices.values()):
        raise ValueError(f"every operand must be on x's device ({x.device}); got {devices}: move the banks, "
                         f"scales and row_slots there")
    rows = row_slots.shape[0]
    tokens = x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1]
    if (x.dim() == 3 and x.shape[0] != rows) or rows == 0 or tokens % rows != 0:
        raise ValueError(f"row_slots has {rows} rows, which does not split x {tuple(x.shape)} into equal "
                         f"contiguous segments; give one slot per batch row")


def mixed_lora_reference(base: Tensor, x: Tensor, row_slots: Tensor, a_bank: Tensor, b_bank: Tensor,
                         scales: Tensor) -> Tensor:
    r"""Plain PyTorch form of :func:`mixed_lora`: gather each row's ``A`` / ``B`` and two ``bmm``.

    .. math::

        y_b = \text{base}_b + \sigma_{s_b} \, x_b A_{s_b}^\top B_{s_b}^\top

    Computed in fp32 (or wider) and rounded once to ``base``'s dtype; no host sync.
    """
    _check(base, x, row_slots, a_bank, b_bank, scales)
    compute = torch.promote_types(torch.promote_types(x.dtype, a_bank.dtype), torch.float32)
    rows = row_slots.shape[0]
    x3 = x.reshape(rows, -1, x.shape[-1]).to(compute)
    a = a_bank.index_select(0, row_slots).to(compute)           # [rows, R, d_in]
    b = b_bank.index_select(0, row_slots).to(compute)           # [rows, d_out, R]
    s = scales.index_select(0, row_slots).to(compute).view(rows, 1, 1)
    h = torch.bmm(x3, a.transpose(1, 2)) * s
    delta = torch.bmm(h, b.transpose(1, 2)).view(base.shape)
    return (base.to(compute) + delta).to(base.dtype)


def mixed_lora(base: Tensor, x: Tensor, row_slots: Tensor, a_bank: Tensor, b_bank: Tensor,
               scales: Tensor) -> Tensor:
    r"""A site's output when each batch row uses its own adapter slot of a bank (out of place).

    .. math::

        y_b = \text{base}_b + \sigma_{s_b} \, x_b A_{s_b}^\top B_{s_b}^\top

    Args:
        base: the base linear's output, ``[batch, seq, d_out]`` or ``[tokens, d_out]``.
        x: its input, ``[batch, seq, d_in]`` or ``[tokens, d_in]``; row ``b`` owns tokens
            ``[b * seq, (b + 1) * seq)``.
        row_slots: ``[batch]`` int64, each row's slot (in ``[0, S)``: not checked on the device).
        a_bank: ``[S, R, d_in]``; b_bank: ``[S, d_out, R]``, fp32 or the activation dtype.
        scales: ``[S]`` float32 (``alpha / r``; 0 for the base slot, whose rows get ``base`` exactly).

    Returns:
        ``base``'s shape and dtype; fp32 accumulation throughout. On CUDA (or under the Triton
        interpreter) the SGMV/BGMV kernels, elsewhere (CPU, fp64, no Triton, or autograd needed)
        :func:`mixed_lora_reference`.

    Raises:
        ValueError: shapes that do not fit together (the message names them).
    """
    _check(base, x, row_slots, a_bank, b_bank, scales)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (base, x, a_bank, b_bank, scales)):
        return mixed_lora_reference(base, x, row_slots, a_bank, b_bank, scales)   # differentiable
    if torch.compiler.is_compiling():  # compiled for CUDA means Inductor, which means Triton
        if x.is_cuda and _MIXED_OP is not None and x.dtype in _KERNEL_DTYPES and a_bank.dtype in _KERNEL_DTYPES \
                and b_bank.dtype in _KERNEL_DTYPES:
            return _MIXED_OP(base, x, row_slots, a_bank, b_bank, scales)
        return mixed_lora_reference(base, x, row_slots, a_bank, b_bank, scales)
    if kernels_serve(x, a_bank, b_bank):
        return _mixed_kernels(base, x, row_slots, a_bank, b_bank, scales, wrap=False)
    return mixed_lora_reference(base, x, row_slots, a_bank, b_bank, scales)
