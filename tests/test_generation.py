"""Generation: ``gm.generate`` is transformers' loop through the adapted graphs, with a KV cache in the graph.

The reference is PEFT's ``generate`` on the same weights (random LoRA A and B), and the base
model's ``generate`` with adapters disabled. The KV-cache call contract is checked against a full
recompute; switching adapters must never add a program.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from models import randomize_b, tiny_gpt2, tiny_llama, token_ids
from snapshot import assert_unchanged, snapshot

import graphlora
from graphlora import LoraConfig

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}
#: one decoder layer: every call signature is a torch.export trace, and this file traces about ten
BUILD = {"llama": lambda: tiny_llama(seed=0, layers=1), "gpt2": lambda: tiny_gpt2(seed=0, layers=1)}
PAD = 0


def _cache_name(model) -> str:
    """transformers 5.24 calls the cache argument ``cache``; 5.17 ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _prompt(batch: int = 3, seq: int = 6):
    """A left-padded batch: row 0 has 2 pads, row 1 has 1, the rest none."""
    ids = token_ids(batch, seq, seed=3)
    mask = torch.ones_like(ids)
    for row, pads in enumerate((2, 1)[:batch]):
        ids[row, :pads], mask[row, :pads] = PAD, 0
    return ids, mask


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tmp_path_factory):
    """(arch, gm, PEFT model, base model) on the same weights."""
    import peft

    arch = request.param
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(BUILD[arch](), config).eval()
        path = tmp_path_factory.mktemp(arch)
        ref.save_pretrained(path)
        gm = graphlora.inject(BUILD[arch](), str(path))
    return arch, gm.eval(), ref, BUILD[arch]()


def _gen(model, ids, mask, **kwargs):
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": PAD, **kwargs}
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("mode", [{}, {"num_beams": 3}], ids=["greedy", "beam"])
def test_tokens_equal_peft_and_base(pair, mode):
    arch, gm, ref, plain = pair
    ids, mask = _prompt()
    ours, theirs = _gen(gm, ids, mask, **mode), _gen(ref, ids, mask, **mode)
    assert torch.equal(ours, theirs)
    with gm.disable_adapter():
        off = _gen(gm, ids, mask, **mode)
    assert torch.equal(off, _gen(plain, ids, mask, **mode))
    assert not torch.equal(ours, off), "the adapter should change the tokens (random LoRA B)"
    assert "forward" not in gm.get_base_model().__dict__  # the shadow forward is gone


@pytest.mark.parametrize("pair", ["llama"], indirect=True)  # GPT-2's cache programs: covered by generate
@pytest.mark.parametrize("new", [1, 2])
def test_cache_call_contract(pair, new):
    arch, gm, _, _ = pair
    name = _cache_name(gm.get_base_model())
    ids = token_ids(2, 7, seed=5)
    prompt, step = ids[:, :-new], ids[:, -new:]
    with torch.no_grad():
        out = gm(input_ids=prompt, use_cache=True)
        cache = getattr(out, name)
        assert cache.get_seq_length() == prompt.shape[1]
        nxt = gm(input_ids=step, attention_mask=torch.ones_like(ids), use_cache=True, **{name: cache})
        full = gm(input_ids=ids).logits
    torch.testing.assert_close(nxt.logits, full[:, -new:], atol=1e-5, rtol=1e-5)
    assert getattr(nxt, name).get_seq_length() == ids.shape[1]
    with torch.no_grad():  # the decode program serves other batch sizes and past lengths: no new trace
        count = len(gm.programs)
        one = gm(input_ids=ids[:1, :3], use_cache=True)
        nxt = gm(input_ids=ids[:1, 3:3 + new], attention_mask=torch.ones(1, 3 + new, dtype=torch.long),
                 use_cache=True, **{name: getattr(one, name)})
        full = gm(input_ids=ids[:1, :3 + new]).logits
    torch.testing.assert_close(nxt.logits, full[:, -new:], atol=1e-5, rtol=1e-5)
    assert len(gm.programs) == count


@pytest.fixture(scope="module")
def two(pair):
    """The pair's gm with a second adapter ``other`` (random B) on the same sites."""
    arch, gm, _, _ = pair
    if "other" not in gm.adapters:
        gm.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS[arch]))
        randomize_b(gm, "other", seed=7, std=0.3)
    gm.set_adapter("default")
    return gm


def test_switching_adapters_never_retraces(two):
    gm = two
    ids, mask = _prompt()
    first = _gen(gm, ids, mask)
    count = len(gm.programs)
    gm.set_adapter("other")
    try:
        second = _gen(gm, ids, mask)
        assert len(gm.programs) == count
        assert not torch.equal(first, second)
        assert torch.equal(second, _gen(gm, ids, mask, adapter_names=["other"] * 3))  # the mixed programs agree
    finally:
        gm.set_adapter("default")


@pytest.mark.parametrize("mode", [{}, {"num_beams": 2, "num_return_sequences": 2}], ids=["greedy", "beam"])
def test_adapter_names_equal_per_row_generation(two, mode):
    gm = two
    names = ["other", "__base__", "default"]
    ids, mask = _prompt()
    mixed = _gen(gm, ids, mask, adapter_names=names, **mode)
    per = 2 if mode else 1
    for row, name in enumerate(names):
        if name == "__base__":
            with gm.disable_adapter():
                alone = _gen(gm, ids, mask, **mode)
        else:
            gm.set_adapter(name)
            alone = _gen(gm, ids, mask, **mode)
        gm.set_adapter("default")
        rows = slice(row * per, (row + 1) * per)
        assert torch.equal(mixed[rows], alone[rows]), name


def test_unknown_argument_is_transformers_error(pair):
    arch, gm, _, plain = pair
    ids, mask = _prompt()
    with pytest.raises(ValueError) as theirs:
        _gen(plain, ids, mask, not_an_argument=1)
    before = snapshot(gm, gm.get_base_model())
    with pytest.raises(type(theirs.value), match="not_an_argument"):
        _gen(gm, ids, mask, not_an_argument=1)
    assert_unchanged(before, snapshot(gm, gm.get_base_model()))
    assert "forward" not in gm.get_base_model().__dict__


#: adapters on the encoder alone: they change the tokens only if the encoder runs through a program
ENCODER_ONLY = r"encoder\..*\.(q|v|wo)"


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1, num_heads=4,
                   decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def test_t5_encoder_and_decoder_run_through_programs(tmp_path):
    """Encoder-decoder: generate calls ``get_encoder()`` directly; the encoder runs through its own program."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(tiny_t5(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ENCODER_ONLY,
                                                             init_lora_weights=False)).eval()
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if "lora_B" in name:
                    p.mul_(30)  # a tiny random T5 is nearly constant: make the adapter matter
        ref.save_pretrained(tmp_path)
        gm = graphlora.inject(tiny_t5(), str(tmp_path)).eval()
    ids = token_ids(3, 6, seed=4)
    mask = torch.ones_like(ids)
    ids[0, 4:], mask[0, 4:] = PAD, 0  # T5 pads on the right
    kw = {"suppress_tokens": [PAD, 1], "output_scores": True, "return_dict_in_generate": True}
    for mode in ({}, {"num_beams": 2}):
        ours, theirs = _gen(gm, ids, mask, **kw, **mode), _gen(ref, ids, mask, **kw, **mode)
        assert torch.equal(ours.sequences, theirs.sequences)
        torch.testing.assert_close(torch.stack(ours.scores), torch.stack(theirs.scores), atol=1e-5, rtol=1e-5)
    with gm.disable_adapter():
        off = _gen(gm, ids, mask, **kw)
    plain = _gen(tiny_t5(), ids, mask, **kw)
    assert torch.equal(off.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(off.scores), torch.stack(plain.scores), atol=1e-5, rtol=1e-5)
    on = torch.stack(_gen(gm, ids, mask, **kw).scores)
    assert (on - torch.stack(off.scores))[..., 2:].abs().max() > 1e-3, "the encoder's adapter should change the scores"
    assert any("__graphlora_half__" in dict(key[0]) for key in gm.programs.keys())


def test_t5_encoder_gives_each_row_its_adapter():
    from graphlora.calls import MODES
    from graphlora.generation import run_encoder

    gm = graphlora.inject(tiny_t5(), LoraConfig(r=4, target_modules=ENCODER_ONLY, init_lora_weights=False))
    gm.add_adapter("b", LoraConfig(r=4, target_modules=ENCODER_ONLY, init_lora_weights=False))
    gm.eval()
    ids = torch.randint(2, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        rows = run_encoder(gm, kwargs, ["default", "b"]).last_hidden_state
        gm.set_adapter("b")
        only_b = run_encoder(gm, kwargs).last_hidden_state
        gm.set_adapter("default")
        only_default = run_encoder(gm, kwargs).last_hidden_state
    torch.testing.assert_close(rows[1], only_b[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rows[0], only_default[0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(only_b[1], only_default[1])
    assert all(key[1] in MODES for key in gm.programs.keys())


def test_a_dynamic_caches_leaves_are_counted_as_its_flatten_gives_them():
    """The program key counts a ``DynamicCache``'s leaves without flattening it (every decode step
    describes its cache): the count equals transformers' pytree flatten for empty, partly and fully
    filled caches, sliding-window layers among them; other caches are left to the flatten."""
    from torch.utils import _pytree as pytree
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    from graphlora._compat import register_cache_pytree
    from graphlora.generation import _dynamic_leaves, describe_cache

    register_cache_pytree()
    kv = torch.zeros(1, 2, 3, 4)
    for filled in ([], [0], [1, 3], [0, 1, 2, 3]):
        cache = DynamicCache()
        cache.layers = [DynamicSlidingWindowLayer(sliding_window=4) if i % 2 else DynamicLayer() for i in range(4)]
        for i in filled:
            cache.update(kv, kv, i)
        assert _dynamic_leaves(cache) == len(pytree.tree_flatten(cache)[0]) == 2 * len(filled)
        assert describe_cache(cache)[3] == 2 * len(filled)

    class Other(DynamicCache):  # not the registered node: left to the flatten (and refused there)
        pass

    assert _dynamic_leaves(Other()) is None
