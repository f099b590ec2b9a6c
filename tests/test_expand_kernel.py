"""The serving banks' float32 expand into a bf16 output (``passes/kernels.py``: ``expand_into``).

The Triton kernel runs on CPU tensors under Triton's interpreter, in a subprocess started with
``TRITON_INTERPRET=1`` (read when ``triton.language`` is imported), against the PyTorch form it
replaces on CUDA: ``y += mm(h, B^T)`` in float32, rounded once into ``y``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KERNELS_FILE = Path(__file__).resolve().parents[1] / "passes" / "kernels.py"


def _cases():
    """(y, h, b) triples: ranks below and above a block, a column block of a wider ``h`` (the
    fused siblings' shrink output), ragged M and N."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for m, n, r, dtype in ((37, 50, 20, torch.bfloat16), (70, 129, 32, torch.bfloat16), (5, 16, 8, torch.float16)):
        y = torch.randn(m, n, generator=gen).to(dtype)
        wide = torch.randn(m, 3 * r, generator=gen)
        h = wide[:, r: 2 * r]  # strided: row stride 3 r
        b = torch.randn(n, r, generator=gen) * 0.5
        out.append((y, h, b))
    return out


def _run(path: str) -> None:
    spec = importlib.util.spec_from_file_location("graphlora_kernels_interpreted", KERNELS_FILE)
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    results = []
    for y, h, b in _cases():
        got = kernels.expand_into(y.clone(), h, b)
        results.append(got)
    torch.save(results, path)


def test_expand_into_matches_the_float32_reference_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "expand.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the interpreter run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    got = torch.load(out)
    for (y, h, b), result in zip(_cases(), got):
        want = y.float().add_(torch.mm(h, b.t())).to(y.dtype)  # the CPU / few-token form, in float32
        assert result.dtype == y.dtype and result.shape == y.shape
        # one rounding of the same float32 sum: equal up to the last bit where the float32 dot's order differs
        torch.testing.assert_close(result, want)
        assert not torch.equal(result, y)


def test_the_cpu_and_small_calls_keep_the_pytorch_form():
    from graphlora.passes import kernels

    y = torch.zeros(4096, 64, dtype=torch.bfloat16)
    b = torch.zeros(64, 16)
    assert not kernels.expand_ok(y, torch.zeros(4096, 16), b)  # not CUDA
    assert not kernels.expand_ok(y, torch.zeros(4096, 16, dtype=torch.bfloat16), b)  # not float32 factors
    assert kernels._span(torch.zeros(3, 5)[:, 1:3]) == 2 * 5 + 1 + 1


def test_under_compile_the_triton_path_is_never_looked_at(monkeypatch):
    """Under ``torch.compile`` the float32 expand is Inductor's: ``expand_ok`` answers False before
    any Triton check, which dynamo would trace into and break the graph on (every site of a 4x512
    call did on the H200)."""
    from graphlora.passes import kernels

    seen = []

    def spy(t):
        seen.append(t.shape)
        return True

    monkeypatch.setattr(kernels, "available", spy)
    y = torch.zeros(kernels.EXPAND_MIN_TOKENS, 8, dtype=torch.bfloat16)
    h, b = torch.zeros(kernels.EXPAND_MIN_TOKENS, 4), torch.zeros(8, 4)
    assert kernels.expand_ok(y, h, b) and seen  # eager: the checks run (the spy says "Triton here")
    seen.clear()
    torch._dynamo.reset()
    f = torch.compile(lambda y, h, b: y + 1 if kernels.expand_ok(y, h, b) else y - 1, backend="eager", fullgraph=True)
    assert torch.equal(f(y, h, b), y - 1) and not seen


if __name__ == "__main__":  # the interpreter run: python tests/test_expand_kernel.py OUT.pt (TRITON_INTERPRET=1)
    _run(sys.argv[1])
