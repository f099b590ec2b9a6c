"""GPU time of the serving banks' shrink and expand kernels at few rows, per tile config (issue 13).

For each row count and Llama-7B site shape (``K`` in, stacked rank ``R``, ``N`` out: q/k/v's
stacked 48 over 4096, gate/up's 32, o's 16, down's 16 over 11008), float32 factors over a bf16
``x`` (PEFT's default), it times under CUDA graphs (``triton.testing.do_bench_cudagraph``: the
GPU's time, not the Python launch) ``shrink_parts`` for each config in :data:`SHRINK`, and the
two ways to finish one site's update from those partials: the sum kernel then ``add_update`` on
``h`` (the path before), or ``add_update`` over the partials (the kernel sums them), each with its
error against a float64 reference. Run on the GPU machine: ``python bench/sweep_few_rows.py``.
"""

from __future__ import annotations

import argparse
import json

import torch

from graphlora.passes import kernels

#: (BM, BK, K_PER, num_warps)
SHRINK = [(64, 64, 512, 4), (32, 64, 256, 4), (16, 64, 256, 4), (32, 64, 128, 4), (64, 64, 128, 4),
          (16, 128, 512, 4), (32, 128, 512, 4), (64, 64, 256, 4), (16, 64, 128, 2), (32, 32, 128, 4),
          (16, 128, 1024, 4), (32, 128, 256, 8)]
#: (K, R, N): the stacked shrink and one site's expand (a column block of 16 of the stack)
SHAPES = [(4096, 48, 4096), (4096, 32, 11008), (4096, 16, 4096), (11008, 16, 4096)]


def main() -> None:
    from triton.testing import do_bench_cudagraph

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="8,32,128,256,512,2048")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}

    def us(fn) -> float:
        return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3

    def rel(a, b) -> float:
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    gen = torch.Generator(device=dev).manual_seed(0)
    for m in (int(v) for v in args.rows.split(",")):
        for k, r, n in SHAPES:
            x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
            a = torch.randn(r, k, device=dev, generator=gen) * k ** -0.5
            b = torch.randn(n, 16, device=dev, generator=gen) * 0.1
            y = torch.randn(m, n, device=dev, generator=gen).to(torch.bfloat16)
            h_ref = x.double() @ a.double().t()
            want = y.double() + h_ref[:, :16] @ b.double().t()
            row: dict = {}
            for cfg in SHRINK:
                parts = kernels.shrink_parts(x, a, cfg)
                shrink_us = us(lambda cfg=cfg: kernels.shrink_parts(x, a, cfg))
                sum_add = us(lambda p=parts: kernels.add_update(y, p.sum(0)[:, :16], b))
                fused = us(lambda p=parts: kernels.add_update(y, p[..., :16], b))
                err = rel(kernels.add_update(y, parts[..., :16], b), want)
                row[str(cfg)] = {"splits": parts.shape[0], "shrink": shrink_us, "sum+add": sum_add,
                                 "add(parts)": fused, "rel err": err}
                print(f"M={m:5d} K={k:5d} R={r:2d} N={n:5d} {cfg}: S={parts.shape[0]:2d} shrink {shrink_us:7.2f} us"
                      f"  sum+add {sum_add:7.2f}  add(parts) {fused:7.2f}  err {err:.1e}", flush=True)
            report["rows"][f"{m} {k} {r} {n}"] = row
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
