"""Host cost of graphlora's routing for one decode step, the program itself left out (issue 12).

Builds a small Llama (``--layers``, hidden 64; the routing does not depend on the model's width), injects
LoRA on its 7 linears per block, fills a ``StaticCache`` (``--cache static``) or a ``DynamicCache``
with a prompt, then times in microseconds per call, after the very same call has run a few hundred times:

- each step of the routing on its own (bind, the call key, the banks' check, ...);
- ``gm._route`` (all of it);
- a whole ``gm(...)`` call, the program replaced by a stub that returns the last output.

Run it on the machine whose host you care about (the device's CPU is slower than this project's).
Prints one line per row and writes them as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

import graphlora
from graphlora import capture, generation


def _time(fn, n: int) -> float:
    for _ in range(max(n // 10, 50)):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--cache", default="static", choices=["static", "dynamic"])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    gm = graphlora.inject(LlamaForCausalLM(config).eval(), graphlora.LoraConfig(r=8, target_modules=targets)).eval()
    ids = torch.randint(0, 128, (1, 8))
    rows = {}
    with torch.no_grad():
        cache = StaticCache(config=gm.config, max_cache_len=64) if args.cache == "static" else None
        out = gm(ids, attention_mask=torch.ones(1, 8, dtype=torch.long), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        raw = dict(attention_mask=torch.ones(1, 9, dtype=torch.long), past_key_values=cache, use_cache=True)
        step = ids[:, :1]
        if args.cache == "static":  # the step's program, traced once (its output is what the stub returns)
            target, a, k = gm._route((step,), dict(raw), False)
            result = target(*a, **k)
        else:
            result = gm(step, **raw)
        bound = gm._calls.bind((step,), dict(raw))
        mode = gm._mode(None, False)
        key = gm._calls.key(bound, mode)
        banks = gm._programs.state.store.banks
        steps = {
            "bind": lambda: gm._calls.bind((step,), dict(raw)),
            "sliding_count_input": lambda: generation.sliding_count_input(bound),
            "ready_static_cache": lambda: generation.ready_static_cache(gm._facts.source, bound),
            "call_key": lambda: capture.call_key(bound),
            "mode": lambda: gm._mode(None, False),
            "banks.gather (the version check)": banks.gather,
            "module_for": lambda: gm._programs.module_for(key, bound),
            "graph_inputs": lambda: gm._calls.graph_inputs(bound),
            "_route": lambda: gm._route((step,), dict(raw), False),
        }
        for name, fn in steps.items():
            rows[name] = _time(fn, args.calls)
        programs = type(gm._programs)
        original = programs.runnable  # the key, the lookup and the banks' check still run
        programs.runnable = lambda self, program: (lambda *a, **k: result)
        try:
            rows["gm(...) with the program stubbed"] = _time(lambda: gm(step, **raw), args.calls)
        finally:
            programs.runnable = original
    for name, us in rows.items():
        print(f"{name:36s} {us:8.2f} us")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"cache": args.cache, "layers": args.layers, "torch": torch.__version__, "us": rows}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
