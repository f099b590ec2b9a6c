"""Does static-cache generate record new CUDA graphs on every call? (issue 12, a probe)

Builds the benchmark model (``bench_gpu.build``), then for the base model and graphlora (one
adapter, eval) runs ``generate(cache_implementation="static")`` (transformers compiles the decode
step with its ``CompileConfig``: CUDA graphs) ``--calls`` times with the same prompt, and after each
call prints how many CUDA-graph nodes Inductor's CUDA-graph trees have recorded so far (counted by
wrapping ``CUDAGraphNode.__init__``), the call's wall milliseconds and ``torch.cuda.memory_reserved``.
A steady state records nothing after the first calls; a count that grows with every call is a
re-record per call (time, and a memory pool that grows).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_gpu import TARGETS, build

import graphlora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA (CUDA graphs)")
        return
    from torch._inductor import cudagraph_trees

    recorded = [0]
    original = cudagraph_trees.CUDAGraphNode.__init__

    def counting(self, *a, **k):
        recorded[0] += 1
        return original(self, *a, **k)

    cudagraph_trees.CUDAGraphNode.__init__ = counting
    device = torch.device("cuda")
    base, cfg = build(False, device, torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, 32), device=device)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
              do_sample=False, cache_implementation="static")
    rows = []
    for label in ("base", "graphlora"):
        model = base if label == "base" else graphlora.inject(
            base, graphlora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)).eval()
        torch._dynamo.reset()
        recorded[0] = 0
        with torch.no_grad():
            for call in range(args.calls):
                torch.cuda.synchronize()
                start = time.perf_counter()
                model.generate(**kw)
                torch.cuda.synchronize()
                row = {"model": label, "call": call, "graphs_recorded": recorded[0],
                       "ms": (time.perf_counter() - start) * 1e3,
                       "reserved_mib": torch.cuda.memory_reserved() / 2 ** 20}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
