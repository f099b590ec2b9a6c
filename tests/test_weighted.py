"""add_weighted_adapter against PEFT's (linear, cat, svd for LoRA; linear for IA3)."""

from __future__ import annotations

import warnings

import pytest
import torch

import graphlora
from graphlora import AdapterExistsError, ConfigError, IA3Config, LoraConfig

from models import token_ids
from peft_oracle import base, peft_model, run

peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-5)
IDS = token_ids(batch=2, seq=7)
ADAPTERS = {  # name: LoraConfig kwargs (the same dict builds PEFT's config)
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"], use_rslora=True),
    "c": dict(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """PEFT and graphlora with the same three LoRA adapters (random A and B, read from PEFT's files)."""
    root = tmp_path_factory.mktemp("weighted")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft_model("llama", "a", init_lora_weights=False, **ADAPTERS["a"])
        for name in ("b", "c"):
            ref.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **ADAPTERS[name]))
    ref.save_pretrained(root)
    gm = graphlora.inject(base("llama"), str(root / "a") if (root / "a").exists() else str(root), adapter_name="a")
    for name in ("b", "c"):
        gm.load_adapter(root, name)
    return ref, gm


def _both(pair, adapters, weights, name, kind, **kw):
    ref, gm = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.add_weighted_adapter(adapters, weights, name, combination_type=kind, **kw)
    gm.add_weighted_adapter(adapters, weights, name, combination_type=kind, **kw)
    ref.set_adapter(name)
    gm.set_adapter(name)
    return run(ref, IDS), run(gm, IDS)


@pytest.mark.parametrize("kind,adapters,weights", [
    ("linear", ["a", "b"], [0.7, -0.4]),
    ("cat", ["a", "b", "c"], [1.0, 0.5, -2.0]),
    ("svd", ["a", "c"], [0.6, 1.3]),
])
def test_same_as_peft(pair, kind, adapters, weights):
    name = f"mix_{kind}"
    theirs, ours = _both(pair, adapters, weights, name, kind)
    torch.testing.assert_close(ours, theirs, **TOL)
    assert not torch.allclose(ours, run(base("llama"), IDS), atol=1e-4)  # the mix does something
    ref, gm = pair
    # the new adapter's tensors equal PEFT's (svd: up to the singular vectors' signs, so compare B A)
    mine = gm.get_adapter_state_dict(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from peft import get_peft_model_state_dict

        theirs_sd = get_peft_model_state_dict(ref, adapter_name=name)
    assert mine.keys() == theirs_sd.keys()
    for key in mine:
        if kind != "svd":
            torch.testing.assert_close(mine[key], theirs_sd[key], **TOL)
    assert gm.adapters[name].r == ref.peft_config[name].r
    gm.set_adapter("a")
    ref.set_adapter("a")


def test_cat_is_exact_sum_of_updates(pair):
    """cat: y = W x + sum_i w_i s_i B_i A_i x, i.e. the same as the weighted active set."""
    _, gm = pair
    gm.add_weighted_adapter(["a", "c"], [0.5, -1.5], "exact", combination_type="cat")
    gm.set_adapter("exact")
    combined = run(gm, IDS)
    gm.set_adapter_weights({"a": 0.5, "c": -1.5})
    torch.testing.assert_close(combined, run(gm, IDS), **TOL)
    gm.set_adapter("a")


def test_svd_full_rank_is_exact(pair):
    _, gm = pair
    gm.add_weighted_adapter(["a", "c"], [1.0, 1.0], "svd6", combination_type="svd", svd_rank=6)
    gm.set_adapter("svd6")
    got = run(gm, IDS)
    gm.set_adapter(["a", "c"])
    torch.testing.assert_close(got, run(gm, IDS), **TOL)
    gm.set_adapter("a")


def test_refusals_leave_everything_as_it_was(pair):
    _, gm = pair
    before = (list(gm.adapters), gm.active_adapters, gm.code)
    cases = [
        (ConfigError, dict(adapters=["a", "c"], weights=[1, 1], adapter_name="x", combination_type="linear")),
        (ConfigError, dict(adapters=["a"], weights=[1, 2], adapter_name="x")),
        (ConfigError, dict(adapters=["a", "b"], weights=[1, float("nan")], adapter_name="x")),
        (ConfigError, dict(adapters=["a", "b"], weights=[1, 1], adapter_name="x", combination_type="ties")),
        (AdapterExistsError, dict(adapters=["a", "b"], weights=[1, 1], adapter_name="b")),
        (KeyError, dict(adapters=["a", "nope"], weights=[1, 1], adapter_name="x")),
    ]
    for error, kwargs in cases:
        with pytest.raises(error):
            gm.add_weighted_adapter(**kwargs)
    assert (list(gm.adapters), gm.active_adapters, gm.code) == before


def test_ia3_linear_same_as_peft_and_mixed_methods_refused():
    kw = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        ref = peft.get_peft_model(base("llama"), peft.IA3Config(**kw), adapter_name="x").eval()
        ref.add_adapter("y", peft.IA3Config(**dict(kw, target_modules=["k_proj", "v_proj", "down_proj"])))
        ref.add_weighted_adapter(["x", "y"], [0.3, 0.9], "xy")
    gm = graphlora.inject(base("llama"), IA3Config(**kw), adapter_name="x")
    gm.add_adapter("y", IA3Config(**dict(kw, target_modules=["k_proj", "v_proj", "down_proj"])))
    with torch.no_grad():
        for name in ("x", "y"):
            theirs = {n: p for n, p in ref.named_parameters() if n.endswith(f"ia3_l.{name}")}
            for key, param in gm.get_adapter_state_dict(name).items():
                param.copy_(theirs[f"{key}.{name}"])
    gm.add_weighted_adapter(["x", "y"], [0.3, 0.9], "xy", combination_type="linear")
    ref.set_adapter("xy")
    gm.set_adapter("xy")
    torch.testing.assert_close(run(gm, IDS), run(ref, IDS), **TOL)
    assert not torch.allclose(run(gm, IDS), run(base("llama"), IDS), atol=1e-4)
    gm.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="mix methods"):
        gm.add_weighted_adapter(["x", "lora"], [1, 1], "bad", combination_type="linear")
