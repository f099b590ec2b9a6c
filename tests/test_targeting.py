"""Site selection and numbers against PEFT (the oracle) for the same configs."""

from __future__ import annotations

import pytest
import torch
from models import main_output, tiny_bert, tiny_gpt2, tiny_llama, token_ids

import graphlora
from graphlora import LoraConfig

peft = pytest.importorskip("peft")

CASES = [
    (tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    (tiny_llama, dict(target_modules="all-linear")),
    (tiny_llama, dict(target_modules=r".*layers\.1\..*_proj")),
    (tiny_llama, dict(target_modules=["q_proj", "down_proj"], exclude_modules=["model.layers.0.mlp.down_proj"])),
    (tiny_llama, dict(target_modules="all-linear", exclude_modules=r".*mlp.*")),
    (tiny_llama, dict(target_modules=["k_proj", "o_proj"], layers_to_transform=[1])),
    (tiny_llama, dict(target_modules=["k_proj"], layers_to_transform=0, layers_pattern="layers")),
    (tiny_llama, dict(target_modules=None)),
    (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"])),
    (tiny_gpt2, dict(target_modules="all-linear")),
    (tiny_gpt2, dict(target_modules=["c_fc"], layers_to_transform=[1], layers_pattern="h")),
    (tiny_bert, dict(target_modules=["query", "dense"])),
    (tiny_bert, dict(target_modules="all-linear")),
]


@pytest.mark.parametrize("builder,fields", CASES, ids=[f"{b.__name__}-{i}" for i, (b, _) in enumerate(CASES)])
def test_selects_the_same_modules_as_peft(builder, fields):
    gm = graphlora.inject(builder(), LoraConfig(r=2, **fields))
    ours = {s.name for s in gm.sites if s.ranks}
    pm = peft.get_peft_model(builder(), peft.LoraConfig(r=2, **fields))
    theirs = set(pm.targeted_module_names)
    theirs = {name.removeprefix("base_model.model.") for name in theirs}
    assert ours == theirs


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2, tiny_bert])
@pytest.mark.parametrize("fields", [
    dict(r=4, lora_alpha=8),
    dict(r=4, lora_alpha=8, use_rslora=True),
    dict(r=4, lora_alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 2, "h.1.attn.c_attn": 3, "layer.1.attention.self.query": 6},
         alpha_pattern={"q_proj": 5, "c_attn": 7, "query": 3}),
])
def test_same_numbers_as_peft_with_the_same_weights(builder, fields):
    targets = {"tiny_llama": ["q_proj", "v_proj"], "tiny_gpt2": ["c_attn"], "tiny_bert": ["query", "value"]}[builder.__name__]
    gm = graphlora.inject(builder(), LoraConfig(target_modules=targets, **fields))
    pm = peft.get_peft_model(builder(), peft.LoraConfig(target_modules=targets, **fields))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in pm.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                branch = gm.graphlora.branch(name.removeprefix("base_model.model.").replace(".", "_"), "default")
                assert branch.r == module.r["default"] and branch.scaling == pytest.approx(module.scaling["default"])
                branch.lora_B.weight.normal_(generator=gen)
                module.lora_A["default"].weight.copy_(branch.lora_A.weight)
                module.lora_B["default"].weight.copy_(branch.lora_B.weight)
        ids = token_ids(2, 6)
        torch.testing.assert_close(main_output(gm(ids)), main_output(pm(input_ids=ids)), rtol=1e-5, atol=1e-5)
    assert gm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
