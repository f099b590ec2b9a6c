"""Core behaviour on four architectures: MLP with a functional linear (fx), Llama, GPT-2 (Conv1D), BERT."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from models import FunctionalMLP, main_output, randomize_b, tiny_bert, tiny_gpt2, tiny_llama, token_ids

import graphlora
from graphlora import LoraConfig
from graphlora.passes.sites import getattr_path

ARCHS = {
    # name: (builder, inputs(batch, seq), targets)
    "mlp": (FunctionalMLP, lambda b, s: (torch.randn(b, s, 12),), ["fc1", "proj", "fc2"]),
    "llama": (tiny_llama, lambda b, s: (token_ids(b, s),), ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, lambda b, s: (token_ids(b, s),), ["c_attn", "c_fc"]),
    "bert": (tiny_bert, lambda b, s: (token_ids(b, s),), ["query", "value", "dense"]),
}


def _call(m, inputs):
    return main_output(m(*inputs))


def _randomize(gm, adapter=None, seed=0):
    randomize_b(gm, adapter, seed, std=0.1)


def _reference(model, gm, weights):
    """The model with ``W + sum_a w_a s_a B_a A_a`` folded into each site's weight (a hand-built oracle)."""
    ref = copy.deepcopy(model)
    sites = {s.name: s for s in gm.programs.primary.sites}
    with torch.no_grad():
        for adapter, w in weights.items():
            for site_name, (_, _, scaling) in gm.adapter_state.plans[adapter].items():
                site = sites[site_name]
                branch = gm.graphlora.branch(site_name.replace(".", "_"), adapter)
                delta = w * scaling * (branch.lora_B.weight @ branch.lora_A.weight)
                weight = getattr_path(ref, site.weight)
                weight += delta.T if site.fan_in_fan_out else delta
    return ref


@pytest.fixture(params=list(ARCHS), scope="module")
def arch(request):
    builder, make_inputs, targets = ARCHS[request.param]
    model = builder()
    base_model = copy.deepcopy(model)
    gm = graphlora.inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    return request.param, model, base_model, gm, make_inputs, targets


def test_identity_at_injection_bit_for_bit(arch):
    _, _, base_model, gm, make_inputs, _ = arch
    inputs = make_inputs(2, 7)
    with torch.no_grad():
        assert torch.equal(_call(gm, inputs), _call(base_model, inputs))


def test_base_parameters_are_shared_and_frozen(arch):
    _, model, _, gm, _, _ = arch
    ours = dict(gm.named_parameters())
    for name, param in model.named_parameters():
        if name in ours:
            assert ours[name].data_ptr() == param.data_ptr()
        assert not param.requires_grad
    adapter = [p for n, p in gm.named_parameters() if n.startswith("graphlora.")]
    assert adapter and all(p.requires_grad for p in adapter)


def test_random_adapter_changes_outputs_and_disable_restores_base(arch):
    name, model, base_model, gm, make_inputs, _ = arch
    inputs = make_inputs(3, 5)
    with torch.no_grad():
        base = _call(base_model, inputs)
        _randomize(gm, seed=1)
        adapted = _call(gm, inputs)
        assert not torch.allclose(adapted, base)
        torch.testing.assert_close(adapted, _call(_reference(base_model, gm, {"default": 1.0}), inputs),
                                   rtol=1e-5, atol=1e-5)
        code = gm.code
        gm.disable_adapters()
        assert torch.equal(_call(gm, inputs), base)
        assert gm.active_adapters == []
        gm.enable_adapters()
        assert torch.equal(_call(gm, inputs), adapted)
        with gm.disable_adapter():
            assert torch.equal(_call(gm, inputs), base)
        assert torch.equal(_call(gm, inputs), adapted)
        assert gm.code == code


def test_shapes_can_change_after_tracing(arch):
    _, _, base_model, gm, make_inputs, _ = arch
    with torch.no_grad():
        for b, s in [(1, 3), (5, 11), (2, 7)]:
            inputs = make_inputs(b, s)
            gm.disable_adapters()
            out = _call(gm, inputs)
            gm.enable_adapters()
            assert torch.equal(out, _call(base_model, inputs))


def test_two_adapters_sum_and_switching_keeps_graph(arch):
    name, model, base_model, gm, make_inputs, targets = arch
    gm.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=targets[:1]))
    try:
        _randomize(gm, seed=2)
        inputs = make_inputs(2, 6)
        code = gm.code
        with torch.no_grad():
            gm.set_adapter(["default", "second"])
            both = _call(gm, inputs)
            ref = _call(_reference(base_model, gm, {"default": 1.0, "second": 1.0}), inputs)
            torch.testing.assert_close(both, ref, rtol=1e-5, atol=1e-5)
            gm.set_adapter_weights({"default": 0.5, "second": -2.0})
            weighted = _call(gm, inputs)
            ref = _call(_reference(base_model, gm, {"default": 0.5, "second": -2.0}), inputs)
            torch.testing.assert_close(weighted, ref, rtol=1e-5, atol=1e-5)
            gm.set_adapter("second")
            only = _call(gm, inputs)
            torch.testing.assert_close(only, _call(_reference(base_model, gm, {"second": 1.0}), inputs),
                                       rtol=1e-5, atol=1e-5)
        assert gm.code == code
        assert gm.active_adapters == ["second"]
    finally:
        gm.delete_adapter("second")
    assert gm.active_adapters == ["default"]
    assert "second" not in gm.code


def test_gradients_reach_only_the_active_adapter(arch):
    name, model, _, gm, make_inputs, targets = arch
    gm.add_adapter("other", LoraConfig(r=2, target_modules=targets))
    try:
        gm.set_adapter("default")
        _randomize(gm, seed=3)
        gm.zero_grad(set_to_none=True)
        out = gm(*make_inputs(2, 5))
        tensors = [out] if isinstance(out, torch.Tensor) else [v for v in out.values() if isinstance(v, torch.Tensor)]
        sum(t.float().pow(2).mean() for t in tensors).backward()
        grads = {n for n, p in gm.named_parameters() if p.grad is not None}
        default = {n for n, _ in gm.named_parameters() if n.startswith("graphlora.") and n.split(".")[2] == "default"}
        assert grads == default
        assert all(not p.requires_grad for n, p in gm.named_parameters() if ".other." in n)
    finally:
        gm.zero_grad(set_to_none=True)
        gm.delete_adapter("other")


def test_parameter_count_is_r_times_in_plus_out(arch):
    _, _, _, gm, _, _ = arch
    adapted = [s for s in gm.sites if s.ranks]
    expected = sum(4 * (s.in_features + s.out_features) for s in adapted)
    got = sum(p.numel() for n, p in gm.named_parameters() if n.startswith("graphlora."))
    assert got == expected
    trainable, total = gm.get_nb_trainable_parameters()
    assert trainable == expected


def test_positional_and_keyword_calls_agree():
    model = tiny_llama()
    gm = graphlora.inject(model, LoraConfig(r=2, target_modules=["q_proj"]))
    ids = token_ids(2, 5)
    with torch.no_grad():
        assert torch.equal(gm(ids).logits, gm(input_ids=ids).logits)


def test_labels_and_no_labels_on_the_same_module():
    model = tiny_llama()
    base = copy.deepcopy(model)
    gm = graphlora.inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = token_ids(2, 6)
    out = gm(input_ids=ids, labels=ids)
    ref = base(input_ids=ids, labels=ids, use_cache=False)
    assert type(out) is type(ref)
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()
    assert any(p.grad is not None for n, p in gm.named_parameters() if n.startswith("graphlora."))
    assert gm(input_ids=ids).loss is None
    attn = torch.ones_like(ids)
    torch.testing.assert_close(gm(input_ids=ids, attention_mask=attn).logits,
                               base(input_ids=ids, attention_mask=attn, use_cache=False).logits)


def test_sites_name_functional_linear_and_conv1d():
    gm = graphlora.inject(FunctionalMLP(), LoraConfig(r=2, target_modules=["proj"]))
    (site,) = [s for s in gm.sites if s.ranks]
    assert (site.name, site.kind, site.in_features, site.out_features) == ("proj", "functional_linear", 20, 20)
    gm2 = graphlora.inject(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    kinds = {s.kind for s in gm2.sites if s.ranks}
    assert kinds == {"addmm"}
    assert [s.out_features for s in gm2.sites if s.ranks] == [96, 96]


def test_switch_nodes_are_named_after_sites():
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert "model_layers_0_self_attn_q_proj_switch = " in gm.code
    assert "model_layers_1_self_attn_q_proj_switch = " in gm.code
    switches = [n for n in gm.graph.nodes if n.meta.get("graphlora", {}).get("role") == "switch"]
    assert len(switches) == 2


def test_scaling_rslora_and_gaussian_init():
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights="gaussian",
                                                   target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2},
                                                   alpha_pattern={"layers.1.self_attn.q_proj": 3}))
    b0 = gm.graphlora.branch("model_layers_0_self_attn_q_proj", "default")
    b1 = gm.graphlora.branch("model_layers_1_self_attn_q_proj", "default")
    assert b0.gate.item() == pytest.approx(8 / 2.0) and b0.r == 4
    assert b1.gate.item() == pytest.approx(3 / 2**0.5) and b1.r == 2
    assert torch.count_nonzero(b0.lora_B.weight) == 0
    assert b0.lora_A.weight.std().item() == pytest.approx(0.25, rel=0.5)


def test_train_eval_switch_dropout():
    model = tiny_bert()
    gm = graphlora.inject(model, LoraConfig(r=4, lora_dropout=0.5, target_modules=["query"]))
    _randomize(gm)
    ids = token_ids(2, 6)
    with torch.no_grad():
        gm.eval()
        assert torch.equal(gm(ids).last_hidden_state, gm(ids).last_hidden_state)
        gm.train()
        assert gm.training and all(m.training for m in gm.modules())
        assert not torch.equal(gm(ids).last_hidden_state, gm(ids).last_hidden_state)
        gm.eval()
        gm.disable_adapters()
        assert torch.equal(gm(ids).last_hidden_state, model(ids).last_hidden_state)


def test_all_linear_skips_output_head():
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    adapted = {s.name for s in gm.sites if s.ranks}
    assert "lm_head" not in adapted
    assert len(adapted) == 14


# ------------------------------------------------------------------ bad input: clear errors, nothing half-done
def test_no_site_matched_lists_candidates():
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    code, params = gm.code, len(list(gm.parameters()))
    with pytest.raises(graphlora.NoTargetError) as info:
        gm.add_adapter("x", LoraConfig(target_modules=["q_prj"]))
    assert "q_prj" in str(info.value) and "self_attn.q_proj" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert gm.code == code and len(list(gm.parameters())) == params and list(gm.adapters) == ["default"]


def test_no_site_matched_at_inject_leaves_model_unfrozen():
    model = tiny_llama()
    with pytest.raises(graphlora.NoTargetError):
        graphlora.inject(model, LoraConfig(target_modules=["nothing_here"]))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("bad", [{"r": 0}, {"r": -3}, {"r": 2.5}, {"lora_alpha": "big"},
                                 {"target_modules": "q_proj("}, {"lora_dropout": 1.5},
                                 {"layers_pattern": "layers"}, {"init_lora_weights": "pissa"}])
def test_bad_config_values(bad):
    with pytest.raises(graphlora.ConfigError) as info:
        LoraConfig(**bad)
    key = next(iter(bad))
    assert key in str(info.value)


def test_unknown_and_duplicate_adapter_names():
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    gm.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj"]))
    code = gm.code
    with pytest.raises(graphlora.AdapterNotFoundError) as info:
        gm.set_adapter("nope")
    assert "nope" in str(info.value) and "'default'" in str(info.value) and "'b'" in str(info.value)
    assert isinstance(info.value, KeyError)
    with pytest.raises(graphlora.AdapterExistsError) as info:
        gm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    assert "'b'" in str(info.value)
    with pytest.raises(graphlora.AdapterNotFoundError):
        gm.delete_adapter("nope")
    assert gm.code == code and gm.active_adapters == ["b"] and list(gm.adapters) == ["default", "b"]
    gm.delete_adapter("b")
    with pytest.raises(graphlora.AdapterStateError):
        gm.delete_adapter("default")


def test_delete_then_readd_gives_same_code():
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    gm.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj"]))
    code = gm.code
    gm.delete_adapter("b")
    gm.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj"]))
    assert gm.code == code


def test_new_call_signatures_follow_eval_mode():
    """A signature traced after injection (here: with attention_mask) must not run dropout in eval mode."""
    model = tiny_bert()
    gm = graphlora.inject(model, LoraConfig(r=2, target_modules=["query"]))
    ids = token_ids(2, 6)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        first = gm(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.equal(first, gm(input_ids=ids, attention_mask=mask).last_hidden_state)
        torch.testing.assert_close(first, model(input_ids=ids, attention_mask=mask).last_hidden_state)
        gm.train()
        assert not torch.equal(gm(input_ids=ids, attention_mask=mask).last_hidden_state,
                               gm(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_layers_to_transform_needs_a_list_of_targets():
    with pytest.raises(graphlora.ConfigError, match="layers_to_transform"):
        LoraConfig(target_modules="all-linear", layers_to_transform=[1])


def test_switching_while_merged_unmerges_and_mixed_batches_are_refused():
    model = tiny_llama()
    base = copy.deepcopy(model)
    gm = graphlora.inject(model, LoraConfig(r=2, target_modules=["q_proj"]))
    gm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    _randomize(gm)
    ids = token_ids(2, 5)
    with torch.no_grad():
        only_b = gm(ids).logits
        gm.set_adapter("default")
        gm.merge_adapter()
        with pytest.raises(graphlora.AdapterStateError, match="unmerge"):
            gm(input_ids=ids, adapter_names=["default", "b"])
        with pytest.warns(UserWarning, match="unmerging"):
            gm.set_adapter("b")
        assert not gm.merged
        torch.testing.assert_close(gm(ids).logits, only_b)
        gm.merge_adapter()
        with pytest.warns(UserWarning, match="unmerging"):
            gm.disable_adapters()
        assert torch.equal(gm(ids).logits, base(ids, use_cache=False).logits)


class _ScaledByKeyword(nn.Module):
    """A forward that reads a tensor only through ``**kwargs``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, **kwargs):
        return self.fc(x) * kwargs["scale"]


def test_constants_through_var_keyword_are_traced_tensors_there_are_inputs_and_the_config_route_works():
    model = tiny_llama()
    base = copy.deepcopy(model)
    gm = graphlora.inject(model, LoraConfig(r=2, target_modules=["q_proj"]))
    code = gm.code
    assert len(gm(input_ids=token_ids(2, 5), output_hidden_states=True).hidden_states) == 3  # its own program
    # cache_position= reaches transformers 5.24's forward only through **kwargs (5.17 names it): the model takes it
    ids, position = token_ids(2, 5), torch.arange(5)
    with torch.no_grad():
        assert torch.equal(gm(input_ids=ids, cache_position=position).logits,
                           base(input_ids=ids, cache_position=position, use_cache=False).logits)
    assert gm.code == code
    # a tensor there is a graph input, not a constant of the trace: one program serves other values
    module = _ScaledByKeyword()
    x = torch.randn(3, 4)
    gm = graphlora.inject(copy.deepcopy(module), LoraConfig(r=2, target_modules=["fc"]),
                          example_inputs={"x": x, "scale": torch.ones(3, 4)})
    count = len(gm.programs)
    for scale in (torch.full((3, 4), 2.0), torch.randn(3, 4)):
        torch.testing.assert_close(gm(x, scale=scale), module(x, scale=scale))
    assert len(gm.programs) == count
    model = tiny_llama()
    model.config.output_hidden_states = True
    out = graphlora.inject(model, LoraConfig(r=2, target_modules=["q_proj"]))(input_ids=token_ids(2, 5))
    assert len(out.hidden_states) == 3
