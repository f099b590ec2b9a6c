"""Runtime functions called by the nodes that graphlora's passes insert.

On CPU and in fp32 they are plain PyTorch (autograd and ``torch.compile`` work as for any op). On
CUDA with bf16/fp16 the switches run Triton kernels (:mod:`.kernels`) and, under
``torch.compile`` or when autograd needs them, go through custom ops with hand-written backwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels, linear_few
from ._compat import autocast_on

__all__ = ["lora_switch", "lora_linear", "lora_down", "lora_shrink", "lora_bank", "lora_bank_", "lora_bank_rows"]

#: Use the opaque custom ops under torch.compile (benchmarks flip it to compare).
COMPILE_AS_CUSTOM_OP = True


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _use_op(t: Tensor, *grads: Tensor) -> bool:
    """Whether a CUDA kernel path runs through its custom op (compile, or autograd needed).

    Under ``torch.compile`` only the tensor's device and dtype are looked at (Dynamo cannot trace
    the Triton import check); the op's body checks for Triton at run time and falls back itself.
    """
    if torch.compiler.is_compiling():
        return COMPILE_AS_CUSTOM_OP and t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)
    return kernels.available(t) and _needs_grad(*grads)


# ---------------------------------------------------------------------------- lora_switch
def _uniform(base: Tensor, hs: Sequence[Tensor], bs: Sequence[Tensor]) -> bool:
    """Whether every adapter term has the base output's dtype (float32 adapters over a bf16 base,
    PEFT's ``autocast_adapter_dtype``, do not)."""
    return all(t.dtype == base.dtype for t in (*hs, *bs))


def _promoted(base: Tensor, hs: Sequence[Tensor], bs: Sequence[Tensor]) -> Tensor:
    """``(base + sum h_i B_i^T)`` computed in the widest dtype of the terms, cast back once to the
    base dtype: PEFT's numbers for float32 adapters over an fp16 / bf16 base (``result + delta``
    promotes, then ``result.to(previous_dtype)``)."""
    dtype = base.dtype
    for t in (*hs, *bs):
        dtype = torch.promote_types(dtype, t.dtype)
    out = _rows(base).to(dtype)
    for h, b in zip(hs, bs):
        out = torch.addmm(out, _rows(h).to(dtype), b.to(dtype).t())
    return out.to(base.dtype).view(base.shape)


def _switch_math(base: Tensor, hs: Sequence[Tensor], bs: Sequence[Tensor]) -> Tensor:
    """``base + sum h_i B_i^T`` without autograd bookkeeping: the GPU kernel or ``addmm``."""
    if not _uniform(base, hs, bs):
        return _promoted(base, hs, bs)
    out = _rows(base)
    if kernels.available(out):
        return kernels.lora_add(out, [_rows(h) for h in hs], bs).view(base.shape)
    for h, b in zip(hs, bs):
        out = torch.addmm(out, _rows(h), b.t())
    return out.view(base.shape)


@torch.library.custom_op("graphlora::lora_switch", mutates_args=())
def _switch_op(base: Tensor, hs: list[Tensor], bs: list[Tensor]) -> Tensor:
    return _switch_math(base, hs, bs)


@_switch_op.register_fake
def _switch_fake(base: Tensor, hs: list[Tensor], bs: list[Tensor]) -> Tensor:
    return base.new_empty(base.shape)


def _switch_setup(ctx, inputs, output) -> None:
    _, hs, bs = inputs
    ctx.count = len(hs)
    ctx.save_for_backward(*hs, *bs)


def _low_rank_grads(g: Tensor, hs: Sequence[Tensor], bs: Sequence[Tensor]) -> tuple[list, list]:
    """``dL/dh_i = g B_i`` and ``dL/dB_i = g^T h_i`` for ``y += h_i B_i^T`` (``g``: 2-D output grad)."""
    grad_hs = [(g @ b.to(g.dtype)).view(h.shape) for h, b in zip(hs, bs)]
    grad_bs = [(g.t() @ _rows(h).to(g.dtype)).to(b.dtype) for h, b in zip(hs, bs)]
    return grad_hs, grad_bs


def _switch_backward(ctx, grad: Tensor):
    saved = ctx.saved_tensors
    hs, bs = saved[: ctx.count], saved[ctx.count:]
    grad_hs, grad_bs = _low_rank_grads(_rows(grad), hs, bs)
    return grad, grad_hs, grad_bs


_switch_op.register_autograd(_switch_backward, setup_context=_switch_setup)


def lora_switch(base: Tensor, hs: Sequence[Tensor], bs: Sequence[Tensor]) -> Tensor:
    r"""Combine a site's base output with its adapter branches.

    .. math::

        y = \text{base} + \sum_i h_i B_i^\top, \qquad h_i = g_i \cdot A_i\,\mathrm{dropout}_i(x)

    where ``g_i`` (the gate, folded into ``h_i`` upstream on the rank-``r`` tensor, where it is
    cheap) is ``alpha_i / r_i`` times the adapter's weight while active and 0 otherwise. Each
    term is one ``addmm`` into the running output (on CUDA, one Triton kernel for all terms,
    :func:`.kernels.lora_add`), so the add costs one pass over the ``[tokens, out]`` tensor.
    With every gate at 0 the result equals ``base`` exactly. Sites whose base op is a plain
    ``linear`` use :func:`lora_linear` instead, which folds the base op in.

    Under ``torch.compile`` (CUDA) the same math is the custom op ``graphlora::lora_switch`` with
    its own backward: Inductor treats it as one opaque op instead of tracing into the Triton
    launcher (which compiled one adapted linear to 2.86 x base instead of 1.46 x on an H200).

    Args:
        base: output of the base op, ``[..., out]``.
        hs: gated rank-``r_i`` activations, each ``[..., r_i]`` with ``base``'s leading dims.
        bs: the ``B_i`` weights, each ``[out, r_i]``.
    """
    if not hs:
        return base
    if not _uniform(base, hs, bs):  # float32 adapters over an fp16 / bf16 base: plain ops, autograd as usual
        return _promoted(base, hs, bs)
    if _use_op(base, base, *hs, *bs):
        return _switch_op(base, list(hs), list(bs))
    return _switch_math(base, hs, bs)


# ---------------------------------------------------------------------------- lora_linear
def _linear_math(x: Tensor, w: Tensor, bias: Tensor | None, hs: Sequence[Tensor], bs: Sequence[Tensor]) -> Tensor:
    """``x W^T + b + sum h_i B_i^T``: one fused GPU kernel where it pays, else base op + switch."""
    x2 = _rows(x)
    if kernels.fused_linear_ok(x2, w, bias, sum(h.shape[-1] for h in hs)):
        return kernels.lora_linear(x2, w, bias, [_rows(h) for h in hs], bs).view(*x.shape[:-1], w.shape[0])
    return _switch_math(F.linear(x, w, bias), hs, bs)


@torch.library.custom_op("graphlora::lora_linear", mutates_args=())
def _linear_op(x: Tensor, w: Tensor, bias: Tensor | None, hs: list[Tensor], bs: list[Tensor]) -> Tensor:
    return _linear_math(x, w, bias, hs, bs)


@_linear_op.register_fake
def _linear_fake(x: Tensor, w: Tensor, bias: Tensor | None, hs: list[Tensor], bs: list[Tensor]) -> Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _linear_setup(ctx, inputs, output) -> None:
    x, w, bias, hs, bs = inputs
    ctx.count = len(hs)
    ctx.grad_x, ctx.grad_w = x.requires_grad, w.requires_grad
    ctx.grad_bias = bias is not None and bias.requires_grad
    ctx.save_for_backward(x, w, *hs, *bs)


def _linear_backward(ctx, grad: Tensor):
    x, w, *rest = ctx.saved_tensors
    hs, bs = rest[: ctx.count], rest[ctx.count:]
    g = _rows(grad)
    grad_x = (g @ w.to(g.dtype)).view(x.shape) if ctx.grad_x else None
    grad_w = (g.t() @ _rows(x).to(g.dtype)).to(w.dtype) if ctx.grad_w else None
    grad_bias = g.sum(0) if ctx.grad_bias else None
    grad_hs, grad_bs = _low_rank_grads(g, hs, bs)
    return grad_x, grad_w, grad_bias, grad_hs, grad_bs


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def lora_linear(x: Tensor, w: Tensor, bias: Tensor | None, hs: Sequence[Tensor], bs: Sequence[Tensor]) -> Tensor:
    r"""A linear site's base op and its low-rank adapter terms as one op.

    .. math::

        y = x W^\top + b + \sum_i h_i B_i^\top

    the same function as ``lora_switch(linear(x, W, b), hs, bs)``, which it replaces for sites
    whose base op is a plain ``linear``. On CPU (and fp32) it is exactly that: ``linear`` then
    ``addmm``. On CUDA bf16/fp16 with a wide output (measured faster there, see
    :func:`.kernels.fused_linear_ok`) it is one Triton GEMM whose epilogue adds the rank-``r``
    product to the fp32 accumulator before the single store, so the adapter costs no pass over
    ``y``; other shapes run cuBLAS for the base and :func:`.kernels.lora_add` for the update.
    Under ``torch.compile`` (CUDA) it is the custom op ``graphlora::lora_linear`` with its backward.

    Args:
        x: the site's input ``[..., in]``; w: ``W`` ``[out, in]``; bias: ``[out]`` or ``None``.
        hs / bs: as in :func:`lora_switch`.
    """
    if not hs:
        return F.linear(x, w, bias)
    if not all(t.dtype == x.dtype for t in (*hs, *bs)):  # float32 adapters over an fp16 / bf16 base
        return _promoted(F.linear(x, w, bias), hs, bs)
    if _use_op(x, x, w, bias, *hs, *bs):
        return _linear_op(x, w, bias, list(hs), list(bs))
    if torch.compiler.is_compiling() or _needs_grad(x, w, bias, *hs, *bs):
        # decided again on the base output: under autocast an fp32 x gives a bf16 base output,
        # whose update must still go through the custom op (autograd, no raw kernel launch)
        return lora_switch(F.linear(x, w, bias), hs, bs)
    return _linear_math(x, w, bias, hs, bs)


# ---------------------------------------------------------------------------- lora_down
def lora_down(x: Tensor, a: Tensor, gate: Tensor) -> Tensor:
    r"""A low-rank (LoRA-style) branch's gated down-projection.

    .. math::

        h = g \cdot x A^\top

    ``g`` is the branch's gate buffer (``alpha / r`` times the adapter's weight while active, 0
    otherwise; it never receives a gradient). Plain ``linear(x, A) * g`` everywhere, so Inductor
    sees through it. A Triton kernel for this ``N = r`` product (one read of ``x``, gate folded
    in) measured 17.6 vs 24.1 us per call in isolation on an H200, yet made the model slower as a
    custom op: eager 4 adapters loaded 28.3 vs 20.4 ms, compiled 1.146 vs 1.083 x base, since its
    Python launch costs more CPU time than it saves GPU time (``bench/results-h200-run3.json``).
    """
    return F.linear(x.to(a.dtype), a) * gate


def lora_shrink(x: Tensor, mats: Sequence[Tensor]) -> Tensor:
    r"""Several low-rank branches' down-projections of one input as one GEMM (ungated).

    .. math::

        p = x\,[A_1; A_2; \dots; A_n]^\top \in \mathbb{R}^{\dots \times (r_1 + \dots + r_n)}

    so ``p[..., o_i : o_i + r_i] = x A_i^\top`` (``o_i = r_1 + ... + r_{i-1}``), which the
    :class:`~graphlora.passes.fuse_shrink.FuseShrink` pass splits and gates per branch. The
    concatenation is of the parameters themselves (``r x d_in`` each, cheap), made on every call,
    so each ``A_i`` receives its own gradient (``torch.cat``'s backward slices it), and the input
    gradient of all the branches is one GEMM ``dp [A_1; ...; A_n]`` instead of ``n`` GEMMs and
    ``n - 1`` adds over ``[tokens, d_in]``. ``x`` is cast to the adapters' dtype, as in
    :func:`lora_down`; every ``A_i`` has one dtype.
    """
    a = mats[0] if len(mats) == 1 else torch.cat(list(mats))
    return F.linear(x.to(a.dtype), a)


# ---------------------------------------------------------------------------- adapter banks
#: Compiled serving calls of at most this many rows (decode steps, batches of one token a row)
#: compute the adapter's two products as broadcast reductions (:func:`fusible_rows`).
FUSIBLE_MAX_ROWS = 32


def fusible_rows(t: Tensor) -> bool:
    r"""Whether a compiled serving op over the 2-D ``t`` ``[M, \cdot]`` writes its skinny products as
    broadcast reductions, ``h = \sum_k x_{:,k} A_{:,k}`` and ``u = \sum_r h_{:,r} B_{:,r}``, in float32:
    on CUDA with ``M`` at most :data:`FUSIBLE_MAX_ROWS`.

    At a few rows each product is a few microseconds of launch, not of work: as GEMMs (or the
    Triton ops) a decode step of 28 sites ran 60 kernels more than the base model's, 0.33 ms of
    GPU time against its 0.64 (H200, batch 1, ``bench/profile_generate.py``). As reductions,
    Inductor fuses the expand into the kernel that reads the site's output (RoPE, the SwiGLU
    product, the residual add) and the shrink with the kernel that produces ``x``. Many rows stay
    GEMMs: the reduction re-reads ``B`` for every row. Float32 products and sum, one rounding to
    the output's dtype, as :func:`lora_expand`'s other forms. CUDA only (elsewhere the GEMM is
    the fast form). Call it inside ``torch.compiler.is_compiling()`` only.
    """
    return t.is_cuda and t.shape[0] <= FUSIBLE_MAX_ROWS and not torch.is_grad_enabled()


def lora_bank(base: Tensor, x: Tensor, a_hat: Tensor, b_hat: Tensor, linear: Optional[tuple] = None) -> Tensor:
    r"""A site's serving output from its adapter bank: the active adapters' sum, in two GEMMs.

    .. math::

        y = \text{base} + \sum_{k<K} g_k \, x A_{s_k}^\top B_{s_k}^\top
          = \text{base} + (x \hat A^\top) \hat B^\top

    with ``s`` the ``K`` active slots, ``\hat A = [A_{s_0}; ...; A_{s_{K-1}}]`` (``[K R, d_in]``) and
    ``\hat B = [g_0 B_{s_0}, ..., g_{K-1} B_{s_{K-1}}]`` (``[d_out, K R]``), gathered in place by
    :meth:`graphlora.banks.SiteBank.gather` whenever the active set, a gate or a slot changes. A
    call is one ``linear`` and one ``addmm`` that adds into the base output (plus the casts of
    float32 adapters over an fp16 / bf16 base): no custom op, no Python kernel launch, no per-call
    gather, and Inductor sees through all of it. The cost depends on ``K`` (the active adapters),
    never on how many adapters the bank holds.

    Args:
        base: the base op's output ``[..., d_out]``; x: its input ``[..., d_in]``.
        a_hat / b_hat: the gathered factors (unused positions hold zeros).
        linear: the base linear's ``(x, W, bias)`` (:func:`lora_expand`).
    """
    return lora_expand(base, bank_shrink(x, a_hat), b_hat, linear)


def bank_shrink(x: Tensor, a_hat: Tensor) -> Tensor:
    r"""``h = x \hat A^\top`` as ``[tokens, rows]`` (``x`` cast to the factors' dtype when it differs).

    ``a_hat`` is one site's gathered factors, or several sibling sites' stacked
    (:class:`~graphlora.passes.fuse_shrink.FuseBankShrink`: ``q`` / ``k`` / ``v`` read one ``x``, so one
    GEMM and one cast serve the three; each site's ``h`` is a column block of the result).
    Float32 factors over a bf16 / fp16 ``x`` on CUDA: :func:`.kernels.shrink` (``x`` read once in
    its dtype, a float32-accurate dot on tensor cores) where :func:`.kernels.shrink_ok` holds;
    compiled, at most :data:`.kernels.PARTS_MAX_ROWS` rows, that kernel's split-K partial sums
    ``[S, tokens, rows]`` (``h = \sum_s h_s``), which :func:`lora_expand` adds in its kernel.
    """
    compiling = torch.compiler.is_compiling()  # first: a compiled graph traces none of the eager checks
    if compiling or (x.is_cuda and x.dtype != a_hat.dtype):  # eager, the float32 shrink kernel serves CUDA only
        flat = x.reshape(-1, x.shape[-1])
        if compiling and fusible_rows(flat):  # a handful of rows: a reduction Inductor fuses with x's producer
            xs = flat.to(a_hat.dtype).to(torch.float32)  # the GEMM form's cast of x, then a float32 sum
            return (xs[:, None, :] * a_hat.to(torch.float32)[None]).sum(-1).to(a_hat.dtype)
        if x.dtype != a_hat.dtype and kernels.shrink_ok(flat, a_hat):
            return kernels.shrink(flat, a_hat)
    if x.dtype != a_hat.dtype:
        x = x.to(a_hat.dtype)
    h = F.linear(x, a_hat)
    return h.reshape(-1, h.shape[-1])


def lora_expand(base: Tensor, h: Tensor, b_hat: Tensor, linear: Optional[tuple] = None) -> Tensor:
    r"""``y = \text{base} + h \hat B^\top`` out of place (``h`` ``[tokens, K R]`` from :func:`bank_shrink`).

    Factors of another dtype than the base: ``u = h \hat B^\top`` in theirs, the sum in the
    wider of the two, rounded once to the base's: float32 factors over a bf16 base add in float32,
    as PEFT does (``result + lora(x.float())``, then the cast back); bf16 factors over a float32
    base (``configure_banks(lora_dtype=torch.bfloat16)``) never round the base output. Compiled on
    CUDA over a bf16 / fp16 base, it is the Triton op ``graphlora::lora_expand``
    (:func:`.kernels.compiled_expand_ok`): one pass over the output, the same float32 sum.

    ``linear``: ``base``'s own inputs ``(x, W, bias)`` when ``base`` is a linear's fresh output
    (:class:`~graphlora.passes.fuse_linear.AttachBaseLinear`). Compiled, where
    :func:`.linear_few.compiled_ok` holds (few rows; off by default), the result is computed from
    them in one kernel, the update as the GEMM's epilogue, and ``base`` goes unread.
    """
    d_out = b_hat.shape[0]
    if torch.compiler.is_compiling():  # first: a compiled graph traces none of the other branches
        flat = base.reshape(-1, d_out)
        if linear is not None and linear_few.compiled_ok(flat, *linear, h, b_hat):
            return linear_few.linear_few_op(*linear, h, b_hat).view(base.shape)
        if h.dim() == 3:  # a few-row shrink's split-K partials (kernels.shrink): summed in the expand kernel
            if kernels.compiled_expand_ok(flat, h, b_hat):
                return kernels.expand_op(flat, h, b_hat).view(base.shape)
            h = h.sum(0)
        if fusible_rows(flat):  # a handful of rows: no kernel of its own, fused into its neighbours
            u = (h.to(torch.float32)[:, None, :] * b_hat.to(torch.float32)[None]).sum(-1)
            return (flat.to(torch.float32) + u).to(base.dtype).view(base.shape)
        if kernels.compiled_expand_ok(flat, h, b_hat):  # one Triton pass over the output
            return kernels.expand_op(flat, h, b_hat).view(base.shape)
    if h.dtype != base.dtype:  # the sum in the wider dtype (type promotion), rounded once to the base's
        return torch.add(base.reshape(-1, d_out), torch.mm(h, b_hat.t())).to(base.dtype).view(base.shape)
    return torch.addmm(base.reshape(-1, d_out), h, b_hat.t()).view(base.shape)


def lora_bank_(base: Tensor, x: Tensor, a_hat: Tensor, b_hat: Tensor, linear: Optional[tuple] = None) -> Tensor:
    r""":func:`lora_bank` adding into ``base`` in place: ``base += (x \hat A^\top) \hat B^\top``.

    The splice uses it where nothing else reads ``base`` (the base op's fresh output, no branch
    reading it: :meth:`~graphlora.passes.splice.SiteBuilder.add_update`). Serving programs only:
    they run without grad. See :func:`lora_expand_`.
    """
    return lora_expand_(base, bank_shrink(x, a_hat), b_hat, linear)


def lora_expand_(base: Tensor, h: Tensor, b_hat: Tensor, linear: Optional[tuple] = None) -> Tensor:
    r""":func:`lora_expand` into ``base`` in place: ``base += h \hat B^\top``.

    An out-of-place ``addmm`` first copies ``base`` into its result (one more kernel and a pass
    over ``[tokens, d_out]``); this one accumulates into it (GEMM with ``beta = 1``). Float32
    factors over an fp16 / bf16 base: ``u = h \hat B^\top`` in float32, then ``base += u``, which
    adds in float32 and rounds once into ``base`` (two kernels; the out-of-place form is three:
    upcast, ``addmm``, downcast); on CUDA with many tokens one Triton pass over ``base``
    (:func:`.kernels.expand_into`). Under ``torch.autocast`` (which casts out-of-place ops only),
    for a strided ``base``, and under ``torch.compile`` (where ``addmm_`` would become a copy of
    ``base`` and an out-of-place ``addmm``) it is :func:`lora_expand`.
    """
    # autocast casts out-of-place ops only (and knows no "meta" device: asking raises there);
    # compiled, the out-of-place Triton op beats the in-place forms (see lora_expand)
    if torch.compiler.is_compiling() or not base.is_contiguous() or autocast_on(base):
        return lora_expand(base, h, b_hat, linear)
    flat = base.view(-1, b_hat.shape[0])
    if h.dtype != base.dtype:
        if kernels.expand_ok(flat, h, b_hat):  # CUDA, many tokens: one pass over the output (Triton)
            kernels.expand_into(flat, h, b_hat)
        else:
            flat.add_(torch.mm(h, b_hat.t()))
    else:
        flat.addmm_(h, b_hat.t())
    return base


def lora_bank_rows(base: Tensor, x: Tensor, rows: Tensor, a_bank: Tensor, b_bank: Tensor, scale: Tensor) -> Tensor:
    r"""A site's output in a mixed-adapter batch: row ``i`` uses bank slot ``rows[i]``.

    .. math::

        y_i = \text{base}_i + s_{j} \, x_i A_{j}^\top B_{j}^\top, \qquad j = \text{rows}_i

    ``x`` is ``[batch, ..., d_in]`` (or ``[batch * seq, d_in]``: rows contiguous). The base rows'
    slot is the zero slot (scale 0), so they get ``base`` exactly. On CUDA the segmented
    shrink/expand Triton kernels of :mod:`.sgmv` run it (SGMV for prefill, BGMV for decode,
    CUDA-graph safe, a ``triton_op`` under ``torch.compile``); elsewhere the per-row gather and two
    ``bmm`` (:func:`.sgmv.mixed_lora_reference`).
    """
    from .sgmv import mixed_lora

    return mixed_lora(base, x, rows, a_bank, b_bank, scale)
