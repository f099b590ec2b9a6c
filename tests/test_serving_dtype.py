"""``configure_banks(lora_dtype=)``: serving calls compute the adapter update in the base dtype
(vLLM's ``lora_dtype="auto"``) or, by default, in the adapters' own (PEFT's numbers)."""

from __future__ import annotations

import pytest
import torch
from models import randomize_b, tiny_llama, token_ids

import graphlora
from graphlora import LoraConfig
from graphlora.errors import ConfigError


def _bf16():
    gm = graphlora.inject(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_b(gm, seed=4, std=0.5)
    return gm.eval()


def _serve(gm, ids):
    with torch.no_grad():
        return gm(input_ids=ids).logits.float()


def _hats(gm):
    return {bank.a_hat.dtype for _, bank in gm._adapters.store.banks.sites()}


def test_auto_serves_in_the_base_dtype_close_to_the_adapters_dtype_and_adapter_gives_it_back_exactly():
    gm, ids = _bf16(), token_ids(2, 8)
    exact = _serve(gm, ids)
    assert {p.dtype for n, p in gm.named_parameters() if "lora_" in n} == {torch.float32}  # PEFT's default
    assert _hats(gm) == {torch.float32}
    gm.configure_banks(lora_dtype="auto")
    assert _hats(gm) == {torch.bfloat16}
    rounded = _serve(gm, ids)
    with gm.disable_adapter():
        base = _serve(gm, ids)
    delta, err = (exact - base).abs().max(), (rounded - exact).abs().max()
    assert delta > 0.05  # the adapter matters here
    assert 0 < err < 0.1 * delta, (err, delta)  # rounded to bf16, not wrong
    gm.configure_banks(lora_dtype="adapter")
    assert _hats(gm) == {torch.float32}
    assert torch.equal(_serve(gm, ids), exact)


def test_the_base_dtype_survives_a_bank_growing_and_a_new_adapter():
    gm, ids = _bf16(), token_ids(2, 6)
    gm.configure_banks(lora_dtype=torch.bfloat16)
    for i in range(5):  # past the 4 default slots: the banks grow
        gm.add_adapter(f"a{i}", LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_b(gm, "a4", seed=9, std=0.5)
    gm.set_adapter("a4")
    assert _hats(gm) == {torch.bfloat16}
    got = _serve(gm, ids)
    gm.configure_banks(lora_dtype="adapter")
    want = _serve(gm, ids)
    assert 0 < (got - want).abs().max() < 0.1 * (want - _serve_base(gm, ids)).abs().max()


def _serve_base(gm, ids):
    with gm.disable_adapter():
        return _serve(gm, ids)


@pytest.mark.parametrize("bad", ["int8", torch.int8, "bf16", 16])
def test_a_bad_lora_dtype_names_the_value_and_changes_nothing(bad):
    gm, ids = _bf16(), token_ids(1, 5)
    before = _serve(gm, ids)
    with pytest.raises(ConfigError, match="lora_dtype=.*auto"):
        gm.configure_banks(lora_dtype=bad)
    assert _hats(gm) == {torch.float32} and gm._adapters.banks.lora_dtype is None
    assert torch.equal(_serve(gm, ids), before)
