"""Host-side profile of one-token decode steps (issue 12): base model vs graphlora, eval, no_grad.

Times ``--steps`` decode calls with a DynamicCache (the cache grows by one per call) for the base
model, graphlora with one adapter, and graphlora merged; then prints cProfile's top functions for
graphlora's steps (sorted by own time and by cumulative time). Run:
``python bench/profile_decode.py`` (``--tiny`` on the CPU).
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import json
import pstats
import time

import torch
from bench_gpu import TARGETS, build

import graphlora


def steps(model, name, prompt, n, sync):
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache = out.past_key_values
        nxt = prompt[:, -1:]
        for _ in range(3):  # warm-up: the very call timed below
            model(input_ids=nxt, use_cache=True, **{name: cache})
        sync()
        t = time.perf_counter()
        for _ in range(n):
            model(input_ids=nxt, use_cache=True, **{name: cache})
        sync()
        return (time.perf_counter() - t) / n * 1e3, cache, nxt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base, cfg = build(args.tiny, device, dtype)
    name = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
    prompt = torch.randint(0, cfg.vocab_size, (1, 32), device=device)
    results = {}
    results["base_ms"], _, _ = steps(base, name, prompt, args.steps, sync)
    gm = graphlora.inject(base, graphlora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    gm.eval()
    results["graphlora_ms"], cache, nxt = steps(gm, name, prompt, args.steps, sync)
    prof = cProfile.Profile()
    with torch.no_grad():
        prof.enable()
        for _ in range(args.steps):
            gm(input_ids=nxt, use_cache=True, **{name: cache})
        sync()
        prof.disable()
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(35)
        print(buf.getvalue())
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), profile(activities=acts) as tp:
        for _ in range(5):
            gm(input_ids=nxt, use_cache=True, **{name: cache})
        sync()
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    gm.merge_adapter()
    results["graphlora_merged_ms"], _, _ = steps(gm, name, prompt, args.steps, sync)
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
