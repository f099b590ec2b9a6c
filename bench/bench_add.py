"""Hot add: seconds for 15 ``add_adapter`` calls into free bank slots, graphlora and PEFT.

The benchmark model (``bench_gpu.build``: Llama-7B shape, 4 layers, bf16 on CUDA; ``--tiny``: a
2-layer toy on the CPU), LoRA r=16 on the 28 linears, ``configure_banks(max_loras=17,
max_lora_rank=16)`` so every add lands in a free slot (no re-splice). Each repeat injects a fresh
module, adds one warm-up adapter (the first add of a process imports and builds what later ones
reuse), then times 15 adds; the same for ``PeftModel.add_adapter`` on a fresh PEFT model. Prints
the min and median of ``--repeat`` repeats (issue 13's target: 15 adds in at most 0.2 s).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import warnings

import torch
from bench_gpu import TARGETS, build

import graphlora

LORA = dict(r=16, lora_alpha=32, target_modules=TARGETS)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fifteen(add, device) -> float:
    _sync(device)
    start = time.perf_counter()
    for i in range(15):
        add(f"x{i}")
    _sync(device)
    return time.perf_counter() - start


def _ready(tiny: bool, device, dtype):
    """A fresh module with room for the default, a warm-up and 15 adds, the warm-up added."""
    gm = graphlora.inject(build(tiny, device, dtype)[0], graphlora.LoraConfig(**LORA))
    gm.configure_banks(max_loras=17, max_lora_rank=16)
    gm.add_adapter("warm", graphlora.LoraConfig(**LORA))
    return gm


def _profile(device, dtype, tiny: bool) -> None:
    import cProfile
    import pstats

    gm = _ready(tiny, device, dtype)
    prof = cProfile.Profile()
    prof.enable()
    fifteen(lambda name: gm.add_adapter(name, graphlora.LoraConfig(**LORA)), device)
    prof.disable()
    stats = pstats.Stats(prof).strip_dirs()
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="then cProfile 15 more graphlora adds (top 30 by own time)")
    args = ap.parse_args()
    import peft

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    ours, theirs = [], []
    for _ in range(args.repeat):
        gm = _ready(args.tiny, device, dtype)
        ours.append(fifteen(lambda name: gm.add_adapter(name, graphlora.LoraConfig(**LORA)), device))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(build(args.tiny, device, dtype)[0], peft.LoraConfig(**LORA))
            pm.add_adapter("warm", peft.LoraConfig(**LORA))
            theirs.append(fifteen(lambda name: pm.add_adapter(name, peft.LoraConfig(**LORA)), device))
    result = {"device": str(device), "graphlora_s": ours, "peft_s": theirs, "gc_gen2": gc.get_stats()[2]}
    if args.profile:
        _profile(device, dtype, args.tiny)
    for label, times in (("graphlora", ours), ("peft", theirs)):
        print(f"15 add_adapter, {label}: min {min(times):.3f} s, median {statistics.median(times):.3f} s", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
