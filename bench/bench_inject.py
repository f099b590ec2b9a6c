"""Injection cost on the CPU: trace + inject of a 32-layer Llama (hidden 256, all-linear) vs PEFT.

Run: ``python bench/bench_inject.py``. Prints seconds for graphlora.inject (with the share spent in
torch.export) and for peft.get_peft_model on an identical model, medians of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8)
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import peft

    import graphlora
    from graphlora import _compat

    export_times: list[float] = []
    original = _compat.export_module

    def timed_export(*a, **k):
        t = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            export_times.append(time.perf_counter() - t)

    _compat.export_module = timed_export
    import graphlora.capture as capture

    capture.export_module = timed_export
    ours, theirs = [], []
    for _ in range(args.repeat):
        m = model(args.layers)
        t = time.perf_counter()
        graphlora.inject(m, graphlora.LoraConfig(r=8, target_modules="all-linear"))
        ours.append(time.perf_counter() - t)
        m = model(args.layers)
        t = time.perf_counter()
        peft.get_peft_model(m, peft.LoraConfig(r=8, target_modules="all-linear"))
        theirs.append(time.perf_counter() - t)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.layers} layers, hidden 256")
    print(f"graphlora.inject      {statistics.median(ours):6.2f} s  (torch.export: {statistics.median(export_times):.2f} s)")
    print(f"peft.get_peft_model   {statistics.median(theirs):6.2f} s")


if __name__ == "__main__":
    main()
