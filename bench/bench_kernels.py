"""Kernel-level timings for one adapted linear: cuBLAS forms vs graphlora's Triton kernels, per tile config.

Run on the GPU machine: ``python bench/bench_kernels.py [--out kernels.json]``. For each Llama-7B
linear shape (4096 tokens, bf16, r=16) it prints medians (``triton.testing.do_bench``, L2 flushed
between calls) of: the base GEMM (cuBLAS), ``x A^T`` (cuBLAS), each ``lora_add`` config, each ``lora_linear`` config (base GEMM with the rank-r epilogue), and the
end-to-end adapted linear in its forms, with each kernel's error against an fp64 reference.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from graphlora.passes import kernels

SHAPES = [(4096, 4096, 4096), (4096, 11008, 4096), (4096, 4096, 11008)]  # (tokens, out, in)
ADD = [(64, 128, 4), (128, 128, 8), (64, 256, 8), (128, 64, 4), (32, 256, 4), (128, 256, 8)]
# TMA, persistent: (BM, BN, BK, GROUP_M, warps, stages, flatten, warp_specialize, programs or 0 = SMs)
TMA = [(128, 256, 64, 8, 8, 3, False, False, 0), (128, 256, 64, 8, 8, 3, True, False, 0),
       (128, 256, 64, 8, 8, 3, False, True, 0), (128, 128, 64, 8, 8, 4, True, False, 0),
       (256, 128, 64, 8, 8, 3, True, False, 0), (128, 256, 64, 8, 8, 3, False, False, 100000)]


#: few-row tiles (a 128-row call: one row block, the programs spread over N)
TMA_FEW = [(64, 64, 128, 1, 4, 4, False, False, 0), (128, 64, 128, 1, 4, 4, False, False, 0),
           (128, 32, 128, 1, 4, 5, False, False, 0), (64, 32, 128, 1, 4, 5, False, False, 0),
           (128, 64, 64, 1, 4, 6, False, False, 0), (64, 128, 64, 8, 4, 4, False, False, 0),
           (128, 128, 64, 8, 8, 4, False, False, 0), (128, 64, 256, 1, 8, 3, False, False, 0),
           (64, 64, 256, 1, 4, 3, False, False, 0), (128, 32, 256, 1, 4, 3, False, False, 0)]


#: ``passes/linear_few.py`` tiles: (BM, BN, BK, num_warps, num_stages)
LINEAR_FEW = [(128, 32, 128, 4, 4), (128, 64, 128, 4, 4), (64, 32, 128, 4, 4), (128, 32, 64, 4, 6),
              (128, 64, 64, 4, 5), (64, 64, 128, 4, 4), (128, 32, 256, 8, 3), (128, 16, 128, 4, 4),
              (64, 32, 256, 4, 3), (128, 64, 128, 8, 4)]


def few(rows: list[int], report: dict) -> None:
    """``--few``: at few rows, the fused linears (base GEMM with the rank-16 epilogue: the TMA
    kernel per :data:`TMA_FEW` config with bf16 factors, ``passes/linear_few.py`` per
    :data:`LINEAR_FEW` config with float32 factors, PEFT's default) against cuBLAS's base GEMM
    alone and cuBLAS + ``add_update``, GPU time under CUDA graphs (``do_bench_cudagraph``: the
    Python launch is not timed)."""
    from triton.testing import do_bench_cudagraph

    from graphlora.passes import linear_few

    def us(fn) -> float:
        return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3

    dev, dt = torch.device("cuda"), torch.bfloat16
    for m in rows:
        for _, n, k in SHAPES:
            torch.manual_seed(0)
            x = torch.randn(m, k, device=dev, dtype=dt)
            w = torch.randn(n, k, device=dev, dtype=dt) * k ** -0.5
            h = torch.randn(m, 16, device=dev, dtype=dt)
            b = torch.randn(n, 16, device=dev, dtype=dt) * 0.1
            ref = x.double() @ w.double().T + h.double() @ b.double().T
            row = {"cuBLAS base": us(lambda: F.linear(x, w)),
                   "cuBLAS base + add_update": us(lambda: kernels.add_update(F.linear(x, w), h, b)),
                   "cuBLAS base + add_update fp32 factors": us(lambda: kernels.add_update(F.linear(x, w), h.float(), b.float()))}
            row["tma"] = configs("tma", TMA_FEW, lambda c: kernels.lora_linear(x, w, None, [h], [b], c), ref, us)
            h32, b32 = h.float(), b.float()
            ref32 = x.double() @ w.double().T + h32.double() @ b32.double().T
            row["linear_few fp32 factors"] = configs(
                "linear_few", LINEAR_FEW, lambda c: linear_few.linear_few(x, w, None, h32, b32, c), ref32, us)
            report["shapes"][f"few {m}x{n}x{k}"] = row
            print(f"== few rows {m} out {n} in {k}: cuBLAS {row['cuBLAS base']:.2f} us, + add_update "
                  f"{row['cuBLAS base + add_update']:.2f} (fp32 factors {row['cuBLAS base + add_update fp32 factors']:.2f})",
                  flush=True)
            for key in ("tma", "linear_few fp32 factors"):
                for c, (t, e) in sorted(row[key].items(), key=lambda kv: kv[1][0]):
                    print(f"== {key} {c:<48s} {t:8.2f} us  err {e:.1e}", flush=True)


def configs(label: str, tiles: list, run, ref: torch.Tensor, us) -> dict:
    """``{str(config): (us, error against ref)}`` of ``run(config)`` for each config that compiles here."""
    out = {}
    for c in tiles:
        try:
            out[str(c)] = (us(lambda c=c: run(c)), rel(run(c), ref))
        except Exception as exc:  # a config that does not compile on this GPU
            print(label, c, "failed:", type(exc).__name__, str(exc)[:200], flush=True)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    from triton.testing import do_bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--few", default=None, help="rows, e.g. 128,256: only the few-row fused-linear sweep")
    args = parser.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    if args.few:
        few([int(v) for v in args.few.split(",")], report)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(report, fh, indent=1)
        return

    def us(fn) -> float:
        return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3

    for m, n, k in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(m, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) * k ** -0.5
        a = torch.randn(16, k, device=dev, dtype=dt) * k ** -0.5
        b = torch.randn(n, 16, device=dev, dtype=dt) * 0.1
        g = torch.tensor(2.0, device=dev)
        ref_y = x.double() @ w.double().T
        h = (F.linear(x, a) * g)
        y = F.linear(x, w)
        ref = ref_y + h.double() @ b.double().T
        row: dict = {"base cuBLAS": us(lambda: F.linear(x, w)), "xA cuBLAS + mul": us(lambda: F.linear(x, a) * g)}
        row["add"] = {str(c): (us(lambda c=c: kernels.lora_add(y, [h], [b], c)), rel(kernels.lora_add(y, [h], [b], c), ref))
                      for c in ADD}
        row["tma"] = configs("tma", TMA, lambda c: kernels.lora_linear(x, w, None, [h], [b], c), ref, us)
        best = {key: min(row[key], key=lambda c: row[key][c][0]) for key in ("add", "tma")}
        row["best"] = best
        cfg = {key: eval(best[key]) for key in best}  # noqa: S307 (our own tuple reprs)
        zero = kernels.lora_linear(x, w, None, [torch.zeros_like(h)], [b], cfg["tma"])
        row["linear with h=0: max |diff| vs cuBLAS"] = (zero.float() - y.float()).abs().max().item()
        row["linear with h=0: fraction of elements != cuBLAS"] = (zero != y).float().mean().item()
        row["cuBLAS rel err vs fp64"] = rel(y, ref_y)
        row["forms"] = {
            "unfused cuBLAS (peft-style: y + (xA)B)": us(lambda: F.linear(x, w) + F.linear(F.linear(x, a), b) * 2.0),
            "cuBLAS base + cuBLAS xA + triton add": us(lambda: kernels.lora_add(F.linear(x, w), [F.linear(x, a) * g], [b], cfg["add"])),
            "cuBLAS xA + fused linear (TMA)": us(
                lambda: kernels.lora_linear(x, w, None, [F.linear(x, a) * g], [b], cfg["tma"])),
            "base TMA kernel alone (h=0)": us(
                lambda: kernels.lora_linear(x, w, None, [torch.zeros_like(h)], [b], cfg["tma"])),
        }
        report["shapes"][f"{m}x{n}x{k}"] = row
        print(f"== tokens {m} out {n} in {k}", flush=True)
        for key in ("base cuBLAS", "xA cuBLAS + mul"):
            print(f"  {key:<45s} {row[key]:8.1f} us")
        for key in ("add", "tma"):
            for c, (t, e) in sorted(row[key].items(), key=lambda kv: kv[1][0]):
                print(f"  {key:<7s}{c:<38s} {t:8.1f} us  err {e:.1e}")
        for key, t in row["forms"].items():
            print(f"  {key:<45s} {t:8.1f} us  ({t / row['base cuBLAS']:.3f} x base)")
        print(f"  fused with h=0 vs cuBLAS: max diff {row['linear with h=0: max |diff| vs cuBLAS']:.2e}, "
              f"{row['linear with h=0: fraction of elements != cuBLAS'] * 100:.2f}% of elements differ", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
