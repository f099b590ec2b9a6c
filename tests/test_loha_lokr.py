"""LoHa and LoKr against PEFT (tiny Llama and GPT-2), PEFT's default targets per architecture,
and ``inject(..., is_trainable=True)``.

PEFT's LoHa/LoKr accept ``nn.Linear`` / ``nn.Conv*`` only, so on GPT-2 (``Conv1D`` stores ``W``
as ``(in, out)``) the oracle is PEFT on the same GPT-2 with each targeted ``Conv1D`` turned into
the equivalent ``nn.Linear``: same keys, same shapes, same outputs.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import graphlora
from graphlora import AdapterFileError, ConfigError, IA3Config, LoHaConfig, LoKrConfig, LoraConfig
from graphlora.methods.lokr import factorization

import models
from models import VOCAB, main_output, token_ids
from peft_oracle import run

peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-5)
IDS = token_ids(batch=2, seq=7)
TARGETS = {"llama": ["q_proj", "k_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
CONFIGS = {  # method: (PEFT config class, kwargs)
    "loha": (lambda: peft.LoHaConfig, dict(r=3, alpha=6, rank_pattern={"down_proj": 2, "c_fc": 2})),
    # r=2 with decompose_both: w1 whole / w2 low-rank; r=1 at k_proj and c_attn: both low-rank; r=8 at
    # down_proj and c_fc: both whole
    "lokr": (lambda: peft.LoKrConfig, dict(r=2, alpha=4, decompose_both=True,
                                           rank_pattern={"k_proj": 1, "c_attn": 1, "down_proj": 8, "c_fc": 8})),
}
OURS = {"loha": LoHaConfig, "lokr": LoKrConfig}
PREFIX = {"loha": "hada_", "lokr": "lokr_"}


def base(arch: str) -> nn.Module:
    """One-layer tiny models (tracing time dominates this file)."""
    return {"llama": models.tiny_llama, "gpt2": models.tiny_gpt2, "bert": models.tiny_bert}[arch](seed=0, layers=1)


def _linearize(model: nn.Module) -> nn.Module:
    """GPT-2 with every ``Conv1D`` replaced by the same map as an ``nn.Linear`` (PEFT's oracle)."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape
            linear = nn.Linear(d_in, d_out)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def _oracle_base(arch):
    return _linearize(base(arch)) if arch == "gpt2" else base(arch)


def _peft(arch, method, **overrides):
    cls, kwargs = CONFIGS[method]
    kwargs = {**kwargs, "target_modules": TARGETS[arch], "init_weights": False, **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_oracle_base(arch), cls()(**kwargs)).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-identity factors of a size that moves the outputs
        for name, p in model.named_parameters():
            if PREFIX[method] in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def _load_peft(arch, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(_oracle_base(arch), str(path), **kw).eval()


def _ours(arch, method, tmp_path, **overrides):
    """graphlora loading the file of a randomised PEFT adapter: (graphlora module, PEFT model)."""
    ref = _peft(arch, method, **overrides)
    ref.save_pretrained(tmp_path / "theirs")
    return graphlora.inject(base(arch), str(tmp_path / "theirs")), ref


def _run_plain(module):
    with torch.no_grad():
        return main_output(module(input_ids=IDS, use_cache=False))


# ---------------------------------------------------------------------------------- parity, both ways
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_peft_file_to_graphlora_to_peft(method, arch, tmp_path):
    gm, ref = _ours(arch, method, tmp_path)
    assert isinstance(gm.adapters["default"], OURS[method])
    expected = run(ref, IDS)
    assert not torch.allclose(expected, run(base(arch), IDS), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(run(gm, IDS), expected, **TOL)
    gm.save_adapter(tmp_path / "ours")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == method.upper()
    torch.testing.assert_close(run(_load_peft(arch, tmp_path / "ours"), IDS), expected, **TOL)
    if method == "lokr":  # every storage form occurs: whole and low-rank w1, whole and low-rank w2
        kinds = {k.rsplit(".", 1)[-1] for k in ours}
        assert {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w1_a"} <= kinds


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_fresh_adapter_is_identity_and_peft_shaped(method, tmp_path):
    """PEFT's init (identity), PEFT's shapes for a fresh adapter, and graphlora's file in PEFT."""
    plain = run(base("llama"), IDS)
    gm = graphlora.inject(base("llama"), OURS[method](r=2, target_modules=TARGETS["llama"]))
    assert torch.equal(run(gm, IDS), plain)
    extra = {"decompose_both": False} if method == "lokr" else {}
    ref = _peft("llama", method, r=2, rank_pattern={}, init_weights=True, **extra)
    theirs = {k.replace(".default", ""): tuple(v.shape) for k, v in ref.named_parameters() if PREFIX[method] in k}
    ours = {k: tuple(v.shape) for k, v in gm.get_adapter_state_dict().items()}
    assert ours == theirs
    gm.save_adapter(tmp_path)
    torch.testing.assert_close(run(_load_peft("llama", tmp_path), IDS), plain, rtol=0, atol=0)


def test_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for n in (1, 7, 16, 32, 48, 96, 127, 128, 768, 1000, 4096, 11008):
        for f in (-1, 2, 4, 5, 8, 16):
            assert factorization(n, f) == peft_factorization(n, f), (n, f)


# ---------------------------------------------------------------------------------- switching, merge, specialize
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_switch_merge_unmerge_specialize(arch, tmp_path):
    gm, ref = _ours(arch, "loha", tmp_path)
    gm.load_adapter(_saved_lokr(arch, tmp_path), "kr")
    plain = run(base(arch), IDS)
    gm.set_adapter(["default", "kr"])
    both = run(gm, IDS)
    gm.disable_adapters()
    assert torch.equal(run(gm, IDS), plain)  # every gate 0: the base, bit for bit
    gm.enable_adapters()
    gm.set_adapter_weights({"default": 0.0, "kr": 0.0})
    assert torch.equal(run(gm, IDS), plain)
    gm.set_adapter_weights({"default": 0.5, "kr": -1.0})
    weighted = run(gm, IDS)
    fast = graphlora.specialize(gm)
    assert "default_gate" not in fast.code and "loha_residual" in fast.code and "lokr_residual" in fast.code
    torch.testing.assert_close(_run_plain(fast), weighted, rtol=0, atol=0)
    gm.set_adapter("default")
    torch.testing.assert_close(run(gm, IDS), run(ref, IDS), **TOL)
    only = graphlora.specialize(gm)
    assert "lokr_residual" not in only.code
    torch.testing.assert_close(_run_plain(only), run(gm, IDS), rtol=0, atol=0)
    gm.disable_adapters()
    bare = graphlora.specialize(gm)
    assert "loha" not in bare.code and "lokr" not in bare.code
    assert torch.equal(_run_plain(bare), plain)
    gm.enable_adapters()
    # merge: W += dW (transposed at Conv1D sites); same outputs; unmerge restores exactly
    gm.set_adapter(["default", "kr"])
    originals = {n: p.detach().clone() for n, p in gm.get_base_model().named_parameters()}
    gm.merge_adapter()
    torch.testing.assert_close(run(gm, IDS), both, **TOL)
    torch.testing.assert_close(_run_plain(gm.merge_and_unload()), both, **TOL)
    gm.unmerge_adapter()
    assert all(torch.equal(p, originals[n]) for n, p in gm.get_base_model().named_parameters())
    assert torch.equal(run(gm, IDS), both)


def _saved_lokr(arch, tmp_path):
    ref = _peft(arch, "lokr")
    ref.save_pretrained(tmp_path / "lokr")
    return tmp_path / "lokr"


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_merged_weights_equal_peft(method, tmp_path):
    gm, ref = _ours("llama", method, tmp_path)
    gm.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_ref = ref.merge_and_unload()
    ours = dict(gm.merge_and_unload().named_parameters())
    original = dict(base("llama").named_parameters())
    changed = 0
    for name, p in merged_ref.named_parameters():
        torch.testing.assert_close(ours[name], p, **TOL)
        changed += not torch.equal(p, original[name])
    assert changed == 3  # three targets in the one layer


def test_mixed_batches_refuse_loha_and_lokr():
    gm = graphlora.inject(base("llama"), LoHaConfig(target_modules=["q_proj"]))
    gm.add_adapter("kr", LoKrConfig(target_modules=["q_proj"]))
    for name in ("default", "kr"):
        with torch.no_grad(), pytest.raises(ConfigError, match="mixed-adapter batches"):
            gm(input_ids=IDS, adapter_names=[name, "__base__"])


# ---------------------------------------------------------------------------------- config and file errors
def test_config_refusals_name_the_field(tmp_path):
    for kwargs, field in ((dict(rank_dropout=0.1), "rank_dropout"), (dict(module_dropout=0.2), "module_dropout"),
                          (dict(use_effective_conv2d=True), "use_effective_conv2d"), (dict(r=0), "r=")):
        for cls in (LoHaConfig, LoKrConfig):
            with pytest.raises(ConfigError, match=field):
                cls(**kwargs)
    with pytest.raises(ConfigError, match="decompose_factor"):
        LoKrConfig(decompose_factor=0)
    with pytest.raises(ConfigError, match="init_weights"):
        LoHaConfig(init_weights="lycoris")
    with pytest.raises(ConfigError, match="did you mean"):
        LoKrConfig(decompose_bot=True)
    # a PEFT file with rank_dropout is refused on load, naming the field
    ref = _peft("llama", "loha", rank_dropout=0.1)
    ref.save_pretrained(tmp_path / "drop")
    with pytest.raises(AdapterFileError, match="rank_dropout"):
        graphlora.read_adapter_config(tmp_path / "drop")


def test_loha_file_with_a_missing_key_loads_nothing(tmp_path):
    gm, _ = _ours("llama", "loha", tmp_path)
    gm.save_adapter(tmp_path / "ok")
    tensors = load_file(tmp_path / "ok" / "adapter_model.safetensors")
    dropped = "base_model.model.model.layers.0.self_attn.k_proj.hada_w2_b"
    del tensors[dropped]
    save_file(tensors, tmp_path / "ok" / "adapter_model.safetensors", metadata={"format": "pt"})
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(AdapterFileError, match="missing tensor.*hada_w2_b"):
        gm.load_adapter(tmp_path / "ok", "broken")
    assert list(gm.adapters) == ["default"]
    assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())


# ---------------------------------------------------------------------------------- default targets, is_trainable
def _tiny(arch):
    if arch in ("llama", "gpt2", "bert"):
        return base(arch)
    import transformers as tf

    torch.manual_seed(0)
    if arch == "vit":
        cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                           image_size=16, patch_size=8)
        return tf.ViTModel(cfg).eval()
    cls = {"qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[arch]
    cfg = cls[0](vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    return cls[1](cfg).eval()


def _peft_targets(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return set(peft.get_peft_model(model, config).targeted_module_names)
        except (ValueError, TypeError) as exc:
            return type(exc).__name__


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "qwen2", "mistral", "vit"])
def test_default_targets_follow_peft(arch):
    gm = graphlora.inject(_tiny(arch), LoraConfig())
    gm.add_adapter("ia3", IA3Config()) if arch != "vit" else None
    gm.add_adapter("loha", LoHaConfig())
    gm.add_adapter("lokr", LoKrConfig())
    ours = {name: {s.name for s in gm.sites if name in s.methods} for name in gm.adapters}
    assert ours["loha"] == ours["lokr"] == ours["default"]
    lora = _peft_targets(_tiny(arch), peft.LoraConfig())
    if arch == "vit":  # PEFT has no ViT default; graphlora takes transformers 5's q_proj / v_proj
        assert lora == "ValueError"
        assert {n.rsplit(".", 1)[-1] for n in ours["default"]} == {"q_proj", "v_proj"}
        with pytest.raises(ConfigError, match="no default for model type 'vit'"):
            gm.add_adapter("ia3", IA3Config())
        return
    assert ours["default"] == lora
    assert ours["ia3"] == _peft_targets(_tiny(arch), peft.IA3Config())
    if arch != "gpt2":  # PEFT's LoHa/LoKr refuse GPT-2's Conv1D: graphlora adapts LoRA's default there
        assert ours["loha"] == _peft_targets(_tiny(arch), peft.LoHaConfig())
        assert ours["lokr"] == _peft_targets(_tiny(arch), peft.LoKrConfig())


def test_inject_is_trainable(tmp_path):
    gm = graphlora.inject(base("llama"), LoHaConfig(r=2, target_modules=["q_proj"]))
    gm.save_adapter(tmp_path)
    other = graphlora.inject(base("llama"), str(tmp_path), is_trainable=True)  # the default (frozen) is
    assert other.adapters["default"].inference_mode is False                   # tested with load_adapter
    grads = {n: p.requires_grad for n, p in other.named_parameters()}
    adapter = [g for n, g in grads.items() if "hada_" in n]
    assert len(adapter) == 4 and all(adapter)
    assert not any(g for n, g in grads.items() if "hada_" not in n)
    main_output(other(input_ids=IDS)).sum().backward()
    assert all(p.grad is not None for n, p in other.named_parameters() if p.requires_grad)
