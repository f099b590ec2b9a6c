"""Static-cache decoding on architectures whose graphs differ from Llama's: OPT, Qwen2, Bloom.

The reference is PEFT on the same weights (random LoRA A and B) with the same ``StaticCache``.
Each model is checked in a manual decode loop (a prompt, one-token steps, a multi-token chunk:
one-token calls have their own program, traced with one new token) and through
``generate(cache_implementation="static")`` on a plain and a left-padded batch:

- OPT computes positions from the 2-d mask sliced by the cache's count of tokens seen;
- Qwen2's generate passes a dict of masks per layer type (``{"full_attention": None}`` unpadded);
- Bloom's generate passes a 2-d mask spanning the whole cache (its ALiBi bias covers every slot).
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import graphlora

VOCAB, PAD, MAX_LEN = 96, 1, 16


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=1,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                    pad_token_id=PAD))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4))


MODELS = {"opt": (_opt, ["q_proj", "v_proj", "fc2"]), "qwen2": (_qwen2, ["q_proj", "v_proj", "down_proj"]),
          "bloom": (_bloom, ["query_key_value", "dense_4h_to_h"])}


def _build(arch):
    torch.manual_seed(0)
    return MODELS[arch][0]().eval()


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, tmp_path_factory):
    """(arch, gm, PEFT model) on the same weights."""
    import peft

    arch = request.param
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODELS[arch][1], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(_build(arch), config).eval()
        path = tmp_path_factory.mktemp(arch)
        ref.save_pretrained(path)
        gm = graphlora.inject(_build(arch), str(path))
    return arch, gm.eval(), ref


def _prompt(padded: bool):
    ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if padded:
        ids[0, :2], mask[0, :2] = PAD, 0
    return ids, mask


def _cache_name(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _loop(model, arch, ids, mask):
    """Logits of a prompt, three one-token steps and a two-token chunk, all into one StaticCache."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=MAX_LEN)
    own = _cache_name(model.get_base_model())
    rows = ids.shape[0]
    chunk = torch.randint(2, VOCAB, (rows, 2), generator=torch.Generator().manual_seed(5))
    seen, out, logits = mask, None, []
    with torch.no_grad():
        for step in [ids, None, None, None, chunk]:
            if step is None:
                step = out.logits[:, -1].argmax(-1)[:, None]
            if out is not None:
                seen = torch.cat([seen, torch.ones_like(step)], dim=1)
            # Bloom's ALiBi bias spans every cache slot: its mask does too (as generate builds it)
            full = torch.cat([seen, seen.new_zeros(rows, MAX_LEN - seen.shape[1])], 1) if arch == "bloom" else seen
            out = model(step, attention_mask=full, use_cache=True, **{own: cache})
            logits.append(out.logits[:, -1])
    assert int(cache.layers[0].cumulative_length) == seen.shape[1]
    return logits


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
def test_static_cache_decode_loop_and_generate_equal_peft(pair, padded):
    arch, gm, ref = pair
    ids, mask = _prompt(padded)
    for ours, theirs in zip(_loop(gm, arch, ids, mask), _loop(ref, arch, ids, mask)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": PAD, "cache_implementation": "static"}
    with torch.no_grad():
        tokens = gm.generate(input_ids=ids, attention_mask=mask, **kwargs)
        assert torch.equal(tokens, ref.generate(input_ids=ids, attention_mask=mask, **kwargs))
    assert "forward" not in gm.get_base_model().__dict__


def test_one_token_and_chunk_calls_are_separate_programs(pair):
    """A filled-cache call's key says whether it feeds one token and whether it is a prompt into an
    empty StaticCache (its mask covers the new positions only): a decode loop runs one program for
    its prompt, one for its steps and one for a later chunk, whatever the batch, cache and prompt
    lengths. Bloom's masks span the cache, so its prompt and chunk share one."""
    from graphlora.calls import SWITCH
    from graphlora.generation import STEP

    arch, gm, _ = pair
    ids, mask = _prompt(True)
    _loop(gm, arch, ids, mask)
    loop = [dict(key[0]) for key in gm.programs.keys() if key[1] != SWITCH]
    loop = [key for key in loop if key.get("attention_mask") == ("tensor", torch.int64, 2)
            and "logits_to_keep" not in key]  # the manual loop's, not generate's
    bloom = arch == "bloom"
    expected = [(False, True, False), (True, True, False)] if bloom else [
        (False, False, False), (False, False, True), (True, False, False)]
    assert sorted(key[STEP][1] for key in loop) == expected
    count = len(gm.programs)
    _loop(gm, arch, ids[:1, 1:], mask[:1, 1:])  # another batch and prompt length: no new trace
    assert len(gm.programs) == count


def test_a_mask_of_the_wrong_length_is_a_signature_error_and_leaves_the_cache():
    """OPT's one-token program reads the cache's token count as a size and checks it against the
    mask while it runs; a mask one position too long fails that check before the cache is written,
    and says what the call was and what the mask must cover (was torch's bare RuntimeError)."""
    from transformers import StaticCache

    gm = graphlora.inject(_build("opt"), graphlora.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    ids, mask = _prompt(False)
    cache = StaticCache(config=gm.config, max_cache_len=MAX_LEN)
    with torch.no_grad():
        step = gm(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        gm(step, attention_mask=mask, past_key_values=cache, use_cache=True)
        keys = cache.layers[0].keys.clone()
        too_long = torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], 1)
        with pytest.raises(graphlora.SignatureError, match="attention_mask must cover the cached and the new"):
            gm(step, attention_mask=too_long, past_key_values=cache, use_cache=True)
    assert torch.equal(cache.layers[0].keys, keys)


def test_a_manual_loop_fills_the_cache_to_its_last_slot_as_peft(pair):
    """At the last step the 2-d mask (past + new) is as long as the cache, which is also the length
    of a spanning mask (Bloom's in generate): the one-token step must still be served (OPT's failed
    on its data-dependent positions) with PEFT's logits."""
    from transformers import StaticCache

    arch, gm, ref = pair
    if arch == "bloom":
        pytest.skip("Bloom's StaticCache takes a cache-length mask only: PEFT and the plain model fail on past + new")
    ids, mask = _prompt(False)
    length = ids.shape[1] + 3
    outs = []
    for model in (gm, ref):
        cache = StaticCache(config=model.config, max_cache_len=length)
        step_ids, step_mask, logits = ids, mask, []
        with torch.no_grad():
            for _ in range(4):  # the prompt, then 3 steps: the last one writes slot length - 1
                out = model(step_ids, attention_mask=step_mask, past_key_values=cache, use_cache=True).logits[:, -1]
                logits.append(out)
                step_ids = out.argmax(-1, keepdim=True)
                step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        outs.append(torch.stack(logits))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_calls_without_a_mask_fill_a_static_cache_as_peft(pair):
    """Without ``attention_mask`` (transformers 5.17's generate drops an all-ones one for a static
    cache), OPT builds ``ones(B, past + new)`` from the cache's token count: the prompt, the steps
    and the last slot (no padding left) are served with PEFT's logits."""
    from transformers import StaticCache

    arch, gm, ref = pair
    if arch == "bloom":
        pytest.skip("Bloom's StaticCache takes a cache-length mask only")
    ids, _ = _prompt(False)
    length = ids.shape[1] + 3

    def run(model):
        cache, logits = StaticCache(config=model.config, max_cache_len=length), []
        own, step, past = _cache_name(model.get_base_model()), ids, 0
        with torch.no_grad():
            for _ in range(4):  # the prompt, then three steps: the last fills slot length - 1
                # positions as generate passes them (without, OPT slices its own by the count:
                # torch 2.11 cannot trace that slice by a data-dependent size)
                positions = torch.arange(past, past + step.shape[1]).expand(step.shape[0], -1)
                out = model(step, position_ids=positions, use_cache=True, **{own: cache})
                logits.append(out.logits[:, -1])
                past += step.shape[1]
                step = out.logits[:, -1].argmax(-1)[:, None]
        assert int(cache.layers[0].cumulative_length) == length
        return logits

    for ours, theirs in zip(run(gm), run(ref)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
def test_a_loop_whose_first_traces_fail_on_the_count_is_traced_from_the_mask(monkeypatch, tmp_path, padded):
    """torch 2.11 cannot slice by the cache's data-dependent count (OPT's ``position_ids[:, past:]``):
    there every masked call of a manual loop fails its first trace, as a one-token step does on
    every torch. The retry reads the count from the mask (``past = mask length - new``); the prompt
    into the empty cache has its own program (traced with nothing cached), so the chunk's may hold
    ``past != 0``. Here every first trace of a static call is made to fail as torch 2.11's does:
    the logits still equal PEFT's."""
    import peft
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    import graphlora.generation as generation

    real, failed, plain = generation.export_with_shapes, [], StaticLayer.get_seq_length

    def export_with_shapes(model, inputs, shapes):  # fails a first trace, not the retry (which patches the count)
        if any(isinstance(v, StaticCache) for v in inputs.values()) and StaticLayer.get_seq_length is plain:
            failed.append(True)
            raise RuntimeError("Could not extract specialized integer from data-dependent expression u0")
        return real(model, inputs, shapes)

    monkeypatch.setattr(generation, "export_with_shapes", export_with_shapes)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODELS["opt"][1], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(_build("opt"), config).eval()
        ref.save_pretrained(tmp_path)
    gm = graphlora.inject(_build("opt"), str(tmp_path)).eval()
    ids, mask = _prompt(padded)
    for ours, theirs in zip(_loop(gm, "opt", ids, mask), _loop(ref, "opt", ids, mask)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert len(failed) == 3  # the prompt's, the steps' and the chunk's first traces
