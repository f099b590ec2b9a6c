"""PEFT's PeftModel methods on the emitted module, against PEFT 0.21 on the same tiny models:
set_requires_grad, get_layer_status / get_model_status, enable_adapter_layers / disable_adapter_layers,
active_peft_config, and peft.get_peft_model_state_dict / set_peft_model_state_dict (refused clearly,
with graphlora's equivalents)."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from safetensors.torch import load_file

import graphlora
from graphlora import AdapterFileError, AdapterNotFoundError, ConfigError, PeftFunctionError

from models import randomize_b, tiny_llama, token_ids
from peft_oracle import peft_model, run

peft = pytest.importorskip("peft")

IDS = token_ids(2, 5)
CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def status(model):
    """Model and layer status as plain dicts (graphlora's dataclasses are not PEFT's classes)."""
    return dataclasses.asdict(model.get_model_status()), [dataclasses.asdict(s) for s in model.get_layer_status()]


def grads(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def pair():
    """PEFT's and graphlora's model with the same config (weights differ; status does not read them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft_model("llama", **CONFIG), graphlora.inject(tiny_llama(seed=0), graphlora.LoraConfig(**CONFIG))


def add_both(pm, gm, name, **kwargs):
    """Add ``name`` on both, then make ``default`` active again (graphlora's add_adapter activates the new
    adapter, as transformers' does; PEFT's does not)."""
    pm.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **kwargs))
    gm.add_adapter(name, graphlora.LoraConfig(**kwargs))
    pm.set_adapter("default")
    gm.set_adapter("default")


STEPS = [
    ("set_requires_grad an inactive adapter", lambda m: m.set_requires_grad("b")),
    ("freeze both", lambda m: m.set_requires_grad(["b", "default"], False)),
    ("unfreeze the active one", lambda m: m.set_requires_grad("default")),
    ("two inactive ones", lambda m: m.set_requires_grad(("b", "c"), True)),
    ("set_adapter resets", lambda m: (m.base_model if isinstance(m, peft.PeftModel) else m).set_adapter(["default", "b"])),
    ("set_requires_grad c", lambda m: m.set_requires_grad("c")),
    ("disable_adapter_layers", lambda m: m.disable_adapter_layers()),
    ("set_requires_grad while disabled", lambda m: m.set_requires_grad("c")),
    ("enable_adapter_layers", lambda m: m.enable_adapter_layers()),
    ("delete c", lambda m: m.delete_adapter("c")),
    ("set_adapter frozen", lambda m: m.set_adapter("b", inference_mode=True)),
    ("enable_adapter_layers trains the active", lambda m: m.enable_adapter_layers()),
    ("merge", lambda m: m.merge_adapter()),
    ("unmerge", lambda m: m.unmerge_adapter()),
]


def test_set_requires_grad_and_adapter_layers_give_peft_status_at_every_step():
    pm, gm = pair()
    assert status(gm) == status(pm)
    add_both(pm, gm, "b", r=2, target_modules=["q_proj"])
    add_both(pm, gm, "c", r=2, target_modules=["v_proj"])
    assert status(gm) == status(pm)
    for what, step in STEPS:
        step(pm)
        step(gm)
        assert status(gm) == status(pm), what
        assert gm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters(), what


def test_set_requires_grad_reaches_gradients_and_survives_add_and_deepcopy():
    gm = graphlora.inject(tiny_llama(seed=0), graphlora.LoraConfig(**CONFIG))
    gm.add_adapter("b", graphlora.LoraConfig(r=2, target_modules=["q_proj"]))
    gm.set_adapter("default")
    gm.set_requires_grad("default", False)
    gm.set_requires_grad("b")
    gm.add_adapter("c", graphlora.LoraConfig(r=2, target_modules=["v_proj"]))  # keeps the choices
    gm.set_adapter_weights({"default": 1.0, "c": 1.0})  # an activation: resets them
    assert gm.get_model_status().requires_grad == {"default": True, "b": False, "c": True}
    gm.set_requires_grad(["default"], False)
    gm.set_requires_grad("b")
    expected = {"default": False, "b": True, "c": True}
    assert gm.get_model_status().requires_grad == expected
    assert copy.deepcopy(gm).get_model_status().requires_grad == expected
    gm.train()
    gm(input_ids=IDS, labels=IDS).loss.backward()
    params = dict(gm.graphlora.named_parameters())
    assert all(p.grad is None for n, p in params.items() if ".default." in n)
    assert any(p.grad is not None for n, p in params.items() if ".c." in n)
    gm.requires_grad_(False)  # the module-wide switch wins over the choices
    assert gm.get_model_status().requires_grad == {"default": False, "b": False, "c": False}


def test_set_requires_grad_refuses_bad_input_and_changes_nothing():
    _, gm = pair()
    gm.set_requires_grad("default", False)
    before = grads(gm), dict(gm.adapter_state.requires_grad)
    with pytest.raises(AdapterNotFoundError, match=r"no adapter named 'nope'; loaded adapters: \['default'\]"):
        gm.set_requires_grad(["default", "nope"])
    with pytest.raises(ConfigError, match=r"requires_grad='yes'.*True or False"):
        gm.set_requires_grad("default", "yes")
    with pytest.raises(ConfigError, match=r"adapter_names=\[1\]"):
        gm.set_requires_grad([1])
    assert (grads(gm), dict(gm.adapter_state.requires_grad)) == before


def test_status_of_saved_modules_trainable_rows_ia3_and_merges_equals_peft():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def seq_cls():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, num_labels=3, pad_token_id=0)).eval()

    kwargs = dict(r=4, target_modules=["q_proj"], modules_to_save=["score"], trainable_token_indices=[1, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(seq_cls(), peft.LoraConfig(**kwargs))
    gm = graphlora.inject(seq_cls(), graphlora.LoraConfig(**kwargs))
    assert status(gm) == status(pm)
    assert [s.module_type for s in gm.get_layer_status()] == ["TrainableTokensLayer", "lora.Linear",
                                                               "ModulesToSaveWrapper"]
    for step in (lambda m: m.set_requires_grad("default", False), lambda m: m.disable_adapter_layers(),
                 lambda m: m.enable_adapter_layers()):
        step(pm)
        step(gm)
        assert status(gm) == status(pm)

    ia3 = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(seed=0), peft.IA3Config(**ia3))
    gm = graphlora.inject(tiny_llama(seed=0), graphlora.IA3Config(**ia3))
    assert status(gm) == status(pm)
    pm.merge_adapter()
    gm.merge_adapter()
    assert status(gm) == status(pm) and gm.get_model_status().merged_adapters == ["default"]


def test_disable_adapter_layers_runs_the_base_model_without_a_new_graph():
    pm, gm = pair()
    randomize_b(gm)
    base = run(gm.get_base_model(), IDS)
    code = gm.code
    adapted = run(gm, IDS)
    assert not torch.equal(adapted, base)
    gm.disable_adapter_layers()
    pm.disable_adapter_layers()
    torch.testing.assert_close(run(gm, IDS), base, rtol=0, atol=0)
    torch.testing.assert_close(run(pm, IDS), base, rtol=0, atol=0)
    assert gm.active_adapters == [] and gm.get_model_status().active_adapters == ["default"]
    assert gm.get_nb_trainable_parameters()[0] == 0 == pm.get_nb_trainable_parameters()[0]
    gm.enable_adapter_layers()
    torch.testing.assert_close(run(gm, IDS), adapted, rtol=0, atol=0)
    assert gm.code == code


def test_active_peft_config_is_the_active_adapters_config():
    _, gm = pair()
    gm.add_adapter("b", graphlora.LoraConfig(r=2, target_modules=["q_proj"]))
    assert gm.active_peft_config is gm.peft_config["b"]
    gm.disable_adapters()
    with pytest.raises(graphlora.AdapterStateError, match="no adapter is active"):
        gm.active_peft_config


def test_peft_state_dict_functions_refuse_clearly_and_change_nothing(tmp_path):
    pm, gm = pair()
    randomize_b(gm)
    before = run(gm, IDS)
    with pytest.raises(PeftFunctionError, match=r"gm\.get_adapter_state_dict\(adapter_name\)"):
        peft.get_peft_model_state_dict(gm)
    theirs = peft.get_peft_model_state_dict(pm)
    with pytest.raises(PeftFunctionError, match=r"gm\.load_adapter_state_dict\(state_dict, adapter_name\)"):
        peft.set_peft_model_state_dict(gm, theirs)
    torch.testing.assert_close(run(gm, IDS), before, rtol=0, atol=0)
    assert isinstance(PeftFunctionError("x"), AttributeError)
    assert not hasattr(graphlora.LoraConfig(r=2), "is_prompt_learning")  # duck-typing checks see no such field


def test_get_and_load_adapter_state_dict_are_peft_functions_equivalents(tmp_path):
    pm, gm = pair()
    gm.set_requires_grad("default", False)
    config = gm.peft_config["default"]
    theirs = peft.get_peft_model_state_dict(pm)
    gm.load_adapter_state_dict(theirs)  # set_peft_model_state_dict
    torch.testing.assert_close(run(gm, IDS), run(pm, IDS), rtol=1e-5, atol=1e-5)
    assert gm.peft_config["default"] == config and gm.get_model_status().requires_grad == {"default": False}
    ours = gm.get_adapter_state_dict()  # get_peft_model_state_dict
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    gm.save_pretrained(tmp_path)
    written = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert written.keys() == ours.keys() and all(torch.equal(written[k], ours[k]) for k in ours)

    before = {k: v.clone() for k, v in gm.get_adapter_state_dict().items()}
    bad = dict(theirs)
    bad.pop(next(iter(bad)))
    with pytest.raises(AdapterFileError, match="lora_A.weight"):
        gm.load_adapter_state_dict(bad)
    with pytest.raises(AdapterNotFoundError, match="'other'"):
        gm.load_adapter_state_dict(theirs, "other")
    after = gm.get_adapter_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("is_trainable", [True, False])
def test_load_adapter_trainable_though_inactive_as_peft(tmp_path, is_trainable):
    """``load_adapter(dir, "x", is_trainable=True)`` next to an active adapter: PEFT's loaded
    adapter requires grad though it is not active (graphlora's stayed frozen); ``False`` loads it
    frozen; a later ``set_adapter("x")`` makes it the one that trains, on both."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = peft_model("llama", r=2, target_modules=["q_proj"], init_lora_weights=False)
        src.save_pretrained(tmp_path)
        pm, gm = pair()
        pm.load_adapter(str(tmp_path), "x", is_trainable=is_trainable)
    gm.load_adapter(str(tmp_path), "x", is_trainable=is_trainable)

    def adapters_training(model):
        names = {"default", "x"}
        return {a for n, p in model.named_parameters() if p.requires_grad for a in names if f".{a}." in n}

    assert gm.active_adapters == ["default"]
    assert adapters_training(gm) == adapters_training(pm) == ({"default", "x"} if is_trainable else {"default"})
    pm.set_adapter("x")
    gm.set_adapter("x")
    assert adapters_training(gm) == adapters_training(pm)
