"""Check (GPU) the Triton float32 expand into a bf16 output (``passes/kernels.py``: ``expand_into``)
against the PyTorch form, at the serving benchmark's shapes, and time both.

Run on the device machine: ``python bench/check_expand.py`` (prints a JSON report; ``--out`` writes it).
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_gpu import timer

from graphlora.passes import kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    report: dict = {}
    for tokens in (512, 2048, 4096):
        for d_out in (4096, 11008):
            y = torch.randn(tokens, d_out, device=dev, generator=gen).to(torch.bfloat16)
            wide = torch.randn(tokens, 96, device=dev, generator=gen)
            h = wide[:, 32:64]  # a column block, as the fused siblings' shrink gives
            b = torch.randn(d_out, 32, device=dev, generator=gen) * 0.05
            assert kernels.expand_ok(y, h, b)
            want = y.clone().add_(torch.mm(h, b.t()))
            got = kernels.expand_into(y.clone(), h, b)
            exact = y.float() + (h.double() @ b.double().t()).float()
            diff = (got.float() - want.float()).abs()
            ulp = want.float().abs() * 2 ** -8
            key = f"{tokens}x{d_out}"
            report[key] = {
                "max abs diff triton vs torch": diff.max().item(),
                "elements differing": int((diff > 0).sum().item()),
                "elements differing by more than 1 bf16 ulp": int((diff > ulp * 1.01 + 1e-30).sum().item()),
                "max abs err triton vs fp64": (got.float() - exact).abs().max().item(),
                "max abs err torch vs fp64": (want.float() - exact).abs().max().item(),
                "us torch (mm + add_)": 1e3 * timer(lambda: y.add_(torch.mm(h, b.t())), 5, 50, dev),
                "us triton": 1e3 * timer(lambda: kernels.expand_into(y, h, b), 5, 50, dev),
            }
            print(key, report[key], flush=True)
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
