"""Memory: adding and deleting adapters in a loop returns to the starting state (nothing piles up:
store modules, parameters, buffers, programs, graph code, Python heap, and every deleted branch
is garbage-collected); injecting on the ``meta`` device works and materializes later."""

from __future__ import annotations

import copy
import gc
import tracemalloc
import weakref

import torch
import torch.fx as fx
from torch import nn
from models import FunctionalMLP, tiny_llama, token_ids

import graphlora
from graphlora import LoraConfig
from graphlora.errors import PlacementError


def _footprint(gm) -> dict:
    store = gm.graphlora
    return dict(
        store_modules=sum(1 for _ in store.modules()),
        store_params=sum(p.numel() for p in store.parameters()),
        store_buffers=sum(b.numel() for b in store.buffers()),
        params=len(list(gm.parameters())),
        buffers=len(list(gm.buffers())),
        modules=len(list(gm.modules())),
        attributes=len(gm.__dict__),
        programs=len(gm.programs),
        code=gm.code,
        configs=list(gm.adapters),
        plans=list(gm.adapter_state.plans),
        weights=dict(gm.adapter_state.weights),
    )


def _cycle(gm, n, configs, call):
    refs = []
    for i in range(n):
        name = f"tmp{i}"
        gm.add_adapter(name, configs[i % len(configs)])
        refs += [weakref.ref(b) for _, _, b in gm.graphlora.branches(name)]
        refs += [weakref.ref(p) for _, _, b in gm.graphlora.branches(name) for p in b.parameters()]
        call()  # run the graph with the adapter in it
        gm.delete_adapter(name)
    gm.set_adapter("default")
    return refs


def test_fifty_adapters_in_a_loop_leave_nothing_behind():
    model = FunctionalMLP(d_in=64, d_hidden=256, d_out=64)
    gm = graphlora.inject(model, LoraConfig(r=4, target_modules=["fc1"]))
    x = torch.randn(4, 64)
    configs = [LoraConfig(r=16, target_modules=["fc1", "proj", "fc2"], lora_dropout=0.1),
               LoraConfig(r=8, target_modules=["proj"], use_rslora=True)]

    def call():
        with torch.no_grad():
            gm(x)
            gm(x, adapter_names=["default", "__base__", "default", list(gm.adapters)[-1]])  # mixed program too

    _cycle(gm, 3, configs, call)  # warm caches (fx codegen, mixed program, torch dispatch)
    gc.collect()
    start = _footprint(gm)
    tracemalloc.start(8)
    try:
        gc.collect()
        first = tracemalloc.take_snapshot()
        refs = _cycle(gm, 50, configs, call)
        gc.collect()
        last = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    # torch.fx keeps the source of every generated forward (its eval cache and linecache) for the
    # life of the process: that grows with the number of recompiles whatever graphlora does, so it
    # is reported apart; everything else must come back.
    fx_cache = [tracemalloc.Filter(True, "*torch/fx/graph.py", all_frames=True),
                tracemalloc.Filter(True, "*torch/fx/graph_module.py", all_frames=True)]
    not_fx = [tracemalloc.Filter(False, f.filename_pattern, all_frames=True) for f in fx_cache]
    growth = sum(d.size_diff for d in last.filter_traces(not_fx).compare_to(first.filter_traces(not_fx), "filename"))
    fx_growth = sum(d.size_diff for d in last.compare_to(first, "filename")) - growth
    assert _footprint(gm) == start
    alive = [r for r in refs if r() is not None]
    assert not alive, f"{len(alive)} of {len(refs)} deleted adapter modules/parameters are still referenced"
    # (tensor storage is not on the Python heap: the weakrefs above cover it)
    # an adapter here is ~9 modules (~14 kB of Python objects): 50 piling up would be ~700 kB
    assert growth < 100_000, f"Python heap grew by {growth} bytes over 50 add/delete cycles"
    print(f"heap growth over 50 cycles: {growth} B outside torch.fx's source cache, {fx_growth} B in it")


def test_adapter_cycles_on_an_exported_model_leave_nothing_behind():
    model = tiny_llama(layers=1)
    gm = graphlora.inject(model, LoraConfig(r=2, target_modules=["q_proj"]))
    ids = token_ids(2, 5)

    def call():
        with torch.no_grad():
            gm(ids)
            gm(input_ids=ids, attention_mask=torch.ones_like(ids))  # a second traced signature

    configs = [LoraConfig(r=4, target_modules=["v_proj", "down_proj"])]
    _cycle(gm, 1, configs, call)
    gc.collect()
    start = _footprint(gm)
    refs = _cycle(gm, 10, configs, call)
    gc.collect()
    assert _footprint(gm) == start
    assert not [r for r in refs if r() is not None]


# ------------------------------------------------------------------------------------------ meta
def _check_materialized(gm, real_gm, call):
    with torch.no_grad():
        torch.testing.assert_close(call(gm), call(real_gm), rtol=0, atol=0)
        gm.disable_adapters()
        real_gm.disable_adapters()
        torch.testing.assert_close(call(gm), call(real_gm), rtol=0, atol=0)
        gm.enable_adapters()
        real_gm.enable_adapters()


def _real_with_adapter(real, config, tmp_path):
    real_gm = graphlora.inject(real, config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, _, b in real_gm.graphlora.branches():
            b.lora_B.weight.copy_(torch.randn(b.lora_B.weight.shape, generator=gen))
    real_gm.save_adapter(tmp_path)
    return real_gm


def test_inject_on_meta_then_materialize_fx(tmp_path):
    torch.manual_seed(0)
    real = FunctionalMLP()
    config = LoraConfig(r=3, target_modules=["fc1", "proj"])
    real_gm = _real_with_adapter(copy.deepcopy(real), config, tmp_path)

    with torch.device("meta"):
        model = FunctionalMLP()
    gm = graphlora.inject(model, config)  # traces and splices without allocating a weight
    assert all(p.device.type == "meta" for p in gm.parameters())
    assert "fc1_switch" in gm.code
    gm.eval()
    with torch.no_grad():  # a serving call on meta (shapes only): the bank update runs there too
        assert gm(torch.zeros(3, 12, device="meta")).shape == (3, 6)
    gm.train()
    gm.to_empty(device="cpu")  # materialize (uninitialized memory)
    result = gm.load_state_dict(real.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(k for k in gm.state_dict() if k.startswith("graphlora."))
    assert not result.unexpected_keys
    gm.load_adapter(tmp_path, "default")  # hotswap: the adapter's weights (uninitialized after to_empty)
    x = torch.randn(2, 12)
    _check_materialized(gm, real_gm, lambda m: m(x))
    assert all(p.device.type == "cpu" for p in gm.parameters())


def test_inject_on_meta_llama_traces_and_refuses_loading():
    """The export frontend traces a meta model (no weight is allocated) and finds the same sites;
    loading an adapter before materializing is refused (docs/errors.md, PlacementError).
    Materializing is the next test."""
    real_gm = graphlora.inject(tiny_llama(layers=1), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.device("meta"):
        model = tiny_llama(layers=1)
    gm = graphlora.inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert all(p.device.type == "meta" for p in gm.parameters())
    assert gm.sites == real_gm.sites
    assert gm.sites_table() == real_gm.sites_table()
    real_gm.save_adapter(tmp := __import__("tempfile").mkdtemp())
    try:
        gm.load_adapter(tmp, "default")
    except PlacementError as exc:
        assert "meta device" in str(exc) and "to_empty" in str(exc)
    else:
        raise AssertionError("loading onto meta weights was not refused")


def test_inject_on_meta_llama_then_materialize(tmp_path):
    """Export-traced graphs bake the trace device into factory ops; moving the module retargets them."""
    real = tiny_llama(layers=2)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    real_gm = _real_with_adapter(copy.deepcopy(real), config, tmp_path)
    with torch.device("meta"):
        model = tiny_llama(layers=2)
    gm = graphlora.inject(model, config)
    assert "device(type='meta')" in gm.code
    gm.to_empty(device="cpu")
    assert "device(type='meta')" not in gm.code and "device(type='cpu')" in gm.code
    with torch.no_grad():  # materialize: parameters and (non-persistent) buffers from the real model
        for name, tensor in [*real.named_parameters(), *real.named_buffers()]:
            target = gm.get_parameter(name) if name in dict(gm.named_parameters()) else gm.get_buffer(name)
            target.copy_(tensor)
    gm.load_adapter(tmp_path, "default")
    ids = token_ids(2, 6)
    _check_materialized(gm, real_gm, lambda m: m(input_ids=ids).logits)
    _check_materialized(gm, real_gm, lambda m: m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)


class AutocastBlock(nn.Module):
    """fx cannot trace it (a shape check), so it is exported; the autocast-off region becomes a
    ``wrap_with_autocast`` higher-order op whose subgraph creates a tensor on the trace device
    (the pattern of HF's rotary embedding in transformers 5.17)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[-1] != 8:
            raise ValueError("8 features expected")
        with torch.autocast("cpu", enabled=False):
            pos = torch.arange(x.shape[-2], device=x.device, dtype=x.dtype)
        return self.fc2(torch.relu(self.fc1(x + pos[:, None])))


def _subgraph_modules(gm):
    return [m for m in gm.modules() if isinstance(m, fx.GraphModule) and m is not gm]


def test_materialize_retargets_higher_order_op_subgraphs():
    torch.manual_seed(0)
    real = AutocastBlock()
    with torch.device("meta"):
        empty = AutocastBlock()
    gm = graphlora.inject(empty, LoraConfig(r=2, target_modules=["fc1"]),
                          example_inputs=(torch.randn(2, 5, 8, device="meta"),))
    (sub,) = _subgraph_modules(gm)
    assert "device(type='meta')" in sub.code
    gm.to_empty(device="cpu")
    assert "device(type='meta')" not in sub.code and "device(type='cpu')" in sub.code
    with torch.no_grad():
        for name, tensor in real.named_parameters():
            gm.get_parameter(name).copy_(tensor)
        for p in gm.graphlora.parameters():  # to_empty left the adapter uninitialized (possibly inf/nan)
            p.zero_()
    x = torch.randn(3, 7, 8)
    torch.testing.assert_close(gm(x), real(x), rtol=0, atol=0)  # zero adapter: the base model


def test_retarget_rewrites_autocast_device_type_in_subgraphs():
    """CPU -> CUDA cannot run here; the rewrite itself is checked on the graph."""
    from graphlora.passes.device import RetargetDevice

    gm = graphlora.inject(AutocastBlock(), LoraConfig(r=2, target_modules=["fc1"]),
                          example_inputs=(torch.randn(2, 5, 8),))
    graph = gm.programs.primary.base.graph
    hop = next(n for n in graph.nodes if "wrap_with_autocast" in str(n.target))
    assert hop.args[0] == "cpu"
    retarget = RetargetDevice(torch.device("cpu"), torch.device("cuda", 0))
    assert retarget(gm.programs.primary.base).modified
    assert hop.args[0] == "cuda"
    (sub,) = _subgraph_modules(gm)
    assert "device(type='cuda', index=0)" in sub.code and "device(type='cpu')" not in sub.code
    assert not retarget(gm.programs.primary.base).modified  # idempotent
