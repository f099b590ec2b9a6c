"""FSDP2 training benchmark: graphlora against PEFT, the same FSDP2 setup, one torchrun launch.

Model: Llama-7B-shaped (hidden 4096, intermediate 11008, 32 heads, vocab 32000), 8 layers, bf16;
LoRA r=16, alpha=32 on q,k,v,o,gate,up,down (adapters in bf16 for both: PEFT with
``autocast_adapter_dtype=False``). Both start the way torchtune's LoRA recipe does: the model is
built on the meta device, the adapters added there, ``fully_shard`` applied per decoder block and at
the root (graphlora: ``graphlora.distributed.shard``; PEFT: each ``LlamaDecoderLayer``, then the
``PeftModel``), then ``to_empty`` and the same seeded weights (every rank fills its shards from
one full state dict). A step is forward (logits), fp32 cross-entropy, backward, AdamW on the
adapters. Reported per implementation: median step time, tokens/s over all ranks
(``world * batch * seq / step``), and each rank's peak allocated memory over the timed steps.

Run (2 GPUs)::

    torchrun --nproc-per-node 2 bench/bench_fsdp.py --out bench/fsdp-h200.json

``--tiny`` is a CPU smoke run (gloo): ``torchrun --nproc-per-node 2 bench/bench_fsdp.py --tiny``.
Needs torch >= 2.11, transformers 5, peft (no network).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(tiny: bool, layers: int):
    from transformers import LlamaConfig

    if tiny:
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    return cfg


def meta_model(cfg, dtype):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(cfg).to(dtype)


def full_weights(cfg, dtype) -> dict[str, torch.Tensor]:
    """One seeded full state dict (on CPU, same on every rank): base weights N(0, 0.02), norms 1,
    the rotary table as transformers computes it."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model = meta_model(cfg, dtype)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            out[name] = torch.ones(p.shape, dtype=dtype)
        else:
            out[name] = (torch.randn(p.shape, generator=gen) * 0.02).to(dtype)
    rotary = LlamaRotaryEmbedding(cfg)
    for name, b in rotary.named_buffers():
        out[f"model.rotary_emb.{name}"] = b
    return out


def lora_weights(names_shapes, dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {n: (torch.randn(s, generator=gen) * 0.01).to(dtype) for n, s in names_shapes}


@torch.no_grad()
def fill(module, weights: dict[str, torch.Tensor], device, key=lambda name: name) -> None:
    """Copy full tensors into (sharded) parameters and buffers, ``weights[key(name)]``; each rank its shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if key(name) not in weights:
            continue
        full = weights[key(name)].to(device=device, dtype=t.dtype)
        if isinstance(t, DTensor):
            t.copy_(distribute_tensor(full, t.device_mesh, t.placements))
        else:
            t.copy_(full)


def build_graphlora(cfg, dtype, device, r: int):
    import graphlora
    from graphlora import distributed as gd

    gm = graphlora.inject(meta_model(cfg, dtype), graphlora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    gd.shard(gm)
    weights = full_weights(cfg, dtype)
    adapters = [(n, p.shape) for n, p in gm.named_parameters() if p.requires_grad]
    weights.update(lora_weights(adapters, dtype))
    gd.materialize(gm, device, weights)
    return gm, gm


def build_peft(cfg, dtype, device, r: int):
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard

    model = meta_model(cfg, dtype)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS),
                                autocast_adapter_dtype=False)
    for layer in peft_model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(peft_model)
    peft_model.to_empty(device=device)
    weights = full_weights(cfg, dtype)
    adapters = [(n, p.shape) for n, p in peft_model.named_parameters() if p.requires_grad]
    weights.update(lora_weights(adapters, dtype))
    fill(peft_model, weights, device,
         key=lambda n: n if n in weights else n.replace(".base_layer", "").removeprefix("base_model.model."))
    return peft_model, peft_model


def step_fn(model, params, ids):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure(name, build, cfg, dtype, device, args) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, owner = build(cfg, dtype, device, args.r)
    setup_s = time.perf_counter() - t0
    model.train()
    params = [p for p in owner.parameters() if p.requires_grad]
    world, rank = dist.get_world_size(), dist.get_rank()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(rank))
    ids = ids.to(device)
    step = step_fn(model, params, ids)
    cuda = device.type == "cuda"
    losses = [float(step()) for _ in range(args.warmup)]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        dist.barrier()
        t = time.perf_counter()
        losses.append(float(step()))  # float() synchronizes
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    trainable = sum(p.numel() for p in params) * world  # each rank holds 1/world of each
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"rank": rank, "peak_gib": peak, "step_s": statistics.median(times)})
    step_s = max(r["step_s"] for r in per_rank)
    result = {
        "impl": name, "setup_s": setup_s, "step_ms": 1e3 * step_s,
        "tokens_per_s": world * args.batch * args.seq / step_s,
        "peak_gib_per_rank": [r["peak_gib"] for r in per_rank],
        "losses_rank0": losses if rank == 0 else None, "trainable_params_approx": trainable,
    }
    del model, owner, params, step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny Llama (gloo)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="rows per rank")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--impl", choices=["both", "graphlora", "peft"], default="both")
    parser.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    args = parser.parse_args()
    if args.tiny:
        args.seq, args.steps, args.warmup = min(args.seq, 32), min(args.steps, 3), 1

    cuda = torch.cuda.is_available() and not args.tiny
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16
    cfg = llama_config(args.tiny, args.layers)
    builders = {"graphlora": build_graphlora, "peft": build_peft}
    names = list(builders) if args.impl == "both" else [args.impl]
    results = [measure(n, builders[n], cfg, dtype, device, args) for n in names]
    if rank == 0:
        import peft
        import transformers

        report = {
            "world": dist.get_world_size(), "device": torch.cuda.get_device_name() if cuda else platform.processor(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "shape": {"layers": args.layers, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
                      "vocab": cfg.vocab_size, "batch_per_rank": args.batch, "seq": args.seq, "r": args.r,
                      "dtype": str(dtype)},
            "results": results,
        }
        for r in results:
            print(f"{r['impl']:>9}: {r['step_ms']:8.1f} ms/step  {r['tokens_per_s']:10.0f} tok/s  peak "
                  + " ".join(f"{g:.2f}" for g in r["peak_gib_per_rank"]) + " GiB/rank", flush=True)
        if len(results) == 2:
            print(f"graphlora / peft tokens/s: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.3f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
