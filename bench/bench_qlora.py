"""QLoRA benchmark: a quantized frozen base, graphlora against PEFT with bitsandbytes, in one run.

Model: Llama-7B-shaped (hidden 4096, intermediate 11008, 32 heads, vocab 32000), 4 layers, bf16 activations;
training batch 4 x 1024 tokens; LoRA r=16, alpha=32 on q,k,v,o,gate,up,down. Cases:

- ``graphlora_nf4``: ``graphlora.inject`` then ``graphlora.quantize_base(gm, "nf4")`` (torchao's NF4 packing,
  double-quantized scales), eager and (unless ``--skip-compile``) ``torch.compile``.
- ``peft_bnb``: the same weights saved and loaded with ``BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16)``, then PEFT's
  ``get_peft_model`` (no ``prepare_model_for_kbit_training``: no gradient checkpointing on either side).
- ``graphlora_bnb4``: that bitsandbytes model through ``graphlora.quantize.inject_bnb`` (bitsandbytes' kernel).

Measured per case: base linear weight bytes (against the same weights in bf16), a training step's
(forward, next-token cross-entropy from the logits, backward) median time and peak allocated memory, and the forward at few tokens
(``--few`` tokens, batch 4, ``no_grad``). A missing package is reported as ``"not installed: <name>"``.
Run: ``python bench/bench_qlora.py --out qlora-h200.json`` (``--tiny`` for a CPU smoke run).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import platform
import statistics
import tempfile
import time
import traceback
from typing import Any, Callable

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PACKAGES = ("torch", "transformers", "peft", "torchao", "bitsandbytes", "triton", "graphlora")


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "installed")
        except Exception as exc:  # ImportError, or a package that fails to import on this torch
            out[name] = f"not installed: {name} ({type(exc).__name__})"
    return out


def missing(pkgs: dict[str, str], *names: str) -> str | None:
    gone = [n for n in names if pkgs[n].startswith("not installed")]
    return f"not installed: {', '.join(gone)}" if gone else None


def config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    return cfg


def lora_kwargs() -> dict[str, Any]:
    return dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timer(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds of ``fn``."""
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


def peak_of(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak allocated GiB while ``fn`` runs once (CUDA only)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def linear_weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes stored, bytes in bf16) of the decoder layers' linear weights (the quantized ones)."""
    from graphlora.passes.quantize import QuantizedWeight

    stored = bf16 = 0
    for name, module in model.named_modules():
        if ".layers." not in f".{name}." or not hasattr(module, "weight"):
            continue
        w = module.weight
        if isinstance(w, QuantizedWeight):
            stored += w.nbytes_packed
            bf16 += 2 * w.numel()
        elif type(w).__name__ == "Params4bit":
            state = w.quant_state
            extra = [state.absmax] + ([] if state.state2 is None else [state.state2.absmax, state.state2.code])
            stored += w.numel() * w.element_size() + sum(t.numel() * t.element_size() for t in extra)
            bf16 += 2 * state.shape.numel()
        elif isinstance(module, torch.nn.Linear):
            stored += w.numel() * w.element_size()
            bf16 += 2 * w.numel()
    return stored, bf16


def measure(model: Any, ids: torch.Tensor, few: torch.Tensor, params: list, args, device) -> dict[str, Any]:
    """Training step (time, peak) and the few-token forward of ``model``."""
    def step() -> None:  # next-token loss from the logits: one call signature, no labels program
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        for p in params:
            p.grad = None

    def forward_few() -> None:
        with torch.no_grad():
            model(input_ids=few)

    result: dict[str, Any] = {}
    for label, fn, train in (("step", step, True), ("forward_few", forward_few, False)):
        model.train(train)
        try:  # one failing measurement keeps the other
            fn()  # first call: traces / compiles
            result[f"{label}_ms"] = timer(fn, args.warmup, args.iters, device)
            if train:
                result["step_peak_gib"] = peak_of(fn, device)
        except Exception as exc:
            result[f"{label}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    model.eval()
    return result


def case(results: dict, name: str, fn: Callable[[], dict]) -> None:
    print(f"== {name}", flush=True)
    try:
        results[name] = fn()
    except Exception as exc:  # report and go on with the other cases
        results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         "traceback": traceback.format_exc(limit=6)}
    print(json.dumps(results[name], indent=1, default=str)[:2000], flush=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="small model on CPU (smoke test)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--few", type=int, default=16, help="tokens per row of the few-token forward")
    parser.add_argument("--cases", default="graphlora_nf4,peft_bnb,graphlora_bnb4,graphlora_nf4_compiled",
                        help="comma-separated cases to run, in order")
    args = parser.parse_args()
    pkgs = versions()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.iters = args.iters or (2 if args.tiny else 10)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    batch, seq = (2, 32) if args.tiny else (4, 1024)
    results: dict[str, Any] = {
        "packages": pkgs, "python": platform.python_version(), "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "setup": {"batch": batch, "seq": seq, "few_tokens": args.few, "dtype": str(dtype), "lora": lora_kwargs(),
                  "tiny": args.tiny, "iters": args.iters, "warmup": args.warmup},
    }
    gone = missing(pkgs, "transformers", "graphlora")
    if gone:
        results["error"] = gone
        _write(results, args.out)
        return
    import graphlora
    from transformers import LlamaForCausalLM

    cfg = config(args.tiny)
    vocab = cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    few = torch.randint(0, vocab, (batch, args.few), generator=gen).to(device)
    workdir = tempfile.mkdtemp(prefix="bench_qlora_")

    def dense_model():
        torch.manual_seed(0)
        with torch.device(device):
            return LlamaForCausalLM(cfg).to(dtype).eval()

    model = dense_model()
    model.save_pretrained(workdir)  # the bitsandbytes cases load these weights
    results["bf16_linear_bytes"] = linear_weight_bytes(model)[1]
    del model

    def graphlora_nf4(compiled: bool) -> dict:  # graphlora's own NF4 packing: torchao is not needed
        gm = graphlora.inject(dense_model(), graphlora.LoraConfig(**lora_kwargs()))
        report = graphlora.quantize_base(gm, "nf4")
        stored, bf16 = linear_weight_bytes(gm.programs.source)
        params = [p for p in gm.parameters() if p.requires_grad]
        runner = torch.compile(gm) if compiled else gm
        out = {"quantized_sites": len(report.modules), "base_weight_bytes": stored,
               "base_weight_ratio_vs_bf16": stored / bf16}
        out.update(measure(runner, ids, few, params, args, device))
        return out

    def peft_bnb() -> dict:
        gone = missing(pkgs, "peft", "bitsandbytes")
        if gone:
            return {"skipped": gone}
        import peft
        from transformers import BitsAndBytesConfig

        model = bnb_model(workdir, device, dtype, BitsAndBytesConfig)
        stored, bf16 = linear_weight_bytes(model)
        pm = peft.get_peft_model(model, peft.LoraConfig(**lora_kwargs()))
        params = [p for p in pm.parameters() if p.requires_grad]
        out = {"base_weight_bytes": stored, "base_weight_ratio_vs_bf16": stored / bf16}
        out.update(measure(pm, ids, few, params, args, device))
        return out

    def graphlora_bnb4() -> dict:
        gone = missing(pkgs, "bitsandbytes")
        if gone:
            return {"skipped": gone}
        from transformers import BitsAndBytesConfig

        from graphlora.quantize import inject_bnb

        model = bnb_model(workdir, device, dtype, BitsAndBytesConfig)
        stored, bf16 = linear_weight_bytes(model)
        gm = inject_bnb(model, graphlora.LoraConfig(**lora_kwargs()))
        params = [p for p in gm.parameters() if p.requires_grad]
        out = {"base_weight_bytes": stored, "base_weight_ratio_vs_bf16": stored / bf16}
        out.update(measure(gm, ids, few, params, args, device))
        return out

    cases = [("graphlora_nf4", lambda: graphlora_nf4(False)), ("peft_bnb", peft_bnb),
             ("graphlora_bnb4", graphlora_bnb4)]
    if not args.skip_compile:
        cases.append(("graphlora_nf4_compiled", lambda: graphlora_nf4(True)))
    wanted = args.cases.split(",")
    for name, fn in sorted(cases, key=lambda c: wanted.index(c[0]) if c[0] in wanted else len(wanted)):
        if name not in wanted:
            continue
        case(results, name, fn)
        results["ratios_vs_peft_bnb"] = ratios(results)
        _write(results, args.out, quiet=True)  # after every case: a run cut short keeps what it measured
    _write(results, args.out)


def bnb_model(path: str, device: torch.device, dtype: torch.dtype, config_cls: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    qcfg = config_cls(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                      bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg, dtype=dtype,
                                                device_map=str(device)).eval()


def ratios(results: dict) -> dict[str, Any]:
    ref = results.get("peft_bnb", {})
    out: dict[str, Any] = {}
    for name in ("graphlora_nf4", "graphlora_nf4_compiled", "graphlora_bnb4"):
        mine = results.get(name, {})
        for key in ("step_ms", "step_peak_gib", "forward_few_ms"):
            if isinstance(mine.get(key), float) and isinstance(ref.get(key), float) and ref[key]:
                out[f"{name}.{key}"] = round(mine[key] / ref[key], 3)
    return out


def _write(results: dict, path: str | None, quiet: bool = False) -> None:
    text = json.dumps(results, indent=1, default=str)
    if not quiet:
        print(text)
    if path:
        with open(path, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
