"""Compiled few-row serving calls against eager (``graphlora.passes.ops.fusible_rows``), on the GPU.

Builds the benchmark model (``bench_gpu.build``, Llama-7B shape, 4 layers, bf16, float32 adapters
r=16 on the 28 linears, random B), then for 1, 8 and 32 rows of one token each, with the cache of
a 32-token prompt: the logits of the eager call and of ``torch.compile(gm)`` with the broadcast
reductions (rows up to ``FUSIBLE_MAX_ROWS``) and with the GEMM / Triton-op forms
(``FUSIBLE_MAX_ROWS = 0``). Prints the max abs difference to eager and the logits' scale.
``--tiny``: a CPU smoke run (no reductions there: the CUDA check).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from bench_gpu import TARGETS, build

import graphlora
from graphlora.passes import ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    base, cfg = build(args.tiny, device, dtype)
    gm = graphlora.inject(base, graphlora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, _, branch in gm.graphlora.branches():
            p = branch.lora_B.weight
            p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p))
    limit = ops.FUSIBLE_MAX_ROWS
    rows = []
    for batch in (1, 8, 32):
        ids = torch.randint(0, cfg.vocab_size, (batch, 33), device=device)
        with torch.no_grad():
            cache = gm(input_ids=ids[:, :32], use_cache=True).past_key_values

            def step():  # a fresh copy of the prompt's cache each call (a call appends to it)
                return dict(input_ids=ids[:, 32:], past_key_values=copy.deepcopy(cache))

            want = gm(**step()).logits.float()
            row = {"batch": batch, "logits_absmax": want.abs().max().item()}
            for label, value in (("reductions", limit), ("gemm", 0)):
                ops.FUSIBLE_MAX_ROWS = value
                torch._dynamo.reset()
                fn = torch.compile(gm)
                for _ in range(2):
                    got = fn(**step()).logits.float()
                row[f"{label}_maxdiff"] = (got - want).abs().max().item()
            ops.FUSIBLE_MAX_ROWS = limit
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": str(device), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
