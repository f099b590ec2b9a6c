"""Adapter pool (issue 13, item 6): many registered adapters served through a few bank slots.

Reference: a module with the adapter loaded directly (``load_adapter``), and PEFT for one adapter.
"""

from __future__ import annotations

import random

import pytest
import torch

import graphlora
from graphlora import AdapterPool, LoraConfig
from graphlora.errors import AdapterExistsError, AdapterFileError, AdapterNotFoundError, AdapterStateError, ConfigError
from graphlora.programs import ProgramSet

from models import main_output, tiny_llama, token_ids

TARGETS = ["q_proj", "v_proj", "o_proj"]
COUNT = 6


def _config(i: int) -> LoraConfig:
    """Two configs: even adapters (r=2) and odd ones (r=4, the config of the pools' "default"), so a miss
    either swaps tensors into a resident of the same config or loads and evicts."""
    return LoraConfig(r=(2, 4)[i % 2], lora_alpha=8, target_modules=TARGETS)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """``COUNT`` adapters: (config, PEFT-keyed tensors), each also saved as a PEFT directory."""
    root = tmp_path_factory.mktemp("adapters")
    gm = graphlora.inject(tiny_llama(), _config(0))
    gm.configure_banks(max_loras=COUNT + 1, max_lora_rank=4)
    out = {}
    for i in range(COUNT):
        name = f"a{i}"
        gm.add_adapter(name, _config(i))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for key, t in gm.get_adapter_state_dict(name).items():
                t.copy_(torch.randn(t.shape, generator=gen) * (0.3 if "lora_B" in key else 1.0))
        gm.save_adapter(str(root / name), name)
        out[name] = (_config(i), {k: v.clone() for k, v in gm.get_adapter_state_dict(name).items()},
                     str(root / name / name))
    return out


def _pool(library, slots: int = 2, names=None) -> AdapterPool:
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS)).eval()
    pool = AdapterPool(gm, slots=slots, max_rank=4)
    for i, name in enumerate(names or library):
        config, tensors, path = library[name]
        pool.register(name, path if i % 2 else (config, tensors))  # both ways in
    return pool


def _direct(library, names) -> graphlora.AdaptedGraphModule:
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS)).eval()
    gm.configure_banks(max_loras=COUNT + 1, max_lora_rank=4)
    for name in names:
        gm.load_adapter(library[name][2], name)
    return gm


def test_mixed_batches_through_two_slots_equal_the_adapters_loaded_directly(library):
    pool = _pool(library, slots=2)
    direct = _direct(library, library)
    ids = token_ids(batch=2, seq=5, seed=3)
    rng = random.Random(0)
    with torch.no_grad():
        for _ in range(8):
            rows = rng.sample(list(library), 2)
            got = main_output(pool(ids, adapter_names=rows))
            torch.testing.assert_close(got, main_output(direct(ids, adapter_names=rows)), atol=1e-6, rtol=1e-5)
            assert set(rows) <= set(pool.resident) and len(pool.module.adapters) <= 2
        pool.set_adapter("a3")
        torch.testing.assert_close(main_output(pool(ids)), main_output(_ref_single(direct, "a3", ids)))
        with_base = main_output(pool(ids, adapter_names=["__base__", "a5"]))
        direct.disable_adapters()
        torch.testing.assert_close(with_base[0], main_output(direct(ids))[0])
        torch.testing.assert_close(with_base[1], main_output(_ref_single(direct, "a5", ids))[1])
    assert pool.misses > 2 and pool.swaps + pool.evictions == pool.misses - 1  # "default" left one slot free
    assert pool.swaps and pool.evictions


def test_a_swap_into_the_active_slot_is_served_at_once(library):
    """One slot, two adapters of one config: making the other adapter resident writes its tensors
    into the slot the module has active (same active set, no sync), and the module's next call must
    serve what the slot now holds, not the factors gathered before."""
    direct = _direct(library, ["a1", "a5"])
    ids = token_ids(batch=2, seq=5, seed=4)
    with torch.no_grad():  # the references first: nothing may run between the swap and the call
        want = {name: main_output(_ref_single(direct, name, ids)) for name in ("a1", "a5")}
        pool = _pool(library, slots=1, names=["a1", "a3", "a5"])  # a1, a5 registered as tensors: one config
        pool.set_adapter("a1")
        torch.testing.assert_close(main_output(pool(ids)), want["a1"], atol=1e-6, rtol=1e-5)
        swaps = pool.swaps
        pool.ensure(["a5"])  # as a request for a5 begins
        assert pool.swaps == swaps + 1 and pool.module.active_adapters == [pool.placement["a5"]]
        torch.testing.assert_close(main_output(pool.module(ids)), want["a5"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(main_output(pool(ids)), want["a1"], atol=1e-6, rtol=1e-5)


def test_one_pooled_adapter_equals_peft(library):
    from peft_oracle import peft_from_pretrained, run

    pool = _pool(library, slots=2, names=["a1", "a2", "a3"])
    ids = token_ids()
    pool.ensure(["a2", "a3"])  # a1 is not resident now
    pool.set_adapter("a1")
    want = run(peft_from_pretrained("llama", library["a1"][2]), ids)
    torch.testing.assert_close(main_output(pool(ids)), want, atol=1e-5, rtol=1e-4)


def test_lru_order_and_counters(library):
    pool = _pool(library, slots=3)
    pool.register("odd", (LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS), library["a1"][1]))
    assert pool.resident == ["default"]
    pool.ensure(["a0", "a1"])  # two free slots: loads
    assert pool.resident == ["default", "a0", "a1"] and (pool.hits, pool.misses, pool.swaps) == (0, 2, 0)
    pool.ensure(["default"])  # a hit: default becomes the most recent
    assert pool.resident == ["a0", "a1", "default"] and pool.hits == 1
    inner = pool.placement["a0"]
    pool.ensure(["a2"])  # a0, the least recently used, has a2's config: a2 takes its place
    assert pool.resident == ["a1", "default", "a2"] and pool.placement["a2"] == inner and pool.swaps == 1
    pool.ensure(["a1", "odd"])  # a1 is needed, so default goes; odd's config is its own: load, then evict
    assert pool.resident == ["a2", "a1", "odd"] and pool.evictions == 1
    assert set(pool.placement.values()) == set(pool.module.adapters) and len(pool.module.adapters) == 3
    assert pool.stats == {"hits": 2, "misses": 4, "swaps": 1, "evictions": 1, "registered": COUNT + 2,
                          "resident": 3, "slots": 3}
    pool.ensure(["default"])  # an evicted adopted adapter comes back from its CPU copy; the LRU, a2, goes
    assert pool.resident == ["a1", "odd", "default"] and (pool.swaps, pool.evictions) == (1, 2)
    pool.ensure(["a3"])  # the LRU, a1, has a3's config: a swap
    assert pool.resident == ["odd", "default", "a3"] and pool.swaps == 2
    ids = token_ids()
    with torch.no_grad():  # the module holds what the placement says
        got = main_output(pool(ids, adapter_names=["odd", "a3"]))
        direct = _direct(library, ["a3"])
        torch.testing.assert_close(got[1], main_output(_ref_single(direct, "a3", ids))[1])


def test_swaps_never_recompile_and_never_resplice_under_fullgraph_compile(library, monkeypatch):
    pool = _pool(library, slots=2)
    direct = _direct(library, library)
    builds = []
    build = ProgramSet._build
    mine = pool.module.programs
    monkeypatch.setattr(ProgramSet, "_build", lambda self, *a, **k: (builds.append(self is mine), build(self, *a, **k))[1])
    compiles = []

    def backend(graph_module, example_inputs):
        compiles.append(1)
        return graph_module.forward

    pool.compile(backend=backend, fullgraph=True)
    ids = token_ids(batch=2, seq=5, seed=4)
    with torch.no_grad():
        pool(ids, adapter_names=["a0", "a1"])  # first mixed call: one trace, one compile
        pool.set_adapter("a2")
        pool(ids)  # first single-adapter (bank) call
        warm_builds, warm_compiles = sum(builds), len(compiles)
        rng = random.Random(1)
        for step in range(10):
            if step % 3 == 2:
                name = rng.choice(list(library))
                pool.set_adapter(name)
                torch.testing.assert_close(main_output(pool(ids)), main_output(_ref_single(direct, name, ids)))
            else:
                rows = rng.sample(list(library), 2)
                got = main_output(pool(ids, adapter_names=rows))
                torch.testing.assert_close(got, main_output(direct(ids, adapter_names=rows)), atol=1e-6, rtol=1e-5)
    assert pool.misses >= 8 and pool.swaps and pool.evictions
    assert len(compiles) == warm_compiles, f"recompiled {len(compiles) - warm_compiles} times"
    assert sum(builds) == warm_builds, f"re-spliced {sum(builds) - warm_builds} times"


def _ref_single(direct, name, ids):
    direct.enable_adapters()
    direct.set_adapter(name)
    return direct(ids)


def test_generate_with_pooled_rows_equals_direct(library):
    pool = _pool(library, slots=2)
    direct = _direct(library, ["a1", "a4"])
    ids = token_ids(batch=2, seq=4, seed=5)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    pool.ensure(["a0", "a2"])
    got = pool.generate(ids, adapter_names=["a1", "a4"], **kw)
    assert torch.equal(got, direct.generate(ids, adapter_names=["a1", "a4"], **kw))


def test_errors_name_the_fix_and_change_nothing(library, tmp_path):
    pool = _pool(library, slots=2)
    before = (pool.registered, pool.resident, dict(pool.stats), list(pool.module.adapters))
    with pytest.raises(ConfigError, match=r"needs 3 distinct adapters .* slots=2.*AdapterPool\(gm, slots=3\)"):
        pool(token_ids(batch=3), adapter_names=["a0", "a1", "a2"])
    with pytest.raises(AdapterNotFoundError, match="'nope' is not registered"):
        pool.ensure(["nope"])
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}')
    with pytest.raises(AdapterFileError):  # no weights file
        pool.register("bad", tmp_path)
    config, tensors, _ = library["a1"]
    key = next(iter(tensors))
    with pytest.raises(AdapterFileError, match="lora_"):  # a tensor of the wrong shape
        pool.register("bad", (config, {**tensors, key: torch.zeros(3, 3)}))
    with pytest.raises(ConfigError, match="plain LoRA"):
        pool.register("dora", (LoraConfig(r=4, target_modules=TARGETS, use_dora=True), tensors))
    with pytest.raises(AdapterExistsError):
        pool.register("a1", library["a1"][2])
    assert (pool.registered, pool.resident, dict(pool.stats), list(pool.module.adapters)) == before
    pool.module.train()
    with pytest.raises(AdapterStateError, match="eval mode"):
        pool(token_ids(), adapter_names=["a0", "a1"])
    with pytest.raises(ConfigError, match="slots=0"):
        AdapterPool(pool.module, slots=0)
