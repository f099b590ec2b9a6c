"""Eager calls run each program's graph with aten ops lowered to torch's public functions
(:mod:`graphlora.passes.eager`): bitwise the same outputs and gradients as the aten graph, which
stays what ``gm.graph`` shows, compiles and exports."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from models import main_output, randomize_b, tiny_bert, tiny_gpt2, tiny_llama, token_ids

import graphlora
from graphlora import LoraConfig
from graphlora.passes.eager import TWINS, EagerOps, _slice, identity_slice, lower_graph

MODELS = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "gate_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"]),
    "bert": (tiny_bert, ["query", "value", "dense"]),
}


def _program(gm):
    return next(p for p in gm.programs if p.module is gm)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_lowered_graph_gives_the_aten_graphs_outputs_and_gradients_bitwise(name):
    build, targets = MODELS[name]
    gm = graphlora.inject(build(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_b(gm, seed=2)
    ids = token_ids(2, 9)
    gm.train()
    lowered, _, kwargs = gm._route((), {"input_ids": ids})  # what an eager training call runs
    program = _program(gm)
    assert lowered is gm._programs.eager(program) and lowered is not program.module
    outs, grads = [], []
    for run in (program.module.forward, lowered):  # the aten graph, then the lowered one
        gm.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks
        out = main_output(run(**kwargs))
        out.float().pow(2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None})
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        assert torch.equal(grads[0][key], grads[1][key]), key


def test_gm_graph_keeps_its_aten_ops_and_the_eager_copy_has_none_of_the_lowered_ones():
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = token_ids(2, 5)
    with torch.no_grad():
        gm(input_ids=ids)
    shown = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.mul.Tensor in shown and torch.ops.aten.view.default in shown
    graph = fx.Graph()
    graph.graph_copy(gm.graph, {})
    whole = sum(identity_slice(n) for n in graph.nodes)
    assert whole >= 2  # export writes each x[:, ...] of the source as a slice of all of x
    assert lower_graph(graph)
    left = {n.target for n in graph.nodes if n.op == "call_function"} & set(TWINS)
    assert not left, left
    assert not any(identity_slice(n) for n in graph.nodes)
    # the slices that remain cut something: the lowered ones take a start, an end or a step
    assert all(n.args[2:] != (0, 2 ** 63 - 1) for n in graph.nodes if n.target is _slice)


@pytest.mark.parametrize("args,whole", [
    ((0, 0, 2 ** 63 - 1), True), ((1,), True), ((1, None, None, 1), True),
    ((1, 0, 5), False), ((1, 1, 2 ** 63 - 1), False), ((0, 0, 2 ** 63 - 1, 2), False)])
def test_identity_slices_are_only_those_of_all_of_x(args, whole):
    graph = fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(torch.ops.aten.slice.Tensor, (x, *args))
    graph.output(node)
    assert identity_slice(node) is whole
    t = torch.arange(6 * 7).reshape(6, 7)
    lowered = fx.Graph()
    lowered.output(lowered.graph_copy(graph, {}))
    lower_graph(lowered)
    want = torch.ops.aten.slice.Tensor(t, *args)
    got = fx.GraphModule(torch.nn.Module(), lowered)(t)
    assert torch.equal(got, want) and got.stride() == want.stride()


def test_a_re_splice_gives_a_new_lowered_copy_that_applies_the_new_adapter():
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = token_ids(2, 6)
    first = gm._programs.eager(_program(gm))
    gm.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj", "o_proj"]))
    randomize_b(gm, "other", seed=5)
    gm.set_adapter("other")
    gm.train()  # the switch program, re-spliced with the new branches
    with torch.no_grad():
        got = main_output(gm(input_ids=ids))
        _, _, kwargs = gm._route((), {"input_ids": ids})
        want = main_output(_program(gm).module.forward(**kwargs))
    assert gm._programs.eager(_program(gm)) is not first
    assert torch.equal(got, want)
    with gm.disable_adapter(), torch.no_grad():
        assert not torch.equal(main_output(gm(input_ids=ids)), got)


def test_forward_hooks_on_the_module_still_run():
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).train()
    seen = []
    handle = gm.register_forward_hook(lambda module, args, out: seen.append(module))
    gm(input_ids=token_ids(1, 4))  # the first program: the module itself runs it, hooks and all
    handle.remove()
    assert seen == [gm]


@pytest.mark.parametrize("dim,start,end,step", [(0, 0, 2, 1), (1, -3, None, 1), (-1, 1, 2**63 - 1, 2),
                                                (2, None, -1, 1), (1, 5, 100, 3), (-2, 4, 1, 1)])
def test_slice_twin_equals_aten_slice(dim, start, end, step):
    x = torch.arange(4 * 6 * 5).reshape(4, 6, 5)
    want = torch.ops.aten.slice.Tensor(x, dim, start, end, step)
    got = _slice(x, dim, start, end, step)
    assert torch.equal(got, want) and got.stride() == want.stride() and got.data_ptr() == want.data_ptr()


def test_nodes_the_twin_cannot_take_keep_their_aten_op():
    graph = fx.Graph()
    x = graph.placeholder("x")
    keep = graph.call_function(torch.ops.aten.to.dtype, (x, torch.float64, False, False, torch.preserve_format))
    kw = graph.call_function(torch.ops.aten.expand.default, (x, [2, 3]), {"implicit": False})
    low = graph.call_function(torch.ops.aten.mul.Tensor, (keep, kw))
    graph.output(low)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert EagerOps()(gm).modified
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [
        torch.ops.aten.to.dtype, torch.ops.aten.expand.default, torch.mul]
    x = torch.randn(2, 3)
    assert torch.equal(gm(x), x.double() * x.double())
