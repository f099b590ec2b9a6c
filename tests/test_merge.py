"""Merge / unmerge / merge_and_unload / specialize: equal outputs, exact restoration, clean refusals."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx

import graphlora
from graphlora import LoraConfig, MergeError
from graphlora.passes.ops import lora_linear, lora_switch
from graphlora.passes.sites import getattr_path
from graphlora.passes.specialize import FreezeSwitches

from models import FunctionalMLP, token_ids, reset_to_default
from peft_oracle import base, peft_model, run

TOL = dict(rtol=1e-5, atol=1e-5)
IDS = token_ids(batch=2, seq=7)
CONFIGS = {
    "llama": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    "gpt2": LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False),
}
SECOND = {
    "llama": LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "o_proj"], use_rslora=True, init_lora_weights=False),
    "gpt2": LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj"], init_lora_weights=False),
}


@pytest.fixture(scope="module")
def gms():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {arch: graphlora.inject(base(arch), config) for arch, config in CONFIGS.items()}


@pytest.fixture
def clean(gms):
    """After a test: only the first adapter remains, active, unmerged."""
    yield gms
    reset_to_default(gms.values())


def _site_weights(gm) -> dict[str, torch.Tensor]:
    return {s.weight: getattr_path(gm, s.weight) for s in gm.programs.primary.sites}


def _gates(gm) -> dict[tuple[str, str], float]:
    return {(k, a): float(b.gate) for k, a, b in gm.graphlora.branches()}


def _call(module, arch):
    """Call a plain GraphModule of the export frontend with the traced signature (``use_cache`` included)."""
    return run(lambda **kw: module(**kw, use_cache=False), IDS)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_restores_exactly(clean, arch):
    gm = clean[arch]
    weights = _site_weights(gm)
    before = {path: w.clone() for path, w in weights.items()}
    expected = run(gm, IDS)
    with gm.disable_adapter():
        plain = run(gm, IDS)
    gm.merge_adapter()
    assert gm.merged_adapters == ["default"]
    adapted = {s.weight for s in gm.programs.primary.sites if s.name in gm.adapter_state.plans["default"]}
    for path, w in weights.items():
        assert torch.equal(w, before[path]) != (path in adapted), path  # only adapted weights changed
    assert all(g == 0.0 for g in _gates(gm).values())  # not counted twice
    torch.testing.assert_close(run(gm, IDS), expected, **TOL)
    gm.set_adapter("default")  # re-syncing the switches keeps the merged adapter's gate at 0
    torch.testing.assert_close(run(gm, IDS), expected, **TOL)
    assert (run(gm, IDS) - plain).abs().max() > 1e-3
    gm.unmerge_adapter()
    assert not gm.merged
    for path, w in weights.items():
        assert torch.equal(w, before[path]), path  # bit-for-bit
    assert torch.equal(run(gm, IDS), expected)
    assert all(g == 2.0 for g in _gates(gm).values())  # alpha / r again


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_weights_match_peft(clean, arch, tmp_path):
    """The fold (incl. the Conv1D transpose) equals PEFT's merge_and_unload weight for weight."""
    gm = clean[arch]
    kwargs = dict(r=3, lora_alpha=7, target_modules=["c_attn", "c_proj"] if arch == "gpt2" else ["q_proj", "o_proj"])
    ref = peft_model(arch, **kwargs)
    ref.save_pretrained(tmp_path)
    gm.load_adapter(tmp_path, "peft")
    gm.merge_adapter(["peft"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = ref.merge_and_unload()
    theirs = dict(merged.named_parameters())
    for site in gm.adapter_state.plans["peft"]:
        path = next(s.weight for s in gm.programs.primary.sites if s.name == site)
        torch.testing.assert_close(getattr_path(gm, path), theirs[f"{site}.weight"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_equals_unmerged(clean, arch):
    gm = clean[arch]
    before = {path: w.clone() for path, w in _site_weights(gm).items()}
    expected = run(gm, IDS)
    plain = gm.merge_and_unload()
    # a transformers model comes back as itself (tests/test_surface.py: saves and reloads)
    assert type(plain) is type(gm.get_base_model()) and not isinstance(plain, fx.GraphModule)
    assert "graphlora" not in dict(plain.named_modules())
    torch.testing.assert_close(_call(plain, arch), expected, **TOL)
    # it shares the merged weights: no copy, so unmerging changes it back too
    shared = {id(p) for p in gm.parameters()}
    assert all(id(p) in shared for p in plain.parameters())
    gm.unmerge_adapter()
    for path, w in _site_weights(gm).items():
        assert torch.equal(w, before[path])


def test_weighted_mix_and_partial_unmerge(clean):
    gm = clean["llama"]
    before = {path: w.clone() for path, w in _site_weights(gm).items()}
    gm.add_adapter("b", SECOND["llama"])
    gm.set_adapter_weights({"default": 0.5, "b": -1.5})
    expected = run(gm, IDS)
    gm.merge_adapter()
    assert gm.merged_adapters == ["default", "b"]
    torch.testing.assert_close(run(gm, IDS), expected, **TOL)
    gm.unmerge_adapter(["b"])  # b runs through its branch again, default stays folded in
    assert gm.merged_adapters == ["default"]
    assert float(gm.graphlora.branch("model_layers_0_self_attn_o_proj", "b").gate) != 0.0
    assert float(gm.graphlora.branch("model_layers_0_self_attn_q_proj", "default").gate) == 0.0
    torch.testing.assert_close(run(gm, IDS), expected, **TOL)
    gm.unmerge_adapter()
    for path, w in _site_weights(gm).items():
        assert torch.equal(w, before[path])
    assert torch.equal(run(gm, IDS), expected)


def test_refusals_leave_everything_unchanged(clean, tmp_path):
    gm = clean["llama"]
    before = {path: w.clone() for path, w in _site_weights(gm).items()}
    gates = _gates(gm)
    branch = gm.graphlora.branch("model_layers_1_mlp_down_proj", "default")
    saved = branch.lora_B.weight.detach().clone()
    with torch.no_grad():
        branch.lora_B.weight[0, 0] = float("inf")
    try:
        with pytest.raises(MergeError, match=r"model\.layers\.1\.mlp\.down_proj.*non-finite"):
            gm.merge_adapter(safe_merge=True)
    finally:
        with torch.no_grad():
            branch.lora_B.weight.copy_(saved)
    assert not gm.merged and _gates(gm) == gates
    for path, w in _site_weights(gm).items():
        assert torch.equal(w, before[path])
    gm.disable_adapters()
    with pytest.raises(MergeError, match="no active adapter"):
        gm.merge_adapter()
    gm.enable_adapters()
    gm.merge_adapter()
    with pytest.raises(MergeError, match="already merged"):
        gm.merge_adapter(["default"])
    gm.save_adapter(tmp_path)
    with pytest.raises(graphlora.AdapterStateError, match="unmerge_adapter"):
        gm.load_adapter(tmp_path, "default")  # a hotswap would change a folded-in adapter
    gm.unmerge_adapter()
    with pytest.warns(UserWarning, match="nothing to do"):
        gm.unmerge_adapter()


def test_tied_weight_is_refused(clean):
    gm = clean["gpt2"]
    gm.add_adapter("head", LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    wte = gm.transformer.wte.weight.clone()
    with pytest.raises(MergeError, match=r"tied to \['transformer\.wte\.weight'\]"):
        gm.merge_adapter(["head"])
    assert torch.equal(gm.transformer.wte.weight, wte) and not gm.merged


# ---------------------------------------------------------------------------------- specialize
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_specialize_equals_unspecialized(clean, arch):
    gm = clean[arch]
    gm.add_adapter("b", SECOND[arch])
    gm.add_adapter("off", LoraConfig(r=2, target_modules=["c_proj"] if arch == "gpt2" else ["k_proj"],
                                     init_lora_weights=False))
    gm.set_adapter_weights({"default": 1.0 / 2.0, "b": 0.75})  # default's gate becomes 1.0
    expected = run(gm, IDS)
    fast = graphlora.specialize(gm)
    assert not isinstance(fast, graphlora.AdaptedGraphModule)
    torch.testing.assert_close(_call(fast, arch), expected, **TOL)
    code = fast.code
    reads = [n.target for n in fast.graph.nodes if n.op == "get_attr"]
    assert not [t for t in reads if t.endswith(".gate")]  # no gate reads
    assert not [t for t in reads if ".off." in t] and "_off_" not in code  # no inactive branch
    assert "lora_down" not in code  # gates became constants: plain linear (1.0) or linear * constant
    switches = code.count("lora_switch(") + code.count("lora_linear(")
    assert switches == len(set(gm.adapter_state.plans["default"]) | set(gm.adapter_state.plans["b"]))
    # the adapters' parameters are shared, not copied
    a = gm.graphlora.branch(next(k for k, _, _ in gm.graphlora.branches("b")), "b").lora_A.weight
    assert any(p is a for p in fast.parameters())
    # the state is frozen: switching the source module does not change the specialized one
    gm.set_adapter("off")
    torch.testing.assert_close(_call(fast, arch), expected, **TOL)
    gm.disable_adapters()
    bare = graphlora.specialize(gm)
    assert "lora" not in bare.code
    torch.testing.assert_close(_call(bare, arch), run(gm, IDS), rtol=0, atol=0)


def test_specialize_after_merge_drops_merged_branches(clean):
    gm = clean["llama"]
    expected = run(gm, IDS)
    gm.merge_adapter()
    fast = graphlora.specialize(gm)
    assert "lora" not in fast.code
    torch.testing.assert_close(_call(fast, "llama"), expected, **TOL)


def test_freeze_switches_pass_on_plain_graphs():
    traced = fx.symbolic_trace(FunctionalMLP())
    assert FreezeSwitches()(traced).modified is False
    gm = graphlora.inject(FunctionalMLP(), LoraConfig(r=2, target_modules=["fc1", "proj"], init_lora_weights=False))
    gm.add_adapter("zero", LoraConfig(r=2, target_modules=["fc2"], init_lora_weights=False))
    gm.set_adapter("default")
    x = torch.randn(3, 12)
    expected = gm(x)
    frozen = graphlora.specialize(gm)
    switches = [n for n in frozen.graph.nodes if n.target in (lora_switch, lora_linear)]
    assert len(switches) == 2 and "fc2_zero" not in frozen.code
    torch.testing.assert_close(frozen(x), expected, **TOL)


def test_bf16_merge_within_bf16_tolerance():
    model = FunctionalMLP(d_in=64, d_hidden=96, d_out=32).to(torch.bfloat16)
    gm = graphlora.inject(model, LoraConfig(r=8, lora_alpha=16, target_modules=["fc1", "proj", "fc2"],
                                           init_lora_weights=False))
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    before = {path: w.clone() for path, w in _site_weights(gm).items()}
    expected = gm(x).float()
    gm.merge_adapter()
    torch.testing.assert_close(gm(x).float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gm.merge_and_unload()(x).float(), expected, rtol=2e-2, atol=2e-2)
    gm.unmerge_adapter()
    for path, w in _site_weights(gm).items():
        assert torch.equal(w, before[path])


def test_merging_a_scaling_adapter_under_an_unmerged_lora_is_refused():
    """IA3 scales the whole adapted layer; folding it alone would move an active LoRA outside it."""
    from models import tiny_llama

    from graphlora import IA3Config, MergeError

    gm = graphlora.inject(tiny_llama(), LoraConfig(r=2, target_modules=["down_proj"]))
    gm.add_adapter("ia3", IA3Config(target_modules=["down_proj"], feedforward_modules=[], init_ia3_weights=False))
    with torch.no_grad():
        for _, _, branch in gm.graphlora.branches("default"):
            branch.lora_B.weight.normal_()
    gm.set_adapter(["default", "ia3"])
    ids = token_ids(2, 5)
    with torch.no_grad():
        before = gm(ids).logits
        weights = {n: p.clone() for n, p in gm.named_parameters()}
        with pytest.raises(MergeError, match="default"):
            gm.merge_adapter(["ia3"])
        assert not gm.merged and all(torch.equal(p, weights[n]) for n, p in gm.named_parameters())
        gm.merge_adapter(["ia3", "default"])  # together is exact
        torch.testing.assert_close(gm(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_deleting_a_merged_adapter_is_refused():
    from models import tiny_llama

    gm = graphlora.inject(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    gm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    gm.merge_adapter(["b"])
    with pytest.raises(graphlora.AdapterStateError, match="unmerge_adapter"):
        gm.delete_adapter("b")
    assert gm.merged_adapters == ["b"] and "b" in gm.adapters
    gm.unmerge_adapter(["b"])
    gm.delete_adapter("b")
    assert list(gm.adapters) == ["default"]
