"""PEFT's ``trainable_token_indices`` (LoRA plus trained embedding rows) against PEFT.

Tiny Llama (untied embeddings), fp32: outputs within 1e-5 of PEFT for the active adapter, the base
when disabled, PEFT-format files both ways, gradients only into the active adapter's delta rows,
``merge_and_unload`` as PEFT's, and clear refusals that leave the model unchanged.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import graphlora
from graphlora import ConfigError, LoraConfig
from graphlora.passes.param_switch import rows_select
from graphlora.peft_format import CONFIG_NAME

from models import tiny_gpt2, tiny_llama, token_ids
from snapshot import assert_unchanged, snapshot

peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-5)
IDS = token_ids()
ROWS_A = [int(IDS[0, 1]), int(IDS[1, 3]), 5]
ROWS_B = [int(IDS[0, 4]), 2]
KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
DELTA = "graphlora.trainable_tokens.model_embed_tokens.deltas."


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.detach().clone()


def peft_model(adapter="default", seed=0, **kwargs):
    """PEFT model with random LoRA weights and perturbed trainable rows."""
    kwargs.setdefault("init_lora_weights", False)
    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, **kwargs), adapter_name=adapter).eval()
    perturb_peft(model, adapter, seed)
    return model


def perturb_peft(model, adapter, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        delta = model.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta[adapter]
        delta.add_(torch.randn(delta.shape, generator=gen))


def peft_load(path, adapter="default"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(tiny_llama(), str(path), adapter_name=adapter).eval()


def make_gm():
    return graphlora.inject(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=ROWS_A))


@pytest.fixture
def gm():
    return make_gm()


@pytest.fixture(scope="module")
def shared_gm():
    """For refusals only: each must leave it unchanged (checked), so the tests can share it."""
    return make_gm()


def delta_of(gm, adapter="default"):
    return dict(gm.named_parameters())[DELTA + adapter]


# ------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("indices", [ROWS_A, {"embed_tokens": ROWS_A}])
def test_peft_file_matches_and_disables(indices, tmp_path):
    ref = peft_model(trainable_token_indices=indices)
    ref.save_pretrained(tmp_path)
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"]))
    gm.load_adapter(tmp_path, "tt", activate=True)
    stored = {k: tuple(v) for k, v in indices.items()} if isinstance(indices, dict) else tuple(indices)
    assert gm.adapters["tt"].trainable_token_indices == stored
    expected = logits(ref)
    torch.testing.assert_close(logits(gm), expected, **TOL)
    with ref.disable_adapter():
        base = logits(ref)
    assert not torch.allclose(base, expected, **TOL)
    gm.disable_adapters()
    torch.testing.assert_close(logits(gm), base, **TOL)
    assert torch.equal(logits(gm), logits(graphlora.inject(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"]))))


def test_init_is_the_original_rows(gm):
    torch.testing.assert_close(delta_of(gm), tiny_llama().model.embed_tokens.weight[ROWS_A])
    gm.disable_adapters()
    base = logits(gm)
    gm.enable_adapters()
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if "lora_B" in name:
                p.zero_()
    assert torch.equal(logits(gm), base)  # initial rows: the base outputs exactly


def test_graphlora_files_load_in_peft_two_adapters(gm, tmp_path):
    gm.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj"], trainable_token_indices={"embed_tokens": ROWS_B},
                                   init_lora_weights=False))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if "lora_" in name or "trainable_tokens" in name:
                p.add_(torch.randn(p.shape, generator=gen))
    gm.save_adapter(tmp_path, adapter_name=None)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["trainable_token_indices"] == ROWS_A
    assert json.loads((tmp_path / "b" / CONFIG_NAME).read_text())["trainable_token_indices"] == {"embed_tokens": ROWS_B}
    ref = peft_load(tmp_path)
    ref.load_adapter(str(tmp_path / "b"), adapter_name="b")
    code = gm.code
    outs = {}
    for name in ("default", "b"):
        gm.set_adapter(name)
        ref.set_adapter(name)
        outs[name] = logits(gm)
        torch.testing.assert_close(outs[name], logits(ref), **TOL)
    assert not torch.allclose(outs["default"], outs["b"], **TOL)
    gm.set_adapter("default")
    assert gm.code == code  # switching writes the slot buffer: no re-trace
    assert torch.equal(logits(gm), outs["default"])
    peft_rows = dict(ref.named_parameters())["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.b"]
    torch.testing.assert_close(peft_rows, delta_of(gm, "b"))


def test_state_dict_layout(gm):
    sd = gm.get_adapter_state_dict()
    assert sd[KEY].shape == (len(ROWS_A), 32)
    gm.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"]))
    assert KEY not in gm.get_adapter_state_dict("plain")
    gm.delete_adapter("default")
    assert not any("trainable_tokens" in n for n, _ in gm.named_parameters())
    gm.set_adapter("plain")
    torch.testing.assert_close(logits(gm)[0, 0], logits(gm)[0, 0])


# ------------------------------------------------------------------------------- training
def test_gradients_only_reach_active_delta(gm):
    gm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=ROWS_B))
    gm.set_adapter("default")
    gm.train()
    assert delta_of(gm).requires_grad and not delta_of(gm, "b").requires_grad
    weight = gm.get_base_model().model.embed_tokens.weight
    assert not weight.requires_grad
    gm(input_ids=IDS).logits.square().sum().backward()
    grad = delta_of(gm).grad
    used = [i for i, t in enumerate(ROWS_A) if (IDS == t).any()]
    unused = [i for i in range(len(ROWS_A)) if i not in used]
    assert grad[used].abs().sum() > 0 and torch.equal(grad[unused], torch.zeros_like(grad[unused]))
    assert delta_of(gm, "b").grad is None and weight.grad is None


def test_rows_select_is_exact_and_routes_gradients():
    base = torch.randn(6, 3)
    deltas = [torch.randn(2, 3, requires_grad=True), torch.randn(1, 3, requires_grad=True)]
    rows = [torch.tensor([1, 4]), torch.tensor([0])]
    for k in range(3):
        out = rows_select(torch.tensor(k), base, rows, deltas)
        expected = base if k == 0 else base.index_copy(0, rows[k - 1], deltas[k - 1])
        assert torch.equal(out, expected)
        grads = torch.autograd.grad(out.sum(), deltas, allow_unused=True)
        for i, g in enumerate(grads):
            assert torch.equal(g, torch.ones_like(g) if i == k - 1 else torch.zeros_like(g))


# ------------------------------------------------------------------------------- merge
def test_merge_and_unload_matches_peft(tmp_path):
    ref = peft_model(trainable_token_indices=ROWS_A)
    ref.save_pretrained(tmp_path)
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    gm.load_adapter(tmp_path, "m", activate=True)
    expected = logits(ref)
    merged_ref = ref.merge_and_unload()
    torch.testing.assert_close(logits(merged_ref), expected, **TOL)
    merged = gm.merge_and_unload()
    torch.testing.assert_close(logits(merged), expected, **TOL)
    torch.testing.assert_close(merged.model.embed_tokens.weight, merged_ref.model.embed_tokens.weight, **TOL)
    torch.testing.assert_close(logits(gm), expected, **TOL)
    gm.unmerge_adapter()
    assert torch.equal(gm.get_base_model().model.embed_tokens.weight, tiny_llama().model.embed_tokens.weight)
    torch.testing.assert_close(logits(gm), expected, **TOL)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(trainable_token_indices=[1, 1]), "repeats"),
    (dict(trainable_token_indices=[-1]), "non-negative"),
    (dict(trainable_token_indices="embed_tokens"), "list of token ids"),
    (dict(trainable_token_indices={"embed_tokens": [1.5]}), "non-negative int"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(target_modules=["q_proj"], **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(trainable_token_indices=[10_000]), "out of range"),
    (dict(trainable_token_indices={"embed_tokns": [1]}), "names no module"),
    (dict(trainable_token_indices={"lm_head": [1]}), "nn.Embedding modules only"),
    (dict(trainable_token_indices=[1], modules_to_save=["embed_tokens"]), "also in modules_to_save"),
    (dict(trainable_token_indices=[1], target_modules=["q_proj", "embed_tokens"]), "adapted site"),
])
def test_bad_configs_refused_unchanged(shared_gm, kwargs, match):
    kwargs.setdefault("target_modules", ["q_proj"])
    before = snapshot(shared_gm)
    with pytest.raises(ConfigError, match=match):
        shared_gm.add_adapter("bad", LoraConfig(r=2, **kwargs))
    assert_unchanged(before, snapshot(shared_gm))


def test_tied_embedding_refused():
    with pytest.raises(ConfigError, match="tied"):
        graphlora.inject(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=[1]))


def test_two_active_refused_and_mixed_batch_refused(gm):
    gm.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj"], trainable_token_indices=ROWS_B))
    before = snapshot(gm)
    with pytest.raises(ConfigError, match="embed_tokens"):
        gm.set_adapter(["default", "b"])
    assert_unchanged(before, snapshot(gm))
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        gm(input_ids=IDS, adapter_names=["default", "b"])


def test_hotswap_rows_in_place_and_other_ids_refused(tmp_path):
    first, second, other = tmp_path / "1", tmp_path / "2", tmp_path / "3"
    peft_model(trainable_token_indices=ROWS_A, seed=0).save_pretrained(first)
    ref = peft_model(trainable_token_indices=ROWS_A, seed=1)
    ref.save_pretrained(second)
    peft_model(trainable_token_indices=[1, 2, 3], seed=2).save_pretrained(other)
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"]))
    gm.load_adapter(first, "hs", activate=True)
    gm.load_adapter(second, "hs")
    torch.testing.assert_close(logits(gm), logits(ref), **TOL)
    before = snapshot(gm)
    with pytest.raises(graphlora.AdapterFileError, match="trainable_token_indices"):
        gm.load_adapter(other, "hs")  # same shapes, other rows: the ids cannot change in place
    assert_unchanged(before, snapshot(gm))


def test_weighted_adapter_refused(gm):
    gm.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(gm)
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        gm.add_weighted_adapter(["default", "plain"], [0.5, 0.5], "mix")
    assert_unchanged(before, snapshot(gm))


def test_generate_matches_peft(tmp_path):
    ref = peft_model(trainable_token_indices=ROWS_A)
    ref.save_pretrained(tmp_path)
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    gm.load_adapter(tmp_path, "g", activate=True)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = ref.generate(input_ids=IDS, **kwargs)
        assert torch.equal(gm.generate(input_ids=IDS, **kwargs), expected)
