"""Deep models are traced with two layers and replicated; the result must be the full model."""

from __future__ import annotations

import re

import pytest
import torch
from models import main_output, tiny_bert, tiny_gpt2, tiny_llama, token_ids

import graphlora
from graphlora import LoraConfig, capture


@pytest.fixture
def export_depths(monkeypatch):
    """Record the layer count of every model torch.export sees."""
    depths = []
    original = capture._export_eval

    def spy(model, kwargs):
        from graphlora.repeat import layer_stack

        found = layer_stack(model)
        depths.append(len(found[1]) if found else len(next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))))
        return original(model, kwargs)

    monkeypatch.setattr(capture, "_export_eval", spy)
    return depths


@pytest.mark.parametrize("builder,targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_fc"]),
                                             (tiny_bert, ["query", "value", "dense"])])
def test_six_layers_traced_as_two(builder, targets, export_depths):
    model = builder(layers=6)
    gm = graphlora.inject(model, LoraConfig(r=2, target_modules=targets))
    assert export_depths == [2]  # one export, of the two-layer cut; the model keeps its six layers
    assert len(model.get_submodule({"tiny_llama": "model.layers", "tiny_gpt2": "transformer.h",
                                    "tiny_bert": "encoder.layer"}[builder.__name__])) == 6
    layers = {int(re.search(r"\.(\d+)\.", s.name).group(1)) for s in gm.sites if s.ranks and re.search(r"\.\d+\.", s.name)}
    assert layers == set(range(6))
    assert {s.kind for s in gm.sites if s.ranks} <= {"linear", "addmm"}
    ids = token_ids(3, 9)
    with torch.no_grad():
        assert torch.equal(main_output(gm(ids)), main_output(model(ids)))
        for _, _, branch in gm.graphlora.branches():
            branch.lora_B.weight.normal_()
        assert not torch.allclose(main_output(gm(ids)), main_output(model(ids)))


def test_mismatching_layers_fall_back_to_a_full_trace(export_depths):
    model = tiny_llama(layers=4)
    model.model.layers[3].self_attn.scaling = 0.5  # same modules and shapes, different numbers
    gm = graphlora.inject(model, LoraConfig(r=2, target_modules=["down_proj"]))
    assert export_depths == [2, 4]  # the replicated graph failed the numerical check; full trace used
    ids = token_ids(2, 5)
    with torch.no_grad():
        assert torch.equal(gm(ids).logits, model(ids, use_cache=False).logits)


def test_layers_built_differently_are_not_replicated(export_depths):
    model = tiny_llama(layers=4)
    model.model.layers[3].mlp.act_fn = torch.nn.Tanh()
    graphlora.inject(model, LoraConfig(r=2, target_modules=["down_proj"]))
    assert export_depths == [4]


def test_per_layer_config_lists_disable_replication(export_depths):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert len(set(cfg.layer_types)) == 2  # layers 2, 3 use sliding-window attention
    model = Qwen2ForCausalLM(cfg).eval()
    gm = graphlora.inject(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert export_depths == [4]
    ids = token_ids(2, 12)  # longer than the window: sliding layers differ from full ones here
    with torch.no_grad():
        assert torch.equal(gm(ids).logits, model(ids, use_cache=False).logits)
