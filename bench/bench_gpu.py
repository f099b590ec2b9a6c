"""GPU benchmark: base vs graphlora vs PEFT vs merged, eager and compiled, on one GPU in one process.

Model: Llama-7B-shaped (hidden 4096, intermediate 11008, 32 heads, vocab 32000), 4 layers, bf16;
batch 4 x seq 1024; LoRA r=16, alpha=32 on q,k,v,o,gate,up,down (same config and weights for PEFT).
Times are medians of CUDA-event timings after warm-up. Ratios are against the base model from the
same run. Run: ``python bench/bench_gpu.py --out results.json`` (``--tiny`` for a CPU smoke run;
``--no-fuse-shrink`` to time the training step with one down-projection GEMM per site, as before
``passes/fuse_shrink.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

import graphlora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(tiny: bool, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model, cfg


def timer(fn, warmup: int, iters: int, device) -> float:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = device.type == "cuda"
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def randomize_lora(module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.01).to(p.dtype))


def copy_into_peft(gm, pm, adapter: str) -> None:
    """Give PEFT's adapter exactly graphlora's weights."""
    with torch.no_grad():
        for name, module in pm.named_modules():
            if hasattr(module, "lora_A") and adapter in getattr(module, "lora_A", {}):
                key = name.removeprefix("base_model.model.").replace(".", "_")
                branch = gm.graphlora.branch(key, adapter)
                module.lora_A[adapter].weight.copy_(branch.lora_A.weight)
                module.lora_B[adapter].weight.copy_(branch.lora_B.weight)


def reduce_overhead(gm, ids, results: dict, ms: dict, warmup: int, iters: int, device) -> None:
    """``torch.compile(mode="reduce-overhead")`` (CUDA graphs): switching adapters must change the
    replayed graph's outputs (gates are updated in place) without recompiling or re-recording."""
    from torch._dynamo.utils import counters

    expected = {}
    with torch.no_grad():
        for name in ["default", "a1", "a2"]:
            gm.set_adapter(name)
            gm.requires_grad_(False)
            expected[name] = gm(input_ids=ids).logits.float()
        gm.set_adapter("default")
        gm.requires_grad_(False)
        cm = torch.compile(gm, mode="reduce-overhead")
        for _ in range(3):
            cm(input_ids=ids)
        counters.clear()
        ms["graphlora reduce-overhead"] = timer(lambda: cm(input_ids=ids), warmup, iters, device)
        errors = {}
        for name in ["a1", "a2", "default"]:
            gm.set_adapter(name)
            gm.requires_grad_(False)
            got = cm(input_ids=ids).logits.float()
            # distance to every adapter's eager output: the right one must be the nearest by far
            errors[name] = {other: ((got - ref).norm() / ref.norm()).item() for other, ref in expected.items()}
        gm.set_adapter("a1")
        gm.requires_grad_(False)
        stall = timer(lambda: cm(input_ids=ids), 0, 1, device)
        gm.set_adapter("default")
        gm.requires_grad_(False)
    results["reduce-overhead rel diff: active adapter -> {eager output of each adapter}"] = errors
    results["reduce-overhead recompiles after switching"] = counters["stats"]["unique_graphs"]
    results["reduce-overhead first call after switch ms"] = stall
    print({k: v for k, v in results.items() if "reduce-overhead" in k}, ms["graphlora reduce-overhead"], flush=True)
    torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="small model on CPU (smoke test)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--no-fuse-shrink", action="store_true",
                        help="training programs keep one down-projection GEMM per site (passes/fuse_shrink.py off)")
    args = parser.parse_args()
    from graphlora.passes import fuse_shrink

    fuse_shrink.ENABLED = not args.no_fuse_shrink  # read when each program is built (inject, first fwd+bwd call)
    from torch._dynamo.utils import counters
    import peft

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    warmup, iters = (2, 5) if args.tiny else (5, 30)
    batch, seq = (4, 16) if args.tiny else (4, 1024)
    results: dict = {"config": {"batch": batch, "seq": seq, "r": 16, "targets": TARGETS, "dtype": str(dtype),
                                "fuse_shrink": fuse_shrink.ENABLED}}
    env = {"torch": torch.__version__, "python": platform.python_version(), "peft": peft.__version__}
    import transformers

    env["transformers"] = transformers.__version__
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    results["env"] = env
    print(env, flush=True)

    base, cfg = build(args.tiny, device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    lora = dict(r=16, lora_alpha=32, target_modules=TARGETS)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora)).eval()

    t = time.perf_counter()
    gm = graphlora.inject(base, graphlora.LoraConfig(**lora))
    results["inject_s"] = time.perf_counter() - t
    randomize_lora(gm, 0)
    copy_into_peft(gm, peft_model, "default")
    gm.requires_grad_(False)
    peft_model.requires_grad_(False)

    ms: dict[str, float] = {}
    results["ms"] = ms

    def dump() -> None:
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(results, fh, indent=1, default=str)

    def compiled_ms(label: str, m, call) -> None:
        counters.clear()
        t = time.perf_counter()
        call()
        results[f"compile_s {label}"] = time.perf_counter() - t
        ms[f"{label} compiled"] = timer(call, warmup, iters, device)
        print(label, ms[f"{label} compiled"], flush=True)

    call_base = lambda m: (lambda: m(input_ids=ids, use_cache=False))  # noqa: E731
    with torch.no_grad():
        ref = gm(input_ids=ids).logits.float()
        got = peft_model(input_ids=ids, use_cache=False).logits.float()
        results["max_abs_diff_vs_peft"] = (ref - got).abs().max().item()
        results["max_rel_diff_vs_peft"] = ((ref - got).norm() / got.norm()).item()
        ms["base eager"] = timer(call_base(base), warmup, iters, device)
        ms["graphlora eager"] = timer(lambda: gm(input_ids=ids), warmup, iters, device)
        ms["peft eager"] = timer(call_base(peft_model), warmup, iters, device)
        print(ms, flush=True)
        if not args.skip_compile:
            for label, m in [("base", base), ("graphlora", gm), ("peft", peft_model)]:
                cm = torch.compile(m)
                compiled_ms(label, m, (lambda cm=cm: cm(input_ids=ids)) if m is gm else call_base(cm))
                torch._dynamo.reset()
            sm = graphlora.specialize(gm)
            csm = torch.compile(sm)
            compiled_ms("graphlora specialized", sm, call_base(csm))
            torch._dynamo.reset()
        dump()

        # four adapters loaded: mixed batch (one adapter per row), switching under compile
        for name in ["a1", "a2", "a3"]:
            gm.add_adapter(name, graphlora.LoraConfig(**lora))
            peft_model.add_adapter(name, peft.LoraConfig(**lora))
        randomize_lora(gm, 1)
        for name in ["default", "a1", "a2", "a3"]:
            copy_into_peft(gm, peft_model, name)
        gm.set_adapter("default")
        peft_model.set_adapter("default")
        gm.requires_grad_(False)
        peft_model.requires_grad_(False)
        names = ["default", "a1", "a2", "a3"][:batch]
        mixed = gm(input_ids=ids, adapter_names=names).logits.float()
        mixed_peft = peft_model(input_ids=ids, use_cache=False, adapter_names=names).logits.float()
        results["mixed_max_abs_diff_vs_peft"] = (mixed - mixed_peft).abs().max().item()
        results["mixed_max_rel_diff_vs_peft"] = ((mixed - mixed_peft).norm() / mixed_peft.norm()).item()
        ms["graphlora mixed4 eager"] = timer(lambda: gm(input_ids=ids, adapter_names=names), warmup, iters, device)
        ms["peft mixed4 eager"] = timer(lambda: peft_model(input_ids=ids, use_cache=False, adapter_names=names),
                                        warmup, iters, device)
        ms["graphlora 4-loaded eager"] = timer(lambda: gm(input_ids=ids), warmup, iters, device)
        print(ms, flush=True)
        dump()
        if not args.skip_compile:
            cm = torch.compile(gm)
            compiled_ms("graphlora mixed4", gm, lambda: cm(input_ids=ids, adapter_names=names))
            compiled_ms("graphlora 4-loaded", gm, lambda: cm(input_ids=ids))
            for label, m, call in [("graphlora", gm, lambda: cm(input_ids=ids)),
                                   ("peft", peft_model, None)]:
                if m is peft_model:
                    torch._dynamo.reset()
                    cp = torch.compile(peft_model)
                    call = call_base(cp)
                    call()
                counters.clear()
                stalls, steady = [], timer(call, 2, 5, device)
                for name in (["a1", "a2", "default", "a3"] if m is gm else ["a1", "default"]):
                    m.set_adapter(name)
                    m.requires_grad_(False)
                    stalls.append(timer(call, 0, 1, device))
                results[f"switch recompiles {label}"] = counters["stats"]["unique_graphs"]
                results[f"switch first-call ms {label}"] = stalls
                results[f"switch steady ms {label}"] = steady
                m.set_adapter("default")
                m.requires_grad_(False)
                print({k: v for k, v in results.items() if "switch" in k}, flush=True)
            torch._dynamo.reset()
            reduce_overhead(gm, ids, results, ms, warmup, iters, device)
        dump()
        for name in ["a1", "a2", "a3"]:
            gm.delete_adapter(name)
            peft_model.delete_adapter(name)

    if not args.skip_compile:
        # forward + backward (one trainable adapter), compiled
        for label, m in [("graphlora", gm), ("peft", peft_model)]:
            m.train()
            m.set_adapter("default")
            if m is gm:
                gm.requires_grad_(True)
                for p in gm._base_parameters():
                    p.requires_grad_(False)
            else:
                for n, p in m.named_parameters():
                    p.requires_grad_("lora_" in n)
            cm = torch.compile(m)

            def step(cm=cm, m=m):
                out = cm(input_ids=ids, labels=ids) if m is gm else cm(input_ids=ids, labels=ids, use_cache=False)
                out.loss.backward()

            t = time.perf_counter()
            step()
            results[f"compile_s {label} fwd+bwd"] = time.perf_counter() - t
            ms[f"{label} fwd+bwd compiled"] = timer(step, 3, max(iters // 2, 3), device)
            m.zero_grad(set_to_none=True)
            m.eval()
            torch._dynamo.reset()
            print(ms, flush=True)
            dump()

    with torch.no_grad():
        gm.requires_grad_(False)
        gm.set_adapter("default")
        merged = gm.merge_and_unload()
        ms["merged eager"] = timer(lambda: merged(input_ids=ids, use_cache=False), warmup, iters, device)
        if not args.skip_compile:
            cm = torch.compile(merged)
            cm(input_ids=ids, use_cache=False)
            ms["merged compiled"] = timer(lambda: cm(input_ids=ids, use_cache=False), warmup, iters, device)

    results["ms"] = ms
    ratios = {}
    for key, value in ms.items():
        mode = "compiled" if "compiled" in key else "eager"
        if "fwd+bwd" in key:
            other = "peft fwd+bwd compiled"
        else:
            other = f"base {mode}"
        if other in ms and key != other:
            ratios[f"{key} / {other}"] = value / ms[other]
    if "graphlora mixed4 eager" in ms:
        ratios["graphlora mixed4 eager / peft mixed4 eager"] = ms["graphlora mixed4 eager"] / ms["peft mixed4 eager"]
    results["ratios"] = ratios
    print("\n| measurement | ms |\n| --- | ---: |")
    for key, value in ms.items():
        print(f"| {key} | {value:.3f} |")
    print("\n| ratio | value |\n| --- | ---: |")
    for key, value in ratios.items():
        print(f"| {key} | {value:.3f} |")
    print(json.dumps({k: v for k, v in results.items() if k not in ("ms", "ratios")}, indent=1, default=str))
    dump()


if __name__ == "__main__":
    main()
