"""MoE benchmark: LoRA on the experts of one Mixtral-shaped MoE layer, graphlora against PEFT.

Layer: transformers' ``MixtralSparseMoeBlock`` (router + ``MixtralExperts`` with 3-D ``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``, ``experts_implementation="grouped_mm"``), 8 experts, top-2,
hidden 4096, intermediate 14336, bf16 on CUDA; input ``[2, 2048, 4096]`` (4,096 tokens) with
``requires_grad`` (a layer inside a model passes gradients on). LoRA r=16, alpha=32 on both expert
weights (``target_parameters=["experts.gate_up_proj", "experts.down_proj"]``), random non-zero A and B,
the same values on both sides. Cases:

- ``base``: the layer without adapters (frozen weights, input gradient only);
- ``graphlora``: ``graphlora.inject(..., LoraConfig(target_modules=[], target_parameters=...))``, eager:
  the low-rank path runs as two more grouped matmuls per weight (no ``Delta W``);
- ``peft``: PEFT's ``get_peft_model`` with the same config (``ParamWrapper``: ``W + s B A`` per expert, formed
  on every forward through a parametrization).

Measured per case: one training step (forward, ``out.float().pow(2).mean()``, backward) median time over
``--iters`` after ``--warmup`` runs of the exact same call, and its peak allocated memory (absolute, and the
extra over what was allocated before the step). Reported ratios graphlora / PEFT (targets: time <= 0.7,
peak <= 0.8) and the largest output difference graphlora vs PEFT (bf16). ``--tiny``: a small layer in
float32 on CPU (a smoke run, < 60 s). Run: ``python bench/bench_moe.py --out moe-h200.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import time
import traceback
from typing import Any, Callable

import torch
from torch import nn

PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
PACKAGES = ("torch", "transformers", "peft", "graphlora")


class Layer(nn.Module):
    """One MoE block as a model of its own: ``moe`` holds the router (``moe.gate``) and ``moe.experts``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.moe = block

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden_states)


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "installed")
        except Exception as exc:
            out[name] = f"not installed: {name} ({type(exc).__name__})"
    return out


def build(tiny: bool, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Layer:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    if tiny:
        cfg = MixtralConfig(hidden_size=64, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)
    else:
        cfg = MixtralConfig(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    with torch.device(device):
        block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    layer = Layer(block).to(dtype).eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


def inputs(tiny: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    shape = (2, 128, 64) if tiny else (2, 2048, 4096)
    gen = torch.Generator(device="cpu").manual_seed(1)
    return torch.randn(shape, generator=gen).to(device, dtype).requires_grad_(True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timer(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds of ``fn`` after ``warmup`` runs of it."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_of(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Peak allocated bytes while ``fn`` runs: absolute and above the memory allocated before it."""
    if device.type != "cuda":
        return {"peak_bytes": None, "peak_extra_bytes": None}
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": peak, "peak_extra_bytes": peak - before}


def step_fn(model: nn.Module, x: torch.Tensor, params: list) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        for p in [*params, x]:
            p.grad = None
        out = model(x)
        out = out if isinstance(out, torch.Tensor) else out[0]
        out.float().pow(2).mean().backward()
        return out.detach()

    return step


def measure(model: nn.Module, x: torch.Tensor, args, device: torch.device) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    step = step_fn(model, x, params)
    ms = timer(step, args.warmup, args.iters, device)
    out = {"step_ms": ms, "trainable_params": sum(p.numel() for p in params), **peak_of(step, device)}
    return out


def randomize(module: nn.Module, seed: int) -> None:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.device, p.dtype))


def lora_kwargs() -> dict[str, Any]:
    return dict(r=16, lora_alpha=32, target_modules=[], target_parameters=PARAMS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small float32 layer on CPU (smoke run)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 3)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the full benchmark needs CUDA; use --tiny for a CPU smoke run")
        device, dtype = torch.device("cuda"), torch.bfloat16
    results: dict[str, Any] = {
        "setup": {"tiny": args.tiny, "device": str(device), "dtype": str(dtype), "platform": platform.platform(),
                  "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                  "experts": 8, "top_k": 2, "tokens": 256 if args.tiny else 4096,
                  "hidden": 64 if args.tiny else 4096, "intermediate": 96 if args.tiny else 14336,
                  "lora": {k: v for k, v in lora_kwargs().items()}, "warmup": args.warmup, "iters": args.iters},
        "versions": versions(), "cases": {},
    }
    x = inputs(args.tiny, device, dtype)
    outs: dict[str, torch.Tensor] = {}

    def case(name: str, fn: Callable[[], tuple[nn.Module, dict]]) -> None:
        try:
            model, extra = fn()
            results["cases"][name] = {**measure(model, x, args, device), **extra}
            with torch.no_grad():
                out = model(x)
            outs[name] = (out if isinstance(out, torch.Tensor) else out[0]).float()
            del model
        except Exception as exc:  # one failing case must not hide the others
            results["cases"][name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(name, json.dumps({k: v for k, v in results["cases"][name].items() if k != "trace"}), flush=True)

    import graphlora

    state: dict[str, Any] = {}

    def run_base():
        return build(args.tiny, device, dtype), {}

    def run_graphlora():
        layer = build(args.tiny, device, dtype)
        t = time.perf_counter()
        gm = graphlora.inject(layer, graphlora.LoraConfig(**lora_kwargs()), example_inputs=(x.detach(),),
                              is_trainable=True)
        inject_s = time.perf_counter() - t
        randomize(gm, seed=5)
        gm.train()
        state["adapter"] = {k: v.detach().clone() for k, v in gm.get_adapter_state_dict("default").items()}
        return gm, {"inject_s": inject_s}

    def run_peft():
        from peft import LoraConfig as PeftLoraConfig, get_peft_model, set_peft_model_state_dict

        layer = build(args.tiny, device, dtype)
        pm = get_peft_model(layer, PeftLoraConfig(**lora_kwargs()))
        if "adapter" in state:
            set_peft_model_state_dict(pm, state["adapter"])
        else:
            randomize(pm, seed=5)
        pm.train()
        return pm, {}

    case("base", run_base)
    case("graphlora", run_graphlora)
    case("peft", run_peft)
    cases = results["cases"]
    g, p = cases.get("graphlora", {}), cases.get("peft", {})
    ratios: dict[str, Any] = {}
    if "step_ms" in g and "step_ms" in p:
        ratios["time_graphlora_over_peft"] = g["step_ms"] / p["step_ms"]
        ratios["time_target"] = 0.7
    if g.get("peak_bytes") and p.get("peak_bytes"):
        ratios["peak_graphlora_over_peft"] = g["peak_bytes"] / p["peak_bytes"]
        ratios["peak_extra_graphlora_over_peft"] = g["peak_extra_bytes"] / p["peak_extra_bytes"]
        ratios["peak_target"] = 0.8
    if "graphlora" in outs and "peft" in outs:
        ratios["max_abs_diff_graphlora_vs_peft"] = (outs["graphlora"] - outs["peft"]).abs().max().item()
        if "base" in outs:
            ratios["max_abs_diff_adapter_vs_base"] = (outs["graphlora"] - outs["base"]).abs().max().item()
    results["ratios"] = ratios
    print("ratios", json.dumps(ratios), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
