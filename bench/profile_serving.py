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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="4x512,8x16")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", default=None)  # accepted for bench/h200_run.sh; the report is stdout
    args = ap.parse_args()
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
    with torch.no_grad():
        for shape in args.tokens.split(","):
            b, s = (int(v) for v in shape.split("x"))
            ids = torch.randint(0, cfg.vocab_size, (b, s), generator=gen).to(device)
            measure(f"base {shape}", lambda: base(input_ids=ids, use_cache=False), args.top)
            measure(f"graphlora {shape}", lambda: gm(input_ids=ids), args.top)
            gm.configure_banks(lora_dtype="auto")
            measure(f"graphlora lora_dtype=auto {shape}", lambda: gm(input_ids=ids), args.top)
            gm.configure_banks(lora_dtype="adapter")
            gm.merge_adapter()
            measure(f"graphlora merged {shape}", lambda: gm(input_ids=ids), args.top)
            gm.unmerge_adapter()
            measure(f"peft {shape}", lambda: pm(input_ids=ids, use_cache=False), args.top)


if __name__ == "__main__":
    main()
