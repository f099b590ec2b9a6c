"""Why is static-cache generate slower through graphlora (issue 12)? A host and log profile.

Builds the Llama-7B-shaped model (``bench_gpu.build``), then for the base model and graphlora (one
adapter, eval): ``generate(cache_implementation="static")`` of ``--new`` tokens at batch 1, warmed
up with the very same call, timed, then profiled with cProfile (host) and torch.profiler (kernels,
CUDA-graph launches). Run with ``TORCH_LOGS=recompiles,graph_breaks,cudagraphs`` to see what
dynamo and the CUDA-graph trees decide. ``--tiny``: a CPU smoke run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from bench_gpu import TARGETS, build

import graphlora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--cache", default="static", choices=["static", "dynamic"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--fusible-rows", type=int, default=None,
                    help="graphlora.passes.ops.FUSIBLE_MAX_ROWS for this run (0: compiled few-row calls keep the GEMMs)")
    ap.add_argument("--kernels", type=int, default=30, help="rows of the table sorted by device time")
    args = ap.parse_args()
    if args.fusible_rows is not None:
        from graphlora.passes import ops

        ops.FUSIBLE_MAX_ROWS = args.fusible_rows
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base, cfg = build(args.tiny, device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (1, 32), device=device)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
              do_sample=False, **({"cache_implementation": "static"} if args.cache == "static" else {}))
    gm = graphlora.inject(base, graphlora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)).eval()
    lines = []
    for label, model in (("base", base), ("graphlora", gm)):
        with torch.no_grad():
            for _ in range(3):
                model.generate(**kw)
            sync()
            t = time.perf_counter()
            model.generate(**kw)
            sync()
            ms = (time.perf_counter() - t) * 1e3 / args.new
            prof = cProfile.Profile()
            prof.enable()
            model.generate(**kw)
            sync()
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(45)  # the call chain
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as tp:
                model.generate(**kw)
                sync()
            averages = tp.key_averages()
            table = averages.table(sort_by="self_cpu_time_total", row_limit=25)
            try:
                kernels = averages.table(sort_by="self_device_time_total", row_limit=args.kernels)
            except Exception:  # an older torch
                kernels = averages.table(sort_by="self_cuda_time_total", row_limit=args.kernels)
        lines += [f"===== {label}: {ms:.3f} ms per token", buf.getvalue(), table, kernels]
        print(lines[-4], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out.replace(".json", ".txt"), "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
