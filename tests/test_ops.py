"""The runtime ops the splice inserts: their custom-op forms (used on CUDA and under torch.compile)
checked on CPU in float64 — schema, fake tensors and autograd registration with ``opcheck``, the
hand-written backwards with ``gradcheck`` — and the graph form the splice emits."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import graphlora
from graphlora import LoraConfig
from graphlora.passes.ops import lora_down, lora_linear, lora_switch
from models import tiny_llama

torch.manual_seed(0)


def _t(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_op_backward_and_registration(bias):
    x, w = _t(2, 5, 7), _t(6, 7)
    b = _t(6) if bias else None
    hs, bs = [_t(2, 5, 3), _t(2, 5, 2)], [_t(6, 3), _t(6, 2)]
    op = torch.ops.graphlora.lora_linear
    assert torch.autograd.gradcheck(lambda x, w, b, h0, h1, b0, b1: op(x, w, b, [h0, h1], [b0, b1]),
                                    (x, w, b, *hs, *bs))
    opcheck(op, (x, w, b, hs, bs))
    expected = torch.nn.functional.linear(x, w, b) + sum(h @ B.T for h, B in zip(hs, bs))
    torch.testing.assert_close(op(x, w, b, hs, bs), expected)


def test_lora_linear_op_skips_frozen_weight_gradient():
    x, w = _t(4, 7), _t(6, 7, grad=False)
    h, B = _t(4, 2), _t(6, 2)
    out = torch.ops.graphlora.lora_linear(x, w, None, [h], [B])
    gx, gh, gB = torch.autograd.grad(out.sum(), (x, h, B))
    ones = torch.ones(4, 6, dtype=torch.float64)
    torch.testing.assert_close(gx, ones @ w)
    torch.testing.assert_close(gh, ones @ B)
    torch.testing.assert_close(gB, ones.T @ h)


def test_lora_switch_op_backward():
    base, h, B = _t(3, 6), _t(3, 2), _t(6, 2)
    op = torch.ops.graphlora.lora_switch
    assert torch.autograd.gradcheck(lambda base, h, B: op(base, [h], [B]), (base, h, B))
    opcheck(op, (base, [h], [B]))


def test_cpu_forms_are_the_plain_ops_bit_for_bit():
    """On CPU the fused node computes exactly what linear + addmm (and linear * gate) compute."""
    x, w, a, B = (torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2))
    gate = torch.tensor(1.5)
    h = lora_down(x, a, gate)
    assert torch.equal(h, torch.nn.functional.linear(x, a) * gate)
    assert torch.equal(lora_linear(x, w, None, [h], [B]), lora_switch(torch.nn.functional.linear(x, w), [h], [B]))
    assert torch.equal(lora_linear(x, w, None, [h], [B]), torch.addmm(x @ w.T, h, B.T))
    assert torch.equal(lora_linear(x, w, None, [], []), torch.nn.functional.linear(x, w))


def test_splice_fuses_plain_linear_sites_only():
    """Export graphs (aten.linear) get one lora_linear node per site; the base node is gone."""
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    ids = torch.randint(0, 32, (2, 6))
    gm(input_ids=ids)
    fused = [n for n in gm.graph.nodes if n.target is lora_linear]
    assert len(fused) == len(gm.adapter_state.plans["default"]) > 0
    assert all(n.name.endswith("_switch") for n in fused)
    assert not [n for n in gm.graph.nodes if n.target is lora_switch]
    downs = [n for n in gm.graph.nodes if n.target is lora_down]
    assert len(downs) == len(fused)
    # the traced base nodes of adapted sites are replaced, other linears stay
    adapted = {s.node for s in gm.programs.primary.sites if s.name in gm.adapter_state.plans["default"]}
    names = {n.name for n in gm.graph.nodes}
    assert not adapted & names
    assert {s.node for s in gm.programs.primary.sites} - adapted <= names
    # disabling every adapter gives the base model exactly
    with gm.disable_adapter():
        got = gm(input_ids=ids).logits
    assert torch.equal(got, gm.get_base_model()(input_ids=ids, use_cache=False).logits)


def test_custom_op_path_compiles_fullgraph_and_trains(monkeypatch):
    """The CUDA path (every switch as a graphlora custom op) forced on CPU:
    one graph under ``fullgraph=True``, same outputs and adapter gradients as eager, and no
    recompilation when the adapter changes."""
    from torch._dynamo.utils import counters

    from graphlora.passes import ops

    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   init_lora_weights=False))
    gm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    gm.set_adapter("default")
    ids = torch.randint(0, 32, (2, 6))
    expected = gm(input_ids=ids).logits
    expected.sum().backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad(set_to_none=True)
    monkeypatch.setattr(ops, "_use_op", lambda t, *grads: True)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
    out = compiled(input_ids=ids).logits
    code = "\n".join(str(n.target) for n in gm.graph.nodes)
    assert "lora_linear" in code and "lora_down" in code
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert set(grads) == {n for n, p in gm.named_parameters() if p.grad is not None}
    for n, p in gm.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n])
    gm.requires_grad_(False)
    with torch.no_grad():  # serving: compile once, then switch adapters
        compiled(input_ids=ids)
        frames = counters["stats"]["unique_graphs"]
        for name in ("b", "default"):
            gm.set_adapter(name)
            gm.requires_grad_(False)
            torch.testing.assert_close(compiled(input_ids=ids).logits, gm(input_ids=ids).logits)
    assert counters["stats"]["unique_graphs"] == frames
    torch._dynamo.reset()


def test_autocast_training_keeps_gradients_through_the_kernel_path(monkeypatch):
    """Under autocast an fp32 input gives a bf16 base output. On CUDA that output takes the Triton
    update, which must run inside the custom op (autograd), never as a raw launch. Simulated on
    CPU: bf16 counts as kernel-served and the "kernel" is a stand-in with no autograd of its own."""
    from graphlora.passes import kernels

    def raw_kernel(y, hs, bs, config=None):  # like a Triton launch: the result has no grad_fn
        with torch.no_grad():
            return y + sum(h @ b.T for h, b in zip(hs, bs))

    monkeypatch.setattr(kernels, "available", lambda t: t.dtype == torch.bfloat16)
    monkeypatch.setattr(kernels, "fused_linear_ok", lambda *args: False)
    monkeypatch.setattr(kernels, "lora_add", raw_kernel)
    x, w = torch.randn(4, 16), torch.randn(32, 16)
    a = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(32, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lora_down(x, a, torch.tensor(2.0))
        y = lora_linear(x, w, None, [h], [b])
    assert y.dtype == torch.bfloat16 and y.requires_grad
    y.float().sum().backward()
    got = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same computation in plain ops
        ref = torch.nn.functional.linear(x, w) + (torch.nn.functional.linear(x, a) * 2.0) @ b.T
    ref.float().sum().backward()
    for g, r in zip(got, (a.grad, b.grad)):
        torch.testing.assert_close(g, r, rtol=5e-2, atol=1e-1)


def test_window_lengths_with_several_text_configs():
    """A config whose get_text_config() refuses (several text sub-configs) is read at the top level."""
    from graphlora.prepare import window_lengths

    class TwoTexts:
        sliding_window = 16

        def get_text_config(self):
            raise ValueError("Multiple valid text configs were found")

    model = torch.nn.Linear(2, 2)
    model.config = TwoTexts()
    assert window_lengths(model) == (17, 18)


@pytest.mark.parametrize("base_dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                      (torch.bfloat16, torch.float32)])
def test_the_in_place_bank_update_equals_the_out_of_place_one_bit_for_bit(base_dtype, adapter_dtype):
    from graphlora.passes.ops import lora_bank, lora_bank_

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, generator=gen).to(base_dtype)
    base = torch.randn(2, 5, 20, generator=gen).to(base_dtype)
    a_hat = torch.randn(8, 12, generator=gen).to(adapter_dtype)
    b_hat = torch.randn(20, 8, generator=gen).to(adapter_dtype)
    want = lora_bank(base, x, a_hat, b_hat)
    got = lora_bank_(base.clone(), x, a_hat, b_hat)
    assert got.dtype == base.dtype and got.shape == base.shape and torch.equal(got, want)
    strided = base.transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous: the out-of-place form
    assert torch.equal(lora_bank_(strided, x, a_hat, b_hat), want)


@pytest.mark.parametrize("base_dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                      (torch.bfloat16, torch.float32)])
def test_a_column_block_of_one_stacked_shrink_expands_as_its_own_bank_update(base_dtype, adapter_dtype):
    """Sibling sites share ``bank_shrink(x, [A_1; A_2])``; each expands its column block (a strided
    view) in place or out of place, with the result of its own ``lora_bank`` (float32 adapters over
    bf16: the update in float32, rounded once into the base output)."""
    from graphlora.passes.ops import bank_shrink, lora_bank, lora_expand, lora_expand_

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 12, generator=gen).to(base_dtype)
    bases = [torch.randn(2, 5, d, generator=gen).to(base_dtype) for d in (20, 6)]
    a_hats = [torch.randn(8, 12, generator=gen).to(adapter_dtype) for _ in bases]
    b_hats = [torch.randn(d, 8, generator=gen).to(adapter_dtype) for d in (20, 6)]
    blocks = bank_shrink(x, torch.cat(a_hats)).chunk(2, -1)
    assert not blocks[1].is_contiguous()
    # rounding only: one GEMM's column block against its own GEMM, mm + add against addmm
    tol = {"rtol": 1e-5, "atol": 1e-5} if base_dtype == torch.float32 else {"rtol": 1e-2, "atol": 5e-2}
    for base, a_hat, b_hat, h in zip(bases, a_hats, b_hats, blocks):
        want = lora_bank(base, x, a_hat, b_hat)
        for got in (lora_expand(base, h, b_hat), lora_expand_(base.clone(), h, b_hat)):
            assert got.dtype == base.dtype and got.shape == base.shape
            torch.testing.assert_close(got, want, **tol)


def test_serving_programs_add_into_the_base_output_in_place_and_equal_the_switch_form():
    """The bank update adds into the base op's output in place (nothing else reads it); with a
    DoRA branch on the same site (its residual reads the base output) the update comes after
    that residual's add, so the base output is never overwritten: outputs equal the switch form."""
    from graphlora.calls import BANK
    from graphlora.passes.ops import lora_bank, lora_bank_, lora_expand, lora_expand_
    from models import randomize_b, token_ids

    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    gm.add_adapter("dora", LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    randomize_b(gm)
    gm.set_adapter(["default", "dora"])
    gm.eval()
    ids = token_ids()
    with torch.no_grad():
        served = gm(input_ids=ids).logits
    want = gm(input_ids=ids).logits.detach()  # grad enabled: the switch form
    torch.testing.assert_close(served, want, atol=1e-5, rtol=1e-5)
    module = next(p for p in gm.programs if p.mode == BANK).module
    kinds = (lora_bank, lora_bank_, lora_expand, lora_expand_)  # q / v share one shrink: their expands
    updates = [n.target for n in module.graph.nodes if n.op == "call_function" and n.target in kinds]
    assert len(updates) == 4 and all(t in (lora_bank_, lora_expand_) for t in updates)


def test_serving_under_autocast_runs_and_equals_the_switch_form_under_autocast():
    """``torch.autocast`` casts out-of-place ops only: the in-place bank update steps aside there."""
    from models import randomize_b, token_ids

    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_b(gm)
    gm.eval()
    ids = token_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            served = gm(input_ids=ids).logits
        want = gm(input_ids=ids).logits.detach()  # grad enabled: the switch form
    torch.testing.assert_close(served.float(), want.float(), atol=0.05, rtol=0.02)


def test_the_in_place_update_leaves_what_a_submodule_hook_saw_alone():
    """A ``call_module`` site's output is what the submodule's forward hooks received: the bank
    update must not add into it."""
    import torch.nn.functional as F
    from models import FunctionalMLP, randomize_b

    model = FunctionalMLP()
    seen = []
    model.fc1.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    gm = graphlora.inject(model, LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    randomize_b(gm)
    gm.eval()
    seen.clear()
    with torch.no_grad():
        gm(torch.randn(3, 12))
    (x, out), = seen
    assert torch.equal(out, F.linear(x, model.fc1.weight, model.fc1.bias))


def test_an_update_in_a_narrower_dtype_never_rounds_the_base_output():
    """bf16 factors over a float32 base (``configure_banks(lora_dtype=torch.bfloat16)``): the
    update is added in float32, in place or not; the base output is never rounded to bf16."""
    from graphlora.passes.ops import lora_expand, lora_expand_

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=gen) * 100
    h = torch.randn(64, 8, generator=gen).bfloat16()
    b = (torch.randn(32, 8, generator=gen) * 0.01).bfloat16()
    exact = base + h.float() @ b.float().t()
    for got in (lora_expand(base, h, b), lora_expand_(base.clone(), h, b)):
        assert got.dtype == torch.float32
        assert (got - exact).abs().max() < 1e-3  # bf16 rounding of the base (values ~100) would be ~0.5
