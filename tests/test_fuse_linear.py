"""Serving programs' bank updates carry their base linear (``passes/fuse_linear.py``), and compiled
few-row calls can take the fused op (``passes/linear_few.py``) for them."""

from __future__ import annotations

import pytest
import torch

import graphlora
import models
from graphlora.passes import linear_few
from graphlora.passes.ops import lora_bank, lora_bank_, lora_expand, lora_expand_

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
UPDATES = (lora_bank, lora_bank_, lora_expand, lora_expand_)


def _serving(gm, ids):
    from graphlora.calls import BANK

    gm.eval()
    with torch.no_grad():
        gm(input_ids=ids)
    return next(p for p in gm.programs if p.mode == BANK).module


def test_every_bank_update_knows_its_base_linear():
    """Each site's update is its base linear's one reader and carries that linear's ``(x, W, bias)``;
    the base node stays in the graph (eager calls ignore the keyword)."""
    gm = graphlora.inject(models.tiny_llama(), graphlora.LoraConfig(r=4, target_modules=ALL))
    module = _serving(gm, models.token_ids(2, 5))
    updates = [n for n in module.graph.nodes if n.op == "call_function" and n.target in UPDATES]
    assert len(updates) == 2 * len(ALL)
    for node in updates:
        base = node.args[0]
        x, w, bias = node.kwargs["linear"]
        assert base.args[:2] == (x, w) and w.op == "get_attr" and bias is None
        assert list(base.users) == [node]
        assert w.target.split(".")[-2] in ALL  # the site's own base weight (model.layers.i.<...>.q_proj.weight)


@pytest.mark.parametrize("max_rows", [0, 64])
def test_compiled_few_row_calls_take_the_fused_linear_where_it_is_on(monkeypatch, max_rows):
    """With ``linear_few.MAX_ROWS`` at 64, a compiled serving call of 10 rows of a bf16 model with
    float32 adapters (PEFT's default) computes every site as one fused op from the base linear's
    inputs (stood in for by a CPU custom op with the kernel's contract; ``compiled_ok``'s own
    checks run, only its CUDA check is dropped), a call of 80 rows keeps the two ops, and the
    outputs equal eager's; at 0 (the default) no call takes it."""
    calls = []

    @torch.library.custom_op("graphlora_test::lora_linear_few", mutates_args=())
    def stand_in(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor,
                 b: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])  # x flattened to rows
        h = h.sum(0) if h.dim() == 3 else h
        out = x.float() @ w.float().t() + h.float() @ b.float().t()
        return (out + bias.float() if bias is not None else out).to(x.dtype)

    @stand_in.register_fake
    def _(x, w, bias, h, b):
        return x.new_empty((x.shape[0], w.shape[0]))

    monkeypatch.setattr(linear_few, "MAX_ROWS", max_rows)
    monkeypatch.setattr(linear_few, "_OP", stand_in)
    monkeypatch.setattr(linear_few, "_serves", lambda x: True)
    gm = graphlora.inject(models.tiny_llama().to(torch.bfloat16), graphlora.LoraConfig(r=4, target_modules=ALL)).eval()
    assert all(p.dtype == torch.float32 for n, p in gm.named_parameters() if "lora_" in n)
    models.randomize_b(gm)
    for rows, fused in ((5, bool(max_rows)), (40, False)):  # 2 x 5 = 10 rows; 2 x 40 = 80
        ids = models.token_ids(2, rows)
        calls.clear()
        with torch.no_grad():
            want = gm(input_ids=ids).logits
            got = models.aot_eager_logits(gm, ids)
        assert calls == ([2 * rows] * 2 * len(ALL) if fused else []), (rows, calls)
        # one rounding of the float32 sum (fused) against two (eager): bf16 noise
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
