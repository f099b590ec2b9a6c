"""The serving banks' float32 expand into a bf16 output (``passes/kernels.py``: ``expand_into``).

The Triton kernel runs on CPU tensors under Triton's interpreter, in a subprocess started with
``TRITON_INTERPRET=1`` (read when ``triton.language`` is imported), against the PyTorch form it
replaces on CUDA: ``y += mm(h, B^T)`` in float32, rounded once into ``y``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from interpreted import run_interpreted

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
    results = {"expand": [], "add": []}
    for y, h, b in _cases():
        results["expand"].append(kernels.expand_into(y.clone(), h, b))
        # the compiled serving op's kernel, out of place: float32 factors, and factors in y's dtype
        # (the interpreter's bf16 dot is wrong, numpy has no bf16: factors in y's dtype run as fp16)
        y16 = y.half()
        results["add"].append((kernels.add_update(y, h, b), kernels.add_update(y16, h.half(), b.half()), y))
    results["shrink"] = [(x, a, kernels.shrink(x, a)) for x, a in _shrink_cases()]  # few rows: the few-row tiles
    # the tiles of calls of more rows (every eager shrink: 512 rows and up)
    results["shrink_main"] = [kernels.shrink_parts(x, a, kernels.SHRINK_CONFIG).sum(0) for x, a in _shrink_cases()]
    # the few-row path: partials from the few-row tiles, summed by the expand kernel itself
    results["parts"] = []
    for (x, a), (y, _, _) in zip(_shrink_cases(), _cases()):
        parts = kernels.shrink_parts(x[: y.shape[0]], a, kernels.SHRINK_FEW_CONFIG)
        block = parts[..., 1: 1 + min(a.shape[0] - 1, 16)]  # a column block (strided), as a fused group's sites read
        b = torch.randn(y.shape[1], block.shape[-1], generator=torch.Generator().manual_seed(2))
        rows = min(y.shape[0], x.shape[0])
        results["parts"].append((parts, y[:rows], block[:, :rows], b, kernels.add_update(y[:rows], block[:, :rows], b)))
    torch.save(results, path)


def _shrink_cases():
    """(x, A) pairs for the float32-factor shrink: one split of ``K`` and several (ragged), ranks
    below and above a block, bf16 and fp16 ``x``, a strided ``x``."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for m, k, r, dtype in ((37, 200, 20, torch.bfloat16), (70, 1100, 96, torch.bfloat16), (5, 64, 8, torch.float16)):
        x = torch.randn(m, k, generator=gen).to(dtype)
        out.append((x, torch.randn(r, k, generator=gen) * 0.1))
    wide = torch.randn(9, 300, generator=gen).to(torch.bfloat16)
    out.append((wide[:, 50:250], torch.randn(16, 200, generator=gen)))
    return out


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """The kernels' outputs for :func:`_cases`, computed under Triton's interpreter in a subprocess."""
    pytest.importorskip("triton")
    return run_interpreted(__file__, tmp_path_factory.mktemp("kernels") / "expand.pt")


def test_expand_into_matches_the_float32_reference_under_the_interpreter(interpreted):
    for (y, h, b), result in zip(_cases(), interpreted["expand"]):
        want = y.float().add_(torch.mm(h, b.t())).to(y.dtype)  # the CPU / few-token form, in float32
        assert result.dtype == y.dtype and result.shape == y.shape
        # one rounding of the same float32 sum: equal up to the last bit where the float32 dot's order differs
        torch.testing.assert_close(result, want)
        assert not torch.equal(result, y)


def test_the_compiled_expand_op_matches_the_pytorch_forms_under_the_interpreter(interpreted):
    """``add_update`` (the kernel of ``graphlora::lora_expand``): float32 factors give PEFT's float32
    sum rounded once, factors of ``y``'s dtype give ``addmm``'s float32-accumulated sum; ``y`` is
    left as it was (out of place)."""
    for (y, h, b), (got32, got_low, y_after) in zip(_cases(), interpreted["add"]):
        assert torch.equal(y_after, y)
        torch.testing.assert_close(got32, y.float().add_(torch.mm(h, b.t())).to(y.dtype))
        low = torch.addmm(y.half().float(), h.half().float(), b.half().float().t()).half()
        torch.testing.assert_close(got_low, low)
        assert got32.dtype == y.dtype and got_low.dtype == torch.float16 and not torch.equal(got32, y)


def test_the_float32_shrink_matches_peft_form_under_the_interpreter(interpreted):
    """``kernels.shrink``: ``x A^T`` from a bf16 / fp16 ``x`` and float32 ``A`` equals PEFT's
    ``lora_A(x.float())`` to float32 accuracy (the tf32x3 dot), over one split of ``K`` and several."""
    for (x, a, got), main in zip(interpreted["shrink"], interpreted["shrink_main"]):
        want = torch.nn.functional.linear(x.float(), a)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(main, want, rtol=1e-5, atol=1e-5)  # SHRINK_CONFIG's tiles too


def test_the_expand_kernel_sums_split_k_partials_under_the_interpreter(interpreted):
    """The few-row compiled path: ``shrink_parts`` with the few-row tiles gives several split-K
    partials, and ``add_update`` over a 3-D (strided column block of) partials equals the float32
    reference ``y + (sum_s h_s) B^T`` rounded once."""
    assert any(parts.shape[0] > 1 for parts, *_ in interpreted["parts"])  # the cases do split K
    for (x, a), (parts, y, block, b, got) in zip(_shrink_cases(), interpreted["parts"]):
        torch.testing.assert_close(parts.sum(0), torch.nn.functional.linear(x[: parts.shape[1]].float(), a),
                                   rtol=1e-5, atol=1e-5)
        want = y.float().add_(torch.mm(block.sum(0), b.t())).to(y.dtype)
        assert got.dtype == y.dtype and got.shape == y.shape
        torch.testing.assert_close(got, want)


def test_compiled_serving_takes_the_expand_op_and_eager_does_not(monkeypatch):
    """Under ``torch.compile`` a serving call's updates go through ``kernels.expand_op`` wherever
    ``compiled_expand_ok`` holds (on CUDA: bf16 / fp16 outputs); eager calls keep the PyTorch
    forms. The CUDA op is stood in for by a CPU custom op with the same contract (opaque to the
    compiler, so each call reaches it at run time), and the outputs equal eager's."""
    import graphlora
    from graphlora.passes import kernels
    from models import aot_eager_logits, randomize_b, tiny_llama, token_ids

    calls = []

    @torch.library.custom_op("graphlora_test::lora_expand", mutates_args=())
    def stand_in(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(y.shape))
        return torch.addmm(y, h, b.t())

    @stand_in.register_fake
    def _(y, h, b):
        return torch.empty_like(y)

    monkeypatch.setattr(kernels, "compiled_expand_ok", lambda y, h, b: not torch.is_grad_enabled())
    monkeypatch.setattr(kernels, "_EXPAND_OP", stand_in)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    gm = graphlora.inject(tiny_llama(), graphlora.LoraConfig(r=4, target_modules=targets)).eval()
    randomize_b(gm)
    ids = token_ids(2, 5)
    with torch.no_grad():
        want = gm(input_ids=ids).logits
        assert not calls  # eager: the PyTorch forms
        got = aot_eager_logits(gm, ids)
    assert len(calls) == 2 * len(targets)  # every site of both layers, once
    torch.testing.assert_close(got, want)


def test_compiled_serving_takes_the_float32_shrink_op(monkeypatch):
    """Float32 factors over a bf16 base (PEFT's default): under ``torch.compile`` each shrink goes
    through ``graphlora::lora_shrink_parts`` (stood in for by a CPU custom op, as above); eager calls
    on the CPU keep ``F.linear(x.float(), A)``; the outputs are equal."""
    import torch.nn.functional as F

    import graphlora
    from graphlora.passes import kernels
    from models import aot_eager_logits, randomize_b, tiny_llama, token_ids

    calls, configs = [], []

    @torch.library.custom_op("graphlora_test::lora_shrink_parts", mutates_args=())
    def stand_in(x: torch.Tensor, a: torch.Tensor, block_m: int, block_k: int, k_per: int, warps: int) -> torch.Tensor:
        calls.append(tuple(x.shape))
        configs.append((block_m, block_k, k_per, warps))
        # the kernel's contract: split-K partials [S, M, R] (here two uneven splits of K)
        cut = x.shape[1] // 3
        return torch.stack([F.linear(x[:, :cut].float(), a[:, :cut]), F.linear(x[:, cut:].float(), a[:, cut:])])

    @stand_in.register_fake
    def _(x, a, block_m, block_k, k_per, warps):
        return x.new_empty((2, x.shape[0], a.shape[0]), dtype=torch.float32)

    monkeypatch.setattr(kernels, "shrink_ok", lambda x, a: torch.compiler.is_compiling() and x.dtype != a.dtype
                        and not torch.is_grad_enabled())
    monkeypatch.setattr(kernels, "_SHRINK_OP", stand_in)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    gm = graphlora.inject(tiny_llama().to(torch.bfloat16), graphlora.LoraConfig(r=4, target_modules=targets)).eval()
    assert all(p.dtype == torch.float32 for n, p in gm.named_parameters() if "lora_" in n)  # PEFT's default
    randomize_b(gm)
    ids = token_ids(2, 5)
    with torch.no_grad():
        want = gm(input_ids=ids).logits
        assert not calls
        got = aot_eager_logits(gm, ids)
    assert calls and all(shape[0] == 10 for shape in calls)  # the shrinks, of 2 x 5 rows
    assert set(configs) == {kernels.SHRINK_FEW_CONFIG}  # few rows: the few-row tiles
    torch.testing.assert_close(got, want)


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


@pytest.mark.parametrize("parts_rows, expand_takes_parts", [(0, True), (256, True), (256, False)])
def test_compiled_few_row_serving_writes_the_products_as_reductions(monkeypatch, parts_rows, expand_takes_parts):
    """Under ``torch.compile`` a serving call of at most ``FUSIBLE_MAX_ROWS`` rows computes the
    shrink and the expand as float32 broadcast reductions (which Inductor fuses into the
    neighbouring kernels) instead of the GEMMs or the Triton ops; more rows keep the ops. On CUDA
    that is ``ops.fusible_rows``; here its CUDA check is dropped, and the Triton ops are stood in for
    by CPU custom ops that record their calls. With ``kernels.PARTS_MAX_ROWS`` covering the call,
    the expand op gets the shrink's split-K partials, or their sum where it does not take them
    (``expand_takes_parts`` False). Every form equals eager's outputs."""
    import torch.nn.functional as F

    import graphlora
    from graphlora.passes import kernels, ops
    from models import aot_eager_logits, randomize_b, tiny_llama, token_ids

    calls = []

    @torch.library.custom_op("graphlora_test::few_rows_expand", mutates_args=())
    def expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(f"expand{h.dim()}")
        h = h.sum(0) if h.dim() == 3 else h  # the kernel's contract: split-K partials are summed in it
        return (y.float() + h.float() @ b.float().t()).to(y.dtype)

    @expand.register_fake
    def _(y, h, b):
        return torch.empty_like(y)

    @torch.library.custom_op("graphlora_test::few_rows_shrink", mutates_args=())
    def shrink(x: torch.Tensor, a: torch.Tensor, block_m: int, block_k: int, k_per: int, warps: int) -> torch.Tensor:
        calls.append("shrink")
        cut = x.shape[1] // 2
        return torch.stack([F.linear(x[:, :cut].float(), a[:, :cut]), F.linear(x[:, cut:].float(), a[:, cut:])])

    @shrink.register_fake
    def _(x, a, block_m, block_k, k_per, warps):
        return x.new_empty((2, x.shape[0], a.shape[0]), dtype=torch.float32)

    fused = []

    def few_rows(t):
        fused.append(t.shape[0])
        return t.shape[0] <= ops.FUSIBLE_MAX_ROWS and not torch.is_grad_enabled()

    monkeypatch.setattr(ops, "fusible_rows", few_rows)
    monkeypatch.setattr(kernels, "compiled_expand_ok",
                        lambda y, h, b: not torch.is_grad_enabled() and (expand_takes_parts or h.dim() == 2))
    monkeypatch.setattr(kernels, "_EXPAND_OP", expand)
    monkeypatch.setattr(kernels, "shrink_ok", lambda x, a: torch.compiler.is_compiling() and x.dtype != a.dtype)
    monkeypatch.setattr(kernels, "_SHRINK_OP", shrink)
    monkeypatch.setattr(kernels, "PARTS_MAX_ROWS", parts_rows)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    gm = graphlora.inject(tiny_llama().to(torch.bfloat16), graphlora.LoraConfig(r=4, target_modules=targets)).eval()
    randomize_b(gm)
    for rows, takes_ops in ((5, False), (20, True)):  # 2 x 5 = 10 rows fuse; 2 x 20 = 40 do not
        ids = token_ids(2, rows)
        calls.clear()
        fused.clear()
        with torch.no_grad():
            want = gm(input_ids=ids).logits
            got = aot_eager_logits(gm, ids)
        assert fused and all(n == 2 * rows for n in fused)  # asked at every shrink and expand
        assert bool(calls) == takes_ops, (rows, calls)
        # 40 rows: with kernels.PARTS_MAX_ROWS at 256 the expand op gets the shrink's partials (no
        # sum kernel), at 0 their sum
        expand = "expand3" if parts_rows and expand_takes_parts else "expand2"
        assert not takes_ops or set(calls) == {"shrink", expand}, calls
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
