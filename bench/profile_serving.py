"""Where a serving call's time goes (issue 13): the kernels of one eager call, per form.

Model and adapters as in ``bench_serving.py`` (Llama-7B shape, 4 layers, bf16, r=16 on every
linear, float32 adapters: PEFT's default). For each form -- the base model, graphlora serving
(``lora_dtype="adapter"`` and ``"auto"``), merged, and PEFT -- the very call is run 5 times, then
profiled over 5 more: CUDA time per call, wall time per call, kernel launches per call, and the
top kernels. Run on the GPU machine: ``python bench/profile_serving.py --tokens 4x512``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import TARGETS, build, copy_into_peft, randomize_lora  # noqa: E402
from bench_serving import unfused  # noqa: E402

import graphlora  # noqa: E402

CALLS = 5


def measure(label: str, fn, top: int) -> None:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / CALLS * 1e3
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sum(e.count for e in events) / CALLS
    gpu = sum(e.self_device_time_total for e in events) / CALLS / 1e3
    print(f"\n=== {label}: wall {wall:.3f} ms/call, CUDA {gpu:.3f} ms/call, {kernels:.0f} kernels/call", flush=True)
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"  {e.self_device_time_total / CALLS / 1e3:8.3f} ms  {e.count / CALLS:6.0f}x  {e.key[:110]}")


def host(label: str, fn, top: int) -> None:
    """Host time of the calls: 20 issued back to back (the GPU is idle most of a few-token call),
    under cProfile, the functions by their own time."""
    import cProfile
    import pstats

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        fn()
    issued = (time.perf_counter() - start) / 20 * 1e3
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    print(f"\n=== host {label}: {issued:.3f} ms/call to issue (no profiler)", flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="4x512,8x16")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--host", action="store_true", help="cProfile the host side of each call instead")
    ap.add_argument("--compiled", action="store_true",
                    help="profile torch.compile'd base and graphlora (fused / unfused) instead of eager")
    ap.add_argument("--out", default=None)  # accepted for bench/h200_run.sh; the report is stdout
    ap.add_argument("--fusible-rows", type=int, default=None,
                    help="graphlora.passes.ops.FUSIBLE_MAX_ROWS for this run (compiled calls of at most this many "
                         "rows write the adapter's products as reductions; 0: never)")
    args = ap.parse_args()
    if args.fusible_rows is not None:
        from graphlora.passes import ops

        ops.FUSIBLE_MAX_ROWS = args.fusible_rows
    if args.compiled:
        return compiled(args)
    import peft

    device, dtype = torch.device("cuda"), torch.bfloat16
    base, cfg = build(False, device, dtype)
    lora = dict(r=16, lora_alpha=32, target_modules=TARGETS)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora)).eval()
    gm = graphlora.inject(base, graphlora.LoraConfig(**lora))
    randomize_lora(gm, 0)
    copy_into_peft(gm, pm, "default")
    gm.eval()
    gen = torch.Generator().manual_seed(0)
    measure_form = (lambda label, fn, top: host(label, fn, 25)) if args.host else measure
    with torch.no_grad():
        for shape in args.tokens.split(","):
            b, s = (int(v) for v in shape.split("x"))
            ids = torch.randint(0, cfg.vocab_size, (b, s), generator=gen).to(device)
            measure_form(f"base {shape}", lambda: base(input_ids=ids, use_cache=False), args.top)
            measure_form(f"graphlora {shape}", lambda: gm(input_ids=ids), args.top)
            with unfused(gm):
                measure_form(f"graphlora unfused {shape}", lambda: gm(input_ids=ids), args.top)
            gm.configure_banks(lora_dtype="auto")
            measure_form(f"graphlora lora_dtype=auto {shape}", lambda: gm(input_ids=ids), args.top)
            gm.configure_banks(lora_dtype="adapter")
            gm.merge_adapter()
            measure_form(f"graphlora merged {shape}", lambda: gm(input_ids=ids), args.top)
            gm.unmerge_adapter()
            measure_form(f"peft {shape}", lambda: pm(input_ids=ids, use_cache=False), args.top)


def compiled(args) -> None:
    """Kernels and CUDA time per call of the compiled base and graphlora, fused and unfused sibling
    shrinks (host-speed independent, unlike the wall times of few-token calls)."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    base, cfg = build(False, device, dtype)
    gm = graphlora.inject(base, graphlora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    randomize_lora(gm, 0)
    gm.eval()
    gen = torch.Generator().manual_seed(0)
    cb, cg = torch.compile(base), torch.compile(gm)
    form = (lambda label, fn, top: host(label, fn, 25)) if args.host else measure
    with torch.no_grad():
        for shape in args.tokens.split(","):
            b, s = (int(v) for v in shape.split("x"))
            ids = torch.randint(0, cfg.vocab_size, (b, s), generator=gen).to(device)
            form(f"base compiled {shape}", lambda: cb(input_ids=ids, use_cache=False), args.top)
            form(f"graphlora compiled {shape}", lambda: cg(input_ids=ids), args.top)
            with unfused(gm):
                form(f"graphlora compiled unfused {shape}", lambda: cg(input_ids=ids), args.top)
            gm.configure_banks(lora_dtype="auto")
            form(f"graphlora compiled lora_dtype=auto {shape}", lambda: cg(input_ids=ids), args.top)
            gm.configure_banks(lora_dtype="adapter")


if __name__ == "__main__":
    main()
