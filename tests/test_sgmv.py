"""The segmented mixed-adapter LoRA kernels (``graphlora.passes.sgmv``) against a PyTorch reference.

The Triton kernels run on CPU tensors under Triton's interpreter, in one subprocess started with
``TRITON_INTERPRET=1`` (Triton reads it when ``triton.language`` is imported, so it cannot be
turned on inside a test process where torch or another test already imported Triton). The
subprocess runs this file as a script: it computes every kernel case in :data:`CASES` from
seeded inputs and saves the outputs; the tests rebuild the same inputs here and compare the
outputs with ``mixed_lora_reference`` and with a per-row loop over each adapter's *unpadded*
weights (which also checks the reference). Shapes are tiny: the interpreter runs every program
in numpy.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

SGMV_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "passes", "sgmv.py")

if __name__ == "__main__" and os.path.exists(SGMV_FILE):
    # the interpreter subprocess: load the one module by path, not the whole package (import time)
    _spec = importlib.util.spec_from_file_location("graphlora_sgmv_interpreted", SGMV_FILE)
    sgmv = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sgmv)
else:
    from graphlora.passes import sgmv

ADAPTERS = 16
RANKS = [16, 8, 4, 12, 16, 2, 8, 6, 16, 4, 10, 16, 1, 8, 14, 3]   # mixed: zero-padded to R = 16
R = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_bank(d_in: int, d_out: int, bank_dtype: torch.dtype, seed: int = 0):
    """16 adapters of mixed ranks (each ``(A_i [r_i, d_in], B_i [d_out, r_i], scale_i)``) and their
    bank of 17 slots, the last the all-zero base slot with scale 0."""
    g = torch.Generator().manual_seed(seed)
    adapters = [(torch.randn(r, d_in, generator=g) * d_in ** -0.5, torch.randn(d_out, r, generator=g),
                 float(torch.rand((), generator=g)) + 0.5) for r in RANKS]
    a_bank = torch.zeros(ADAPTERS + 1, R, d_in)
    b_bank = torch.zeros(ADAPTERS + 1, d_out, R)
    scales = torch.zeros(ADAPTERS + 1)
    for i, (a, b, s) in enumerate(adapters):
        a_bank[i, : a.shape[0]] = a
        b_bank[i, :, : b.shape[1]] = b
        scales[i] = s
    return adapters, a_bank.to(bank_dtype), b_bank.to(bank_dtype), scales


def make_batch(rows: int, seq: int, d_in: int, d_out: int, dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, seq, d_in, generator=g).to(dtype)
    base = torch.randn(rows, seq, d_out, generator=g).to(dtype)
    slots = torch.arange(rows) % (ADAPTERS + 1)        # every adapter, then the base slot (16), ...
    return x, base, slots


def per_row(base, x, slots, adapters, weight_dtype=torch.float32):
    """Independent oracle: row by row, each adapter's own (unpadded) weights as stored in a bank of
    ``weight_dtype``, in float64."""
    out = base.double().clone()
    for row, slot in enumerate(slots.tolist()):
        if slot < len(adapters):
            a, b, s = adapters[slot]
            a, b = a.to(weight_dtype).double(), b.to(weight_dtype).double()
            out[row] += s * (x[row].double() @ a.T) @ b.T
    return out


def tol(dtype: torch.dtype) -> dict:
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
            torch.float16: dict(rtol=4e-3, atol=5e-3)}[dtype]


# ---------------------------------------------------------------------------- kernel cases
MIXED_DIMS = (40, 36)              # d_in, d_out: d_out a multiple of no block, so the masks work
TILE_DIMS = (70, 20)
SEQS = {"decode": 1, "prefill": 12}
DTYPE_PAIRS = [("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32"), ("float16", "float16")]
TILE_CONFIGS = {
    "sgmv-split3-fold": sgmv.SgmvConfig(bgmv=False, bk=16, split=3, bn=16, shrink_bm=16, expand_bm=16, fold_base=True),
    "sgmv-split1": sgmv.SgmvConfig(bgmv=False, bk=32, split=1, bn=32, shrink_bm=32, expand_bm=16, fold_base=False),
    "bgmv-split4": sgmv.SgmvConfig(bgmv=True, bk=16, split=4, bn=16),
}
TILE_SLOTS = [3, 16, 3, 0]  # a slot shared by two rows, the base slot


def mixed_inputs(seq: int, dtype: str, bank: str):
    adapters, a_bank, b_bank, scales = make_bank(*MIXED_DIMS, DTYPES[bank])
    x, base, slots = make_batch(ADAPTERS + 1, seq, *MIXED_DIMS, DTYPES[dtype])
    return adapters, (base, x, slots, a_bank, b_bank, scales)


def tile_inputs(name: str):
    config = TILE_CONFIGS[name]
    adapters, a_bank, b_bank, scales = make_bank(*TILE_DIMS, torch.float32)
    x, base, _ = make_batch(len(TILE_SLOTS), 1 if config.bgmv else 17, *TILE_DIMS, torch.float32)
    return config, adapters, (base, x, torch.tensor(TILE_SLOTS), a_bank, b_bank, scales)


def run_kernels() -> dict:
    """Every kernel case (run under ``TRITON_INTERPRET=1``, in the subprocess)."""
    assert sgmv._interpreting(), "Triton's interpreter did not take TRITON_INTERPRET=1"
    out: dict = {}
    for label, seq in SEQS.items():
        for dtype, bank in DTYPE_PAIRS:
            _, (base, x, slots, a_bank, b_bank, scales) = mixed_inputs(seq, dtype, bank)
            assert sgmv.kernels_serve(x, a_bank, b_bank)
            out[f"mixed-{label}-{dtype}-{bank}"] = sgmv.mixed_lora(base, x, slots, a_bank, b_bank, scales)
    for name in TILE_CONFIGS:
        config, _, (base, x, slots, a_bank, b_bank, scales) = tile_inputs(name)
        parts = sgmv.lora_shrink(x.reshape(-1, x.shape[-1]), slots, a_bank, scales, config)
        out[f"tiles-{name}-parts"] = parts
        out[f"tiles-{name}"] = sgmv.lora_expand(base.reshape(-1, base.shape[-1]), parts, slots, b_bank, scales, config)
    _, a_bank, b_bank, scales = make_bank(32, 24, torch.bfloat16)
    x, base, slots = make_batch(4, 2, 32, 24, torch.bfloat16)
    with torch.inference_mode():
        out["two-dim-inference-mode"] = sgmv.mixed_lora(base.view(8, 24), x.view(8, 32), slots, a_bank, b_bank, scales)
    for seq in (1, 9):
        x, base, _ = make_batch(3, seq, 32, 24, torch.bfloat16)
        out[f"all-base-{seq}"] = sgmv.mixed_lora(base, x, torch.full((3,), ADAPTERS), a_bank, b_bank, scales)
    _, a_bank, b_bank, scales = make_bank(32, 24, torch.float32)
    x, base, slots = make_batch(4, 2, 32, 24, torch.float32)
    a_bank.requires_grad_()
    y = sgmv.mixed_lora(base, x, slots, a_bank, b_bank, scales)   # autograd needed: the reference path
    y.sum().backward()
    out["grad-a-bank"] = a_bank.grad
    return out


@pytest.fixture(scope="module")
def kernel_outputs(tmp_path_factory):
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("sgmv") / "outputs.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), str(path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"the interpreter run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return torch.load(path)


# ---------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("seq", [1, 5])
def test_reference_matches_per_row_oracle(seq):
    adapters, a_bank, b_bank, scales = make_bank(24, 20, torch.float32)
    x, base, slots = make_batch(ADAPTERS + 1, seq, 24, 20, torch.float32)
    out = sgmv.mixed_lora(base, x, slots, a_bank, b_bank, scales)            # CPU: the reference path
    torch.testing.assert_close(out.double(), per_row(base, x, slots, adapters), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[ADAPTERS], base[ADAPTERS])                       # the base slot's row


def test_reference_bf16_rounds_once():
    adapters, a_bank, b_bank, scales = make_bank(24, 20, torch.float32)
    x, base, slots = make_batch(ADAPTERS + 1, 3, 24, 20, torch.bfloat16)
    out = sgmv.mixed_lora_reference(base, x, slots, a_bank, b_bank, scales)
    assert out.dtype == torch.bfloat16
    want = per_row(base, x, slots, adapters).to(torch.bfloat16)
    torch.testing.assert_close(out, want, rtol=8e-3, atol=8e-3)


# ---------------------------------------------------------------------------- the kernels
@pytest.mark.parametrize("dtype,bank", DTYPE_PAIRS, ids=["-".join(p) for p in DTYPE_PAIRS])
@pytest.mark.parametrize("label", list(SEQS))
def test_kernels_match_reference(kernel_outputs, label, dtype, bank):
    """16 distinct adapters of mixed ranks and the base slot, one row each (SGMV or BGMV)."""
    adapters, (base, x, slots, a_bank, b_bank, scales) = mixed_inputs(SEQS[label], dtype, bank)
    out = kernel_outputs[f"mixed-{label}-{dtype}-{bank}"]
    assert out.shape == base.shape and out.dtype == base.dtype
    ref = sgmv.mixed_lora_reference(base, x, slots, a_bank, b_bank, scales)
    torch.testing.assert_close(out, ref, **tol(base.dtype))
    torch.testing.assert_close(out.double(), per_row(base, x, slots, adapters, a_bank.dtype), **tol(base.dtype))
    assert torch.equal(out[ADAPTERS], base[ADAPTERS])       # the base slot gives exactly base
    assert not torch.equal(out[0], base[0])


@pytest.mark.parametrize("name", list(TILE_CONFIGS))
def test_shrink_expand_tiles(kernel_outputs, name):
    """Other tiles than the plan's: several ``d_in`` slices (the last partly or wholly masked),
    outputs split across programs, the base tile folded into the dot or added after it."""
    config, adapters, (base, x, slots, a_bank, b_bank, scales) = tile_inputs(name)
    seq = x.shape[1]
    parts = kernel_outputs[f"tiles-{name}-parts"]
    assert parts.shape == (len(TILE_SLOTS) * seq, config.split, R) and parts.dtype == torch.float32
    rows = slots.repeat_interleave(seq)
    h = torch.einsum("tk,trk->tr", x.reshape(-1, x.shape[-1]), a_bank[rows]) * scales[rows, None]
    torch.testing.assert_close(parts.sum(1), h, rtol=1e-5, atol=1e-5)
    out = kernel_outputs[f"tiles-{name}"].view(base.shape)
    torch.testing.assert_close(out.double(), per_row(base, x, slots, adapters), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1], base[1])


def test_kernels_two_dim_input_and_inference_mode(kernel_outputs):
    _, a_bank, b_bank, scales = make_bank(32, 24, torch.bfloat16)
    x, base, slots = make_batch(4, 2, 32, 24, torch.bfloat16)
    out = kernel_outputs["two-dim-inference-mode"]
    assert out.shape == (8, 24)
    ref = sgmv.mixed_lora_reference(base, x, slots, a_bank, b_bank, scales)
    torch.testing.assert_close(out.view(base.shape), ref, **tol(torch.bfloat16))


@pytest.mark.parametrize("seq", [1, 9])
def test_base_slot_everywhere_is_exact(kernel_outputs, seq):
    _, base, _ = make_batch(3, seq, 32, 24, torch.bfloat16)
    assert torch.equal(kernel_outputs[f"all-base-{seq}"], base)


def test_autograd_needed_takes_the_differentiable_path(kernel_outputs):
    """With the interpreter's kernels available, a bank that requires grad still gets its gradient."""
    _, a_bank, b_bank, scales = make_bank(32, 24, torch.float32)
    x, base, slots = make_batch(4, 2, 32, 24, torch.float32)
    a_bank.requires_grad_()
    sgmv.mixed_lora_reference(base, x, slots, a_bank, b_bank, scales).sum().backward()
    torch.testing.assert_close(kernel_outputs["grad-a-bank"], a_bank.grad)
    assert a_bank.grad[:4].abs().sum() > 0 and a_bank.grad[4:].abs().sum() == 0   # only the used slots


# ---------------------------------------------------------------------------- plans, errors, dispatch
def test_plan_follows_the_segment_length():
    assert sgmv.plan(1, 4096, 4096, 16).bgmv
    assert [sgmv.plan(seq, 4096, 11008, 16).shrink_bm for seq in (2, 16, 17, 32, 33, 128)] == [16, 16, 32, 32, 64, 64]
    assert sgmv.plan(128, 64, 64, 16).split == 1             # d_in below one slice: no split


@pytest.mark.parametrize("change,match", [
    (lambda t: {**t, "x": t["x"][..., :-1]}, "do not fit banks"),
    (lambda t: {**t, "b_bank": t["b_bank"][:, :, :-1]}, "banks disagree"),
    (lambda t: {**t, "scales": t["scales"][:-1]}, "banks disagree"),
    (lambda t: {**t, "row_slots": t["row_slots"][:-1]}, "one slot per batch row"),
    (lambda t: {**t, "row_slots": t["row_slots"].float()}, "int64"),
    (lambda t: {**t, "base": t["base"][:, :-1]}, "leading dims"),
    (lambda t: {**t, "a_bank": t["a_bank"].to("meta")}, "x's device"),
])
def test_bad_input_names_the_problem(change, match):
    _, a_bank, b_bank, scales = make_bank(16, 12, torch.float32)
    x, base, slots = make_batch(4, 2, 16, 12, torch.float32)
    args = change({"base": base, "x": x, "row_slots": slots, "a_bank": a_bank, "b_bank": b_bank, "scales": scales})
    with pytest.raises(ValueError, match=match):
        sgmv.mixed_lora(**args)


def test_cpu_without_interpreter_takes_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, a_bank, b_bank, scales = make_bank(16, 12, torch.float32)
    x, _, _ = make_batch(4, 2, 16, 12, torch.float32)
    assert not sgmv.kernels_serve(x, a_bank, b_bank)
    assert not sgmv.kernels_serve(x.double(), a_bank.double(), b_bank.double())


def test_compiles_fullgraph_on_cpu():
    """The dispatch traces without graph breaks (on the CPU it compiles the reference path)."""
    import torch._dynamo

    _, a_bank, b_bank, scales = make_bank(16, 12, torch.float32)
    x, base, slots = make_batch(4, 2, 16, 12, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(sgmv.mixed_lora, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(base, x, slots, a_bank, b_bank, scales),
                                   sgmv.mixed_lora_reference(base, x, slots, a_bank, b_bank, scales))


def test_triton_op_only_where_cuda_is():
    """The op is registered at import where CUDA is (the decorator costs seconds of imports)."""
    assert (sgmv._MIXED_OP is not None) == torch.cuda.is_available()


if __name__ == "__main__":  # the interpreter run: python tests/test_sgmv.py OUT.pt (TRITON_INTERPRET=1)
    torch.save(run_kernels(), sys.argv[1])
