"""The transformers model surface of the emitted module (graphlora/surface.py): attributes read from
the source model, save_pretrained / unload / merge_and_unload, call-time flags, pickling and deepcopy."""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import warnings

import pytest
import torch

import graphlora
from graphlora import LoraConfig

from models import main_output, randomize_b, tiny_llama, token_ids
from peft_oracle import run

IDS = token_ids(2, 5)
CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def gm():
    """One Llama with a non-zero ``default`` adapter; tests leave it unmerged with ``default`` active."""
    module = graphlora.inject(tiny_llama(seed=0, layers=1), LoraConfig(**CONFIG))
    randomize_b(module)
    return module


def test_model_attributes_come_from_the_source_model(gm):
    source = gm.get_base_model()
    assert gm.config is source.config and gm.generation_config is source.generation_config
    assert gm.device == torch.device("cpu") and gm.dtype == torch.float32
    assert gm.get_input_embeddings() is source.get_input_embeddings()
    assert gm.get_output_embeddings() is source.get_output_embeddings()
    assert gm.can_generate() is True
    adapters = sum(p.numel() for p in gm.graphlora.parameters())
    assert gm.num_parameters() == source.num_parameters() + adapters
    assert gm.num_parameters(only_trainable=True) == adapters
    embeddings = source.get_input_embeddings().weight.numel()
    assert gm.num_parameters(exclude_embeddings=True) == gm.num_parameters() - embeddings
    # nn.Module's own lookup still comes first: submodules, parameters, buffers
    assert gm.graphlora is gm.adapter_state.store
    assert gm.model.embed_tokens.weight is source.model.embed_tokens.weight


def test_a_missing_attribute_says_what_the_module_is(gm):
    with pytest.raises(AttributeError, match=r"the adapted graph of a LlamaForCausalLM .*no attribute 'not_there'"):
        gm.not_there
    assert not hasattr(gm, "not_there") and hasattr(gm, "config")
    with pytest.raises(AttributeError, match="push_to_hub.*without the adapters"):
        gm.push_to_hub


def test_save_pretrained_writes_files_peft_loads_with_equal_outputs(gm, tmp_path):
    written = gm.save_pretrained(tmp_path)
    assert written == [str(tmp_path)]
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0, layers=1), str(tmp_path)).eval()
    torch.testing.assert_close(run(theirs, IDS), run(gm, IDS), rtol=1e-5, atol=1e-5)
    assert gm.save_pretrained(tmp_path / "none", is_main_process=False) == []


def test_unload_is_the_source_model_without_adapters(gm):
    plain = gm.unload()
    assert plain is gm.get_base_model()
    assert "graphlora" not in dict(plain.named_modules())
    with gm.disable_adapter():
        torch.testing.assert_close(run(plain, IDS), run(gm, IDS))


def test_call_time_flags_work_as_on_the_model(gm):
    source = gm.get_base_model()
    with gm.disable_adapter(), torch.no_grad():
        ours = gm(input_ids=IDS, output_hidden_states=True)
        theirs = source(input_ids=IDS, output_hidden_states=True, use_cache=False)
        assert len(ours.hidden_states) == len(theirs.hidden_states) == 2
        for a, b in zip(ours.hidden_states, theirs.hidden_states):
            torch.testing.assert_close(a, b)
        as_tuple = gm(input_ids=IDS, return_dict=False)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], theirs.logits)
    # the adapters apply in these programs too
    torch.testing.assert_close(gm(input_ids=IDS, return_dict=False)[0], run(gm, IDS))


def test_call_time_flags_work_with_a_kv_cache_and_in_generate(gm):
    """``use_cache=True`` with ``output_hidden_states`` / ``return_dict=False`` (the constants are baked
    into the cache programs too), and ``generate(output_hidden_states=True)``, as on the model."""
    source = gm.get_base_model()
    cache = next(n for n in ("cache", "past_key_values") if n in inspect.signature(source.forward).parameters)
    with torch.no_grad():
        out = gm(input_ids=IDS[:, :-1], use_cache=True, output_hidden_states=True)
        assert len(out.hidden_states) == 2
        step = gm(input_ids=IDS[:, -1:], use_cache=True, return_dict=False, **{cache: getattr(out, cache)})
    assert isinstance(step, tuple)
    torch.testing.assert_close(step[0], run(gm, IDS)[:, -1:], rtol=1e-5, atol=1e-5)
    kwargs = dict(max_new_tokens=3, do_sample=False, output_hidden_states=True, return_dict_in_generate=True,
                  pad_token_id=0)
    with gm.disable_adapter(), torch.no_grad():
        ours, theirs = gm.generate(IDS, **kwargs), source.generate(IDS, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_output_attentions_equal_the_eager_models():
    model = tiny_llama(seed=0, layers=1)
    model.config._attn_implementation = "eager"  # sdpa returns no attention weights in transformers
    gm = graphlora.inject(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        ours = gm(input_ids=IDS, output_attentions=True).attentions
        theirs = model(input_ids=IDS, output_attentions=True, use_cache=False).attentions
    assert len(ours) == len(theirs) == 1
    torch.testing.assert_close(ours[0], theirs[0])


def _reload(gm, how):
    if how == "pickle":
        return pickle.loads(pickle.dumps(gm))
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(gm, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)
    return copy.deepcopy(gm)


@pytest.fixture(scope="module")
def two_adapters():
    gm = graphlora.inject(tiny_llama(seed=0, layers=1), LoraConfig(r=2, target_modules=["q_proj"]))
    gm.add_adapter("second", LoraConfig(r=4, target_modules=["v_proj"]))
    randomize_b(gm)
    gm.set_adapter_weights({"default": 0.5, "second": 1.0})
    return gm


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_round_trips_give_equal_outputs_and_an_independent_copy(two_adapters, how):
    gm = two_adapters
    expected = run(gm, IDS)
    copied = _reload(gm, how)
    assert copied.active_adapters == ["default", "second"] and copied.adapters == gm.adapters
    torch.testing.assert_close(run(copied, IDS), expected)
    with torch.no_grad():  # independent: its own base weights and adapters
        for _, _, branch in copied.graphlora.branches():
            branch.lora_B.weight.add_(1.0)
        copied.get_base_model().lm_head.weight.mul_(2.0)
    assert not torch.equal(run(copied, IDS), expected)
    torch.testing.assert_close(run(gm, IDS), expected)
    assert copied.get_base_model() is not gm.get_base_model()


def test_pickling_a_merged_module_is_refused_clearly():
    gm = graphlora.inject(tiny_llama(seed=0, layers=1), LoraConfig(r=2, target_modules=["q_proj"]))
    gm.merge_adapter()
    with pytest.raises(graphlora.AdapterStateError, match="unmerge_adapter"):
        pickle.dumps(gm)


def test_merge_and_unload_returns_the_transformers_model_that_saves_and_reloads(tmp_path):
    from transformers import LlamaForCausalLM, PreTrainedModel

    gm = graphlora.inject(tiny_llama(seed=0, layers=1), LoraConfig(**CONFIG))
    randomize_b(gm, seed=3)
    expected = run(gm, IDS)
    merged = gm.merge_and_unload()
    assert isinstance(merged, PreTrainedModel) and type(merged) is LlamaForCausalLM
    assert merged is gm.get_base_model() and gm.merged  # documented: gm stays merged over the same weights
    torch.testing.assert_close(run(merged, IDS), expected, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(run(reloaded, IDS), expected, rtol=1e-5, atol=1e-5)
    tokens = merged.generate(IDS, max_new_tokens=3, do_sample=False)
    assert tokens.shape == (2, 8)


def test_merge_and_unload_of_a_plain_module_is_still_a_graph_module():
    from models import FunctionalMLP

    gm = graphlora.inject(FunctionalMLP(), LoraConfig(r=2, target_modules=["fc1"]))
    randomize_b(gm)
    x = torch.randn(3, 12)
    expected = gm(x)
    plain = gm.merge_and_unload()
    assert isinstance(plain, torch.fx.GraphModule) and not isinstance(plain, graphlora.AdaptedGraphModule)
    torch.testing.assert_close(plain(x), expected)



@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_dtype_casts_after_inject_run_and_switch(cast):
    """A cast after inject re-traces from the cast source model (a trace bakes its casts): the
    forward runs in the new dtype, follows the adapters, and disabling gives the cast base exactly."""
    model = tiny_llama(seed=0, layers=1)
    gm = graphlora.inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_b(gm, seed=5, std=0.5)
    ids = token_ids(2, 7)
    with torch.no_grad():
        gm(input_ids=ids, labels=ids)  # a second program: forgotten by the cast, traced again
        want = main_output(gm(input_ids=ids)).float()
        getattr(gm, cast)()
        dtype = torch.bfloat16 if cast == "bfloat16" else torch.float16
        assert all(p.dtype == dtype for p in gm.parameters())
        got = main_output(gm(input_ids=ids))
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
        assert gm(input_ids=ids, labels=ids).loss.isfinite()
        with gm.disable_adapter():
            base = main_output(gm(input_ids=ids))
        assert torch.equal(base, main_output(model(input_ids=ids, use_cache=False)))
        assert not torch.equal(base, got)
        gm.float()  # and back (the weights keep the rounding of the round trip)
        back = main_output(gm(input_ids=ids))
        assert back.dtype == torch.float32
        torch.testing.assert_close(back, want, rtol=0.05, atol=0.05)
        with gm.disable_adapter():
            assert torch.equal(main_output(gm(input_ids=ids)), main_output(model(input_ids=ids, use_cache=False)))
