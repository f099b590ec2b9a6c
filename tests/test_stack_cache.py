"""The mixed-batch stack cache: cached ``lora_mixed`` equals uncached, never serves stale weights,
bypasses autograd, CUDA-graph capture and inference tensors, and keeps one entry per site."""

from __future__ import annotations

import gc

import pytest
import torch
from models import main_output, randomize_b, tiny_llama, token_ids
from torch import nn

import graphlora
from graphlora import LoraConfig
from graphlora.passes import stack_cache
from graphlora.passes.ops import lora_mixed
from graphlora.passes.stack_cache import StackCache


@pytest.fixture
def cache(monkeypatch):
    """A fresh cache in place of the process-wide one (``lora_mixed`` looks it up per call)."""
    fresh = StackCache()
    monkeypatch.setattr(stack_cache, "STACKS", fresh)
    return fresh


class Adapter(nn.Module):
    def __init__(self, r: int, d_in: int, d_out: int, scale: float) -> None:
        super().__init__()
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=False)
        nn.init.normal_(self.lora_B.weight)
        self.register_buffer("scale", torch.tensor(scale))


class Site(nn.Module):
    """One site's adapter state, read afresh on every call as the graph's ``get_attr`` nodes do."""

    def __init__(self, ranks=(4, None, 2), d_in: int = 6, d_out: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.slots = nn.ModuleList(nn.Identity() if r is None else Adapter(r, d_in, d_out, 0.5 + i)
                                   for i, r in enumerate(ranks))

    def weights(self):
        ads = [None if isinstance(m, nn.Identity) else m for m in self.slots]
        return ([a and a.lora_A.weight for a in ads], [a and a.lora_B.weight for a in ads],
                [a and a.scale for a in ads])

    def __call__(self, base, x, index):
        return lora_mixed(base, x, index, *self.weights())


def _inputs(site, rows=5, seq=3, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    a = next(m for m in site.slots if isinstance(m, Adapter))
    d_in, d_out = a.lora_A.in_features, a.lora_B.out_features
    x = torch.randn(rows, seq, d_in, generator=gen, dtype=dtype)
    base = torch.randn(rows, seq, d_out, generator=gen, dtype=dtype)
    index = torch.arange(rows) % (len(site.slots) + 1)  # every slot, "__base__" included
    return base, x, index


def _uncached(site, base, x, index):
    cache = stack_cache.STACKS
    cache.enabled = False
    try:
        return site(base, x, index)
    finally:
        cache.enabled = True


def _reference(site, base, x, index):
    """Row by row, no stacking: ``base + s x A^T B^T`` for the row's adapter."""
    out = base.clone()
    a_w, b_w, s = site.weights()
    for row, slot in enumerate(index.tolist()):
        if slot < len(a_w) and a_w[slot] is not None:
            out[row] += s[slot] * (x[row] @ a_w[slot].T @ b_w[slot].T)
    return out


def _check(site, base, x, index):
    with torch.no_grad():
        got = site(base, x, index)
        assert torch.equal(got, _uncached(site, base, x, index))
        torch.testing.assert_close(got, _reference(site, base, x, index))
    return got


def test_cached_equals_uncached_over_repeated_calls(cache):
    site = Site()
    base, x, index = _inputs(site)
    for _ in range(3):
        _check(site, base, x, index)
    assert (cache.builds, cache.hits) == (1, 2)
    assert len(cache) == 1


@pytest.mark.parametrize("update", [
    "b_add", "a_mul", "scale_fill", "load_state_dict", "copy_", "optimizer_step", "inference_mode_add",
])
def test_weight_updates_are_seen(cache, update):
    site = Site()
    base, x, index = _inputs(site)
    before = _check(site, base, x, index)
    adapter = site.slots[2]
    if update == "b_add":
        with torch.no_grad():
            adapter.lora_B.weight.add_(1)
    elif update == "a_mul":
        with torch.no_grad():
            adapter.lora_A.weight[0].mul_(3)  # through a view: the version counter is shared
    elif update == "scale_fill":
        adapter.scale.fill_(-2.0)
    elif update == "load_state_dict":
        site.load_state_dict(Site(seed=7).state_dict())
    elif update == "copy_":
        with torch.no_grad():
            site.slots[0].lora_A.weight.copy_(torch.randn(site.slots[0].lora_A.weight.shape))
    elif update == "optimizer_step":
        with torch.enable_grad():
            site(base, x, index).square().sum().backward()
        torch.optim.SGD(site.parameters(), lr=0.1).step()
    elif update == "inference_mode_add":
        with torch.inference_mode():
            adapter.lora_B.weight.add_(1)
    after = _check(site, base, x, index)
    assert not torch.equal(after, before)
    assert len(cache) == 1  # rebuilt in place of the old entry


def test_dtype_move_is_seen(cache):
    site = Site()
    base, x, index = _inputs(site)
    _check(site, base, x, index)
    site.to(torch.float64)
    base64, x64 = base.double(), x.double()
    got = _check(site, base64, x64, index)
    assert got.dtype == torch.float64
    site.to(torch.float32)  # back: the original addresses may be reused, the versions are not reset
    with torch.no_grad():
        site.slots[0].lora_B.weight.mul_(2)
    _check(site, base, x, index)


def test_replaced_parameter_is_seen(cache):
    site = Site()
    base, x, index = _inputs(site)
    _check(site, base, x, index)
    adapter = site.slots[0]
    adapter.lora_B.weight = nn.Parameter(torch.randn_like(adapter.lora_B.weight))  # load_state_dict(assign=True)
    _check(site, base, x, index)
    adapter.lora_B.weight.data = torch.randn_like(adapter.lora_B.weight)  # same object, new storage
    _check(site, base, x, index)


def test_grad_mode_bypasses_the_cache(cache):
    site = Site()
    base, x, index = _inputs(site)
    with torch.no_grad():
        site(base, x, index)  # an entry exists now
    out = site(base, x, index)  # grad on, weights require grad: built afresh, autograd graph included
    assert out.requires_grad and cache.bypasses == 1
    out.sum().backward()
    grads = [p.grad for p in site.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    site.requires_grad_(False)  # grad on but nothing to differentiate: the cache serves again
    x.requires_grad_(True)
    out = site(base, x, index)
    assert cache.hits == 1
    out.sum().backward()
    assert x.grad is not None


def test_inference_mode(cache):
    site = Site()
    base, x, index = _inputs(site)
    with torch.inference_mode():
        site(base, x, index)
    assert cache.builds == 1  # normal weights under inference_mode: cached, as plain tensors
    x.requires_grad_(True)
    site.requires_grad_(False)
    site(base, x, index).sum().backward()  # the cached stacks are usable outside inference mode
    assert cache.hits == 1
    with torch.inference_mode():
        made_there = Site()  # inference tensors have no version counter: never cached
        made_there(base, x.detach(), index)
    assert cache.bypasses == 1 and cache.builds == 1


def test_one_entry_per_site_and_dead_tensors_leave(cache):
    sites = [Site(seed=i) for i in range(3)]
    base, x, index = _inputs(sites[0])
    with torch.no_grad():
        for site in sites:
            site(base, x, index)
    assert len(cache) == 3
    # a new adapter list at a site (add_adapter): same anchor, so it replaces the old entry
    site = sites[0]
    site.slots.append(Adapter(3, 6, 5, 1.0))
    _check(site, base, x, torch.arange(5) % 5)
    assert len(cache) == 3
    # the tensors of a deleted adapter die: the entry goes with them, stacks and all
    del sites[1], site
    gc.collect()
    assert len(cache) == 2


@pytest.mark.parametrize("callbacks", [True, False])
def test_recycled_objects_and_addresses_never_match(monkeypatch, callbacks):
    """A dead tensor's ``id``, address and version can all come back (the CUDA caching allocator
    reuses blocks at once; here a view of one pool stands in) holding other values."""
    if not callbacks:  # the identity check alone, as if the weak-reference callback had not run yet
        monkeypatch.setattr(stack_cache, "_forget", lambda entries, key, serial: lambda _: None)
    cache = StackCache()
    pool, stamps = torch.zeros(4), set()
    for i in range(10):
        pool.fill_(i)
        t = torch.empty(0).set_(pool.untyped_storage(), 0, (4,))
        stamps.add((id(t), t.data_ptr(), t._version))
        assert torch.equal(cache.get([t], t.clone), t)
        del t
    assert cache.hits == 0
    assert len(stamps) < 10  # the scenario did happen: some tensor came back as a look-alike


def test_bound_and_context():
    cache = StackCache(max_entries=2)
    ts = [torch.zeros(1) for _ in range(3)]
    for t in ts:
        cache.get([t], lambda: object())
    assert len(cache) == 2
    t = ts[-1]
    first = cache.get([t], lambda: object(), context=torch.float32)
    assert cache.get([t], lambda: object(), context=torch.float32) is first
    assert cache.get([t], lambda: object(), context=torch.float64) is not first
    cache.clear()
    assert len(cache) == 0


def test_disabled_cache_builds_every_time(cache):
    site = Site()
    base, x, index = _inputs(site)
    cache.enabled = False
    with torch.no_grad():
        site(base, x, index)
        site(base, x, index)
    assert (cache.builds, cache.hits, cache.bypasses, len(cache)) == (0, 0, 2, 0)


# --- end to end through graphlora -------------------------------------------------------------

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _random_b(gm, adapter=None, seed=0):
    randomize_b(gm, adapter, seed, std=0.2)


def _check_rows(gm, ids, names):
    """The mixed batch, checked row by row against single-adapter runs."""
    with torch.no_grad():
        mixed = main_output(gm(input_ids=ids, adapter_names=names))
        for row, name in enumerate(names):
            if name == "__base__":
                with gm.disable_adapter():
                    alone = main_output(gm(input_ids=ids[row:row + 1]))
            else:
                gm.set_adapter(name)
                alone = main_output(gm(input_ids=ids[row:row + 1]))
            torch.testing.assert_close(mixed[row], alone[0], rtol=1e-5, atol=1e-5)
    return mixed


def _mixed_sites(gm) -> int:
    return sum(1 for _ in gm.graphlora.named_children())


def test_graphlora_mixed_batch_follows_weight_changes(cache, monkeypatch):
    gm = graphlora.inject(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    gm.add_adapter("b", LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS[:1]))
    gm.add_adapter("c", LoraConfig(r=6, lora_alpha=3, use_rslora=True, target_modules=TARGETS))
    _random_b(gm)
    gm.eval()
    names = ["c", "__base__", "default", "b", "c"]
    ids = token_ids(len(names), 6)
    stacks = []
    real_stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **k: stacks.append(1) or real_stack(*a, **k))

    def stack_calls(fn):
        stacks.clear()
        out = fn()
        return len(stacks), out

    def run():
        with torch.no_grad():
            return main_output(gm(input_ids=ids, adapter_names=names))

    sites = _mixed_sites(gm)
    first, mixed = stack_calls(run)
    second, again = stack_calls(run)
    assert first == 3 * sites and second == 0  # a, b, scale per site, then nothing: all cached
    assert torch.equal(mixed, again)
    assert len(cache) == sites
    _check_rows(gm, ids, names)

    run()  # (set_adapter in the row checks rewrote every scale buffer in place: all restacked)
    with torch.no_grad():  # one site of one adapter changes in place: that site alone restacks
        gm.graphlora.branch("model_layers_1_self_attn_v_proj", "c").lora_B.weight.mul_(-3)
    third, changed = stack_calls(run)
    assert third == 3
    assert not torch.equal(changed[0], mixed[0]) and torch.equal(changed[2], mixed[2])
    _check_rows(gm, ids, names)

    with torch.no_grad():  # a whole adapter, as load_adapter / hotswap write it
        for _, _, branch in gm.graphlora.branches("default"):
            branch.lora_A.weight.copy_(torch.randn_like(branch.lora_A.weight))
    _check_rows(gm, ids, names)

    gm.delete_adapter("b")  # and back with the same name and another rank and placement
    gm.add_adapter("b", LoraConfig(r=5, lora_alpha=4, target_modules=["v_proj", "down_proj"]))
    _random_b(gm, "b", seed=3)
    gm.eval()
    _check_rows(gm, ids, names)
    _check_rows(gm, ids, ["b", "b", "default", "__base__", "c"])
    gc.collect()
    assert len(cache) == _mixed_sites(gm)  # one entry per site: nothing kept for the old "b"

    gm.to(torch.float64)  # a dtype move: new storage for every weight
    with torch.no_grad():
        got = main_output(gm(input_ids=ids, adapter_names=names))
        gm.set_adapter("c")
        alone = main_output(gm(input_ids=ids[:1]))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got[0], alone[0], rtol=1e-9, atol=1e-9)
