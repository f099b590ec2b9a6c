"""LoRA on embedding lookups against PEFT's ``lora.Embedding``.

``y = E[ids] + s * A^T[ids] B^T`` with ``lora_embedding_A`` ``[r, num]`` and ``lora_embedding_B``
``[dim, r]``. Tiny Llama (``model.embed_tokens``) and GPT-2 (``transformer.wte``, tied to ``lm_head``),
fp32, random non-zero adapter weights: outputs, PEFT files both ways, merge, switching, refusals.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import graphlora
from graphlora import ConfigError, IA3Config, LoraConfig, MergeError
from graphlora.errors import AdapterFileError, TargetTypeError
from graphlora.methods.lora import lora_embedding_delta
from graphlora.peft_format import CONFIG_NAME, WEIGHTS_NAME

from models import token_ids
from peft_oracle import base, peft_from_pretrained, peft_model, run
from snapshot import assert_unchanged, snapshot

TOL = dict(rtol=1e-5, atol=1e-5)
IDS = token_ids(batch=2, seq=7)
EMB = "model.embed_tokens"
TARGETS = ["embed_tokens", "q_proj"]


def _key(site: str, part: str) -> str:
    return f"base_model.model.{site}.{part}"


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """PEFT's file for LoRA on ``embed_tokens`` and ``q_proj`` (random A and B everywhere)."""
    pm = peft_model("llama", r=4, lora_alpha=8, target_modules=TARGETS)
    with torch.no_grad():  # PEFT's init_lora_weights=False leaves the embedding's A random, B random: check
        a = pm.base_model.model.model.embed_tokens.lora_embedding_A["default"]
        assert a.abs().sum() > 0
    path = tmp_path_factory.mktemp("emb") / "peft"
    pm.save_pretrained(path)
    return path, run(pm, IDS)


@pytest.fixture(scope="module")
def loaded(peft_dir):
    """graphlora's module with PEFT's file loaded as ``default``."""
    return graphlora.inject(base("llama"), str(peft_dir[0]))


@pytest.fixture(scope="module")
def plain_gm():
    """A module with a ``v_proj`` adapter, for add_adapter / load_adapter calls (each cleans up)."""
    return graphlora.inject(base("llama"), LoraConfig(r=2, target_modules=["v_proj"]))


def test_peft_file_loads_with_equal_outputs_and_saves_back(peft_dir, loaded, tmp_path):
    path, expected = peft_dir
    theirs = load_file(str(path / WEIGHTS_NAME))
    assert _key(EMB, "lora_embedding_A") in theirs and _key(EMB, "lora_embedding_B") in theirs
    gm = loaded
    out = run(gm, IDS)
    torch.testing.assert_close(out, expected, **TOL)
    assert (out - run(base("llama"), IDS)).abs().max() > 1e-3  # the adapter matters
    kinds = {s.name: s.kind for s in gm.sites if s.ranks}
    assert kinds[EMB] == "embedding" and kinds["model.layers.0.self_attn.q_proj"] == "linear"
    gm.save_pretrained(tmp_path / "ours")
    ours = load_file(str(tmp_path / "ours" / WEIGHTS_NAME))
    # PEFT also writes its copy of the base table (save_embedding_layers="auto"); graphlora does not
    table = _key(EMB, "base_layer.weight")
    assert table in theirs and ours.keys() == theirs.keys() - {table}
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    back = peft_from_pretrained("llama", str(tmp_path / "ours"))
    torch.testing.assert_close(run(back, IDS), expected, **TOL)


def test_graphlora_adapter_matches_peft_with_the_same_weights(tmp_path):
    """Built by graphlora (init, random weights written in), read by PEFT: equal outputs."""
    gm = graphlora.inject(base("llama"), LoraConfig(r=3, lora_alpha=6, target_modules=["embed_tokens"]))
    branch = gm.adapter_state.branch(EMB, "default")
    # PEFT's init: A zeros, B normal, so the adapter starts as the identity
    assert torch.count_nonzero(branch.lora_embedding_A) == 0 and torch.count_nonzero(branch.lora_embedding_B) > 0
    torch.testing.assert_close(run(gm, IDS), run(base("llama"), IDS), rtol=0, atol=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        branch.lora_embedding_A.copy_(torch.randn(branch.lora_embedding_A.shape, generator=gen) * 0.1)
    # an independent reference: E[ids] + s A^T[ids] B^T through the base model's inputs_embeds
    ref_model = base("llama")
    with torch.no_grad():
        emb = ref_model.model.embed_tokens(IDS)
        emb = emb + 2.0 * (branch.lora_embedding_A.t()[IDS] @ branch.lora_embedding_B.t())
        reference = ref_model(inputs_embeds=emb).logits
    torch.testing.assert_close(run(gm, IDS), reference, **TOL)
    frozen = graphlora.specialize(gm)  # gate a constant: same output
    torch.testing.assert_close(frozen(input_ids=IDS, use_cache=False)[0], reference, **TOL)
    with gm.disable_adapter():  # gate 0: the branch is gone and the lookup is the base's
        frozen = graphlora.specialize(gm)
    assert not any(n.target is lora_embedding_delta for n in frozen.graph.nodes)
    torch.testing.assert_close(frozen(input_ids=IDS, use_cache=False)[0], run(base("llama"), IDS), rtol=0, atol=0)
    gm.save_pretrained(tmp_path / "ours")
    torch.testing.assert_close(run(peft_from_pretrained("llama", str(tmp_path / "ours")), IDS), reference, **TOL)


def test_merge_equals_unmerged_and_switching_gives_the_base_exactly(peft_dir, loaded):
    path, expected = peft_dir
    gm = loaded
    plain = run(base("llama"), IDS)
    table = gm.get_base_model().model.embed_tokens.weight.detach().clone()
    with gm.disable_adapter():
        torch.testing.assert_close(run(gm, IDS), plain, rtol=0, atol=0)
    gm.load_adapter(str(path), "other")
    gm.set_adapter("other")
    gm.set_adapter("default")
    torch.testing.assert_close(run(gm, IDS), expected, **TOL)
    gm.merge_adapter()
    torch.testing.assert_close(run(gm, IDS), expected, **TOL)
    assert (gm.get_base_model().model.embed_tokens.weight - table).abs().max() > 1e-3  # folded in
    gm.unmerge_adapter()
    torch.testing.assert_close(gm.get_base_model().model.embed_tokens.weight, table, rtol=0, atol=0)
    torch.testing.assert_close(run(gm, IDS), expected, **TOL)
    gm.disable_adapters()
    torch.testing.assert_close(run(gm, IDS), plain, rtol=0, atol=0)
    gm.enable_adapters()
    gm.delete_adapter("other")


def test_embedding_adapters_are_not_banked(plain_gm):
    gm = plain_gm
    gm.add_adapter("emb", LoraConfig(r=2, target_modules=["embed_tokens"]))
    try:
        branch = gm.adapter_state.branch(EMB, "emb")
        assert gm.adapter_state.rule("emb").bank_factors(branch) is None
        bankable = gm.adapter_state.bankable()
        assert "emb" not in bankable and "default" in bankable  # linear LoRA still banks
        with pytest.raises(ConfigError, match="embedding"):
            gm.add_weighted_adapter(["emb", "default"], [1.0, 1.0], "mix", combination_type="cat")
        assert "mix" not in gm.adapters
    finally:
        gm.delete_adapter("emb")


def test_a_file_without_lora_embedding_B_is_refused_with_nothing_loaded(peft_dir, plain_gm, tmp_path):
    path, _ = peft_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CONFIG_NAME).write_bytes((path / CONFIG_NAME).read_bytes())
    tensors = load_file(str(path / WEIGHTS_NAME))
    del tensors[_key(EMB, "lora_embedding_B")]
    save_file(tensors, str(bad / WEIGHTS_NAME))
    gm = plain_gm
    model = gm.get_base_model()
    before = snapshot(gm, model)
    with pytest.raises(AdapterFileError, match="lora_embedding_B"):
        gm.load_adapter(str(bad), "bad")
    assert_unchanged(before, snapshot(gm, model))


def test_all_linear_leaves_embeddings_out_and_other_methods_refuse_them(plain_gm):
    gm = plain_gm
    gm.add_adapter("all", LoraConfig(r=2, target_modules="all-linear"))
    plan = list(gm.adapter_state.plans["all"])
    gm.delete_adapter("all")
    assert EMB not in plan and "model.layers.0.mlp.down_proj" in plan and "lm_head" not in plan
    before = snapshot(gm, gm.get_base_model())
    with pytest.raises(TargetTypeError, match="embed_tokens"):
        gm.add_adapter("ia3", IA3Config(target_modules=["embed_tokens", "down_proj"],
                                        feedforward_modules=["down_proj"]))
    with pytest.raises(TargetTypeError, match="use_dora"):
        gm.add_adapter("dora", LoraConfig(r=2, target_modules=["embed_tokens"], use_dora=True))
    assert_unchanged(before, snapshot(gm, gm.get_base_model()))


def test_tied_gpt2_embedding_adapts_the_lookup_only_as_peft_does(tmp_path):
    """GPT-2's ``wte`` is tied to ``lm_head``: PEFT adapts the lookup and leaves the head on the base
    table; merging would change the head too, so graphlora refuses it."""
    pm = peft_model("gpt2", r=2, target_modules=["wte"])
    pm.save_pretrained(tmp_path / "peft")
    gm = graphlora.inject(base("gpt2"), str(tmp_path / "peft"))
    torch.testing.assert_close(run(gm, IDS), run(pm, IDS), **TOL)
    assert set(gm.adapter_state.plans["default"]) == {"transformer.wte"}
    with pytest.raises(MergeError, match="tied"):
        gm.merge_adapter()
    torch.testing.assert_close(run(gm, IDS), run(pm, IDS), **TOL)


def _padded_llama():
    model = base("llama")
    model.model.embed_tokens.padding_idx = 0  # as a config with pad_token_id=0 builds it
    return model


def test_the_padding_row_of_a_gets_no_gradient_as_in_peft(tmp_path):
    """PEFT looks ``A^T`` up with the base table's ``padding_idx``: the padding id's column of ``A``
    gets no gradient; with graphlora the same, and every other gradient equal."""
    import peft

    ref = peft.get_peft_model(_padded_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                               init_lora_weights=False))
    ref.save_pretrained(tmp_path)
    gm = graphlora.inject(_padded_llama(), str(tmp_path), is_trainable=True)
    ids = IDS.clone()
    ids[:, :2] = 0  # padding ids in the batch
    for model in (ref, gm):
        model.train()
        model(input_ids=ids).logits.float().pow(2).mean().backward()
    theirs = ref.base_model.model.model.embed_tokens.lora_embedding_A["default"].grad
    ours = gm.adapter_state.branch(EMB, "default").lora_embedding_A.grad
    assert theirs[:, 0].abs().max() == 0 and ours[:, 0].abs().max() == 0
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, **TOL)
