"""``LoraConfig(lora_bias=True)`` against PEFT: ``B`` with a bias, ``y = W x + b + s (B A x + b_B)``.

Tiny BERT and GPT-2 (``Conv1D``), fp32: outputs, files both ways, training reaches the bias, merge
folds ``s b_B`` into the base bias, and the refusals (no base bias to merge into, DoRA, mixed batches).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import graphlora
from graphlora import ConfigError, LoraConfig, MergeError
from graphlora.peft_format import WEIGHTS_NAME

from models import main_output, token_ids
from peft_oracle import base, peft_from_pretrained, peft_model, run
from snapshot import assert_unchanged, snapshot

TOL = dict(rtol=1e-5, atol=1e-5)
IDS = token_ids(batch=2, seq=7)
TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"]}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_peft_files_load_both_ways_with_equal_outputs(arch, tmp_path):
    pm = peft_model(arch, r=2, target_modules=TARGETS[arch], lora_bias=True)
    biases = {k: v for k, v in pm.state_dict().items() if "lora_B" in k and k.endswith("bias")}
    assert biases and all(v.abs().sum() > 0 for v in biases.values())  # random: the term matters
    pm.save_pretrained(tmp_path / "peft")
    gm = graphlora.inject(base(arch), str(tmp_path / "peft"))
    torch.testing.assert_close(run(gm, IDS), run(pm, IDS), **TOL)
    gm.save_pretrained(tmp_path / "ours")
    theirs, ours = load_file(str(tmp_path / "peft" / WEIGHTS_NAME)), load_file(str(tmp_path / "ours" / WEIGHTS_NAME))
    assert theirs.keys() == ours.keys() and any(k.endswith("lora_B.bias") for k in ours)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    back = peft_from_pretrained(arch, str(tmp_path / "ours"))
    torch.testing.assert_close(run(back, IDS), run(pm, IDS), **TOL)


def test_training_reaches_the_bias_and_merge_folds_it_into_the_base_bias():
    gm = graphlora.inject(base("bert"), LoraConfig(r=2, target_modules=TARGETS["bert"], lora_bias=True)).train()
    branch = next(b for _, _, b in gm.graphlora.branches("default"))
    assert branch.lora_B.bias.requires_grad and torch.count_nonzero(branch.lora_B.bias) == 0
    main_output(gm(input_ids=IDS)).pow(2).mean().backward()
    assert branch.lora_B.bias.grad is not None and branch.lora_B.bias.grad.abs().sum() > 0
    with torch.no_grad():
        for _, _, b in gm.graphlora.branches("default"):
            b.lora_B.bias.normal_(0, 0.1)
    gm.eval()
    before = run(gm, IDS)
    gm.merge_adapter()
    torch.testing.assert_close(run(gm, IDS), before, **TOL)
    gm.unmerge_adapter()
    assert torch.equal(run(gm, IDS), before)


def test_refusals_leave_the_module_as_it_was():
    gm = graphlora.inject(base("llama"), LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True,
                                                    init_lora_weights=False))
    before = snapshot(gm)
    with pytest.raises(MergeError, match="lora_bias=True into a site without a bias"):
        gm.merge_adapter()
    assert_unchanged(before, snapshot(gm))
    gm.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"]))
    gm.eval()
    with torch.no_grad(), pytest.raises(ConfigError, match="'default', a lora\\+bias adapter"):
        gm(input_ids=IDS, adapter_names=["default", "plain"])
    with pytest.raises(ConfigError, match="lora_bias=True cannot be combined with use_dora=True"):
        LoraConfig(lora_bias=True, use_dora=True)
