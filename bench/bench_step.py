"""Training-step benchmark (issue 15, item 4): one compiled forward + backward, bf16, one adapter.

Model: Llama-7B-shaped, 4 layers, bf16 (``bench_gpu.build``); batch 4 x 1024 tokens, ``labels=ids``;
LoRA r=16, alpha=32 on q,k,v,o,gate,up,down, the same weights for PEFT. Cases: graphlora with the
sibling down-projections fused (``passes/fuse_shrink.py``), graphlora without, PEFT, and the floor:
the frozen base with only its activations' gradients computed. Each is
``torch.compile``d, run once (compile) and then timed (median of CUDA events after warm-ups of the
very same call); peak memory is ``max_memory_allocated`` during the timed steps. Run:
``python bench/bench_step.py --out step-h200.json`` (``--tiny``: a CPU smoke run).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from bench_gpu import TARGETS, build, copy_into_peft, timer

import graphlora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of each case's step")
    args = ap.parse_args()
    import peft

    from graphlora.passes import fuse_shrink

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    batch, seq = (2, 16) if args.tiny else (4, 1024)
    base, cfg = build(args.tiny, device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    lora = dict(r=16, lora_alpha=32, target_modules=TARGETS)
    results: dict = {"config": {"batch": batch, "seq": seq, "dtype": str(dtype), "lora": lora}, "ms": {}, "peak_gib": {}}
    reference = None

    def case(label: str, make) -> None:
        model, kwargs = make()
        model.train()
        compiled = torch.compile(model)

        def step():
            compiled(input_ids=ids, labels=ids, **kwargs).loss.backward()

        t = time.perf_counter()
        step()
        results[f"compile_s {label}"] = time.perf_counter() - t
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        results["ms"][label] = timer(step, 3, 10, device)
        if device.type == "cuda":
            results["peak_gib"][label] = torch.cuda.max_memory_allocated() / 2**30
        print(label, results["ms"][label], results["peak_gib"].get(label), flush=True)
        if args.profile and device.type == "cuda":
            results.setdefault("top kernels", {})[label] = top_kernels(step)
        torch._dynamo.reset()

    def graphlora_case(fused: bool):
        def make():
            nonlocal reference
            fuse_shrink.ENABLED = fused
            gm = graphlora.inject(copy.deepcopy(base), graphlora.LoraConfig(**lora))
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for _, _, branch in gm.graphlora.branches("default"):
                    branch.lora_B.weight.copy_(torch.randn(branch.lora_B.weight.shape, generator=gen) * 0.01)
            reference = gm
            return gm, {}
        return make

    def peft_case():
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora))
        copy_into_peft(reference, pm, "default")
        return pm, {"use_cache": False}

    def floor_case():
        """The frozen base, nothing trainable, the input embeddings requiring grad: the backward
        computes only the activations' gradients, what any adapter step pays at least."""
        model = copy.deepcopy(base)
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model, {"use_cache": False}

    case("base frozen (dx only)", floor_case)
    case("graphlora fused", graphlora_case(True))
    case("graphlora unfused", graphlora_case(False))
    case("peft", peft_case)
    fuse_shrink.ENABLED = True
    for label in ("graphlora fused", "graphlora unfused", "base frozen (dx only)"):
        results[f"{label} / peft time"] = results["ms"][label] / results["ms"]["peft"]
        if results["peak_gib"]:
            results[f"{label} / peft peak"] = results["peak_gib"][label] / results["peak_gib"]["peft"]
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


def top_kernels(step, calls: int = 3, top: int = 15) -> list[str]:
    """The ``top`` CUDA kernels of ``calls`` steps by their own time (ms per step, count per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / calls / 1e3
    lines = [f"CUDA {total:.3f} ms/step, {sum(e.count for e in events) / calls:.0f} kernels/step"]
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        lines.append(f"{e.self_device_time_total / calls / 1e3:8.3f} ms {e.count / calls:5.0f}x {e.key[:100]}")
    print("\n".join(lines), flush=True)
    return lines


if __name__ == "__main__":
    main()
