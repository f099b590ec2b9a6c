"""Mixed-adapter LoRA kernels (``graphlora.passes.sgmv``) against the alternatives, on one GPU.

Run on the GPU machine (torch 2.11+, Triton 3.6): ``python bench/bench_sgmv.py [--out sgmv.json]``,
``--tune`` to time each kernel alone per tile config, or ``--check`` to compare the kernels with the PyTorch reference (eager, ``torch.compile(fullgraph=True)``
and CUDA-graph replay) and exit non-zero on a mismatch.

Per linear shape (4096 -> 4096, 4096 -> 11008; bf16; R = 16) and batch (16 rows x 128 tokens,
32 x 1, 64 x 1) with 16 or 64 adapters in the bank (row ``b`` uses slot ``b mod n``), each form is
timed with CUDA events over repeated calls of the very same callable after warm-ups (median of
several windows), eagerly (host launch costs included) and as a CUDA-graph replay (GPU time):

- ``base``: ``F.linear(x, W)`` alone;
- ``plain lora``: one adapter for every row, ``base + (x A^T s) B^T`` (cuBLAS);
- ``sgmv``: ``mixed_lora(F.linear(x, W), x, slots, A, B, s)`` (the kernels);
- ``reference``: ``mixed_lora_reference`` (gather per row + ``bmm``);
- ``sgmv kernels only`` / ``reference only``: the same with the base output given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from graphlora.passes import sgmv

SHAPES = [(4096, 4096), (4096, 11008)]      # (d_in, d_out)
BATCHES = [(16, 128), (32, 1), (64, 1)]      # (rows, tokens per row)
ADAPTERS = [16, 64]
RANK = 16


def make(rows: int, seq: int, d_in: int, d_out: int, adapters: int, rank: int, dtype: torch.dtype,
         bank_dtype: torch.dtype, ranks: list[int] | None = None, base_rows: int = 0, seed: int = 0) -> dict:
    """Inputs of one site: weights, a bank of ``adapters`` + 1 slots (the last the base slot), slots."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = torch.device("cuda")
    x = torch.randn(rows, seq, d_in, device=dev, dtype=dtype, generator=g)
    w = (torch.randn(d_out, d_in, device=dev, dtype=dtype, generator=g) * d_in ** -0.5)
    a = torch.randn(adapters + 1, rank, d_in, device=dev, generator=g) * d_in ** -0.5
    b = torch.randn(adapters + 1, d_out, rank, device=dev, generator=g) * 0.1
    scales = torch.rand(adapters + 1, device=dev, generator=g) + 0.5
    for slot, r in enumerate(ranks or []):      # lower ranks: zero rows of A / columns of B
        a[slot, r:] = 0
        b[slot, :, r:] = 0
    a[-1], b[-1], scales[-1] = 0, 0, 0
    slots = torch.arange(rows, device=dev) % adapters
    slots[:base_rows] = adapters
    return {"x": x, "w": w, "a": a.to(bank_dtype), "b": b.to(bank_dtype), "scales": scales, "slots": slots}


def time_us(fn, warmup: int = 10, iters: int = 50, windows: int = 5) -> float:
    """Median over ``windows`` of the mean time per call of ``iters`` back-to-back calls (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(windows):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(out)


def graphed(fn):
    """``fn`` captured once into a CUDA graph (after warm-ups on a side stream); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def forms(t: dict) -> dict:
    x, w, a, b, s, slots = t["x"], t["w"], t["a"], t["b"], t["scales"], t["slots"]
    base = F.linear(x, w)
    a0, b0, s0 = a[0].to(x.dtype), b[0].to(x.dtype), s[0].to(x.dtype)
    return {
        "base": lambda: F.linear(x, w),
        "plain lora": lambda: F.linear(x, w) + F.linear(F.linear(x, a0) * s0, b0),
        "sgmv": lambda: sgmv.mixed_lora(F.linear(x, w), x, slots, a, b, s),
        "reference": lambda: sgmv.mixed_lora_reference(F.linear(x, w), x, slots, a, b, s),
        "sgmv kernels only": lambda: sgmv.mixed_lora(base, x, slots, a, b, s),
        "reference only": lambda: sgmv.mixed_lora_reference(base, x, slots, a, b, s),
    }


def bench(report: dict) -> None:
    for d_in, d_out in SHAPES:
        for rows, seq in BATCHES:
            for n in ADAPTERS:
                t = make(rows, seq, d_in, d_out, n, RANK, torch.bfloat16, torch.bfloat16)
                row: dict = {"distinct adapters in batch": min(n, rows), "config": str(sgmv.plan(seq, d_in, d_out, RANK))}
                with torch.inference_mode():
                    fs = forms(t)
                    row["eager us"] = {k: time_us(f) for k, f in fs.items()}
                    row["graph us"] = {k: time_us(graphed(f)) for k, f in fs.items()}
                key = f"{d_in}->{d_out} {rows}x{seq} n={n}"
                report["bench"][key] = row
                print(f"== {key} ({row['config']})", flush=True)
                for mode in ("eager us", "graph us"):
                    if mode in row:
                        base = row[mode]["base"]
                        print("  " + mode + ": " + ", ".join(f"{k} {v:.1f} ({v / base:.2f}x)" for k, v in row[mode].items()),
                              flush=True)


def err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check(report: dict) -> bool:
    """Kernels vs reference over dtypes, ranks (mixed, zero-padded), rows on the base slot."""
    ok = True
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
    cases = []
    for d_in, d_out in [(4096, 4096), (4096, 11008), (1000, 333)]:
        for rows, seq in [(16, 128), (32, 1), (64, 1), (8, 16), (3, 7)]:
            for dtype, bank in [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                (torch.float16, torch.float16), (torch.float32, torch.float32)]:
                cases.append((d_in, d_out, rows, seq, dtype, bank, 16))
        cases.append((d_in, d_out, 16, 128, torch.bfloat16, torch.bfloat16, 64))
        cases.append((d_in, d_out, 32, 1, torch.bfloat16, torch.bfloat16, 64))
    for d_in, d_out, rows, seq, dtype, bank, rank in cases:
        n = 16
        ranks = [rank // (1 + i % 4) for i in range(n)]
        t = make(rows, seq, d_in, d_out, n, rank, dtype, bank, ranks=ranks, base_rows=min(2, rows - 1))
        with torch.inference_mode():
            base = F.linear(t["x"], t["w"])
            y = sgmv.mixed_lora(base, t["x"], t["slots"], t["a"], t["b"], t["scales"])
            ref = sgmv.mixed_lora_reference(base, t["x"], t["slots"], t["a"], t["b"], t["scales"])
            exact = bool(torch.equal(y[: min(2, rows - 1)], base[: min(2, rows - 1)]))
        e = err(y, ref)
        good = e < tol[dtype] and exact and y.dtype == base.dtype and y.shape == base.shape
        ok &= good
        key = f"{d_in}->{d_out} {rows}x{seq} R={rank} {str(dtype)[6:]}/{str(bank)[6:]}"
        report["check"][key] = {"rel err": e, "base rows exact": exact, "ok": good}
        print(f"  {'ok ' if good else 'BAD'} {key}: rel err {e:.2e}, base rows exact {exact}", flush=True)
    ok &= check_compiled(report)
    return ok


def check_compiled(report: dict) -> bool:
    """``torch.compile(fullgraph=True)`` (default and ``reduce-overhead``) and a captured CUDA graph
    match eager, and changing ``row_slots`` / bank contents in place needs no recompilation."""
    import torch._dynamo

    ok = True
    for rows, seq in [(16, 128), (32, 1)]:
        t = make(rows, seq, 4096, 4096, 16, RANK, torch.bfloat16, torch.bfloat16, base_rows=1)

        def site(x, w, slots, a, b, s):
            return sgmv.mixed_lora(F.linear(x, w), x, slots, a, b, s)

        args = (t["x"], t["w"], t["slots"], t["a"], t["b"], t["scales"])
        for mode in ("default", "reduce-overhead"):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            compiled = torch.compile(site, fullgraph=True, mode=mode)
            def call():
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(*args).clone()

            with torch.no_grad():
                want = site(*args)
                got = call()
                t["slots"].copy_(torch.flip(t["slots"], [0]))   # in place: no recompile expected
                t["a"][0].mul_(2)
                want2 = site(*args)
                got2 = call()
                got2b = call()
            frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            e = max(err(got, want), err(got2, want2), err(got2b, want2))
            good = e < 1e-2
            ok &= good
            key = f"compiled {mode} {rows}x{seq}"
            report["check"][key] = {"rel err vs eager": e, "unique graphs": frames, "ok": good}
            print(f"  {'ok ' if good else 'BAD'} {key}: rel err vs eager {e:.2e}, unique graphs {frames}", flush=True)
        with torch.no_grad():
            out = {}
            replay = graphed(lambda: out.__setitem__("y", site(*args)))
            t["slots"].copy_(torch.roll(t["slots"], 3))
            replay()
            e = err(out["y"], site(*args))
        good = e == 0.0
        ok &= good
        report["check"][f"cuda graph {rows}x{seq}"] = {"rel err vs eager after slot change": e, "ok": good}
        print(f"  {'ok ' if good else 'BAD'} cuda graph {rows}x{seq}: replay after a slot change vs eager {e:.2e}",
              flush=True)
    return ok


def tune(report: dict) -> None:
    """Each kernel alone per tile config, as CUDA-graph replays (GPU time), at the benchmark's shapes."""
    import itertools

    def shrink_cands(bgmv: bool) -> list[dict]:
        if bgmv:
            return [dict(bk=bk, split=sp, shrink_warps=w) for bk, sp, w in itertools.product((64, 128), (8, 16, 32), (1, 2, 4))]
        return [dict(shrink_bm=bm, bk=bk, split=sp, shrink_stages=st)
                for bm, bk, sp, st in itertools.product((16, 32, 64), (64, 128), (2, 4, 8), (3, 4))]

    def expand_cands(bgmv: bool) -> list[dict]:
        if bgmv:
            return [dict(bn=bn, expand_warps=w) for bn, w in itertools.product((128, 256, 512), (1, 2, 4))]
        return [dict(expand_bm=bm, bn=bn, expand_warps=w, fold_base=f)
                for bm, bn, w, f in itertools.product((16, 32, 64), (128, 256), (4, 8), (True, False))]

    for (d_in, d_out), (rows, seq) in itertools.product(SHAPES, BATCHES + [(8, 16)]):
        t = make(rows, seq, d_in, d_out, 16, RANK, torch.bfloat16, torch.bfloat16)
        x2, slots, a, b, s = t["x"].view(-1, d_in), t["slots"], t["a"], t["b"], t["scales"]
        base = F.linear(x2, t["w"])
        default = sgmv.plan(seq, d_in, d_out, RANK)
        row: dict = {"default": str(default), "base graph us": time_us(graphed(lambda: F.linear(x2, t["w"])))}
        with torch.inference_mode():
            shrink = {}
            for c in shrink_cands(default.bgmv):
                if not default.bgmv and c["shrink_bm"] > max(16, 2 * seq):
                    continue
                cfg = dataclasses.replace(default, **c)
                shrink[str(c)] = time_us(graphed(lambda cfg=cfg: sgmv.lora_shrink(x2, slots, a, s, cfg)), 5, 100, 3)
            parts = sgmv.lora_shrink(x2, slots, a, s, default)
            expand = {}
            for c in expand_cands(default.bgmv):
                if not default.bgmv and c["expand_bm"] > max(16, 2 * seq):
                    continue
                cfg = dataclasses.replace(default, **c)
                expand[str(c)] = time_us(graphed(lambda cfg=cfg: sgmv.lora_expand(base, parts, slots, b, s, cfg)), 5, 100, 3)
            row["shrink"] = dict(sorted(shrink.items(), key=lambda kv: kv[1])[:8])
            row["expand"] = dict(sorted(expand.items(), key=lambda kv: kv[1])[:8])
            row["default shrink us"] = time_us(graphed(lambda: sgmv.lora_shrink(x2, slots, a, s, default)), 5, 100, 3)
            row["default expand us"] = time_us(graphed(lambda: sgmv.lora_expand(base, parts, slots, b, s, default)), 5, 100, 3)
            for name, fn in {"host mixed_lora": lambda: sgmv.mixed_lora(base, x2, slots, a, b, s),
                             "host F.linear": lambda: F.linear(x2, t["w"])}.items():
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(200):
                    fn()
                torch.cuda.synchronize()
                row[name + " us per call"] = (time.perf_counter() - start) / 200 * 1e6
        key = f"{d_in}->{d_out} {rows}x{seq}"
        report["tune"][key] = row
        print(f"== {key}: default {row['default']}", flush=True)
        print(f"  base {row['base graph us']:.1f} us; default shrink {row['default shrink us']:.1f}, expand "
              f"{row['default expand us']:.1f}; host per call: mixed_lora {row['host mixed_lora us per call']:.1f}, "
              f"F.linear {row['host F.linear us per call']:.1f}", flush=True)
        for part in ("shrink", "expand"):
            for c, us in list(row[part].items())[:4]:
                print(f"  {part} {us:7.2f} us  {c}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--check", action="store_true", help="compare with the reference instead of timing")
    parser.add_argument("--tune", action="store_true", help="time each kernel per tile config instead")
    args = parser.parse_args()
    import triton

    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "bench": {}, "check": {}, "tune": {}}
    if args.tune:
        ok = tune(report) or True
    else:
        ok = check(report) if args.check else (bench(report) or True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
