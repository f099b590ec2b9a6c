"""Mixed-adapter batches: each row equals running that row alone with its adapter."""

from __future__ import annotations

import pytest
import torch
from models import main_output, tiny_bert, tiny_gpt2, tiny_llama, token_ids

import graphlora
from graphlora import LoraConfig


def _random_b(gm, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, branch in gm.graphlora.branches():
            branch.lora_B.weight.copy_(torch.randn(branch.lora_B.weight.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("builder,targets", [
    (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    (tiny_gpt2, ["c_attn", "c_proj"]),  # Conv1D: addmm on [batch * seq, in]
    (tiny_bert, ["query", "value"]),
])
def test_rows_equal_single_adapter_runs(builder, targets):
    gm = graphlora.inject(builder(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    gm.add_adapter("b", LoraConfig(r=2, lora_alpha=6, target_modules=targets[:1]))  # absent from other sites
    gm.add_adapter("c", LoraConfig(r=6, lora_alpha=3, use_rslora=True, target_modules=targets))
    _random_b(gm)
    gm.eval()
    names = ["c", "__base__", "default", "b", "c"]
    ids = token_ids(len(names), 6)
    with torch.no_grad():
        mixed = main_output(gm(input_ids=ids, adapter_names=names))
        with gm.disable_adapter():
            base_batch = main_output(gm(input_ids=ids))
        for row, name in enumerate(names):
            if name == "__base__":  # exactly the base computation of the same batch
                assert torch.equal(mixed[row], base_batch[row])
                with gm.disable_adapter():
                    alone = main_output(gm(input_ids=ids[row:row + 1]))
                torch.testing.assert_close(mixed[row], alone[0], rtol=1e-5, atol=1e-5)
            else:
                gm.set_adapter(name)
                alone = main_output(gm(input_ids=ids[row:row + 1]))
                torch.testing.assert_close(mixed[row], alone[0], rtol=1e-5, atol=1e-5)
        with gm.disable_adapter():  # disabled: every row is the base model, whatever it names (PEFT's rule)
            assert torch.equal(main_output(gm(input_ids=ids, adapter_names=names)), base_batch)


def test_mixed_batch_bad_input():
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    ids = token_ids(2, 4)
    with pytest.raises(graphlora.AdapterNotFoundError, match="'nope'"):
        gm.eval()(input_ids=ids, adapter_names=["default", "nope"])
    with pytest.raises(graphlora.ConfigError, match="2 rows"):
        gm(input_ids=ids, adapter_names=["default"])
    gm.train()
    with pytest.raises(graphlora.AdapterStateError, match="inference"):
        gm(input_ids=ids, adapter_names=["default", "default"])
    with torch.no_grad():  # inference under no_grad is fine even in train mode
        gm(input_ids=ids, adapter_names=["default", "__base__"])
    gm.eval()
    with pytest.raises(graphlora.ConfigError, match="1 names but the input has 2 rows"):  # checked before generate
        gm.generate(input_ids=ids, adapter_names=["default"], max_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.raises(graphlora.ConfigError, match="4 names but the input has 2 rows"):  # not a beam multiple
        gm.generate(ids, adapter_names=["default"] * 4, max_new_tokens=2, do_sample=False, pad_token_id=0)
