"""The program set: every call signature is built by one pipeline and shares one store.

A first call with a new signature (``labels``, ``attention_mask``, a mixed batch) traces and
splices a new program, but never changes the module tree the user sees: ``named_modules()``,
``named_parameters()`` and ``state_dict()`` keys stay what ``inject`` returned. And every program
reads the same parameter objects (no copy).
"""

from __future__ import annotations

import torch
from models import randomize_b, tiny_llama, token_ids

import graphlora
from graphlora import LoraConfig


def _keys(gm):
    return ([n for n, _ in gm.named_modules()], [n for n, _ in gm.named_parameters()], list(gm.state_dict()))


def _llama():
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_b(gm, seed=3)
    return gm


def test_a_first_call_with_labels_leaves_the_module_tree_unchanged():
    gm = _llama()
    before = _keys(gm)
    ids = token_ids(2, 7)
    out = gm(input_ids=ids, labels=ids)
    assert out.loss is not None and len(gm.programs) == 2
    assert _keys(gm) == before


def test_a_first_call_with_one_tensor_as_ids_and_labels_traces_two_inputs():
    """``gm(input_ids=ids, labels=ids)`` first: ``torch.export`` would trace one input for both,
    and a later call with other labels would embed the labels. The program keeps them apart."""
    gm = _llama()
    ids, other = token_ids(2, 7, seed=1), token_ids(2, 7, seed=5)
    gm(input_ids=ids, labels=ids)
    got = gm(input_ids=ids, labels=other)
    with gm.disable_adapter():
        assert gm(input_ids=ids, labels=other).loss != gm(input_ids=other, labels=other).loss
    with torch.no_grad():  # the source model with the adapter's weights merged in
        gm.merge_adapter()
        want = gm.get_base_model()(input_ids=ids, labels=other)
        gm.unmerge_adapter()
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)


def test_a_first_call_with_attention_mask_leaves_the_module_tree_unchanged():
    gm = _llama()
    before = _keys(gm)
    ids = token_ids(3, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        got = gm(input_ids=ids, attention_mask=mask).logits
        want = gm.get_base_model()(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert len({p.key[0] for p in gm.programs}) == 2  # one new signature (its switch and serving forms)
    assert _keys(gm) == before
    # the adapter is applied in the new program too (B was randomized: outputs differ from the base)
    with gm.disable_adapter(), torch.no_grad():
        base = gm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(base, want, rtol=0, atol=0)
    assert not torch.equal(got, base)


def test_mixed_batches_and_later_adapters_leave_the_module_tree_unchanged_but_for_the_adapter():
    gm = _llama()
    ids = token_ids(2, 7)
    gm(input_ids=ids, labels=ids)
    before = _keys(gm)
    with torch.no_grad():
        gm(input_ids=ids, adapter_names=["default", "__base__"])
    assert _keys(gm) == before
    gm.add_adapter("other", LoraConfig(r=2, target_modules=["o_proj"]))
    modules, params, state = _keys(gm)
    assert set(before[0]) < set(modules) and set(before[1]) < set(params) and set(before[2]) < set(state)
    assert all("other" in n for n in set(params) - set(before[1]))


def test_every_program_reads_the_same_parameter_objects():
    gm = _llama()
    ids = token_ids(2, 7)
    gm(input_ids=ids, labels=ids)
    with torch.no_grad():
        gm(input_ids=ids, adapter_names=["default", "default"])
    mine = {id(p) for p in gm.parameters()}
    for program in gm.programs:
        assert {id(p) for p in program.module.parameters()} <= mine, program.key


def test_a_later_program_follows_train_eval_and_moves():
    gm = _llama()
    ids = token_ids(2, 7)
    gm(input_ids=ids, labels=ids)
    gm.train()
    assert all(m.training for p in gm.programs for m in p.module.modules())
    gm.eval()
    assert not any(m.training for p in gm.programs for m in p.module.modules())
    gm.to(torch.float64)  # the labels program's local state and the shared store move together
    with torch.no_grad(), gm.disable_adapter():
        out = gm(input_ids=ids, labels=ids)
        want = gm.get_base_model()(input_ids=ids, labels=ids, use_cache=False)
    assert gm.graphlora.row_index.dtype == torch.long
    assert all(p.dtype == torch.float64 for p in gm.parameters())
    torch.testing.assert_close(out.loss.double(), want.loss.double(), rtol=1e-4, atol=1e-4)
