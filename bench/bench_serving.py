"""Serving benchmark (issue 13): many adapters on one base, from the adapter banks.

Model: Llama-7B-shaped (hidden 4096, intermediate 11008, 32 heads, vocab 32000), 4 layers, bf16,
sdpa; LoRA r=16, alpha=32 on q,k,v,o,gate,up,down, random B (the same weights for PEFT). Everything
runs in eval mode under ``torch.no_grad()``, as serving does; graphlora needs no
``requires_grad_(False)`` first. Rows (each a median of CUDA-event timings after warm-ups of the
very same call; ratios against the base model in the same mode from this process):

- ``N`` adapters loaded (1, 4, 16, 64), one active, 4 x 512 tokens: eager, compiled; PEFT eager.
  graphlora's compiled module is compiled once, then adapters are hot-added into free bank slots:
  the recompile count is recorded (expected 0).
- mixed batches: 16 distinct adapters at 16 rows x 128 tokens, 64 at 64 x 128 (PEFT eager too).
- few-token calls, 8 rows x 16 tokens: eager, compiled, ``mode="reduce-overhead"``.
- decode steps at batch 1, 8, 32 (one token per row, a KV cache of 512): eager and compiled.
- lora_dtype="auto" (the serving update in the base dtype: eager, compiled, reduce-overhead), merged and
  disabled rows (eager).
- 15 ``add_adapter`` calls (wall seconds).
- ``unfused`` rows: the same calls with one shrink GEMM per site (sibling sites' shrinks not shared,
  ``passes/fuse_shrink.py``), from the same process.

``--part eager`` / ``--part compiled`` split the work into two device calls; ``--part ab`` times eager
base / fused / unfused in turns (:func:`interleaved`); ``--tiny`` is a CPU smoke
run. Run: ``python bench/bench_serving.py --part all --out bench/serving-h200.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import time

import torch
from bench_gpu import build  # the Llama-7B-shaped model (or the tiny one), same in every benchmark
from bench_gpu import copy_into_peft
from bench_gpu import timer as gpu_timer

import graphlora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, lora_alpha=32, target_modules=TARGETS)


def timer(fn, device, warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` identical calls (``bench_gpu.timer``)."""
    return gpu_timer(fn, warmup, iters, device)


def randomize(gm, adapter: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, branch in gm.graphlora.branches(adapter):
            w = branch.lora_B.weight
            w.copy_((torch.randn(w.shape, generator=gen) * 0.01).to(w))


class Counter:
    """Counts dynamo compilations (a backend wrapper around Inductor)."""

    def __init__(self) -> None:
        self.count = 0

    def backend(self, mode=None):
        from torch._inductor import compile_fx

        def run(graph, inputs):
            self.count += 1
            return compile_fx.compile_fx(graph, inputs)

        return run


@contextlib.contextmanager
def unfused(gm):
    """Inside: every program re-spliced with one shrink GEMM per site (``passes/fuse_shrink.py`` off),
    the form before sibling sites shared one; the fused programs again afterwards."""
    programs = gm._programs
    programs.fuse_shrink = False
    programs.rebuild()
    try:
        yield
    finally:
        programs.fuse_shrink = True
        programs.rebuild()


def grow_to(gm, pm, n: int, seed0: int = 100) -> None:
    have = len(gm.adapters)
    for i in range(have, n):
        name = f"a{i}"
        gm.add_adapter(name, graphlora.LoraConfig(**LORA))
        randomize(gm, name, seed0 + i)
        if pm is not None:
            import peft

            pm.add_adapter(name, peft.LoraConfig(**LORA))
            copy_into_peft(gm, pm, name)
    gm.set_adapter("default")
    gm.eval()
    if pm is not None:
        pm.set_adapter("default")


def row_names(gm, k: int) -> list[str]:
    """``k`` rows, each with its own adapter (cycling when fewer are loaded, as in a --counts smoke run)."""
    loaded = list(gm.adapters)
    return [loaded[i % len(loaded)] for i in range(k)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--part", default="all", choices=["eager", "compiled", "all", "ab"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--counts", default="1,4,16,64")
    args = ap.parse_args()
    import peft
    import transformers

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    counts = [int(c) for c in args.counts.split(",")]
    big = 4 if args.tiny else 512
    results: dict = {"env": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "peft": peft.__version__, "python": platform.python_version(),
                             "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"},
                     "ms": {}, "ratios": {}, "notes": {}}
    ms, ratios, notes = results["ms"], results["ratios"], results["notes"]
    print(results["env"], flush=True)

    def dump() -> None:
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(results, fh, indent=1, default=str)

    def record(label: str, value: float, base_label: str) -> None:
        ms[label] = value
        if base_label in ms and label != base_label:
            ratios[f"{label} / {base_label}"] = value / ms[base_label]
        print(f"{label}: {value:.3f} ms" + (f"  ({value / ms[base_label]:.3f}x {base_label})"
                                            if base_label in ms and label != base_label else ""), flush=True)
        dump()

    base, cfg = build(args.tiny, device, dtype)
    vocab = cfg.vocab_size
    gen = torch.Generator().manual_seed(0)

    def ids(b: int, s: int) -> torch.Tensor:
        return torch.randint(0, vocab, (b, s), generator=gen).to(device)

    if args.part == "ab":
        results["ab"] = interleaved(base, ids, big, device)
        dump()
        return

    x_big, x_few = ids(4, big), ids(8, 16)
    x_mix16, x_mix64 = ids(16, 128 if not args.tiny else 4), ids(64, 128 if not args.tiny else 4)
    want_peft = args.part in ("eager", "all")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA)).eval() if want_peft else None
    gm = graphlora.inject(base, graphlora.LoraConfig(**LORA))
    gm.configure_banks(max_loras=max(counts), max_lora_rank=16)
    randomize(gm, "default", 0)
    if pm is not None:
        copy_into_peft(gm, pm, "default")
    gm.eval()
    plain = lambda m, x: (lambda: m(input_ids=x, use_cache=False))  # noqa: E731

    with torch.no_grad():
        if pm is not None:
            ref, got = gm(input_ids=x_few).logits.float(), pm(input_ids=x_few, use_cache=False).logits.float()
            results["max_rel_diff_vs_peft"] = ((ref - got).norm() / got.norm()).item()
        if args.part in ("eager", "all"):
            record("base eager 4x512", timer(plain(base, x_big), device), "base eager 4x512")
            record("base eager mixed16", timer(plain(base, x_mix16), device), "base eager mixed16")
            record("base eager mixed64", timer(plain(base, x_mix64), device), "base eager mixed64")
            record("base eager 8x16", timer(plain(base, x_few), device), "base eager 8x16")
            for n in counts:
                grow_to(gm, pm, n)
                record(f"graphlora eager N={n}", timer(lambda: gm(input_ids=x_big), device), "base eager 4x512")
                record(f"peft eager N={n}", timer(plain(pm, x_big), device), "base eager 4x512")
            record("graphlora eager 8x16", timer(lambda: gm(input_ids=x_few), device), "base eager 8x16")
            record("peft eager 8x16", timer(plain(pm, x_few), device), "base eager 8x16")
            with unfused(gm):  # the same rows with one shrink per site (q/k/v, gate/up not shared)
                record(f"graphlora eager unfused N={counts[-1]}", timer(lambda: gm(input_ids=x_big), device),
                       "base eager 4x512")
                record("graphlora eager unfused 8x16", timer(lambda: gm(input_ids=x_few), device), "base eager 8x16")
            # the serving update in the base dtype (vLLM's "auto"; opt-in, it rounds like the base)
            gm.configure_banks(lora_dtype="auto")
            record(f"graphlora eager lora_dtype=auto N={counts[-1]}", timer(lambda: gm(input_ids=x_big), device),
                   "base eager 4x512")
            record("graphlora eager lora_dtype=auto 8x16", timer(lambda: gm(input_ids=x_few), device),
                   "base eager 8x16")
            with unfused(gm):
                record("graphlora eager lora_dtype=auto unfused 8x16", timer(lambda: gm(input_ids=x_few), device),
                       "base eager 8x16")
            gm.configure_banks(lora_dtype="adapter")
            # nothing contributes (merged, disabled): the base graph runs
            gm.merge_adapter()
            pm.merge_adapter()
            record("graphlora eager merged 4x512", timer(lambda: gm(input_ids=x_big), device), "base eager 4x512")
            record("peft eager merged 4x512", timer(plain(pm, x_big), device), "base eager 4x512")
            record("graphlora eager merged 8x16", timer(lambda: gm(input_ids=x_few), device), "base eager 8x16")
            record("peft eager merged 8x16", timer(plain(pm, x_few), device), "base eager 8x16")
            gm.unmerge_adapter()
            pm.unmerge_adapter()
            with gm.disable_adapter():
                record("graphlora eager disabled 8x16", timer(lambda: gm(input_ids=x_few), device), "base eager 8x16")
            for label, x, k in (("mixed16", x_mix16, 16), ("mixed64", x_mix64, 64)):
                names = row_names(gm, k)
                out = gm(input_ids=x, adapter_names=names).logits.float()
                want = pm(input_ids=x, use_cache=False, adapter_names=names).logits.float()
                results[f"{label} rel diff vs peft"] = ((out - want).norm() / want.norm()).item()
                record(f"graphlora eager {label}", timer(lambda: gm(input_ids=x, adapter_names=names), device),
                       f"base eager {label}")
                record(f"peft eager {label}", timer(lambda: pm(input_ids=x, use_cache=False, adapter_names=names),
                                                    device, warmup=2, iters=5), f"base eager {label}")
            decode(gm, base, ids, device, record, "eager", None)
            # 15 add_adapter calls into free slots (the banks have room for them)
            extra = graphlora.inject(copy.deepcopy(base), graphlora.LoraConfig(**LORA))
            extra.configure_banks(max_loras=16, max_lora_rank=16)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for i in range(15):
                extra.add_adapter(f"x{i}", graphlora.LoraConfig(**LORA))
            if device.type == "cuda":
                torch.cuda.synchronize()
            results["15 add_adapter s"] = time.perf_counter() - t
            print("15 add_adapter s", results["15 add_adapter s"], flush=True)
            del extra
            dump()
        if args.part in ("compiled", "all"):
            compiled(gm, base, ids, x_big, x_few, x_mix16, x_mix64, counts, device, record, results, notes)
    dump()
    print("\n| measurement | ms | ratio |\n| --- | ---: | ---: |")
    for key, value in ms.items():
        ratio = next((v for k, v in ratios.items() if k.startswith(key + " /")), None)
        print(f"| {key} | {value:.3f} | {'' if ratio is None else f'{ratio:.3f}x'} |")


def interleaved(base, ids, big: int, device, rounds: int = 7) -> dict:
    """Eager base / graphlora fused / graphlora unfused (one shrink GEMM per site), timed in turns,
    ``rounds`` times: host speed drifts within a process, so each round's three timings are taken
    back to back and the ratios are medians over rounds. Returns label -> per-round ms and ratios."""
    from graphlora.passes import fuse_shrink

    models = {"base": lambda x: base(input_ids=x, use_cache=False)}
    for label, on in (("fused", True), ("unfused", False)):
        fuse_shrink.ENABLED = on
        gm = graphlora.inject(base, graphlora.LoraConfig(**LORA))
        randomize(gm, "default", 0)
        gm.eval()
        models[label] = gm
    fuse_shrink.ENABLED = True
    out: dict = {}
    for shape, x in (("4x512", ids(4, big)), ("8x16", ids(8, 16))):
        runs: dict = {label: [] for label in models}
        for _ in range(rounds):
            for label, m in models.items():
                fn = (lambda m=m: m(x)) if label == "base" else (lambda m=m: m(input_ids=x))
                runs[label].append(timer(fn, device, warmup=3, iters=20))
        med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
        ratios = {k: sorted(r / b for r, b in zip(v, runs["base"]))[rounds // 2] for k, v in runs.items() if k != "base"}
        out[shape] = {"ms per round": runs, "median ms": med, "median ratio to base": ratios}
        print(shape, {k: round(v, 3) for k, v in med.items()}, {k: round(v, 3) for k, v in ratios.items()}, flush=True)
    return out


def decode(gm, base, ids, device, record, mode: str, wrap) -> None:
    """One-token steps with a KV cache of 512. The base model's cache grows in place on every call
    (graphlora returns a new cache and leaves the one passed in as it was): each call crops the
    cache back to the prompt, so every timed step of both models attends over 512 + 1 positions."""
    import inspect

    # transformers 5.24 renamed forward's ``past_key_values`` to ``cache``
    name = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
    for batch in (1, 8, 32):
        prompt = ids(batch, 512 if device.type == "cuda" else 8)
        for label, m in (("base", base), ("graphlora", gm)):
            run = m if wrap is None else wrap(m)
            cache = m(input_ids=prompt, use_cache=True).past_key_values
            step = ids(batch, 1)

            length = prompt.shape[1]

            def call(run=run, cache=cache, step=step, length=length):
                out = run(input_ids=step, use_cache=True, **{name: cache})
                extra = cache.get_seq_length() - length
                if extra:  # a negative count: what transformers 5.17 and 5.24 both take
                    cache.crop(-extra)
                return out

            record(f"{label} {mode} decode b{batch}", timer(call, device, warmup=3, iters=20),
                   f"base {mode} decode b{batch}")


def compiled(gm, base, ids, x_big, x_few, x_mix16, x_mix64, counts, device, record, results, notes) -> None:
    counter = Counter()
    cb = torch.compile(base)
    cg = torch.compile(gm, backend=counter.backend())
    for x, label in ((x_big, "4x512"), (x_few, "8x16"), (x_mix16, "mixed16"), (x_mix64, "mixed64")):
        record(f"base compiled {label}", timer(lambda: cb(input_ids=x, use_cache=False), device),
               f"base compiled {label}")
    first = counter.count
    for n in counts:
        grow_to(gm, None, n)
        record(f"graphlora compiled N={n}", timer(lambda: cg(input_ids=x_big), device), "base compiled 4x512")
        if n == counts[0]:
            first = counter.count
    results["compiled recompiles while hot-adding adapters"] = counter.count - first
    before = counter.count
    for name in ["a1", "a2", "default"]:
        gm.set_adapter(name)
        cg(input_ids=x_big)
    gm.disable_adapters()
    cg(input_ids=x_big)
    gm.enable_adapters()
    results["compiled recompiles while switching (no requires_grad_ prep)"] = counter.count - before
    record("graphlora compiled 8x16", timer(lambda: cg(input_ids=x_few), device), "base compiled 8x16")
    with unfused(gm):  # a re-splice: the compiled module compiles these programs once more
        # 4x512 first, as for every other compiled row: the second shape a program sees is a dynamic-shape
        # recompile (torch's automatic dynamic shapes), so 8x16 first would time a static graph against
        # the base's dynamic one
        record(f"graphlora compiled unfused N={counts[-1]}", timer(lambda: cg(input_ids=x_big), device),
               "base compiled 4x512")
        record("graphlora compiled unfused 8x16", timer(lambda: cg(input_ids=x_few), device), "base compiled 8x16")
    for label, x, k in (("mixed16", x_mix16, 16), ("mixed64", x_mix64, 64)):
        names = row_names(gm, k)
        record(f"graphlora compiled {label}", timer(lambda: cg(input_ids=x, adapter_names=names), device),
               f"base compiled {label}")
    # the serving update in the base dtype (opt-in): bf16 factors, no casts, tensor-core GEMMs
    gm.configure_banks(lora_dtype="auto")
    record(f"graphlora compiled lora_dtype=auto N={counts[-1]}", timer(lambda: cg(input_ids=x_big), device),
           "base compiled 4x512")
    record("graphlora compiled lora_dtype=auto 8x16", timer(lambda: cg(input_ids=x_few), device),
           "base compiled 8x16")
    gm.configure_banks(lora_dtype="adapter")
    torch._dynamo.reset()
    # few-token calls under CUDA graphs
    rb = torch.compile(base, mode="reduce-overhead")
    rg = torch.compile(gm, mode="reduce-overhead")
    record("base reduce-overhead 8x16", timer(lambda: rb(input_ids=x_few, use_cache=False), device, warmup=5),
           "base reduce-overhead 8x16")
    record("graphlora reduce-overhead 8x16", timer(lambda: rg(input_ids=x_few), device, warmup=5),
           "base reduce-overhead 8x16")
    gm.configure_banks(lora_dtype="auto")
    record("graphlora reduce-overhead lora_dtype=auto 8x16", timer(lambda: rg(input_ids=x_few), device, warmup=5),
           "base reduce-overhead 8x16")
    gm.configure_banks(lora_dtype="adapter")
    with torch.no_grad():
        eager_default = gm(input_ids=x_few).logits.float()
        gm.set_adapter("a1")
        eager_a1 = gm(input_ids=x_few).logits.float()
        replay = rg(input_ids=x_few).logits.float()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    results["reduce-overhead after switch: rel diff to eager"] = rel(replay, eager_a1)
    # what a stale replay (still the first adapter) would show: the check discriminates only if
    # this is well above the line above
    results["reduce-overhead after switch: rel diff eager a1 vs default"] = rel(eager_default, eager_a1)
    gm.set_adapter("default")
    torch._dynamo.reset()
    try:
        decode(gm, base, ids, device, record, "compiled", lambda m: torch.compile(m, dynamic=True))
        notes["decode compiled"] = "dynamic=True (the cache length grows by one per step)"
    except Exception as exc:  # recorded, not raised: the other rows stand
        notes["decode compiled"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        print(notes["decode compiled"], flush=True)


if __name__ == "__main__":
    main()
