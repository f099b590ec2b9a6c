"""Host time to issue one ``torch.compile``'d few-token call (issue 13), base and graphlora.

The benchmark model (``bench_gpu.build``: Llama-7B shape, 4 layers, bf16 on CUDA; ``--tiny``: the
2-layer toy on the CPU), LoRA r=16 on the 28 linears, eval mode under ``no_grad``. Each module is
compiled and called at ``--tokens`` only (one static graph each), warmed up with the very call, then
``--rounds`` rounds of ``--calls`` calls are timed back to back without synchronizing (a few-token
call is bound by the host issuing its kernels), with one synchronize at the end of each round;
prints the minimum per-call time of the rounds, in milliseconds. ``--mixed K``: graphlora's call is
a mixed batch of ``K`` rows of ``--tokens``' length, each row its own adapter (``adapter_names``),
against the base at the same shape. ``--profile``: after timing, one torch.profiler pass over 5
calls of each: kernels and runtime calls (``cudaLaunchKernel``, ``cudaGraphLaunch``) per call.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_gpu import TARGETS, build, randomize_lora
from bench_serving import grow_to, row_names

import graphlora


def issue_ms(fn, device, rounds: int, calls: int) -> float:
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls * 1e3)
    return best


def profiled(label: str, fn, calls: int = 5, top: int = 14) -> None:
    """Kernels (by CUDA time) and host runtime calls (by count) per call, over ``calls`` calls."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    events = prof.key_averages()
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"=== profile {label}: CUDA {sum(e.self_device_time_total for e in gpu) / calls / 1e3:.3f} ms/call, "
          f"{sum(e.count for e in gpu) / calls:.0f} kernels/call", flush=True)
    for e in sorted(gpu, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"| {e.self_device_time_total / calls / 1e3:8.3f} ms {e.count / calls:6.1f}x {e.key[:100]}")
    runtime = [e for e in events if e.key.startswith("cuda") and e.device_type != torch.autograd.DeviceType.CUDA]
    for e in sorted(runtime, key=lambda e: -e.count)[:8]:
        print(f"| host {e.key[:40]:40s} {e.count / calls:6.1f}x {e.self_cpu_time_total / calls / 1e3:8.3f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tokens", default="8x16")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--skip-base", action="store_true")
    ap.add_argument("--mode", default=None, help='torch.compile mode, e.g. "reduce-overhead" (CUDA graphs)')
    ap.add_argument("--mixed", type=int, default=0, help="rows of a mixed batch, each its own adapter")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--parts-max-rows", type=int, default=None, help="kernels.PARTS_MAX_ROWS (0: sum kernels)")
    ap.add_argument("--shrink-few", default=None, help="kernels.SHRINK_FEW_CONFIG as BM,BK,K_PER,WARPS")
    ap.add_argument("--linear-few-rows", type=int, default=None,
                    help="linear_few.MAX_ROWS: compiled calls of at most this many rows fuse each site's base "
                         "linear and update (0: off, the default)")
    ap.add_argument("--linear-few", default=None, help="linear_few.CONFIG as BM,BN,BK,WARPS,STAGES")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from graphlora.passes import kernels, linear_few

    if args.linear_few_rows is not None:
        linear_few.MAX_ROWS = args.linear_few_rows
    if args.linear_few:
        linear_few.CONFIG = tuple(int(v) for v in args.linear_few.split(","))

    if args.parts_max_rows is not None:
        kernels.PARTS_MAX_ROWS = args.parts_max_rows
    if args.shrink_few:
        kernels.SHRINK_FEW_CONFIG = tuple(int(v) for v in args.shrink_few.split(","))
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    base, cfg = build(args.tiny, device, dtype)
    b, s = (int(v) for v in args.tokens.split("x"))
    if args.mixed:
        b = args.mixed
    shape = f"{b}x{s}" + (" mixed" if args.mixed else "")
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0)).to(device)
    result = {}
    calls = {}
    with torch.no_grad():
        if not args.skip_base:
            cb = torch.compile(base, mode=args.mode)
            key = f"base compiled {args.mode or 'default'} {shape}"
            calls[key] = lambda: cb(input_ids=ids, use_cache=False)
            result[key] = issue_ms(calls[key], device, args.rounds, args.calls)
            print(f"{key}: {result[key]:.3f} ms", flush=True)
            eager, compiled = base(input_ids=ids, use_cache=False).logits.float(), calls[key]().logits.float()
            result["base compiled vs eager: rel diff"] = ((compiled - eager).norm() / eager.norm()).item()
            print(f"base compiled vs eager: rel diff {result['base compiled vs eager: rel diff']:.2e}")
        gm = graphlora.inject(base, graphlora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        randomize_lora(gm, 0)
        kwargs = {}
        if args.mixed:
            grow_to(gm, None, args.mixed)
            kwargs["adapter_names"] = row_names(gm, args.mixed)
        cg = torch.compile(gm.eval(), mode=args.mode)
        key = f"graphlora compiled {args.mode or 'default'} {shape}"
        calls[key] = lambda: cg(input_ids=ids, **kwargs)
        result[key] = issue_ms(calls[key], device, args.rounds, args.calls)
        print(f"{key}: {result[key]:.3f} ms", flush=True)
        eager, compiled = gm(input_ids=ids, **kwargs).logits.float(), calls[key]().logits.float()
        result["graphlora compiled vs eager: rel diff"] = ((compiled - eager).norm() / eager.norm()).item()
        print(f"graphlora compiled vs eager: rel diff {result['graphlora compiled vs eager: rel diff']:.2e}")
        if args.profile:
            for key, fn in calls.items():
                profiled(key, fn)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
