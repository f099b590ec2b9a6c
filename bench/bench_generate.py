"""Generation benchmark: tokens/s of transformers' ``generate`` for base, PEFT, graphlora, graphlora merged.

Model: Llama-7B-shaped (hidden 4096, intermediate 11008, 32 heads, vocab 32000), 4 layers, bf16, sdpa;
LoRA r=16, alpha=32 on q,k,v,o,gate,up,down (random B, same weights for PEFT and graphlora). Prompts
of 32 and 1024 tokens, 64 new tokens (``min_new_tokens`` = ``max_new_tokens``: no early stop),
greedy, batch 1, 8, 32; dynamic cache, and static cache (``cache_implementation="static"``: on CUDA
transformers' generate compiles the decode forward itself, ``get_compiled_call`` with its default
``CompileConfig``, for the base model, PEFT and, through the shadowed forward, graphlora's programs;
prefill runs eagerly). A cell that fails records its error, not raised. Plus ``adapter_names`` mixing 8 adapters at batch 8 (one
row each) against the base model at batch 8. Each cell: median of 3 timed runs after 2 identical
warm-ups (graphlora traces its programs in the first). Ratios are against the base model in the same
mode from this process.

Run: ``python bench/bench_generate.py --out bench/generate-h200.json`` (``--tiny`` for a CPU smoke run).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings

import torch

import graphlora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW_TOKENS = 64


def build(tiny: bool, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def randomize_lora(model, seed: int) -> None:
    """Random ``lora_B`` (and A) in every LoRA layer of a PEFT model: the adapter changes the tokens."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p))


def seconds(fn, device, warmup: int = 2, iters: int = 3) -> float:
    """Median wall seconds of ``fn()`` after ``warmup`` identical calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prompt(batch: int, length: int, vocab: int, device):
    gen = torch.Generator().manual_seed(batch * 7919 + length)
    ids = torch.randint(1, vocab, (batch, length), generator=gen).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _error_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of ``exc``, its middle cut when long: graphlora's errors end with the cause
    (``... tracing it failed: ConfigError: <why>``), so the end is kept, not only the start."""
    text = str(exc).strip()
    line = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    return line if len(line) <= limit else f"{line[:80]} ... {line[-(limit - 85):]}"


def cell(model, inputs, device, new_tokens: int, **kwargs) -> dict:
    batch = inputs["input_ids"].shape[0]

    def run():
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, **kwargs)
        assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens
        return out

    try:
        sec = seconds(run, device)
    except Exception as exc:  # a mode that does not work here: recorded, not raised
        return {"error": _error_line(exc)}
    return {"seconds": sec, "tokens_per_s": batch * new_tokens / sec}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy model on CPU (smoke run)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompts", default="32,1024")
    ap.add_argument("--modes", default="dynamic,static")
    ap.add_argument("--variants", default="peft,graphlora,auto,merged,mixed",
                    help="which cells besides the base model to run (auto: lora_dtype='auto'; mixed: 8 adapters; "
                         "gemm: FUSIBLE_MAX_ROWS = 0)")
    ap.add_argument("--fusible-rows", type=int, default=None,
                    help="graphlora.passes.ops.FUSIBLE_MAX_ROWS for this run (0: compiled few-row calls keep the GEMMs)")
    args = ap.parse_args()
    import peft

    if args.fusible_rows is not None:
        from graphlora.passes import ops

        ops.FUSIBLE_MAX_ROWS = args.fusible_rows

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    new_tokens = 4 if args.tiny else NEW_TOKENS
    batches = [int(b) for b in args.batches.split(",")]
    prompts = [min(int(p), 64) if args.tiny else int(p) for p in args.prompts.split(",")]
    modes = args.modes.split(",")
    variants = set(args.variants.split(","))

    base = build(args.tiny, device, dtype)
    config = dict(r=16, lora_alpha=32, target_modules=TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(build(args.tiny, device, dtype), peft.LoraConfig(**config)).eval()
        randomize_lora(ref, seed=1)
        for i in range(1, 8):  # adapters for the mixed-batch cell
            ref.add_adapter(f"a{i}", peft.LoraConfig(**config))
        randomize_lora(ref, seed=2)
        ref.set_adapter("default")
    gm = graphlora.inject(build(args.tiny, device, dtype), graphlora.LoraConfig(**config)).eval()
    for i in range(1, 8):
        gm.add_adapter(f"a{i}", graphlora.LoraConfig(**config))
    gm.set_adapter("default")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random adapters (not PEFT's values: this measures speed, not tokens)
        for _, _, branch in gm.graphlora.branches():
            for p in (branch.lora_A.weight, branch.lora_B.weight):
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p))

    vocab = base.config.vocab_size
    rows = []
    for mode in modes:
        extra = {"cache_implementation": "static"} if mode == "static" else {}
        for length in prompts:
            for batch in batches:
                inputs = prompt(batch, length, vocab, device)
                row = {"mode": mode, "prompt": length, "batch": batch,
                       "base": cell(base, inputs, device, new_tokens, **extra)}
                if "peft" in variants:
                    row["peft"] = cell(ref, inputs, device, new_tokens, **extra)
                if "graphlora" in variants:
                    row["graphlora"] = cell(gm, inputs, device, new_tokens, **extra)
                if "gemm" in variants:  # compiled few-row calls as GEMMs / Triton ops, not reductions
                    from graphlora.passes import ops

                    limit, ops.FUSIBLE_MAX_ROWS = ops.FUSIBLE_MAX_ROWS, 0
                    try:
                        row["graphlora_gemm"] = cell(gm, inputs, device, new_tokens, **extra)
                    finally:
                        ops.FUSIBLE_MAX_ROWS = limit
                if "auto" in variants:
                    gm.configure_banks(lora_dtype="auto")  # serving factors in the base dtype (vLLM's default)
                    try:
                        row["graphlora_base_dtype"] = cell(gm, inputs, device, new_tokens, **extra)
                    finally:
                        gm.configure_banks(lora_dtype="adapter")
                if "merged" in variants:
                    gm.merge_adapter()
                    try:
                        row["graphlora_merged"] = cell(gm, inputs, device, new_tokens, **extra)
                    finally:
                        gm.unmerge_adapter()
                rows.append(row)
                print(json.dumps(row), flush=True)
        mixed_batch = 8
        names = ["default"] + [f"a{i}" for i in range(1, 8)]
        for length in (prompts if "mixed" in variants else []):
            inputs = prompt(mixed_batch, length, vocab, device)
            row = {"mode": mode, "prompt": length, "batch": mixed_batch, "mixed": 8,
                   "base": cell(base, inputs, device, new_tokens, **extra),
                   "peft": cell(ref, inputs, device, new_tokens, adapter_names=names, **extra),
                   "graphlora": cell(gm, inputs, device, new_tokens, adapter_names=names, **extra)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    def ratio(row, key):
        a, b = row.get(key, {}), row["base"]
        if "tokens_per_s" not in a or "tokens_per_s" not in b:
            return a.get("error", "n/a")[:40] if isinstance(a, dict) else "n/a"
        return f"{a['tokens_per_s']:,.0f} ({a['tokens_per_s'] / b['tokens_per_s']:.2f}x)"

    print()
    print("| mode | prompt | batch | base tok/s | PEFT | graphlora | graphlora, GEMM few-row form | "
          "graphlora, base-dtype serving | graphlora merged |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        b = row["base"]
        base_cell = f"{b['tokens_per_s']:,.0f}" if "tokens_per_s" in b else b.get("error", "")[:40]
        label = f"{row['mode']}{' mixed 8' if row.get('mixed') else ''}"
        print(f"| {label} | {row['prompt']} | {row['batch']} | {base_cell} | {ratio(row, 'peft')} | "
              f"{ratio(row, 'graphlora')} | {ratio(row, 'graphlora_gemm')} | {ratio(row, 'graphlora_base_dtype')} | {ratio(row, 'graphlora_merged')} |")
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "dtype": str(dtype), "new_tokens": new_tokens, "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
