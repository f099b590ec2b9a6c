"""Adapter-pool benchmark (issue 13, item 6): 256 adapters served through 16 bank slots.

Model: Llama-7B-shaped (``bench_gpu.build``: hidden 4096, intermediate 11008, vocab 32000), 4 layers,
bf16, sdpa; LoRA r=16, alpha=32 on q,k,v,o,gate,up,down (float32 adapters: ``inject``'s default
``autocast_adapter_dtype``). Every adapter is registered in a :class:`graphlora.AdapterPool` as
pinned CPU tensors; 16 are resident. Everything runs in eval mode under ``no_grad``.

Workloads (each a fixed sequence of requests, drawn once with a seeded RNG; the same sequence is
run once untimed as the warm-up, then timed as a whole: wall clock between two CUDA syncs, since a
miss is host work plus a copy):

- ``prefill``: mixed batches of 8 rows x L tokens, L drawn from 16, 32, 64, 128 per request, each
  row's adapter drawn uniformly from the 256 (``random-256``), from 16 adapters that stay resident
  (``hot-16``: every lookup a hit), or one adapter for every row (``single``); plus the base model.
  Throughput is prompt tokens per second.
- ``decode``: ``pool.generate`` with 8 rows x 32 prompt tokens and 16 new tokens (greedy), the same
  three draws; throughput is generated tokens per second.

Recorded: tokens/s and ms per request, the ratio to ``single``, hits / misses / swaps / evictions
per workload (``--ranks 16``: every adapter has one config, so a miss is a swap, tensor copies into a
resident's slot; ``--ranks 16,8``: a miss whose victim has the other rank loads and evicts), ms per miss (``(random - hot) / misses``), pinned bytes per adapter, and with
``--compile`` the recompiles counted during the timed runs (expected 0). ``--tiny`` is a CPU smoke
run. Run: ``python bench/bench_pool.py --out bench/pool-h200.json`` (add ``--compile`` for the
compiled rows).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch
from bench_gpu import build  # the Llama-7B-shaped model (or the tiny one), same in every benchmark

import graphlora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, lora_alpha=32, target_modules=TARGETS)


def adapter_tensors(template: dict, seed: int, device) -> dict:
    """Random PEFT-keyed tensors shaped as ``template`` (A ~ N(0, 1/d_in), B ~ N(0, 0.01^2))."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for key, t in template.items():
        scale = t.shape[1] ** -0.5 if "lora_A" in key else 0.01
        out[key] = torch.randn(t.shape, generator=gen, device=device, dtype=t.dtype) * scale
    return out


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_requests(call, requests, device) -> float:
    """Seconds for the whole request sequence (the caller warms up with the same sequence first)."""
    sync(device)
    t = time.perf_counter()
    for request in requests:
        call(*request)
    sync(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small model on CPU (smoke test)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--adapters", type=int, default=256)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--requests", type=int, default=None, help="prefill requests per workload (default 64; tiny 12)")
    ap.add_argument("--compile", action="store_true", help="also run the prefill workloads through torch.compile")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--ranks", default="16", help="adapter i has rank ranks[i %% len]: one rank (default) makes every "
                    "miss a swap into a same-config slot; several (16,8) make misses load and evict too")
    args = ap.parse_args()
    import transformers

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    n_requests = args.requests or (12 if args.tiny else 64)
    seqs = (4, 8) if args.tiny else (16, 32, 64, 128)
    prompt, new_tokens, n_gen = (4, 3, 3) if args.tiny else (32, 16, 8)
    results: dict = {"env": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "python": platform.python_version(),
                             "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"},
                     "config": {"adapters": args.adapters, "slots": args.slots, "rows": args.rows, "seqs": seqs,
                                "requests": n_requests, "lora": LORA, "ranks": args.ranks, "dtype": str(dtype),
                                "decode": {"prompt": prompt, "new_tokens": new_tokens, "requests": n_gen}},
                     "tokens_per_s": {}, "ms_per_request": {}, "ratios": {}, "pool": {}, "notes": {}}
    print(results["env"], flush=True)

    def dump() -> None:
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(results, fh, indent=1, default=str)

    base, cfg = build(args.tiny, device, dtype)
    gm = graphlora.inject(base, graphlora.LoraConfig(**LORA)).eval()
    pool = graphlora.AdapterPool(gm, slots=args.slots, max_rank=max(LORA["r"], *(int(r) for r in args.ranks.split(","))))
    template = gm.get_adapter_state_dict("default")
    ranks = [int(r) for r in args.ranks.split(",")]
    configs = {r: graphlora.LoraConfig(**{**LORA, "r": r}) for r in ranks}
    templates = {r: {k: v[:r] if "lora_A" in k else v[:, :r] for k, v in template.items()} for r in ranks}
    names = [f"a{i}" for i in range(args.adapters)]
    t = time.perf_counter()
    for i, name in enumerate(names):
        r = ranks[i % len(ranks)]
        pool.register(name, (configs[r], adapter_tensors(templates[r], i, device)))
    results["pool"]["register_s"] = time.perf_counter() - t
    per_adapter = sum(t.numel() * t.element_size() for t in template.values())
    results["pool"]["cpu_bytes_per_adapter"] = per_adapter
    results["pool"]["pinned"] = torch.cuda.is_available()
    print(f"registered {len(names)} adapters in {results['pool']['register_s']:.1f} s "
          f"({per_adapter / 2**20:.1f} MiB each)", flush=True)
    hot = names[:args.slots]
    rng = random.Random(0)

    def draws(kind: str, count: int, seq_choice) -> list:
        out = []
        for _ in range(count):
            if kind == "random-256":
                rows = [rng.choice(names) for _ in range(args.rows)]
            elif kind == "hot-16":
                rows = [rng.choice(hot) for _ in range(args.rows)]
            else:
                rows = [names[0]] * args.rows
            ids = torch.randint(0, cfg.vocab_size, (args.rows, seq_choice()), device=device)
            out.append((ids, rows))
        return out

    kinds = ("single", "hot-16", "random-256")
    prefill = {k: draws(k, n_requests, lambda: rng.choice(seqs)) for k in kinds}
    decode = {k: draws(k, n_gen, lambda: prompt) for k in kinds}

    def record(label: str, seconds: float, tokens: int, count: int, single: str, before: dict) -> None:
        tps = tokens / seconds
        results["tokens_per_s"][label] = tps
        results["ms_per_request"][label] = 1e3 * seconds / count
        stats = {k: pool.stats[k] - before[k] for k in ("hits", "misses", "swaps", "evictions")}
        results["pool"][label] = stats
        if single in results["tokens_per_s"] and label != single:
            results["ratios"][f"{label} / {single}"] = tps / results["tokens_per_s"][single]
        print(f"{label}: {tps:,.0f} tok/s, {1e3 * seconds / count:.2f} ms/request, {stats}", flush=True)
        dump()

    def prefill_workloads(mode: str, call_pool) -> None:
        with torch.no_grad():
            for kind in kinds:
                requests = prefill[kind]
                if kind == "single":
                    pool.ensure(hot)  # the hot set is resident, the single adapter among it
                call = (lambda ids, rows: call_pool(ids, rows))
                run_requests(call, requests, device)  # warm-up: the very same calls
                if kind == "hot-16":
                    pool.ensure(hot)
                before = dict(pool.stats)
                seconds = run_requests(call, requests, device)
                record(f"prefill {mode} {kind}", seconds, sum(ids.numel() for ids, _ in requests), len(requests),
                       f"prefill {mode} single", before)
            random_ms, hot_ms = (results["ms_per_request"][f"prefill {mode} {k}"] for k in ("random-256", "hot-16"))
            misses = results["pool"][f"prefill {mode} random-256"]["misses"] / n_requests
            results["pool"][f"prefill {mode} ms per miss"] = (random_ms - hot_ms) / misses if misses else None

    with torch.no_grad():
        requests = prefill["random-256"]
        run_requests(lambda ids, rows: base(input_ids=ids, use_cache=False), requests, device)
        seconds = run_requests(lambda ids, rows: base(input_ids=ids, use_cache=False), requests, device)
        results["tokens_per_s"]["prefill base"] = sum(ids.numel() for ids, _ in requests) / seconds
        print(f"prefill base: {results['tokens_per_s']['prefill base']:,.0f} tok/s", flush=True)
    prefill_workloads("eager", lambda ids, rows: pool(input_ids=ids, adapter_names=rows))

    if not args.skip_decode:
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        for kind in kinds:
            requests = decode[kind]
            call = lambda ids, rows: pool.generate(input_ids=ids, adapter_names=rows, **kw)  # noqa: E731
            try:
                pool.ensure(hot)
                run_requests(call, requests, device)
                if kind == "hot-16":
                    pool.ensure(hot)
                before = dict(pool.stats)
                seconds = run_requests(call, requests, device)
            except Exception as exc:  # recorded, not raised: the prefill rows stand
                results["notes"][f"decode {kind}"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                print(results["notes"][f"decode {kind}"], flush=True)
                continue
            record(f"decode eager {kind}", seconds, args.rows * new_tokens * len(requests), len(requests),
                   "decode eager single", before)

    if args.compile:
        from torch._inductor import compile_fx

        compiles = []

        def backend(graph, inputs):
            compiles.append(1)
            return compile_fx.compile_fx(graph, inputs)

        pool.compile(backend=backend, dynamic=False)
        with torch.no_grad():
            for seq in seqs:  # one graph per sequence length, compiled before anything is timed
                pool(input_ids=torch.zeros(args.rows, seq, dtype=torch.long, device=device),
                     adapter_names=[names[0]] * args.rows)
        warm = len(compiles)
        results["pool"]["compiled graphs before timing"] = warm
        prefill_workloads("compiled", lambda ids, rows: pool(input_ids=ids, adapter_names=rows))
        results["pool"]["recompiles while swapping (compiled)"] = len(compiles) - warm
        print("recompiles while swapping:", len(compiles) - warm, flush=True)

    results["pool"]["final"] = pool.stats
    dump()
    print("\n| workload | tokens/s | ms/request | vs single |\n| --- | ---: | ---: | ---: |")
    for label, tps in results["tokens_per_s"].items():
        ratio = next((v for k, v in results["ratios"].items() if k.startswith(label + " /")), None)
        print(f"| {label} | {tps:,.0f} | {results['ms_per_request'].get(label, float('nan')):.2f} | "
              f"{'' if ratio is None else f'{ratio:.3f}x'} |")


if __name__ == "__main__":
    main()
