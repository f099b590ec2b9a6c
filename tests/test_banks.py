"""Adapter banks (issue 13): serving reads stacked slots, so loaded-but-inactive adapters cost nothing,
adding into a free slot writes tensors only, and eval switching never recompiles.

Reference: the switch form (each adapter's own branch), itself checked against PEFT elsewhere, and
per-row runs for mixed batches.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import graphlora
from graphlora import LoraConfig
from graphlora.calls import BANK, SWITCH
from graphlora.errors import ConfigError

from models import main_output, randomize_b, tiny_llama, token_ids
from snapshot import assert_unchanged, snapshot

TARGETS = ["q_proj", "v_proj", "o_proj"]


def _gm(adapters: int = 1, ranks=(4,), **kw):
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=ranks[0], lora_alpha=8, target_modules=TARGETS, **kw))
    gm.configure_banks(max_loras=max(adapters, 2), max_lora_rank=max(ranks))
    randomize_b(gm, "default", seed=0)
    for i in range(1, adapters):
        name = f"a{i}"
        gm.add_adapter(name, LoraConfig(r=ranks[i % len(ranks)], lora_alpha=8, target_modules=TARGETS))
        randomize_b(gm, name, seed=i)
    gm.set_adapter("default")
    return gm.eval()


def _serve(gm, ids):
    with torch.no_grad():
        return main_output(gm(ids))


def _switch(gm, ids):
    with torch.enable_grad():  # grad enabled: the switch form, each adapter's own branch
        return main_output(gm(ids)).detach()


def _bank_program(gm):
    return next(p for p in gm.programs if p.mode == BANK)


def _adapter_reads(module) -> set[str]:
    """The adapter parameters a program's graph reads (``graphlora.<site>.<adapter>....``)."""
    return {n.target for n in module.graph.nodes
            if n.op == "get_attr" and n.target.startswith("graphlora.") and ".lora_" in n.target
            and "._banks." not in n.target}


def test_serving_equals_switch_form_for_every_adapter_and_combination():
    gm = _gm(adapters=3, ranks=(4, 8, 2))
    ids = token_ids()
    for active in (["default"], ["a1"], ["a2"], ["default", "a2"], ["a1", "a2", "default"]):
        gm.set_adapter(active)
        torch.testing.assert_close(_serve(gm, ids), _switch(gm, ids), atol=1e-6, rtol=1e-5)
    gm.set_adapter_weights({"a1": 0.5, "default": -1.25})
    torch.testing.assert_close(_serve(gm, ids), _switch(gm, ids), atol=1e-6, rtol=1e-5)
    gm.disable_adapters()
    with gm.disable_adapter():
        pass
    base = _serve(gm, ids)
    with torch.no_grad():
        plain = main_output(gm.get_base_model()(ids, use_cache=False))
    assert torch.equal(base, plain)  # disabled: exactly the base model


def test_sixteen_loaded_adapters_cost_what_one_costs():
    one, many = _gm(adapters=1), _gm(adapters=16, ranks=(4, 8))
    ids = token_ids()
    _serve(one, ids), _serve(many, ids)
    small, large = _bank_program(one).module, _bank_program(many).module
    assert len(small.graph.nodes) == len(large.graph.nodes)
    assert not _adapter_reads(small) and not _adapter_reads(large)  # only the banks are read
    # the switch form, by contrast, has one branch per loaded adapter
    switch = next(p for p in many.programs if p.mode == SWITCH).module
    assert len(_adapter_reads(switch)) == 16 * 2 * len(TARGETS) * 2


class CountingBackend:
    """A torch.compile backend that counts compilations and runs the graph eagerly."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, graph_module, example_inputs):
        self.compiles += 1
        return graph_module.forward


def test_eval_switching_and_hot_add_under_fullgraph_compile_never_recompile():
    gm = _gm(adapters=2)
    gm.configure_banks(max_loras=4, max_lora_rank=8, max_active=2)
    ids = token_ids()
    backend = CountingBackend()
    compiled = torch.compile(gm, backend=backend, fullgraph=True)
    with torch.no_grad():
        first = main_output(compiled(ids))
        assert backend.compiles == 1
        torch.testing.assert_close(first, _serve(gm, ids))
        for step in (lambda: gm.set_adapter("a1"), lambda: gm.set_adapter_weights({"default": 0.5, "a1": 2.0}),
                     gm.disable_adapters, gm.enable_adapters, lambda: gm.set_adapter(["a1", "default"])):
            step()
            out = main_output(compiled(ids))
            torch.testing.assert_close(out, _serve(gm, ids))
        gm.add_adapter("hot", LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS))
        randomize_b(gm, "hot", seed=7)
        gm.eval()
        out = main_output(compiled(ids))
        torch.testing.assert_close(out, _serve(gm, ids))
        torch.testing.assert_close(out, _switch(gm, ids), atol=1e-6, rtol=1e-5)
    assert backend.compiles == 1, f"recompiled {backend.compiles - 1} times"


def _non_lora_config(method: str):
    if method == "ia3":
        return graphlora.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                                   init_ia3_weights=False)
    if method == "loha":
        return graphlora.LoHaConfig(r=4, target_modules=TARGETS, init_weights=False)
    if method == "lokr":
        return graphlora.LoKrConfig(r=4, target_modules=TARGETS, init_weights=False)
    if method == "dora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False)
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head"],
                      init_lora_weights=False)


@pytest.mark.parametrize("method", ["dora", "ia3", "loha", "lokr", "modules_to_save"])
def test_eval_switching_of_every_method_under_fullgraph_compile_never_recompiles(method):
    """``set_adapter`` flips ``requires_grad`` (PEFT's rules) and dynamo guards on it: the serving form
    reads the other methods' parameters (and ``modules_to_save`` copies) through detached aliases,
    so switching among three adapters, disabling and enabling compile once, with the switch form's
    outputs."""
    gm = graphlora.inject(tiny_llama(), _non_lora_config(method))
    for name in ("a1", "a2"):
        gm.add_adapter(name, _non_lora_config(method))
    if method == "modules_to_save":  # give each adapter's lm_head copy its own weights
        for i, name in enumerate(("default", "a1", "a2")):
            gm.set_adapter(name)
            with torch.no_grad():
                for n, p in gm.graphlora.named_parameters():
                    if "lm_head" in n and f".{name}." in f".{n}.":
                        p.add_(0.1 * (i + 1))
    gm.set_adapter("default")
    gm.eval()
    ids = token_ids()
    backend = CountingBackend()
    compiled = torch.compile(gm, backend=backend, fullgraph=True)
    outputs = []
    for step in (lambda: None, lambda: gm.set_adapter("a1"), lambda: gm.set_adapter("a2"), gm.disable_adapters,
                 gm.enable_adapters, lambda: gm.set_adapter("default")):
        step()
        with torch.no_grad():
            out = main_output(compiled(ids))
        torch.testing.assert_close(out, _switch(gm, ids), atol=1e-6, rtol=1e-5)
        outputs.append(out)
    assert backend.compiles == 1, f"recompiled {backend.compiles - 1} times"
    assert not torch.allclose(outputs[1], outputs[2])  # the adapters differ, and the serving form follows
    torch.testing.assert_close(outputs[5], outputs[0])
    with torch.no_grad():  # disabled: the base model
        torch.testing.assert_close(outputs[3], main_output(tiny_llama()(ids, use_cache=False)))


def test_the_serving_aliases_follow_in_place_writes_and_a_replaced_parameter_after_eval():
    gm = graphlora.inject(tiny_llama(), _non_lora_config("ia3")).eval()
    ids = token_ids()
    vector = next(p for n, p in gm.graphlora.named_parameters() if n.endswith("ia3_l"))
    with torch.no_grad():
        vector.mul_(2.0)  # in place (an optimizer step): the alias shares the storage
    torch.testing.assert_close(_serve(gm, ids), _switch(gm, ids))
    vector.data = vector.data * 0.5  # a new tensor: read anew after eval(), as the banks are re-gathered
    gm.eval()
    torch.testing.assert_close(_serve(gm, ids), _switch(gm, ids))
    # load_state_dict(assign=True) gives new tensors too: read at once; an adapter name ending in "_"
    gm.add_adapter("v_", _non_lora_config("ia3"))
    gm.set_adapter(["default", "v_"])
    gm.eval()
    _serve(gm, ids)
    keys = {k: v * 3 for k, v in gm.state_dict().items() if k.endswith("ia3_l")}
    gm.load_state_dict(keys, strict=False, assign=True)
    torch.testing.assert_close(_serve(gm, ids), _switch(gm, ids))
    own = next(p for n, p in gm.graphlora.named_parameters() if n.endswith("ia3_l") and ".v_." in f".{n}")
    own.data = own.data * 0.5
    gm.eval()
    torch.testing.assert_close(_serve(gm, ids), _switch(gm, ids))
    assert not any(p.requires_grad for n, p in vars(_bank_program(gm).module).items() if n.startswith("_glora"))


def test_mixed_batch_of_sixteen_adapters_with_mixed_ranks_equals_per_row_runs():
    gm = _gm(adapters=16, ranks=(2, 4, 8, 6))
    names = ["default"] + [f"a{i}" for i in range(1, 16)]
    ids = token_ids(batch=16, seq=5, seed=3)
    with torch.no_grad():
        mixed = main_output(gm(ids, adapter_names=names))
        for row, name in enumerate(names):
            gm.set_adapter(name)
            torch.testing.assert_close(mixed[row], main_output(gm(ids[row:row + 1]))[0], atol=1e-6, rtol=1e-5)
        gm.set_adapter("default")
        base_rows = main_output(gm(ids[:2], adapter_names=["__base__", "a3"]))
        gm.disable_adapters()
        assert torch.equal(base_rows[0], main_output(gm(ids[:2]))[0])  # the base row: exactly the base model


def _fill(gm) -> int:
    """Add adapters until every slot is taken; returns the capacity."""
    capacity = gm.adapter_state.banks.capacity
    for i in range(len(gm.adapters), capacity):
        gm.add_adapter(f"a{i}", LoraConfig(r=4, target_modules=TARGETS))
    return capacity


def test_a_full_bank_grows_with_a_warning():
    gm = _gm(adapters=1)
    capacity = _fill(gm)
    with pytest.warns(UserWarning, match=f"banks grow from {capacity} slots"):
        gm.add_adapter("extra", LoraConfig(r=4, target_modules=TARGETS))
    assert gm.adapter_state.banks.capacity == 2 * capacity
    randomize_b(gm, "extra", seed=5)
    ids = token_ids()
    torch.testing.assert_close(_serve(gm, ids), _switch(gm, ids), atol=1e-6, rtol=1e-5)


def test_a_full_bank_without_growth_is_an_error_that_names_the_setting_and_changes_nothing():
    gm = _gm(adapters=2)
    capacity = _fill(gm)
    gm.configure_banks(grow=False)
    ids = token_ids()
    out = _serve(gm, ids)
    before = snapshot(gm)
    with pytest.raises(ConfigError, match=rf"configure_banks\(max_loras={capacity + 1}"):
        gm.add_adapter("extra", LoraConfig(r=4, target_modules=TARGETS))
    assert_unchanged(before, snapshot(gm))
    assert "extra" not in gm.adapters
    assert torch.equal(_serve(gm, ids), out)
    with pytest.raises(ConfigError, match="max_loras=0"):
        gm.configure_banks(max_loras=0)


def test_adapter_parameters_are_views_of_their_slots_so_training_updates_serving():
    gm = _gm(adapters=2, ranks=(4, 2))
    bank = gm.adapter_state.store.banks
    site = next(key for key, _ in bank.sites())
    for adapter, r in (("default", 4), ("a1", 2)):
        branch = gm.adapter_state.store.branch(site, adapter)
        slot = gm.adapter_slots()[adapter]
        assert branch.lora_A.weight.data_ptr() == bank.site(site).lora_A[slot].data_ptr()
        assert branch.lora_A.weight.shape == (r, bank.site(site).d_in)
    gm.train()
    gm.set_adapter("a1")
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.5)
    ids = token_ids()
    main_output(gm(ids)).pow(2).mean().backward()
    opt.step()
    gm.eval()
    torch.testing.assert_close(_serve(gm, ids), _switch(gm, ids), atol=1e-6, rtol=1e-5)
    # a gradient goes to the adapter's own [r, d] parameters, never to a bank
    assert all(b.grad is None for b in bank.buffers())


def test_dtype_cast_deepcopy_and_delete_keep_the_banks_bound():
    gm = _gm(adapters=3, ranks=(4, 8, 2))
    ids = token_ids()
    twin = copy.deepcopy(gm)
    torch.testing.assert_close(_serve(twin, ids), _serve(gm, ids))
    with torch.no_grad():  # the copy is independent: its banks follow its own parameters
        for p in twin.adapter_state.store.parameters():
            p.mul_(2)
    assert not torch.equal(_serve(twin, ids), _serve(gm, ids))
    torch.testing.assert_close(_serve(twin, ids), _switch(twin, ids), atol=1e-6, rtol=1e-5)
    gm.double()
    torch.testing.assert_close(_serve(gm, ids), _switch(gm, ids))
    gm.delete_adapter("a1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # re-adding into the freed slot grows nothing
        gm.add_adapter("again", LoraConfig(r=2, target_modules=TARGETS))
    assert gm.adapter_slots()["again"] == 1
    randomize_b(gm, "again", seed=11)
    gm.set_adapter(["again", "a2"])
    torch.testing.assert_close(_serve(gm, ids), _switch(gm, ids))


# ---------------------------------------------------------------------------- review regressions
def test_a_rolled_back_delete_keeps_the_weights_and_a_deleted_adapter_aliases_nothing(monkeypatch):
    gm = _gm(adapters=3)
    ids = token_ids()
    gm.set_adapter("a1")
    out, b = _serve(gm, ids), gm.adapter_state.branch("model.layers.0.self_attn.q_proj", "a1").lora_B.weight
    kept = b.detach().clone()

    def fail(self):
        raise RuntimeError("injected failure")

    with monkeypatch.context() as patch:
        patch.setattr(type(gm.programs), "invalidate", fail)
        with pytest.raises(RuntimeError, match="injected"):
            gm.delete_adapter("a1")
    assert torch.equal(b, kept) and torch.equal(_serve(gm, ids), out)
    torch.testing.assert_close(_serve(gm, ids), _switch(gm, ids), atol=1e-6, rtol=1e-5)
    gm.delete_adapter("a1")
    gm.add_adapter("c", LoraConfig(r=4, target_modules=TARGETS))
    randomize_b(gm, "c", seed=9)
    assert torch.equal(b, kept)  # the old parameter kept its values: not a view of c's slot


def test_load_state_dict_with_assign_and_saving_state_dicts(tmp_path):
    from safetensors.torch import save_file

    gm = _gm(adapters=2, ranks=(4, 2))  # a1 has rank 2 < the banks' 4: its B is a strided view of its slot
    ids = token_ids()
    gm.set_adapter("a1")
    state = {k: v.clone() * (1.5 if "lora_B" in k else 1.0) for k, v in gm.state_dict().items()}
    gm.load_state_dict(state, assign=True)
    gm.eval()
    torch.testing.assert_close(_serve(gm, ids), _switch(gm, ids), atol=1e-6, rtol=1e-5)
    adapter = {k: v for k, v in gm.state_dict().items() if ".lora_" in k}
    assert all(v.is_contiguous() and v.untyped_storage().nbytes() == v.numel() * v.element_size()
               for v in adapter.values())  # each its own r x d values, not the bank
    save_file(adapter, str(tmp_path / "adapter.safetensors"))  # (safetensors replaces its target file)


def test_pickling_keeps_the_bank_settings_and_each_adapters_dtype():
    import pickle

    base = tiny_llama().to(torch.bfloat16)
    gm = graphlora.inject(base, LoraConfig(r=2, target_modules=TARGETS), autocast_adapter_dtype=False)
    gm.configure_banks(max_loras=8, max_lora_rank=4, grow=False)
    gm.add_adapter("up", LoraConfig(r=2, target_modules=TARGETS), autocast_adapter_dtype=True)
    back = pickle.loads(pickle.dumps(gm))
    layout = back.adapter_state.banks
    assert (layout.capacity, layout.rank, layout.grow) == (8, 4, False)
    dtypes = {n: {p.dtype for _, _, b in back.graphlora.branches(n) for p in b.parameters()} for n in back.adapters}
    assert dtypes == {"default": {torch.bfloat16}, "up": {torch.float32}}
    assert back.adapter_state.autocast_adapter_dtype is False


def test_a_direct_forward_call_after_a_lazy_add_runs_the_new_graph():
    gm = _gm(adapters=1).train()
    ids = token_ids()
    gm.add_adapter("late", LoraConfig(r=4, target_modules=TARGETS))
    randomize_b(gm, "late", seed=4)
    direct = main_output(gm.forward(input_ids=ids, use_cache=False)).detach()
    torch.testing.assert_close(direct, main_output(gm(input_ids=ids)).detach(), rtol=0, atol=0)
    assert "late" in gm.code


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.5),
                                  lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
                                  lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=True)],
                         ids=["sgd", "adamw-fused", "adam-foreach"])
@pytest.mark.parametrize("back_to_eval", [True, False], ids=["eval", "still-training"])
def test_serving_after_an_optimizer_step_reads_the_new_weights(make, back_to_eval):
    """The bank form multiplies gathered copies of the active factors: an optimizer step (fused
    ones write without bumping version counters) must reach the next serving call, also when the
    step comes after ``eval()`` (then only the optimizer-step count can tell)."""
    gm = _gm(adapters=2)
    ids = token_ids()
    before = _serve(gm, ids)
    torch.testing.assert_close(before, _switch(gm, ids), atol=1e-6, rtol=1e-5)
    gm.train()
    opt = make([p for p in gm.parameters() if p.requires_grad])
    main_output(gm(ids)).square().mean().backward()
    if back_to_eval:
        opt.step()
        gm.eval()
    else:  # eval and serve first, then the step: only the optimizer-step count can tell
        gm.eval()
        torch.testing.assert_close(_serve(gm, ids), before)
        opt.step()
    after = _serve(gm, ids)
    assert (after - before).abs().max() > 1e-4  # the step changed the served output
    torch.testing.assert_close(after, _switch(gm, ids), atol=1e-6, rtol=1e-5)
    program = _bank_program(gm).module
    reads = {n.target for n in program.graph.nodes if n.op == "get_attr"}
    assert not [t for t in reads if t.endswith(".active") or t.endswith(".gate")]  # no per-call gather


def test_width_growth_inside_inference_mode_keeps_the_module_usable():
    """Buffers made while serving under ``torch.inference_mode()`` (a wider active set) are normal
    tensors: version counters work, and later calls outside inference mode serve right."""
    gm = _gm(adapters=3)
    ids = token_ids()
    with torch.inference_mode():
        gm.set_adapter(["default", "a1", "a2"])  # width 2 -> 3: new gate / a_hat / b_hat buffers
        inside = main_output(gm(ids)).clone()
    torch.testing.assert_close(inside, _switch(gm, ids), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_serve(gm, ids), inside)


def test_an_add_that_fits_places_only_the_new_adapter(monkeypatch):
    """Into a free slot of banks that already cover its sites, an add binds the new adapter's
    tensors only (banks.place_one); the whole placement (every adapter re-checked) is not run."""
    from graphlora import banks as banking

    gm = _gm(adapters=2)
    gm.configure_banks(max_loras=4)
    ids = token_ids()
    _serve(gm, ids)

    def whole(*args, **kwargs):
        raise AssertionError("the whole placement ran for an add that fits")

    monkeypatch.setattr(banking, "place", whole)
    gm.add_adapter("new", LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS))
    randomize_b(gm, "new", seed=9)
    torch.testing.assert_close(_serve(gm, ids), _switch(gm, ids), atol=1e-6, rtol=1e-5)
    assert gm.adapter_state.banks.slots["new"] not in {gm.adapter_state.banks.slots[a] for a in ("default", "a1")}
    gm.set_adapter("a1")  # the adapters placed before still serve from their slots
    torch.testing.assert_close(_serve(gm, ids), _switch(gm, ids), atol=1e-6, rtol=1e-5)


def test_bank_buffers_written_by_load_full_state_dict_are_served_at_once():
    """``graphlora.distributed.load_full_state_dict`` copies straight into the bank buffers (no
    adapter parameter is written, no sync runs): the next serving call must serve the new slots."""
    from graphlora import distributed

    gm, other = _gm(adapters=2), _gm(adapters=2)
    randomize_b(other, "default", seed=7)
    ids = token_ids()
    want = _serve(other, ids)
    banks = {k: v.clone() for k, v in distributed.full_state_dict(other).items()
             if "._banks." in k and k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "gate", "active")}
    before = _serve(gm, ids)  # the last thing before the load: nothing else may make it gather
    distributed.load_full_state_dict(gm, banks, strict=False)
    after = _serve(gm, ids)
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, want, atol=1e-6, rtol=1e-5)
