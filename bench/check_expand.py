"""Check (GPU) the Triton float32 expand into a bf16 output (``passes/kernels.py``: ``expand_into``)
against the PyTorch form, at the serving benchmark's shapes, and time both; then a compiled
serving model (``graphlora::lora_expand`` in its graph) against eager, float32 and bf16 factors.

Run on the device machine: ``python bench/check_expand.py`` (prints a JSON report; ``--out`` writes it).
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_gpu import timer

import graphlora
from bench_gpu import TARGETS, build, randomize_lora
from graphlora.passes import kernels


def shrink_check(report: dict, dev) -> None:
    """``kernels.shrink`` (bf16 ``x``, float32 ``A``) against PEFT's ``F.linear(x.float(), A)`` and
    fp64, and the time of both, at the serving benchmark's shapes."""
    gen = torch.Generator(device=dev).manual_seed(2)
    for tokens in (128, 2048):
        for d_in, rank in ((4096, 96), (4096, 64), (4096, 32), (11008, 32)):
            x = torch.randn(tokens, d_in, device=dev, generator=gen).to(torch.bfloat16)
            a = torch.randn(rank, d_in, device=dev, generator=gen) * 0.02
            exact = (x.double() @ a.double().t())
            want = torch.nn.functional.linear(x.float(), a)
            got = kernels.shrink(x, a)
            key = f"shrink {tokens}x{d_in} r{rank}"
            report[key] = {
                "max rel err triton vs fp64": ((got.double() - exact).abs().max() / exact.abs().max()).item(),
                "max rel err torch vs fp64": ((want.double() - exact).abs().max() / exact.abs().max()).item(),
                "us torch (x.float() + linear)": 1e3 * timer(lambda: torch.nn.functional.linear(x.float(), a), 5, 50, dev),
                "us triton": 1e3 * timer(lambda: kernels.shrink(x, a), 5, 50, dev),
            }
            print(key, report[key], flush=True)


def compiled_serving(report: dict) -> None:
    """Logits of the compiled serving model (the Llama-7B shape, 4 layers, bf16) against eager,
    with PEFT's float32 factors and with ``lora_dtype="auto"``, and whether the op ran."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cuda")
    base, cfg = build(False, dev, torch.bfloat16)
    gm = graphlora.inject(base, graphlora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)).eval()
    randomize_lora(gm, 0)
    compiled = torch.compile(gm)
    for dtype in ("adapter", "auto"):
        gm.configure_banks(lora_dtype=dtype)
        for b, s in ((4, 512), (8, 16)):
            ids = torch.randint(0, cfg.vocab_size, (b, s), device=dev, generator=torch.Generator(device=dev).manual_seed(1))
            with torch.no_grad():
                want = gm(input_ids=ids).logits.float()
                got = compiled(input_ids=ids).logits.float()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    compiled(input_ids=ids)
                    torch.cuda.synchronize()
            names = [e.key for e in prof.key_averages()]
            key = f"compiled {dtype} {b}x{s}"
            report[key] = {
                "max abs diff compiled vs eager": (got - want).abs().max().item(),
                "max abs logit": want.abs().max().item(),
                "lora_expand kernels per call": sum(e.count for e in prof.key_averages() if "add_kernel" in e.key),
                "distinct kernels": len(names),
            }
            print(key, report[key], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--kernels-only", action="store_true", help="skip the compiled serving model")
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
    with torch.no_grad():
        shrink_check(report, dev)
    if not args.kernels_only:
        compiled_serving(report)
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
