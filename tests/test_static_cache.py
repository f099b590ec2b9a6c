"""Static KV cache (``cache_implementation="static"``) and the KV-cache call contract.

The reference is PEFT's ``generate`` on the same weights (random LoRA A and B) with the same cache,
and the base model's. A ``StaticCache`` is a graph input whose tensors the program updates in place
(``index_copy_``, no copy of the cache), so the caller's tensors keep their addresses from step to
step; one program serves prefill and every decode step, whatever the prompt and cache lengths.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from models import randomize_b, tiny_llama, token_ids

import graphlora
from graphlora import LoraConfig
from graphlora.calls import CallSpec
from graphlora.errors import SignatureError

TARGETS = ["q_proj", "v_proj", "down_proj"]
PAD = 0
STATIC = {"cache_implementation": "static"}


def _cache_name(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _prompt(batch: int = 3, seq: int = 6, seed: int = 3):
    """A left-padded batch: row 0 has 2 pads, row 1 has 1, the rest none."""
    ids = token_ids(batch, seq, seed=seed)
    mask = torch.ones_like(ids)
    for row, pads in enumerate((2, 1)[:batch]):
        ids[row, :pads], mask[row, :pads] = PAD, 0
    return ids, mask


def _gen(model, ids, mask, **kwargs):
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": PAD, **kwargs}
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **kwargs)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """(gm, PEFT model, base model) on the same weights (one decoder layer)."""
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(tiny_llama(seed=0, layers=1), config).eval()
        path = tmp_path_factory.mktemp("static")
        ref.save_pretrained(path)
        gm = graphlora.inject(tiny_llama(seed=0, layers=1), str(path))
    return gm.eval(), ref, tiny_llama(seed=0, layers=1)


def _static_keys(gm):
    return [key for key in gm.programs.keys() if any(d[0] == "cache" and d[1] == "StaticCache" for _, d in key[0])]


def test_static_generate_equals_peft_and_base(trio):
    gm, ref, plain = trio
    ids, mask = _prompt()
    ours = _gen(gm, ids, mask, **STATIC)
    assert torch.equal(ours, _gen(ref, ids, mask, **STATIC))
    assert torch.equal(ours, _gen(gm, ids, mask))  # the dynamic cache gives the same tokens
    beams = {"num_beams": 2, "num_return_sequences": 2, **STATIC}  # transformers reorders the cache's rows
    assert torch.equal(_gen(gm, ids, mask, **beams), _gen(ref, ids, mask, **beams))
    with gm.disable_adapter():
        off = _gen(gm, ids, mask, **STATIC)
    assert torch.equal(off, _gen(plain, ids, mask, **STATIC))
    assert not torch.equal(ours, off), "the adapter should change the tokens (random LoRA B)"
    # one program (per mode) for the prefill and one for every decode step: the cache is allocated before
    # the first call, and one-token calls have their own trace (torch.export takes a traced 2 as "2 or more")
    assert len({key[0] for key in _static_keys(gm)}) == 2
    assert "forward" not in gm.get_base_model().__dict__


def test_static_switching_adapters_and_lengths_never_retraces(trio):
    gm, _, _ = trio
    if "other" not in gm.adapters:
        gm.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS))
        randomize_b(gm, "other", seed=7, std=0.3)
    ids, mask = _prompt()
    gm.set_adapter("default")
    first = _gen(gm, ids, mask, **STATIC)
    count = len(gm.programs)
    gm.set_adapter("other")
    try:
        second = _gen(gm, ids, mask, **STATIC)
        assert not torch.equal(first, second)
        longer, longer_mask = _prompt(batch=2, seq=9, seed=5)  # other batch, prompt and cache lengths
        _gen(gm, longer, longer_mask, max_new_tokens=6, **STATIC)
        assert len(gm.programs) == count
        assert torch.equal(second, _gen(gm, ids, mask, adapter_names=["other"] * 3, **STATIC))  # mixed programs
    finally:
        gm.set_adapter("default")


def test_static_cache_is_updated_in_place(trio):
    """Direct calls: the caller's StaticCache is filled in place (same tensors, no copy in the graph),
    and the logits equal a full recompute."""
    from transformers import StaticCache

    gm, _, _ = trio
    name = _cache_name(gm.get_base_model())
    ids = token_ids(2, 7, seed=5)
    cache = StaticCache(config=gm.get_base_model().config, max_cache_len=12)
    with torch.no_grad():
        out = gm(input_ids=ids[:, :5], use_cache=True, **{name: cache})
        layer = cache.layers[0]
        keys, values = layer.keys, layer.values
        assert layer.is_initialized and keys.shape[2] == 12 and int(layer.cumulative_length) == 5
        assert getattr(out, name).layers[0].keys is keys  # the returned cache holds the caller's tensors
        for pos in (5, 6):
            step = gm(input_ids=ids[:, pos:pos + 1], position_ids=torch.full((2, 1), pos), use_cache=True,
                      **{name: cache})
        full = gm(input_ids=ids).logits
    assert layer.keys is keys and layer.values is values and int(layer.cumulative_length) == 7
    torch.testing.assert_close(out.logits, full[:, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.logits, full[:, -1:], atol=1e-5, rtol=1e-5)
    for key in _static_keys(gm):
        graph = gm.programs._programs[key].module.graph
        targets = {str(n.target) for n in graph.nodes if n.op == "call_function"}
        assert "aten.index_copy_.default" in targets  # in place into the input tensors
        assert not targets & {"aten.copy_.default", "aten.index_copy.default", "aten._local_scalar_dense.default"}


def test_a_new_static_cache_gets_the_tensors_of_a_dead_one_never_of_a_live_one(trio):
    """transformers makes a new StaticCache for every generate call: graphlora initializes it with the
    previous cache's tensors (zeroed) once that cache object is gone, so the addresses a CUDA graph
    recorded stay valid; a cache still referenced keeps its own tensors and contents."""
    import gc

    from transformers import StaticCache

    gm, _, _ = trio
    name = _cache_name(gm.get_base_model())
    config = gm.get_base_model().config
    ids = token_ids(2, 5, seed=8)

    def prefill(cache):
        with torch.no_grad():
            return gm(input_ids=ids, use_cache=True, **{name: cache}).logits

    first = StaticCache(config=config, max_cache_len=12)
    want = prefill(first)
    address = first.layers[0].keys.data_ptr()
    del first
    gc.collect()
    second = StaticCache(config=config, max_cache_len=12)
    got = prefill(second)
    assert second.layers[0].keys.data_ptr() == address  # the dead cache's tensors, zeroed before use
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    kept = second.layers[0].keys.clone()
    third = StaticCache(config=config, max_cache_len=12)  # second is alive: third allocates its own
    prefill(third)
    assert third.layers[0].keys.data_ptr() != address and torch.equal(second.layers[0].keys, kept)
    other = StaticCache(config=config, max_cache_len=20)  # another length: its own tensors
    del second, third
    gc.collect()
    prefill(other)
    assert other.layers[0].keys.shape[2] == 20


@pytest.mark.parametrize("alias", [False, True], ids=["own-name", "alias"])
def test_cache_call_contract_under_both_names(trio, alias):
    """``gm(ids, use_cache=True)`` returns a cache the next call takes as ``cache=`` or ``past_key_values=``."""
    gm, _, _ = trio
    own = _cache_name(gm.get_base_model())
    name = next(n for n in ("cache", "past_key_values") if n != own) if alias else own
    ids = token_ids(2, 7, seed=6)
    with torch.no_grad():
        out = gm(input_ids=ids[:, :-1], use_cache=True)
        nxt = gm(input_ids=ids[:, -1:], attention_mask=torch.ones_like(ids), use_cache=True,
                 **{name: getattr(out, own)})
        full = gm(input_ids=ids).logits
    torch.testing.assert_close(nxt.logits, full[:, -1:], atol=1e-5, rtol=1e-5)
    assert getattr(nxt, own).get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("start", ["empty DynamicCache", "returned cache"])
def test_a_cache_object_passed_in_is_updated_in_place_as_the_models_is(trio, start):
    """A loop that keeps passing one cache object (``cache = DynamicCache(); model(tok, cache=cache)``)
    works as on the model and on PEFT's: the object holds every step, and the output carries it."""
    from transformers import DynamicCache

    gm, ref, _ = trio
    own = _cache_name(gm.get_base_model())
    ids = token_ids(2, 8, seed=9)
    with torch.no_grad():
        full = gm(input_ids=ids).logits
        theirs = DynamicCache()
        ref(input_ids=ids[:, :5], use_cache=True, **{own: theirs})
        cache = DynamicCache() if start == "empty DynamicCache" else None
        out = gm(input_ids=ids[:, :5], use_cache=True, **({own: cache} if cache is not None else {}))
        cache = getattr(out, own) if cache is None else cache
        assert getattr(out, own) is cache and cache.get_seq_length() == theirs.get_seq_length() == 5
        for i in range(5, 8):
            mask = torch.ones(2, i + 1, dtype=torch.long)
            step = gm(input_ids=ids[:, i:i + 1], attention_mask=mask, use_cache=True, **{own: cache})
            peft_step = ref(input_ids=ids[:, i:i + 1], attention_mask=mask, use_cache=True, **{own: theirs})
            assert getattr(step, own) is cache and cache.get_seq_length() == theirs.get_seq_length() == i + 1
            torch.testing.assert_close(step.logits[:, -1], full[:, i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step.logits, peft_step.logits, atol=1e-5, rtol=1e-5)


class _Old(torch.nn.Module):
    """A forward that names the cache ``past_key_values`` (transformers 5.17)."""

    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return input_ids


class _New(torch.nn.Module):
    """A forward that names the cache ``cache`` (transformers 5.24)."""

    def forward(self, input_ids=None, cache=None, use_cache=None):
        return input_ids


def test_bind_maps_the_cache_alias_both_ways():
    old = CallSpec.of(_Old(), "export")
    marker = object()
    assert old.bind((), {"input_ids": 1, "cache": marker})["past_key_values"] is marker
    new = CallSpec.of(_New(), "export")
    bound = new.bind((), {"input_ids": 1, "past_key_values": marker})
    assert bound["cache"] is marker and "past_key_values" not in bound
    assert new.bind((), {"input_ids": 1, "past_key_values": None, "cache": marker})["cache"] is marker
    with pytest.raises(SignatureError, match="twice"):
        new.bind((), {"cache": marker, "past_key_values": object()})


def test_sliding_static_cache_is_refused_with_the_fix(trio):
    from transformers import MistralConfig, StaticCache

    gm, _, _ = trio
    config = MistralConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=4)
    cache = StaticCache(config=config, max_cache_len=8)
    count = len(gm.programs)
    with torch.no_grad(), pytest.raises(SignatureError, match="cache_implementation"):
        gm(input_ids=token_ids(2, 3), use_cache=True, **{_cache_name(gm.get_base_model()): cache})
    assert len(gm.programs) == count
    # the caller's cache is as it was: the refused call allocated nothing in it
    assert not any(layer.is_initialized for layer in cache.layers)
    assert all(layer.keys is None and layer.values is None for layer in cache.layers)


def test_compiled_gm_takes_and_returns_a_dynamic_cache(trio):
    """``torch.compile(gm)`` with a DynamicCache: the program's output cache is unflattened inside the
    compiled frame (torch 2.13's dynamo failed on transformers' ``zip_longest`` there)."""
    gm, _, _ = trio
    own = _cache_name(gm.get_base_model())
    ids = token_ids(2, 7, seed=8)
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend="eager")
    with torch.no_grad():
        out = compiled(input_ids=ids[:, :-1], use_cache=True)
        nxt = compiled(input_ids=ids[:, -1:], attention_mask=torch.ones_like(ids), use_cache=True,
                       **{own: getattr(out, own)})
        full = gm(input_ids=ids).logits
    torch.testing.assert_close(nxt.logits, full[:, -1:], atol=1e-5, rtol=1e-5)


def test_generate_compiles_the_static_decode_as_on_the_base_model(trio):
    """transformers' generate compiles the forward with a static cache (on CUDA; here forced with
    ``_compile_all_devices``): through the shadowed forward it compiles the programs, same tokens."""
    from transformers import CompileConfig

    gm, ref, _ = trio
    config = CompileConfig(backend="eager", mode=None)
    config._compile_all_devices = True
    ids, mask = _prompt()
    torch._dynamo.reset()
    source = gm.get_base_model()
    ours = _gen(gm, ids, mask, compile_config=config, **STATIC)
    # generate took the compiled path: the decode program ran compiled, the routing outside it
    compiled = [key for per_options in gm.programs._compiled.values() for key in per_options]
    assert len(compiled) == 1 and not hasattr(source, "_compiled_call")
    assert torch.equal(ours, _gen(ref, ids, mask, **STATIC))
    frames = dict(torch._dynamo.utils.counters["frames"])
    gm.disable_adapters()  # switching between generate calls: no new compile
    _gen(gm, ids, mask, compile_config=config, **STATIC)
    gm.enable_adapters()
    assert torch.equal(_gen(gm, ids, mask, compile_config=config, **STATIC), ours)
    assert dict(torch._dynamo.utils.counters["frames"]) == frames


def test_a_sliding_static_cache_stays_usable_with_pytree_after_registration():
    """graphlora registers ``StaticCache`` as a pytree node; one it cannot take apart (sliding
    layers) flattens to no leaves and comes back as the same object, as an unregistered leaf would."""
    from torch.utils import _pytree as pytree
    from transformers import MistralConfig, StaticCache

    from graphlora._compat import register_cache_pytree

    register_cache_pytree()
    config = MistralConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=4)
    cache = StaticCache(config=config, max_cache_len=8)
    leaves, spec = pytree.tree_flatten({"cache": cache, "x": torch.ones(2)})
    assert len(leaves) == 1 and pytree.tree_unflatten(leaves, spec)["cache"] is cache


def _tiny_mistral(window: int):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                           max_position_embeddings=64)
    return MistralForCausalLM(config).eval()


def test_a_sliding_window_cache_decodes_within_and_past_its_window():
    """A ``DynamicSlidingWindowLayer`` keeps the last ``window - 1`` positions; within that, decode
    steps equal the model's, and past it too (the count of tokens seen is a graph input there, see
    ``tests/test_sliding_window.py``): the returned cache counts 8 seen, keeps 3."""
    targets = ["q_proj", "v_proj"]
    model, gm = _tiny_mistral(16), graphlora.inject(_tiny_mistral(16), LoraConfig(r=4, target_modules=targets)).eval()
    own = _cache_name(model)
    ids = token_ids(1, 8, seed=4)
    with torch.no_grad():
        out = gm(input_ids=ids[:, :5], use_cache=True)
        step = gm(input_ids=ids[:, 5:6], use_cache=True, **{own: getattr(out, own)})
        torch.testing.assert_close(step.logits[:, -1], model(input_ids=ids[:, :6]).logits[:, -1],
                                   atol=1e-5, rtol=1e-5)
        model, gm = _tiny_mistral(4), graphlora.inject(_tiny_mistral(4), LoraConfig(r=4, target_modules=targets))
        gm.eval()
        long = gm(input_ids=ids[:, :7], use_cache=True)  # the prompt alone is right: 7 positions seen, 3 kept
        torch.testing.assert_close(long.logits, model(input_ids=ids[:, :7]).logits, atol=1e-5, rtol=1e-5)
        cache = getattr(long, own)
        assert cache.get_seq_length() == 7
        step = gm(input_ids=ids[:, 7:8], use_cache=True, **{own: cache})
        torch.testing.assert_close(step.logits[:, -1], model(input_ids=ids).logits[:, -1], atol=1e-5, rtol=1e-5)
        assert cache.get_seq_length() == 8 and cache.layers[0].keys.shape[-2] == 3


def test_a_call_outside_its_graphs_traced_sizes_gets_a_signature_error_and_changes_nothing(trio):
    """A decode step whose attention_mask misses the cached positions fails the program's shape
    guard: a ``SignatureError`` that names the call and the fix (not a bare ``AssertionError``), and
    the cache and later calls are as before."""
    gm, _, _ = trio
    own = _cache_name(gm.get_base_model())
    ids = token_ids(2, 7, seed=6)
    with torch.no_grad():
        out = gm(input_ids=ids[:, :-1], use_cache=True)
        cache = getattr(out, own)
        with pytest.raises(SignatureError, match=r"does not fit the sizes.*attention_mask must cover the cached"):
            gm(input_ids=ids[:, -1:], attention_mask=torch.ones(2, 6, dtype=torch.long), use_cache=True,
               **{own: cache})
        assert cache.get_seq_length() == 6
        from transformers import StaticCache

        fresh = StaticCache(config=gm.config, max_cache_len=16)  # a guard failure leaves it unallocated too
        with pytest.raises(SignatureError, match="does not fit the sizes"):
            gm(input_ids=ids, attention_mask=torch.ones(2, 40, dtype=torch.long), use_cache=True, **{own: fresh})
        assert not any(layer.is_initialized for layer in fresh.layers)
        nxt = gm(input_ids=ids[:, -1:], attention_mask=torch.ones_like(ids), use_cache=True, **{own: cache})
        torch.testing.assert_close(nxt.logits, gm(input_ids=ids).logits[:, -1:], atol=1e-5, rtol=1e-5)
