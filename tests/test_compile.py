"""torch.compile: fullgraph, no recompilation on switching, compiled == eager, training too."""

from __future__ import annotations

import pytest
import torch
from models import FunctionalMLP, tiny_gpt2, tiny_llama, token_ids
from torch._dynamo.utils import counters

import graphlora
from graphlora import LoraConfig


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _random_b(gm, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, branch in gm.graphlora.branches():
            branch.lora_B.weight.copy_(torch.randn(branch.lora_B.weight.shape, generator=gen) * 0.2)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("builder,targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_switching_never_recompiles(builder, targets):
    gm = graphlora.inject(builder(), LoraConfig(r=4, target_modules=targets))
    gm.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=targets[:1]))
    _random_b(gm)
    gm.requires_grad_(False)
    compiled = torch.compile(gm, fullgraph=True, backend="eager")
    ids = token_ids(3, 6)
    switches = [
        lambda: gm.set_adapter("default"),
        lambda: gm.set_adapter(["default", "b"]),
        lambda: gm.set_adapter_weights({"default": 0.5, "b": -1.0}),
        gm.disable_adapters,
        gm.enable_adapters,
        lambda: gm.set_adapter("b"),
    ]
    with torch.no_grad():
        compiled(input_ids=ids)
        warm = _graphs()
        for switch in switches:
            switch()
            torch.testing.assert_close(compiled(input_ids=ids).logits, gm(input_ids=ids).logits)
        assert _graphs() == warm == 1


def test_mixed_batch_names_change_without_recompiling():
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    gm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    _random_b(gm)
    gm.requires_grad_(False)
    compiled = torch.compile(gm, fullgraph=True, backend="eager")
    ids = token_ids(4, 5)
    with torch.no_grad():
        for names in (["default", "b", "__base__", "b"], ["b", "__base__", "default", "default"],
                      ["__base__"] * 4):
            got = compiled(input_ids=ids, adapter_names=names).logits
            torch.testing.assert_close(got, gm(input_ids=ids, adapter_names=names).logits)
    assert _graphs() == 1  # rows are checked against per-row runs in test_mixed_batch.py


def test_compiled_training_matches_eager():
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    _random_b(gm)
    ids = token_ids(2, 6)
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
    loss_c = compiled(input_ids=ids, labels=ids).loss
    loss_c.backward()
    grads_c = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad(set_to_none=True)
    loss_e = gm(input_ids=ids, labels=ids).loss
    loss_e.backward()
    grads_e = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    torch.testing.assert_close(loss_c, loss_e)
    assert grads_c.keys() == grads_e.keys() and grads_c
    for name in grads_c:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5)


def test_inductor_fullgraph_on_functional_mlp():
    gm = graphlora.inject(FunctionalMLP(), LoraConfig(r=4, target_modules=["fc1", "proj"]))
    gm.add_adapter("b", LoraConfig(r=2, target_modules=["proj"]))
    _random_b(gm)
    gm.requires_grad_(False)
    compiled = torch.compile(gm, fullgraph=True)
    x = torch.randn(5, 12)
    with torch.no_grad():
        for switch in (lambda: gm.set_adapter("default"), lambda: gm.set_adapter(["default", "b"]), gm.disable_adapters):
            switch()
            torch.testing.assert_close(compiled(x), gm(x), rtol=1e-5, atol=1e-5)
    assert _graphs() == 1


def test_hotswap_under_compile_changes_outputs_without_recompiling(tmp_path):
    """load_adapter into an existing adapter of the same shapes writes in place: no recompilation."""
    targets = ["q_proj", "v_proj"]
    donor = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=targets))
    _random_b(donor, seed=5)
    donor.save_adapter(tmp_path)
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=targets))
    _random_b(gm, seed=6)
    gm.requires_grad_(False)
    compiled = torch.compile(gm, fullgraph=True, backend="eager")
    ids = token_ids(2, 6)
    with torch.no_grad():
        before = compiled(input_ids=ids).logits
        warm = _graphs()
        gm.load_adapter(tmp_path, "default")
        after = compiled(input_ids=ids).logits
        assert _graphs() == warm == 1
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, donor(input_ids=ids).logits)


def test_a_plain_compiled_call_runs_the_program_from_the_call_frame_itself(monkeypatch):
    """Dynamo checks each frame of a ``recursive=False``-disabled function again on every call (a
    walk over its bytecode), so a call without hooks runs the program from ``__call__``'s own frame,
    not through the hooked path's two frames; with hooks the hooked path runs them, also under
    ``fullgraph=True`` (their registries are swapped by function pairs: a context manager's
    generator in those frames was traced, an error under ``fullgraph=True``)."""
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    _random_b(gm)
    compiled = torch.compile(gm, fullgraph=True, backend="eager")
    ids = token_ids(2, 5)
    with torch.no_grad():
        want = gm(ids, use_cache=False).logits
        compiled(ids, use_cache=False)
        cls = type(gm)

        def hooked(*_args, **_kwargs):
            raise AssertionError("a call without hooks took the hooked path")

        with monkeypatch.context() as patch:
            patch.setattr(cls, "_hooked_call", hooked)
            patch.setattr(cls, "_serve", hooked)
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, want)
            torch.testing.assert_close(gm(ids, use_cache=False).logits, want)
        seen = []
        pre = gm.register_forward_pre_hook(lambda module, args: seen.append(len(args)))
        post = gm.register_forward_hook(lambda module, args, out: out.__setitem__("logits", out["logits"] * 2))
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, want * 2)
        torch.testing.assert_close(gm(ids, use_cache=False).logits, want * 2)
        pre.remove()
        post.remove()
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, want)
    assert seen == [1, 1] and _graphs() >= 1


def test_an_assigned_forward_under_compile_compiles_the_program():
    """accelerate's mixed-precision wrapper is an instance ``forward`` that calls the class one; under
    ``torch.compile(gm)`` the program must be compiled too (it ran eagerly inside a disabled frame),
    equal to eager, with gradients, and eval switching must not recompile it."""
    import functools

    graphs = []

    def backend(graph, inputs):
        graphs.append(sum(1 for n in graph.graph.nodes if n.op == "call_function"))
        return graph.forward

    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    gm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    _random_b(gm)
    gm.set_adapter("default")
    ids = token_ids(2, 5)
    want = gm(ids, use_cache=False).logits
    original = gm.forward

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            return original(*args, **kwargs)

    gm.forward = wrapper
    compiled = torch.compile(gm, backend=backend)
    out = compiled(ids, use_cache=False).logits
    torch.testing.assert_close(out, want)
    out.square().mean().backward()
    assert all(p.grad is not None for n, p in gm.named_parameters() if p.requires_grad)
    assert max(graphs) > 50  # the program's graph, not only the wrapper's pieces around it
    gm.eval()
    with torch.no_grad():
        compiled(ids, use_cache=False)
        before = len(graphs)
        for name in ["b", "default"]:
            gm.set_adapter(name)
            eager = gm(ids, use_cache=False).logits
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, eager)
    assert len(graphs) == before
