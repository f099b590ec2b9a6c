"""LoRA on MoE expert weights (PEFT's ``target_parameters``) against PEFT's ``ParamWrapper``.

Tiny Mixtral and Qwen2-MoE (transformers 5: 3-D ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``
run through grouped matmuls), fp32, random non-zero adapters: outputs and gradients within 1e-5,
files both ways (PEFT's nested ``base_layer`` keys), merge, ``all-linear`` parity, refusals.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import graphlora
from graphlora import ConfigError, LoraConfig
from graphlora.errors import AdapterFileError, NoTargetError, TargetTypeError
from graphlora.methods.experts import expert_delta_weight
from graphlora.peft_format import CONFIG_NAME

from models import main_output, tiny_mixtral, tiny_qwen2_moe, token_ids
from snapshot import assert_unchanged, snapshot

TOL = dict(rtol=1e-5, atol=1e-5)
IDS = token_ids(batch=2, seq=7)
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
KEEP = "keep"
BUILDERS = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe}


def _peft(model, **kw):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    torch.manual_seed(3)
    return get_peft_model(copy.deepcopy(model), PeftLoraConfig(init_lora_weights=False, **kw)).eval()


def _logits(module):
    with torch.no_grad():
        return main_output(module(input_ids=IDS))


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def moe(request):
    """(name, pristine copy of the base model, emitted module with only the identity adapter KEEP)."""
    model = BUILDERS[request.param]()
    pristine = copy.deepcopy(model)
    gm = graphlora.inject(model, LoraConfig(r=4, target_modules=["q_proj"]), adapter_name=KEEP)  # identity (B = 0)
    return request.param, pristine, gm


@pytest.fixture
def clean(moe):
    _, _, gm = moe
    yield moe
    gm.set_adapter(KEEP)
    for name in list(gm.adapters):
        if name != KEEP:
            gm.delete_adapter(name)


def _add(gm, name, seed=0, **kw):
    gm.add_adapter(name, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random A and B: every expert's update is non-zero
        for _, _, branch in gm.graphlora.branches(name):
            for p in (branch.lora_A.weight, branch.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_sites_and_all_linear_match_peft(clean):
    """Every expert weight is a site of kind ``expert``; ``all-linear`` selects PEFT's modules (no
    router, no expert weight)."""
    name, pristine, gm = clean
    experts = sorted(s.name for s in gm.sites if s.kind == "expert")
    assert experts == sorted(f"model.layers.{i}.mlp.{e}" for i in range(2) for e in EXPERTS)
    gm.add_adapter("al", LoraConfig(r=4, target_modules="all-linear"))
    pm = _peft(pristine, r=4, target_modules="all-linear")
    assert sorted(gm.adapter_state.plans["al"]) == sorted(pm.targeted_module_names)


@pytest.mark.parametrize("targets", [dict(target_modules=[], target_parameters=EXPERTS),
                                     dict(target_modules=["q_proj"], target_parameters=["experts.down_proj"])],
                         ids=["experts", "q_proj+down_proj"])
def test_graphlora_file_loads_in_peft(clean, tmp_path, targets):
    from peft import PeftModel

    name, pristine, gm = clean
    _add(gm, "default", **targets)
    ours = _logits(gm)
    assert (ours - _logits(pristine)).abs().max() > 1e-3  # the adapter does something
    gm.save_adapter(str(tmp_path))
    pm = PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path)).eval()
    assert sorted(pm.targeted_parameter_names) == sorted(s for s in gm.adapter_state.plans["default"]
                                                         if "experts" in s)
    torch.testing.assert_close(ours, _logits(pm), **TOL)


def test_peft_file_loads_in_graphlora(clean, tmp_path):
    name, pristine, gm = clean
    pm = _peft(pristine, r=4, lora_alpha=8, target_modules=["v_proj"], target_parameters=EXPERTS)
    pm.save_pretrained(str(tmp_path))
    gm.load_adapter(str(tmp_path), "peft")
    gm.set_adapter("peft")
    torch.testing.assert_close(_logits(gm), _logits(pm), **TOL)
    assert (_logits(gm) - _logits(pristine)).abs().max() > 1e-3
    # a second PEFT file with the same keys: copied in place (hotswap), no re-splice
    code = gm.code
    other = _peft(pristine, r=4, lora_alpha=16, target_modules=["v_proj"], target_parameters=EXPERTS)
    torch.manual_seed(7)
    with torch.no_grad():
        for n, p in other.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    other.save_pretrained(str(tmp_path / "b"))
    gm.load_adapter(str(tmp_path / "b"), "peft")
    assert gm.code == code
    torch.testing.assert_close(_logits(gm), _logits(other), **TOL)
    with pytest.raises(ConfigError, match="target_parameters"):
        gm.add_weighted_adapter(["peft"], [1.0], "combined")


def test_gradients_match_peft_and_reach_adapters_only(clean):
    name, pristine, gm = clean
    _add(gm, "default", target_modules=[], target_parameters=EXPERTS)
    pm = _peft(pristine, r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERTS)
    peft_params = dict(pm.named_parameters())
    state = gm.adapter_state
    with torch.no_grad():  # same adapter weights in PEFT
        for site, plan in state.plans["default"].items():
            branch = state.branch(site, "default")
            for part in ("lora_A", "lora_B"):
                key = f"base_model.model.{plan.peft_module}.{part}.default.weight"
                peft_params[key].copy_(getattr(branch, part).weight)
    (main_output(gm(input_ids=IDS)) ** 2).mean().backward()
    (main_output(pm(input_ids=IDS)) ** 2).mean().backward()
    for site, plan in state.plans["default"].items():
        branch = state.branch(site, "default")
        for part in ("lora_A", "lora_B"):
            grad = getattr(branch, part).weight.grad
            assert grad is not None and grad.abs().sum() > 0, (site, part)
            torch.testing.assert_close(grad, peft_params[f"base_model.model.{plan.peft_module}.{part}.default.weight"].grad,
                                       **TOL)
            getattr(branch, part).weight.grad = None
    assert all(p.grad is None for p in gm.get_base_model().parameters())


def test_merge_equals_peft_delta_and_unmerge_restores(clean):
    name, pristine, gm = clean
    _add(gm, "default", target_modules=[], target_parameters=EXPERTS)
    site = "model.layers.0.mlp.experts.gate_up_proj"
    weight = gm.get_base_model().get_parameter(site)
    before, unmerged = weight.detach().clone(), _logits(gm)
    gm.merge_adapter()
    try:
        torch.testing.assert_close(_logits(gm), unmerged, **TOL)
        torch.testing.assert_close(weight.detach() - before,
                                   expert_delta_weight(gm.adapter_state.branch(site, "default"), False), **TOL)
    finally:
        gm.unmerge_adapter()
    assert torch.equal(weight.detach(), before)
    # PEFT's merge of the same weights agrees with the delta
    pm = _peft(pristine, r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERTS)
    wrapper = pm.base_model.model.model.layers[0].mlp.experts.base_layer
    with torch.no_grad():
        wrapper.lora_A["default"].weight.copy_(gm.adapter_state.branch(site, "default").lora_A.weight)
        wrapper.lora_B["default"].weight.copy_(gm.adapter_state.branch(site, "default").lora_B.weight)
    torch.testing.assert_close(wrapper.get_delta_weight("default"),
                               expert_delta_weight(gm.adapter_state.branch(site, "default"), False), **TOL)


def test_serving_form_and_switching(clean):
    """Expert branches are never banked: eval + no_grad (the bank form) gives the switch form's
    numbers, disabling gives the base, and mixed batches name the adapter in a ConfigError."""
    name, pristine, gm = clean
    _add(gm, "default", target_modules=["q_proj"], target_parameters=EXPERTS)
    with torch.enable_grad():
        switch = main_output(gm(input_ids=IDS)).detach()
    torch.testing.assert_close(_logits(gm), switch, **TOL)
    assert "default" not in gm.adapter_slots()
    gm.disable_adapters()
    try:
        torch.testing.assert_close(_logits(gm), _logits(pristine), **TOL)
    finally:
        gm.enable_adapters()
    with pytest.raises(ConfigError, match="'default'"):
        with torch.no_grad():
            gm(input_ids=IDS, adapter_names=["default", "__base__"])


def test_bad_entry_names_the_field_and_changes_nothing(clean, tmp_path):
    name, pristine, gm = clean
    _add(gm, "default", target_modules=[], target_parameters=EXPERTS)
    before = snapshot(gm)
    with pytest.raises(NoTargetError, match=r"target_parameters entry 'experts\.nope'"):
        gm.add_adapter("bad", LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj",
                                                                                              "experts.nope"]))
    with pytest.raises(TargetTypeError, match=r"target_parameters entry 'q_proj\.weight'.*target_modules"):
        gm.add_adapter("bad", LoraConfig(r=4, target_parameters=["q_proj.weight"]))
    assert_unchanged(before, snapshot(gm))
    # a file whose config names no parameter: refused before anything loads
    gm.save_adapter(str(tmp_path))
    path = os.path.join(str(tmp_path), CONFIG_NAME)
    with open(path) as f:
        data = json.load(f)
    data["target_parameters"] = ["experts.gate_up_proj", "experts.nope"]
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(AdapterFileError, match="target_parameters entry 'experts.nope'"):
        gm.load_adapter(str(tmp_path), "other")
    assert_unchanged(before, snapshot(gm))


def test_bad_entry_at_inject_leaves_the_model_alone():
    model = tiny_mixtral(layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NoTargetError, match="target_parameters"):
        graphlora.inject(model, LoraConfig(r=4, target_modules=[], target_parameters=["experts.gate_proj"]))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(n.startswith("graphlora") for n, _ in model.named_modules())


@pytest.mark.parametrize("field", [dict(lora_dropout=0.1), dict(use_dora=True), dict(lora_bias=True)])
def test_config_refuses_what_peft_refuses(field):
    with pytest.raises(ConfigError, match=next(iter(field))):
        LoraConfig(target_parameters=EXPERTS, **field)
    with pytest.raises(ConfigError, match="target_parameters"):
        LoraConfig(target_parameters="experts.down_proj")


def test_other_experts_implementation_is_refused_clearly():
    model = tiny_mixtral(layers=1)
    model.set_experts_implementation("batched_mm")  # index_select + bmm: no grouped matmul to adapt
    with pytest.raises(TargetTypeError, match="experts_implementation='grouped_mm'"):
        graphlora.inject(model, LoraConfig(r=4, target_modules=[], target_parameters=["experts.down_proj"]))
