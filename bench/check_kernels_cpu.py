"""The Triton kernels under Triton's CPU interpreter: a correctness check without a GPU.

Run: ``TRITON_INTERPRET=1 python bench/check_kernels_cpu.py`` (needs ``triton`` installed; it is
not a project dependency. Triton 3.6's interpreter fails on runtime-bound loops with numpy >= 2.3:
``int()`` of a 1-element array; this machine's copy was patched by hand to take ``.reshape(-1)[0]``).
Small odd shapes: M, N, K tails, ranks padded to the block (3 -> 16, 16 + 4 -> 32), bias on/off.
Timing means nothing here; ``bench/check_gpu.py`` is the real check.
"""

from __future__ import annotations

import os

import torch

from graphlora.passes import kernels


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.manual_seed(0)
    dt = torch.float16
    for m, n, k, ranks, bias in [(70, 56, 96, [8], True), (33, 136, 64, [16, 4], False), (5, 24, 304, [3], True)]:
        x = torch.randn(m, k, dtype=dt)
        w = torch.randn(n, k, dtype=dt) * 0.1
        b = torch.randn(n, dtype=dt) if bias else None
        hs = [torch.randn(m, r, dtype=dt) for r in ranks]
        bs = [torch.randn(n, r, dtype=dt) for r in ranks]
        low = sum(h.double() @ B.double().T for h, B in zip(hs, bs))
        ref = x.double() @ w.double().T + (b.double() if bias else 0) + low
        err = rel(kernels.lora_linear(x, w, b, hs, bs, config=(32, 32, 32, 4, 4, 2, False, False, 3)), ref)
        y = torch.randn(m, n, dtype=dt)
        err_add = rel(kernels.lora_add(y, hs, bs, config=(16, 32, 4)), y.double() + low)
        print(f"{m}x{n}x{k} ranks {ranks}: lora_linear {err:.1e}, lora_add {err_add:.1e}")
        assert err < 1e-3 and err_add < 1e-3
    print("interpreter checks passed")


if __name__ == "__main__":
    main()
