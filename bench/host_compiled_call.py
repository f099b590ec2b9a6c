"""Host time to issue one ``torch.compile``'d few-token call (issue 13), base and graphlora.

The benchmark model (``bench_gpu.build``: Llama-7B shape, 4 layers, bf16 on CUDA; ``--tiny``: the
2-layer toy on the CPU), LoRA r=16 on the 28 linears, eval mode under ``no_grad``. Each module is
compiled and called at ``--tokens`` only (one static graph each), warmed up with the very call, then
``--rounds`` rounds of ``--calls`` calls are timed back to back without synchronizing (a few-token
call is bound by the host issuing its kernels), with one synchronize at the end of each round;
prints the minimum per-call time of the rounds, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_gpu import TARGETS, build, randomize_lora

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tokens", default="8x16")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--skip-base", action="store_true")
    ap.add_argument("--mode", default=None, help='torch.compile mode, e.g. "reduce-overhead" (CUDA graphs)')
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    base, cfg = build(args.tiny, device, dtype)
    b, s = (int(v) for v in args.tokens.split("x"))
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0)).to(device)
    result = {}
    with torch.no_grad():
        if not args.skip_base:
            cb = torch.compile(base, mode=args.mode)
            key = f"base compiled {args.mode or 'default'} {args.tokens}"
            result[key] = issue_ms(lambda: cb(input_ids=ids, use_cache=False), device, args.rounds, args.calls)
            print(f"{key}: {result[key]:.3f} ms", flush=True)
        gm = graphlora.inject(base, graphlora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        randomize_lora(gm, 0)
        cg = torch.compile(gm.eval(), mode=args.mode)
        key = f"graphlora compiled {args.mode or 'default'} {args.tokens}"
        result[key] = issue_ms(lambda: cg(input_ids=ids), device, args.rounds, args.calls)
        print(f"{key}: {result[key]:.3f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
