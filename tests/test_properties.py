"""Property-based tests (hypothesis) over random small graphs and random adapter configs.

Graphs: fx-traced stacks of random widths made of MLP blocks (``nn.Linear`` and functional
``F.linear`` sites, several activations, optional residuals) and single-head attention blocks
(q/k/v/o projections, LayerNorm, softmax), in float32 or bfloat16; plus a few tiny Llama examples
through the export frontend. Configs: 1-3 adapters with random ranks, alphas (rsLoRA or not),
target subsets and ``rank_pattern`` overrides.

Properties: identity at injection (bit for bit); disable equals base (bit for bit); the order in
which adapters were added does not change outputs; merge equals unmerged (and unmerge restores
the base weights bit for bit); save -> load is exact; ``specialize`` equals the switched graph;
delete then re-add gives the same graph code.

The "ci" profile (tests/conftest.py) runs 15 derandomized examples per property; set
``HYPOTHESIS_PROFILE=long`` for 300 (see docs/testing.md).
"""

from __future__ import annotations

import copy
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import tiny_llama, token_ids
from torch import nn

import graphlora
from graphlora import LoraConfig

SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large]
ACTS = {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu}


# ------------------------------------------------------------------------------ random graphs
class MLPBlock(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, act: str, functional: bool, residual: bool) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.down = nn.Linear(d_hidden, d_out, bias=not functional)
        self.act, self.functional = act, functional
        self.residual = residual and d_in == d_out

    def forward(self, x):
        h = ACTS[self.act](self.up(x))
        y = F.linear(h, self.down.weight) if self.functional else self.down(h)
        return x + y if self.residual else y


class AttentionBlock(nn.Module):
    """Single-head self-attention with pre-LayerNorm and a residual (d -> d)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(d, d)
        self.scale = 1.0 / math.sqrt(d)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        att = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
        return x + self.o_proj(torch.matmul(att, v))


class RandomNet(nn.Module):
    def __init__(self, spec: list[tuple]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            AttentionBlock(s[1]) if s[0] == "attn" else MLPBlock(*s[1:]) for s in spec
        )

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@st.composite
def nets(draw):
    """(spec, d_in): a stack of 1-3 blocks with widths 2..10."""
    d = draw(st.integers(2, 10))
    d_in, spec = d, []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()) and draw(st.booleans()):
            spec.append(("attn", d))
        else:
            hidden, out = draw(st.integers(2, 10)), draw(st.sampled_from([d, draw(st.integers(2, 10))]))
            spec.append(("mlp", d, hidden, out, draw(st.sampled_from(sorted(ACTS))), draw(st.booleans()),
                         draw(st.booleans())))
            d = out
    return spec, d_in


def site_names(spec) -> list[str]:
    names = []
    for i, s in enumerate(spec):
        parts = ("q_proj", "k_proj", "v_proj", "o_proj") if s[0] == "attn" else ("up", "down")
        names += [f"blocks.{i}.{p}" for p in parts]
    return names


@st.composite
def adapter_configs(draw, sites: list[str], n: int):
    configs = []
    for _ in range(n):
        targets = draw(st.lists(st.sampled_from(sites), min_size=1, max_size=len(sites), unique=True))
        pattern = {}
        if len(targets) > 1 and draw(st.booleans()):
            pattern = {targets[0].replace(".", r"\."): draw(st.integers(1, 5))}
        configs.append(LoraConfig(
            r=draw(st.integers(1, 4)),
            lora_alpha=draw(st.sampled_from([0.5, 1, 2, 8, 16])),
            use_rslora=draw(st.booleans()),
            target_modules=targets,
            rank_pattern=pattern,
        ))
    return configs


@st.composite
def cases(draw, min_adapters: int = 1, max_adapters: int = 3):
    spec, d_in = draw(nets())
    n = draw(st.integers(min_adapters, max_adapters))
    return dict(
        spec=spec,
        d_in=d_in,
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        configs=draw(adapter_configs(site_names(spec), n)),
        weights=[draw(st.sampled_from([1.0, 0.5, -1.0, 2.0])) for _ in range(n)],
        seed=draw(st.integers(0, 2**16)),
        batch=draw(st.integers(1, 3)),
        seq=draw(st.integers(1, 4)),
    )


# ------------------------------------------------------------------------------ helpers
NAMES = ["alpha", "beta", "gamma"]


def build(case, order=None):
    """(model, gm, inputs): the net (seeded), its adapters added in ``order`` (indices), eval mode."""
    torch.manual_seed(case["seed"])
    model = RandomNet(case["spec"]).to(case["dtype"]).eval()
    order = list(range(len(case["configs"]))) if order is None else order
    gm = graphlora.inject(model, case["configs"][order[0]], adapter_name=NAMES[order[0]])
    for i in order[1:]:
        gm.add_adapter(NAMES[i], case["configs"][i])
    gm.eval()
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    x = torch.randn(case["batch"], case["seq"], case["d_in"], generator=gen).to(case["dtype"])
    return model, gm, x


def randomize(gm, seed: int) -> None:
    """Give every adapter random A and B that depend only on (seed, adapter, site), not on order."""
    with torch.no_grad():
        for key, name, branch in gm.graphlora.branches():
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}/{key}".encode()))
            for layer in (branch.lora_A, branch.lora_B):
                w = torch.randn(layer.weight.shape, generator=gen) * 0.5
                layer.weight.copy_(w.to(layer.weight.dtype))


def activate_all(gm, case) -> None:
    gm.set_adapter_weights({NAMES[i]: w for i, w in enumerate(case["weights"])})


def assert_near(actual, expected, dtype) -> None:
    """fp32: 1e-5 relative to the output's scale; bf16: a few bf16 ulps of that scale (sums are
    rounded to bf16 after each adapter, so reordering them moves the result by ulps)."""
    scale = max(1.0, expected.abs().max().item())
    tol = 1e-5 if dtype == torch.float32 else 4 * 2**-8
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


# ------------------------------------------------------------------------------ properties
@settings(suppress_health_check=SUPPRESS)
@given(cases())
def test_identity_at_injection(case):
    model, gm, x = build(case)
    base = copy.deepcopy(model)
    with torch.no_grad():
        expected = base(x)
        for i in range(len(case["configs"])):
            gm.set_adapter(NAMES[i])
            assert torch.equal(gm(x), expected)
        activate_all(gm, case)
        assert torch.equal(gm(x), expected)


@settings(suppress_health_check=SUPPRESS)
@given(cases())
def test_disable_equals_base(case):
    model, gm, x = build(case)
    base = copy.deepcopy(model)
    randomize(gm, case["seed"])
    activate_all(gm, case)
    code = gm.code
    with torch.no_grad():
        adapted = gm(x)
        gm.disable_adapters()
        assert torch.equal(gm(x), base(x))
        with gm.disable_adapter():
            assert torch.equal(gm(x), base(x))
        gm.enable_adapters()
        assert torch.equal(gm(x), adapted)
    assert gm.code == code  # switching never touches the graph


@settings(suppress_health_check=SUPPRESS)
@given(cases(min_adapters=2), st.randoms(use_true_random=False))
def test_adapter_order_does_not_matter(case, rnd):
    order = list(range(len(case["configs"])))
    rnd.shuffle(order)
    if order == sorted(order):
        order.reverse()
    _, gm1, x = build(case)
    _, gm2, _ = build(case, order)
    assert list(gm2.adapters) == [NAMES[i] for i in order]
    for gm in (gm1, gm2):
        randomize(gm, case["seed"])
        activate_all(gm, case)
    with torch.no_grad():
        assert_near(gm2(x), gm1(x), case["dtype"])
        for i in range(len(case["configs"])):  # each adapter alone, too
            gm1.set_adapter(NAMES[i])
            gm2.set_adapter(NAMES[i])
            assert_near(gm2(x), gm1(x), case["dtype"])


@settings(suppress_health_check=SUPPRESS)
@given(cases())
def test_merge_equals_unmerged_and_unmerge_restores(case):
    model, gm, x = build(case)
    randomize(gm, case["seed"])
    activate_all(gm, case)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        unmerged = gm(x)
        gm.merge_adapter()
        assert sorted(gm.merged_adapters) == sorted(NAMES[: len(case["configs"])])
        merged = gm(x)
        # merging rounds W + delta to the weight dtype once: compare at that precision
        assert_near(merged, unmerged, case["dtype"])
        gm.unmerge_adapter()
        for n, p in model.named_parameters():
            assert torch.equal(p, base_weights[n]), n
        assert torch.equal(gm(x), unmerged)


@settings(suppress_health_check=SUPPRESS)
@given(case=cases())
def test_save_load_round_trip_is_exact(case, tmp_path_factory):
    model, gm, x = build(case)
    randomize(gm, case["seed"])
    activate_all(gm, case)
    directory = tmp_path_factory.mktemp("adapters")
    names = list(gm.adapters)
    gm.save_adapter(directory, adapter_name=None)

    torch.manual_seed(case["seed"])
    fresh = RandomNet(case["spec"]).to(case["dtype"]).eval()
    fresh.load_state_dict(model.state_dict())
    gm2 = graphlora.inject(fresh, directory / names[0] if names[0] != "default" else directory,
                           adapter_name=names[0])
    for name in names[1:]:
        gm2.load_adapter(directory, name)
    assert list(gm2.adapters) == names
    for name in names:
        ours, theirs = gm.get_adapter_state_dict(name), gm2.get_adapter_state_dict(name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
        assert gm2.adapters[name].r == gm.adapters[name].r
        assert gm2.adapters[name].lora_alpha == gm.adapters[name].lora_alpha
    activate_all(gm2, case)
    assert gm2.code == gm.code
    with torch.no_grad():
        assert torch.equal(gm2(x), gm(x))


@settings(suppress_health_check=SUPPRESS)
@given(cases(), st.data())
def test_specialize_equals_switched_graph(case, data):
    _, gm, x = build(case)
    randomize(gm, case["seed"])
    n = len(case["configs"])
    active = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True), label="active")
    gm.set_adapter_weights({NAMES[i]: case["weights"][i] for i in active})
    fast = graphlora.specialize(gm)
    with torch.enable_grad():  # the switch form (under no_grad in eval mode, gm serves from its banks)
        switched = gm(x).detach()
    with torch.no_grad():
        assert_near(fast(x), switched, case["dtype"])
        inactive = [NAMES[i] for i in range(n) if i not in active]
        code = fast.code
        for name in inactive:  # dropped branches do not appear in the specialized graph
            assert f"_{name}_lora_B" not in code
        gm.disable_adapters()  # later switching of gm does not change the specialized module
        assert_near(fast(x), switched, case["dtype"])


@settings(suppress_health_check=SUPPRESS)
@given(cases(), st.data())
def test_delete_then_readd_gives_same_code(case, data):
    _, gm, x = build(case)
    n = len(case["configs"])
    last = NAMES[n - 1]
    code = gm.code
    if n > 1:
        gm.delete_adapter(last)
        gm.add_adapter(last, case["configs"][n - 1])
        assert gm.code == code
        # deleting any adapter and re-adding it gives the code of that adding order
        k = data.draw(st.integers(0, n - 1), label="deleted")
        gm.delete_adapter(NAMES[k])
        gm.add_adapter(NAMES[k], case["configs"][k])
        order = [i for i in range(n) if i != k] + [k]
        _, reference, _ = build(case, order)
        assert gm.code == reference.code
    else:
        gm.add_adapter("extra", case["configs"][0])
        gm.delete_adapter("extra")
        assert gm.code == code
    with torch.no_grad():  # and the graph still runs
        gm(x)


# ------------------------------------------------------------------------------ a transformer
@pytest.fixture(scope="module")
def llamas():
    """Per dtype, traced once (export is the slow part): (base copy, gm, gm2). Both modules hold a
    ``keep`` adapter; each example adds its adapters and deletes them again."""
    cache = {}

    def get(dtype):
        if dtype not in cache:
            model = tiny_llama(layers=1).to(dtype)
            base = copy.deepcopy(model)
            keep = LoraConfig(r=1, target_modules=["o_proj"])
            gm = graphlora.inject(model, keep, adapter_name="keep")
            gm2 = graphlora.inject(copy.deepcopy(base), keep, adapter_name="keep")
            cache[dtype] = (base, gm, gm2)
        return cache[dtype]

    return get


@settings(max_examples=5, suppress_health_check=SUPPRESS)
@given(
    r=st.integers(1, 4),
    alpha=st.sampled_from([1, 8, 16]),
    targets=st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]),
                     min_size=1, max_size=3, unique=True),
    second=st.lists(st.sampled_from(["q_proj", "up_proj", "down_proj"]), min_size=1, max_size=2, unique=True),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_llama_properties(llamas, r, alpha, targets, second, dtype, tmp_path_factory):
    base, gm, gm2 = llamas(dtype)
    code = gm.code
    ids = token_ids(2, 6)
    try:
        gm.add_adapter("one", LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
        gm.add_adapter("two", LoraConfig(r=2, lora_alpha=4, target_modules=second, use_rslora=True))
        with torch.no_grad():
            expected = base(ids).logits
            gm.set_adapter(["one", "two"])
            assert torch.equal(gm(ids).logits, expected)  # identity at injection
            randomize(gm, r)
            gm.set_adapter_weights({"one": 1.0, "two": -0.5})
            adapted = gm(ids).logits
            assert not torch.equal(adapted, expected)
            gm.disable_adapters()
            assert torch.equal(gm(ids).logits, expected)  # disable equals base
            gm.enable_adapters()
            fast = graphlora.specialize(gm)
            assert_near(fast(input_ids=ids, use_cache=False).logits, adapted, dtype)
            directory = tmp_path_factory.mktemp("llama")
            gm.save_adapter(directory, adapter_name=["one", "two"])
            gm.merge_adapter()
            assert_near(gm(ids).logits, adapted, dtype)
            gm.unmerge_adapter()
            assert torch.equal(gm(ids).logits, adapted)
            gm2.load_adapter(directory, "one")
            gm2.load_adapter(directory, "two")
            gm2.set_adapter_weights({"one": 1.0, "two": -0.5})
            assert gm2.code == gm.code
            assert torch.equal(gm2(ids).logits, adapted)  # save -> load is exact
    finally:
        for m in (gm, gm2):
            for name in ("one", "two"):
                if name in m.adapters:
                    m.delete_adapter(name)
            m.set_adapter("keep")
    assert gm.code == code and gm2.code == code  # delete gives the graph back
