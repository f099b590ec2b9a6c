"""Where the time goes: one LoRA linear in isolation, and the top kernels of the compiled model.

Run on the GPU machine: ``python bench/profile_gpu.py``. Prints medians (CUDA events) for a
single adapted linear (4096 tokens, bf16, r=16) in several forms, then the ten most expensive
CUDA kernels of the compiled 4-layer Llama-7B-shaped model for graphlora (custom op on/off) and PEFT.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import TARGETS, build, copy_into_peft, randomize_lora, timer  # noqa: E402

import graphlora  # noqa: E402
from graphlora.passes import ops  # noqa: E402


def linear_forms(tokens: int, d_in: int, d_out: int, r: int = 16) -> dict[str, float]:
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(tokens, d_in, device=dev, dtype=dt)
    w = torch.randn(d_out, d_in, device=dev, dtype=dt) * 0.02
    a = torch.randn(r, d_in, device=dev, dtype=dt) * 0.02
    b = torch.randn(d_out, r, device=dev, dtype=dt) * 0.02
    gate = torch.tensor(2.0, device=dev)

    def base():
        return F.linear(x, w)

    def peft_style():
        return F.linear(x, w) + F.linear(F.linear(x, a), b) * 2.0

    def graphlora_eager():
        return ops.lora_switch(F.linear(x, w), [F.linear(x, a) * gate], [b])

    def a_only():
        return F.linear(x, a)

    h = F.linear(x, a)
    y0 = base()

    def addmm_only():
        return torch.addmm(y0, h, b.t())

    def kernel_only():
        return ops.kernels.lora_add(y0, [h], [b])

    forms = {"base": base, "peft-style": peft_style, "graphlora eager": graphlora_eager,
             "x@A^T alone": a_only, "addmm(y,h,B^T) alone": addmm_only,
             "triton y+h@B^T alone": kernel_only}
    out = {name: timer(fn, 10, 50, dev) for name, fn in forms.items()}
    for flag in (True, False):
        ops.COMPILE_AS_CUSTOM_OP = flag
        torch._dynamo.reset()
        fn = torch.compile(graphlora_eager)
        out[f"graphlora compiled (custom op={flag})"] = timer(fn, 5, 50, dev)
    ops.COMPILE_AS_CUSTOM_OP = True
    torch._dynamo.reset()
    out["peft-style compiled"] = timer(torch.compile(peft_style), 5, 50, dev)
    torch._dynamo.reset()
    return out


def top_kernels(fn, n: int = 10) -> str:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=70)


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    linear_only = "--linear-only" in sys.argv
    for shape in [(4096, 4096, 4096), (4096, 4096, 11008), (4096, 11008, 4096)]:
        res = linear_forms(*shape)
        base = res["base"]
        print(f"\nlinear tokens={shape[0]} in={shape[1]} out={shape[2]}")
        for name, ms in res.items():
            print(f"  {name:<40s} {ms * 1000:8.1f} us  {ms / base:5.2f} x base")
    if linear_only:
        return

    model, cfg = build(False, torch.device("cuda"), torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (4, 1024), device="cuda")
    import peft

    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)).eval()
    gm = graphlora.inject(model, graphlora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    randomize_lora(gm, 0)
    copy_into_peft(gm, pm, "default")
    gm.requires_grad_(False)
    pm.requires_grad_(False)
    with torch.no_grad():
        for flag in (True, False):
            ops.COMPILE_AS_CUSTOM_OP = flag
            torch._dynamo.reset()
            cm = torch.compile(gm)
            print(f"\n=== graphlora compiled, custom op={flag}: "
                  f"{timer(lambda: cm(input_ids=ids), 3, 20, torch.device('cuda')):.3f} ms")
            print(top_kernels(lambda: cm(input_ids=ids)))
        torch._dynamo.reset()
        cp = torch.compile(pm)
        print(f"\n=== peft compiled: {timer(lambda: cp(input_ids=ids, use_cache=False), 3, 20, torch.device('cuda')):.3f} ms")
        print(top_kernels(lambda: cp(input_ids=ids, use_cache=False)))


if __name__ == "__main__":
    main()
