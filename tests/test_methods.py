"""IA3 and DoRA through the same pass, with PEFT as the oracle (tiny Llama, GPT-2 Conv1D, BERT)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import graphlora
from graphlora import AdapterFileError, ConfigError, IA3Config, LoraConfig
from graphlora.passes.splice import site_key

from models import main_output, token_ids
from peft_oracle import base, run

peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-5)
IDS = token_ids(batch=2, seq=7)
IA3 = {  # arch: (target_modules, feedforward_modules)
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
}
DORA = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"]}
ARCHS = list(IA3)


def _peft(arch, config, adapter_name="default"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base(arch), config, adapter_name=adapter_name).eval()


def _randomize_ia3(model, seed=0):
    """PEFT's init is ones; give every vector random values so the test can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))


def _load_peft(arch, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base(arch), path).eval()


def _run_plain(module):
    """A merged / specialized fx module: called with the first traced signature (use_cache=False)."""
    with torch.no_grad():
        return main_output(module(input_ids=IDS, use_cache=False))


def _ia3_config(arch, **kw):
    targets, ff = IA3[arch]
    return dict(target_modules=targets, feedforward_modules=ff, **kw)


# ---------------------------------------------------------------------------------- parity, both ways
@pytest.mark.parametrize("arch", ARCHS)
def test_ia3_peft_to_graphlora_to_peft(arch, tmp_path):
    ref = _peft(arch, peft.IA3Config(**_ia3_config(arch)))
    _randomize_ia3(ref)
    ref.save_pretrained(tmp_path / "theirs")
    gm = graphlora.inject(base(arch), str(tmp_path / "theirs"))
    assert isinstance(gm.adapters["default"], IA3Config)
    expected = run(ref, IDS)
    assert not torch.allclose(expected, run(base(arch), IDS), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(run(gm, IDS), expected, **TOL)
    # and back: graphlora's file loads in PEFT and gives the same outputs
    gm.save_adapter(tmp_path / "ours")
    torch.testing.assert_close(run(_load_peft(arch, tmp_path / "ours"), IDS), expected, **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_dora_peft_to_graphlora_to_peft(arch, tmp_path):
    ref = _peft(arch, peft.LoraConfig(r=4, lora_alpha=8, target_modules=DORA[arch], use_dora=True,
                                      init_lora_weights=False))
    with torch.no_grad():  # magnitudes away from ||W + sBA|| so the rescaling matters
        gen = torch.Generator().manual_seed(3)
        for name, p in ref.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
    ref.save_pretrained(tmp_path / "theirs")
    gm = graphlora.inject(base(arch), str(tmp_path / "theirs"))
    assert gm.adapters["default"].use_dora
    expected = run(ref, IDS)
    torch.testing.assert_close(run(gm, IDS), expected, **TOL)
    gm.save_adapter(tmp_path / "ours")
    torch.testing.assert_close(run(_load_peft(arch, tmp_path / "ours"), IDS), expected, **TOL)
    # the magnitude vector is really read: changing it changes the output
    with torch.no_grad():
        next(p for n, p in gm.named_parameters() if "lora_magnitude_vector" in n).mul_(2)
    assert not torch.allclose(run(gm, IDS), expected, atol=1e-4)


def test_dora_fresh_adapter_matches_peft_init(tmp_path):
    """A fresh DoRA adapter's magnitude is ||W + s B A||_row, as PEFT initialises it."""
    gm = graphlora.inject(base("gpt2"), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True,
                                                   init_lora_weights=False))
    gm.save_adapter(tmp_path)
    ref = _load_peft("gpt2", tmp_path)
    torch.testing.assert_close(run(gm, IDS), run(ref, IDS), **TOL)
    ours = gm.get_adapter_state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = ref.base_model.model.transformer.h[0].attn.c_attn
        m = layer.lora_magnitude_vector["default"]
        lora_weight = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        norm = m.get_weight_norm(layer.base_layer.weight, lora_weight, layer.scaling["default"])
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"
    torch.testing.assert_close(ours[key], norm, **TOL)


def test_dora_dropout_training_matches_peft(tmp_path):
    """With adapter dropout in training mode PEFT rescales W dropout(x); same random mask -> same output."""
    ref = _peft("llama", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True,
                                         lora_dropout=0.3, init_lora_weights=False))
    ref.save_pretrained(tmp_path)
    gm = graphlora.inject(base("llama"), str(tmp_path))
    gm.train(), ref.train()
    torch.manual_seed(7)
    ours = main_output(gm(input_ids=IDS))
    torch.manual_seed(7)
    theirs = main_output(ref(input_ids=IDS))
    torch.testing.assert_close(ours, theirs, **TOL)


# ---------------------------------------------------------------------------------- switch contract
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_injection_and_exact_disable(arch):
    ids = IDS
    plain = run(base(arch), ids)
    gm = graphlora.inject(base(arch), IA3Config(**_ia3_config(arch)))
    assert torch.equal(run(gm, ids), plain)  # ones: bit for bit
    gm.add_adapter("dora", LoraConfig(r=2, target_modules=DORA[arch], use_dora=True))
    torch.testing.assert_close(run(gm, ids), plain, rtol=1e-6, atol=1e-6)  # f = 1 up to rounding
    gm.add_adapter("lora", LoraConfig(r=2, target_modules=DORA[arch]))
    with torch.no_grad():
        for _, _, b in gm.graphlora.branches():
            for name, p in b.named_parameters():
                p.add_(0.3 * torch.randn_like(p))
    gm.set_adapter(["default", "dora", "lora"])
    assert not torch.allclose(run(gm, ids), plain, atol=1e-3)
    gm.disable_adapters()
    assert torch.equal(run(gm, ids), plain)  # every gate 0: the base, bit for bit
    gm.enable_adapters()
    gm.set_adapter_weights({"default": 0.0, "dora": 0.0, "lora": 0.0})
    assert torch.equal(run(gm, ids), plain)


def test_ia3_and_lora_side_by_side_switch_like_alone():
    arch = "llama"
    targets, ff = IA3[arch]
    gm = graphlora.inject(base(arch), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "down_proj"],
                                                 init_lora_weights=False))
    gm.add_adapter("ia3", IA3Config(target_modules=targets, feedforward_modules=ff, init_ia3_weights=False))
    alone_lora = graphlora.inject(base(arch), copy.deepcopy(gm.adapters["default"]))
    alone_ia3 = graphlora.inject(base(arch), gm.adapters["ia3"])
    for other, name in ((alone_lora, "default"), (alone_ia3, "ia3")):
        other.load_state_dict({k.replace(f".{name}.", ".default."): v for k, v in gm.state_dict().items()
                               if f".{name}." in k}, strict=False)
    for name, other in (("default", alone_lora), ("ia3", alone_ia3), ("default", alone_lora)):
        gm.set_adapter(name)
        torch.testing.assert_close(run(gm, IDS), run(other, IDS), rtol=0, atol=0)
    # both active: IA3 wraps the adapted layer, y = l_out * (W' (l_in * x) + b) (merge shows the same)
    gm.set_adapter(["default", "ia3"])
    both = run(gm, IDS)
    gm.merge_adapter(["default", "ia3"])
    torch.testing.assert_close(_run_plain(gm.merge_and_unload()), both, **TOL)
    gm.unmerge_adapter()


def test_switching_lora_and_ia3_never_recompiles():
    gm = graphlora.inject(base("gpt2"), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    gm.add_adapter("ia3", IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                    init_ia3_weights=False))
    gm.add_adapter("dora", LoraConfig(r=2, target_modules=["c_fc"], use_dora=True, init_lora_weights=False))
    gm.requires_grad_(False)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(gm, fullgraph=True, backend="eager")
    switches = [lambda: gm.set_adapter("default"), lambda: gm.set_adapter("ia3"),
                lambda: gm.set_adapter(["default", "ia3", "dora"]), gm.disable_adapters, gm.enable_adapters,
                lambda: gm.set_adapter_weights({"ia3": 0.5, "dora": -1.0}), lambda: gm.set_adapter("default")]
    outs = set()
    with torch.no_grad():
        compiled(input_ids=IDS)
        for switch in switches:
            switch()
            got = compiled(input_ids=IDS).logits
            torch.testing.assert_close(got, gm(input_ids=IDS).logits)
            outs.add(round(float(got.sum()), 3))
    assert counters["stats"]["unique_graphs"] == 1
    assert len(outs) >= 5  # the switches really changed the outputs
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_ia3_and_dora_equal_peft(arch, tmp_path):
    ia3 = _peft(arch, peft.IA3Config(**_ia3_config(arch)))
    _randomize_ia3(ia3)
    ia3.save_pretrained(tmp_path / "ia3")
    dora = _peft(arch, peft.LoraConfig(r=4, lora_alpha=8, target_modules=DORA[arch], use_dora=True,
                                       init_lora_weights=False))
    dora.save_pretrained(tmp_path / "dora")
    gm = graphlora.inject(base(arch), str(tmp_path / "ia3"))
    gm.load_adapter(tmp_path / "dora", "dora")
    for name, ref in (("default", ia3), ("dora", dora)):
        gm.set_adapter(name)
        before = run(gm, IDS)
        gm.merge_adapter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged_ref = copy.deepcopy(ref).merge_and_unload()
        ours = {n: p for n, p in gm.merge_and_unload().named_parameters()}
        original = dict(base(arch).named_parameters())
        compared = changed = 0
        for pname, p in merged_ref.named_parameters():
            if pname in ours:
                torch.testing.assert_close(ours[pname], p, **TOL)
                compared += 1
                changed += not torch.equal(p, original[pname])
        assert compared > 10 and changed >= 4  # the adapted weights (and IA3's biases) were compared
        torch.testing.assert_close(run(gm, IDS), before, **TOL)
        torch.testing.assert_close(run(merged_ref, IDS), before, **TOL)
        gm.unmerge_adapter()
        assert torch.equal(run(gm, IDS), before)


def test_specialize_freezes_ia3_and_dora_gates():
    gm = graphlora.inject(base("llama"), IA3Config(target_modules=["k_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"], init_ia3_weights=False))
    gm.add_adapter("dora", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    gm.set_adapter_weights({"default": 0.5, "dora": 1.0})
    want = run(gm, IDS)
    fast = graphlora.specialize(gm)
    torch.testing.assert_close(_run_plain(fast), want, **TOL)
    gm.set_adapter("dora")  # switching gm later does not change the specialized module
    torch.testing.assert_close(_run_plain(fast), want, **TOL)
    only = graphlora.specialize(gm)
    assert "scale_switch" not in only.code and "dora_factor" in only.code
    gm.disable_adapters()
    bare = graphlora.specialize(gm)
    assert "dora" not in bare.code and "ia3" not in bare.code
    assert torch.equal(_run_plain(bare), run(base("llama"), IDS))


# ---------------------------------------------------------------------------------- config and errors
def test_ia3_defaults_and_errors(tmp_path):
    gm = graphlora.inject(base("llama"), IA3Config())  # PEFT's per-model defaults
    sites = {s.name: s for s in gm.sites if s.ranks}
    assert {n.rsplit(".", 1)[-1] for n in sites} == {"k_proj", "v_proj", "down_proj"}
    assert all(s.methods["default"] == "ia3" for s in sites.values())
    ff = gm.graphlora.branch(site_key("model.layers.0.mlp.down_proj"), "default")
    assert ff.feedforward and tuple(ff.ia3_l.shape) == (1, 48)
    assert gm.get_nb_trainable_parameters()[0] == sum(s.num_parameters for s in sites.values())
    with pytest.raises(ConfigError, match="subset of the targets"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ConfigError, match="mixed-adapter batches"):
        gm.eval()(input_ids=IDS, adapter_names=["default", "__base__"])
    gm.save_adapter(tmp_path)
    gm.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterFileError, match="IA3Config adapter but 'lora' is a LoraConfig"):
        gm.load_adapter(tmp_path, "lora")
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(ConfigError):
        gm.add_adapter("bad", IA3Config(target_modules=["q_proj"], feedforward_modules="(("))
    assert list(gm.adapters) == ["default", "lora"]
    assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())
