"""The few-row fused linear (``passes/linear_few.py``) under Triton's CPU interpreter.

Run in a subprocess started with ``TRITON_INTERPRET=1`` (read when ``triton.language`` is
imported), against the two-kernel form it would replace: ``y = x W^T + b`` in float32, plus the
adapters' update ``(sum_s h_s) B^T`` in float32, rounded once.
"""

from __future__ import annotations

import sys

import pytest
import torch
from interpreted import run_interpreted


def _cases():
    """(x, W, bias, h, B): float32 factors with one ``h`` and with split-K partials (a column block of
    a wider tensor, as a fused group's sites read), factors of ``x``'s dtype, ragged M / N / K, a bias."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for m, n, k, r, parts, dtype, bias in ((37, 50, 200, 20, 0, torch.float16, False),
                                           (70, 129, 300, 16, 3, torch.float16, True),
                                           (5, 16, 64, 8, 0, torch.float16, True)):
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype)
        b_vec = torch.randn(n, generator=gen).to(dtype) if bias else None
        if parts:
            wide = torch.randn(parts, m, 3 * r, generator=gen)
            h = wide[..., r: 2 * r]
        else:
            h = torch.randn(m, r, generator=gen)
        out.append((x, w, b_vec, h, torch.randn(n, r, generator=gen) * 0.5))
    x, w, b_vec, h, b = out[0]
    out.append((x, w, b_vec, h.to(x.dtype), b.to(x.dtype)))  # factors in x's dtype
    return out


def _run(path: str) -> None:
    from graphlora.passes import linear_few

    # the interpreter's dot with the GPU's tiles (linear_few.CONFIG, 128 rows) is slow: small tiles
    # for all cases, CONFIG for the smallest
    results = [linear_few.linear_few(x, w, bias, h, b, (32, 32, 32, 4, 1)) for x, w, bias, h, b in _cases()]
    x, w, bias, h, b = _cases()[2]
    results.append(linear_few.linear_few(x, w, bias, h, b))
    torch.save(results, path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """The kernels' outputs, computed under Triton's interpreter in a subprocess."""
    pytest.importorskip("triton")
    return run_interpreted(__file__, tmp_path_factory.mktemp("linear_few") / "out.pt")


def test_the_fused_linear_matches_the_two_kernel_form_under_the_interpreter(interpreted):
    cases = _cases()
    assert len(interpreted) == len(cases) + 1
    torch.testing.assert_close(interpreted[-1], interpreted[2])  # CONFIG's tiles: the same sums
    for (x, w, bias, h, b), got in zip(cases, interpreted):
        hs = h.float().sum(0) if h.dim() == 3 else h.float()
        base = x.float() @ w.float().t() + (bias.float() if bias is not None else 0)
        want = base + hs @ b.float().t()
        assert got.dtype == x.dtype and got.shape == (x.shape[0], w.shape[0])
        # the float32 sum rounded to fp16 (the interpreter's fp16 dot accumulates in float32 as on the GPU;
        # the tolerance does not tell one rounding from two)
        torch.testing.assert_close(got.float(), want.to(x.dtype).float(), rtol=2e-3, atol=2e-3)
        assert not torch.equal(got.float(), base.to(x.dtype).float())  # the update is there


if __name__ == "__main__":
    _run(sys.argv[1])
