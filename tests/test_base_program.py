"""A module whose adapters contribute nothing (all disabled, merged, or at weight 0) runs the base
graph in eager calls with grad disabled: a merged or disabled module costs what the base model costs,
where the serving program would still run every site with zero gates.

Reference: the source model (it shares every weight) and the switch form with grad enabled.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import graphlora
from graphlora import LoraConfig
from graphlora.calls import BANK, BASE, SWITCH

from models import VOCAB, main_output, randomize_b, tiny_llama, token_ids

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def gm():
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    gm.add_adapter("b", LoraConfig(r=2, target_modules=TARGETS[:1]))
    randomize_b(gm, seed=3)
    gm.set_adapter("default")
    return gm.eval()


@pytest.fixture
def modes(gm, monkeypatch):
    """The mode of every program the routing picks, in call order."""
    picked: list[str] = []
    original = type(gm.programs).module_for

    def spy(self, key, kwargs):
        picked.append(key[1])
        return original(self, key, kwargs)

    monkeypatch.setattr(type(gm.programs), "module_for", spy)
    return picked


def _serve(gm, ids):
    with torch.no_grad():
        return main_output(gm(input_ids=ids))


def _base_model(gm, ids):
    with torch.no_grad():
        return main_output(gm.get_base_model()(input_ids=ids, use_cache=False))


def _adapter_reads(module) -> set[str]:
    return {n.target for n in module.graph.nodes if n.op == "get_attr" and n.target.startswith("graphlora.")}


def test_disabled_runs_the_base_graph_and_equals_the_base_model_exactly(gm, modes):
    ids = token_ids()
    served = _serve(gm, ids)
    gm.disable_adapters()
    off = _serve(gm, ids)
    assert modes == [BANK, BASE]
    assert torch.equal(off, _base_model(gm, ids))
    base = next(p for p in gm.programs if p.mode == BASE).module
    assert not _adapter_reads(base)  # no branch, no bank: the base model's graph
    assert len(base.graph.nodes) < len(next(p for p in gm.programs if p.mode == BANK).module.graph.nodes)
    gm.enable_adapters()
    assert torch.equal(_serve(gm, ids), served) and modes[-1] == BANK


def test_merged_runs_the_base_graph_over_the_merged_weights(gm, modes):
    ids = token_ids()
    served = _serve(gm, ids)
    gm.merge_adapter()
    merged = _serve(gm, ids)
    assert modes[-1] == BASE
    torch.testing.assert_close(merged, served, atol=1e-5, rtol=1e-5)
    assert torch.equal(merged, _base_model(gm, ids))  # the merged weights are the base model's now
    gm.unmerge_adapter()
    torch.testing.assert_close(_serve(gm, ids), served, atol=1e-5, rtol=1e-5)
    assert modes[-1] == BANK
    gm.merge_adapter("b")  # merged but not active: "default" still contributes through the banks
    _serve(gm, ids)
    assert modes[-1] == BANK


def test_weight_zero_contributes_nothing_while_grad_enabled_and_mixed_calls_keep_their_programs(gm, modes):
    ids = token_ids()
    gm.set_adapter_weights({"default": 0.0})
    assert torch.equal(_serve(gm, ids), _base_model(gm, ids)) and modes[-1] == BASE
    gm.set_adapter_weights({"default": 0.0, "b": 0.5})
    _serve(gm, ids)
    assert modes[-1] == BANK
    gm.disable_adapters()
    gm(input_ids=ids)  # grad enabled: the switch form
    with torch.no_grad():
        gm(input_ids=ids, adapter_names=["default", "b"])
    assert modes[-2:] == [SWITCH, "mixed"]


def test_training_mode_under_no_grad_runs_the_base_graph_with_its_dropout(modes):
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, lora_dropout=0.5, target_modules=TARGETS))
    randomize_b(gm)
    gm.train()
    gm.disable_adapters()
    ids = token_ids()
    with torch.no_grad():
        torch.manual_seed(0)
        got = main_output(gm(input_ids=ids))
        torch.manual_seed(0)
        want = main_output(gm.get_base_model()(input_ids=ids, use_cache=False))
    assert torch.equal(got, want)


def test_modules_to_save_still_switch_in_the_base_graph(modes):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0))
    gm = graphlora.inject(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["score"]))
    randomize_b(gm)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if "modules_to_save" in name or ".copies." in name:
                param.add_(0.5)
    gm.eval()
    ids = token_ids(2, 5)
    gm.merge_adapter()  # LoRA folded in; the saved head is not merged and stays switched
    with torch.no_grad():
        got = main_output(gm(input_ids=ids))
    assert modes[-1] == BASE
    with torch.enable_grad():
        want = main_output(gm(input_ids=ids)).detach()
    assert modes[-1] == SWITCH
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        plain = main_output(gm.get_base_model()(input_ids=ids))
    assert not torch.allclose(got, plain)  # the trained head copy is what ran


def test_forward_hooks_on_the_module_run_whichever_program_serves(gm, modes):
    seen = []
    gm.register_forward_pre_hook(lambda module, args, kwargs: seen.append("pre"), with_kwargs=True)
    gm.register_forward_hook(lambda module, args, out: seen.append(main_output(out)))
    ids = token_ids()
    served = _serve(gm, ids)
    gm.disable_adapters()
    off = _serve(gm, ids)
    assert modes == [BANK, BASE]
    assert seen[0] == "pre" and seen[2] == "pre" and torch.equal(seen[1], served) and torch.equal(seen[3], off)
    assert "forward" not in vars(gm)  # the program's forward was only lent for the call


def test_under_a_compiled_caller_switching_to_disabled_compiles_nothing(gm):
    torch._dynamo.reset()
    counters.clear()
    gm.requires_grad_(False)
    compiled = torch.compile(gm, fullgraph=True, backend="eager")
    ids = token_ids()
    with torch.no_grad():
        compiled(input_ids=ids)
        graphs = counters["stats"]["unique_graphs"]
        gm.disable_adapters()
        got = compiled(input_ids=ids).logits
        want = _base_model(gm, ids)
        gm.enable_adapters()
        gm.merge_adapter()
        compiled(input_ids=ids)
    assert counters["stats"]["unique_graphs"] == graphs == 1
    assert BASE not in {p.mode for p in gm.programs}
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


def test_generate_with_disabled_adapters_gives_the_base_models_tokens(gm, modes):
    ids = token_ids(2, 5)
    gm.disable_adapters()
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    ours = gm.generate(input_ids=ids, **kwargs)
    assert set(modes) == {BASE}
    assert torch.equal(ours, gm.get_base_model().generate(input_ids=ids, **kwargs))


def test_a_hook_that_calls_the_module_again_and_an_assigned_forward_both_survive(gm):
    ids = token_ids()
    wrapper = gm.forward
    gm.forward = wrapper  # an instance forward someone assigned (accelerate's pattern)
    inner = []

    def again(module, args, out):
        if not inner:
            inner.append(None)
            inner[0] = main_output(module(input_ids=ids))  # re-entrant call, through the routing

    gm.register_forward_hook(again)
    with torch.no_grad():
        outer = _serve(gm, ids)
    assert torch.equal(inner[0], outer)
    assert vars(gm)["forward"] is wrapper


def test_an_assigned_forward_runs_once_inside_the_hooks_and_its_inner_call_routes(gm):
    """``gm.forward = wrapper`` (accelerate's autocast, TRL's fused LM head) is what a call runs, as
    on any nn.Module: once per call, inside gm's hooks; the forward it replaced routes the
    arguments it is given (here ``labels``, a signature of its own)."""
    ids = token_ids()
    replaced = gm.forward
    order = []

    def wrapper(*args, **kwargs):
        order.append("wrapper")
        out = replaced(*args, labels=kwargs["input_ids"], **kwargs)
        return out.loss

    gm.register_forward_pre_hook(lambda module, args: order.append("pre"))
    gm.register_forward_hook(lambda module, args, out: order.append("post"))
    gm.forward = wrapper
    gm.train()
    loss = gm(input_ids=ids)
    assert order == ["pre", "wrapper", "post"]
    del gm.forward
    torch.testing.assert_close(loss, gm(input_ids=ids, labels=ids).loss)
    assert "forward" not in vars(gm) and order[3:] == ["pre", "post"]


def test_a_pre_hook_that_changes_the_arguments_runs_once_before_the_program_is_chosen(gm, modes):
    """A forward pre-hook adding ``labels`` (a new call signature) is seen by the routing: the call
    gets the program for the hooked arguments and returns the loss; the hook runs once per call,
    positional-only hooks too, and its removal handle still removes it."""
    ids = token_ids()
    calls = []

    def add_labels(module, args, kwargs):
        calls.append("kwargs")
        return args, {**kwargs, "labels": kwargs["input_ids"]}

    def count(module, args):
        calls.append("args")

    handles = [gm.register_forward_pre_hook(add_labels, with_kwargs=True), gm.register_forward_pre_hook(count)]
    gm.train()
    out = gm(input_ids=ids)
    assert calls == ["kwargs", "args"]
    assert out.loss is not None and torch.isfinite(out.loss)
    for handle in handles:
        handle.remove()
    gm.eval()
    with torch.no_grad():
        plain = gm(input_ids=ids)
    assert calls == ["kwargs", "args"] and getattr(plain, "loss", None) is None
    assert not gm._forward_pre_hooks


def test_a_pre_hook_removed_during_the_call_stays_removed(gm):
    """A one-shot pair (a forward hook that removes its pre-hook, as run-once patterns do): the
    pre-hook ran once, was removed while the program ran, and does not come back after the call;
    a with_kwargs pre-hook removed that way too, and one registered during the call stays."""
    ids = token_ids()
    calls = []
    handles = {"args": gm.register_forward_pre_hook(lambda module, args: calls.append("args")),
               "kwargs": gm.register_forward_pre_hook(lambda module, args, kwargs: calls.append("kwargs"),
                                                      with_kwargs=True)}
    late = []

    def remove_both(module, args, out):
        calls.append("post")
        handles.pop("args").remove()
        handles.pop("kwargs").remove()
        late.append(module.register_forward_pre_hook(lambda module, args: calls.append("late")))

    post = gm.register_forward_hook(remove_both)
    with torch.no_grad():
        gm(input_ids=ids)
        post.remove()
        gm(input_ids=ids)
    assert calls == ["args", "kwargs", "post", "late"]
    assert len(gm._forward_pre_hooks) == 1 and not gm._forward_pre_hooks_with_kwargs
    late[0].remove()
    assert not gm._forward_pre_hooks
