"""Sliding-window caches (Mistral ``sliding_window``, Gemma 2's sliding layers) past their window.

A ``DynamicSlidingWindowLayer`` keeps the last ``sliding_window - 1`` positions and counts what it
has seen; past the window the kept keys no longer give the count, which the graphs then take as an
input. The reference is PEFT on the same weights (random LoRA A and B): greedy ``generate`` (tokens
and every step's logits) and manual decode loops with a ``DynamicCache(config=...)``, whose
returned cache must hold what PEFT's holds. The programs are bounded: a second, longer prompt
traces nothing new.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from models import token_ids

import graphlora
from graphlora.errors import ConfigError

WINDOW = 8
TARGETS = ["q_proj", "v_proj"]


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW,
                           max_position_embeddings=64)
    return MistralForCausalLM(config).eval()


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW,
                          max_position_embeddings=64)  # layers: sliding, full
    return Gemma2ForCausalLM(config).eval()


BUILD = {"mistral": _mistral, "gemma2": _gemma2}


def _pair(arch, path):
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(BUILD[arch](), config).eval()
        ref.save_pretrained(path)
        gm = graphlora.inject(BUILD[arch](), str(path)).eval()
    return gm, ref


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return {arch: _pair(arch, tmp_path_factory.mktemp(arch)) for arch in BUILD}


def _cache_name(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _generate(model, ids):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("arch", list(BUILD))
def test_generate_past_the_window_equals_peft_with_bounded_programs(pairs, arch):
    """Prompts of 5 and 20 tokens, 16 new ones (window 8): the decode steps cross the window or
    start past it; greedy tokens and every step's logits equal PEFT's, and the longer prompt reuses
    the shorter one's programs (one within the window, one past it: never one per length)."""
    gm, ref = pairs[arch]
    counts = []
    for length in (5, 20):
        ids = token_ids(2, length, seed=length)
        ours, theirs = _generate(gm, ids), _generate(ref, ids)
        assert ours.sequences.shape[1] == length + 16 and torch.equal(ours.sequences, theirs.sequences)
        for mine, peft_logits in zip(ours.logits, theirs.logits):
            torch.testing.assert_close(mine, peft_logits, atol=1e-5, rtol=1e-5)
        counts.append(len(gm.programs))
    assert counts[1] == counts[0]


def test_manual_decode_loop_past_the_window_equals_peft_and_its_cache(pairs):
    """A loop over one ``DynamicCache(config=...)`` (no mask, no positions: the model reads them
    from the cache's count), steps of one and several tokens, within, across and past the window:
    each call's logits equal PEFT's and a full recompute's, and the caller's cache holds what PEFT's
    holds (count of tokens seen, the last ``window - 1`` keys)."""
    from transformers import DynamicCache

    gm, ref = pairs["mistral"]
    own = _cache_name(ref.get_base_model())
    ids = token_ids(2, 36, seed=7)
    with torch.no_grad():
        for chunks in ([20, 1, 3], [3, 2, 4, 10]):  # 5 -> 9 crosses the window, 9 -> 19 is past it
            ours, theirs, seen = DynamicCache(config=ref.config), DynamicCache(config=ref.config), 0
            for n in chunks:
                step = ids[:, seen:seen + n]
                seen += n
                out = gm(input_ids=step, use_cache=True, **{own: ours})
                expected = ref(input_ids=step, use_cache=True, **{own: theirs}).logits
                torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(out.logits, ref(input_ids=ids[:, :seen]).logits[:, -n:],
                                           atol=1e-5, rtol=1e-5)
                assert getattr(out, own) is ours and ours.get_seq_length() == theirs.get_seq_length() == seen
                for mine, peft_layer in zip(ours.layers, theirs.layers):
                    assert type(mine) is type(peft_layer)
                    torch.testing.assert_close(mine.keys, peft_layer.keys)
                    torch.testing.assert_close(mine.values, peft_layer.values)


def test_prefill_without_a_cache_object_serves_any_prompt_length(pairs):
    """``use_cache=True`` without a cache (the model makes a sliding-window one): a 5-token prompt
    and then a 20-token one run one program (its graph keeps the new positions untrimmed; the
    returned cache is trimmed to the window, as the model's own), and decoding from the long
    prompt's cache, past the window, equals PEFT."""
    gm, ref = pairs["mistral"]
    own = _cache_name(ref.get_base_model())
    with torch.no_grad():
        for length in (5, 20):
            ids = token_ids(2, length, seed=length + 1)
            out, expected = gm(input_ids=ids, use_cache=True), ref(input_ids=ids, use_cache=True)
            torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
            ours, theirs = getattr(out, own), getattr(expected, own)
            assert ours.get_seq_length() == theirs.get_seq_length() == length
            assert [layer.keys.shape for layer in ours.layers] == [layer.keys.shape for layer in theirs.layers]
        nxt = token_ids(2, 1, seed=3)
        step = gm(input_ids=nxt, use_cache=True, **{own: ours})
        torch.testing.assert_close(step.logits, ref(input_ids=nxt, use_cache=True, **{own: theirs}).logits,
                                   atol=1e-5, rtol=1e-5)


def test_a_sliding_cache_no_program_takes_is_refused_and_left_as_it_was(pairs):
    """A sliding-window layer that keeps neither every token it has seen (within its window) nor the
    last ``window - 1`` (past it), as one cut or grown by hand: a ``ConfigError`` with the counts and
    the workaround, before any trace, and the cache untouched."""
    from transformers import DynamicCache

    gm, ref = pairs["mistral"]
    own = _cache_name(ref.get_base_model())
    ids = token_ids(2, 16, seed=9)
    with torch.no_grad():
        cache = DynamicCache(config=ref.config)
        gm(input_ids=ids[:, :5], use_cache=True, **{own: cache})
        for layer in cache.layers:  # 15 seen, 15 kept: more than a window of 8 keeps
            layer.keys, layer.values = layer.keys.repeat(1, 1, 3, 1), layer.values.repeat(1, 1, 3, 1)
            layer.cumulative_length = 15
        count = len(gm.programs)
        with pytest.raises(ConfigError, match=r"neither.*15 tokens seen, sliding_window=8, 15 kept.*merge_adapter"):
            gm(input_ids=ids[:, 15:16], use_cache=True, **{own: cache})
        assert len(gm.programs) == count
        assert cache.get_seq_length() == 15 and cache.layers[0].keys.shape[-2] == 15
