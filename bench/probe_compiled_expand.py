"""Which form of the LoRA update ``y += h B^T`` is cheapest under ``torch.compile`` (issue 13).

One Llama-7B MLP (4096 -> 11008 -> 4096, bf16, 4 x 512 tokens, r = 16 on gate / up / down), the
adapter update written in each candidate form, compiled, timed against the compiled base MLP of
the same run (CUDA events, the very call run 20 times first, median of 5 x 30 calls):

- ``addmm_``: ``y.addmm_(h, B^T)`` in place (the serving programs' bf16 form today);
- ``mm+add``: ``y + mm(h, B^T)`` out of place (Inductor fuses the add into the consumer);
- ``bcast``: ``y + (h[:, None, :] * B[None]).sum(-1)``: a rank-``r`` reduction Inductor can fuse
  into the consumer's kernel, no ``[tokens, d_out]`` temporary;
- ``triton``: the one-pass Triton ``lora_add`` as a ``torch.library.triton_op`` Inductor calls;
- the same with float32 factors over the bf16 base (PEFT's default), ``mm`` + ``add_`` today.

Run on the GPU machine: ``python bench/probe_compiled_expand.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent.parent))
from passes import kernels  # noqa: E402


def _ops():
    k = kernels._triton()

    @torch.library.triton_op("probe::lora_add", mutates_args=())
    def lora_add(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(y)
        M, N = y.shape
        R = h.shape[1]
        BM, BN, warps = kernels.ADD_CONFIG
        grid = (triton_cdiv(M, BM), triton_cdiv(N, BN))
        torch.library.wrap_triton(k.add)[grid](
            y, h, b, out, M, N, R, y.stride(0), y.stride(1), h.stride(0), h.stride(1), b.stride(0), b.stride(1),
            out.stride(0), out.stride(1), BM=BM, BN=BN, BR=kernels._rank_block(R), num_warps=warps)
        return out

    return lora_add


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def update(form: str, y, h, b, op):
    if form == "addmm_":
        if h.dtype == y.dtype:
            return y.addmm_(h, b.t())
        return y.add_(torch.mm(h, b.t()))
    if form == "mm+add":
        return (y + torch.mm(h, b.t())).to(y.dtype)
    if form == "bcast":
        return (y + (h[:, None, :] * b[None, :, :]).sum(-1)).to(y.dtype)
    if form == "triton":
        return op(y, h.to(y.dtype), b.to(y.dtype))
    raise ValueError(form)


def mlp(form, x, wg, wu, wd, ag, bg, au, bu, ad, bd, op):
    def site(inp, w, a, b):
        y = F.linear(inp, w)
        if form == "base":
            return y
        h = F.linear(inp if inp.dtype == a.dtype else inp.to(a.dtype), a)
        return update(form, y, h, b, op)

    z = F.silu(site(x, wg, ag, bg)) * site(x, wu, au, bu)
    return x + site(z, wd, ad, bd)


def timed(fn, reps: int = 5, iters: int = 30) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(iters):
            fn()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e) / iters)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="2048,128")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev, bf = torch.device("cuda"), torch.bfloat16
    op = _ops()
    g = torch.Generator(device=dev).manual_seed(0)
    d, ff, r = 4096, 11008, 16

    def rnd(*shape, dtype=bf, scale=0.02):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    wg, wu, wd = rnd(ff, d), rnd(ff, d), rnd(d, ff)
    results = {}
    with torch.no_grad():
        for t in (int(v) for v in args.tokens.split(",")):
            x = rnd(t, d, scale=1.0)
            for fdt in (bf, torch.float32):
                ag, au, ad = rnd(r, d, dtype=fdt), rnd(r, d, dtype=fdt), rnd(r, ff, dtype=fdt)
                bg, bu, bd = rnd(ff, r, dtype=fdt), rnd(ff, r, dtype=fdt), rnd(d, r, dtype=fdt)
                ref = None
                for form in ("base", "addmm_", "mm+add", "bcast", "triton"):
                    torch._dynamo.reset()
                    fn = torch.compile(lambda form=form: mlp(form, x, wg, wu, wd, ag, bg, au, bu, ad, bd, op))
                    try:
                        out = fn()
                        if form == "addmm_":
                            ref = out.float()
                        err = (out.float() - ref).abs().max().item() / ref.abs().max().item() if ref is not None else 0.0
                        ms = timed(fn)
                    except Exception as exc:  # report and go on
                        print(f"{t} {fdt} {form}: failed {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                        continue
                    key = f"T={t} {str(fdt).split('.')[-1]} {form}"
                    results[key] = {"ms": ms, "max_rel_err_vs_addmm_": err}
                    base = results.get(f"T={t} bfloat16 base", {}).get("ms", ms)
                    print(f"{key:32s} {ms:8.3f} ms  {ms / base:6.3f}x base  err {err:.1e}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
