"""FuseShrink: sibling LoRA down-projections (q/k/v, gate/up) reading one input as one GEMM.

Each test builds the same model with the pass off and on (``fuse_shrink.ENABLED``, held for the
model's whole life: a later call signature builds its program then) and compares outputs and
gradients; PEFT is the reference for the fused training step.
"""

from __future__ import annotations

import contextlib
import operator

import pytest
import torch

import graphlora
import models
import peft_oracle
from graphlora.passes import fuse_shrink
from graphlora.passes.fuse_shrink import FuseShrink
from graphlora.passes.ops import lora_down, lora_shrink

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = models.token_ids(2, 7, seed=1)


@contextlib.contextmanager
def fusion(on: bool):
    old = fuse_shrink.ENABLED
    fuse_shrink.ENABLED = on
    try:
        yield
    finally:
        fuse_shrink.ENABLED = old


def _nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _split_sizes(gm):
    return sorted(tuple(next(iter(n.users)).args[1]) for n in _nodes(gm, lora_shrink))


def _model(dtype=torch.float32, extra=True, **kw):
    """A 2-layer tiny Llama: ``default`` on every linear, ``b`` (r=2) on q/v/up, both active."""
    kw.setdefault("r", 4)
    gm = graphlora.inject(models.tiny_llama(), graphlora.LoraConfig(target_modules=ALL, init_lora_weights=False, **kw))
    if extra:
        gm.add_adapter("b", graphlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj"],
                                                 init_lora_weights=False))
        gm.set_adapter(["default", "b"])
    return gm.to(dtype).train()


def _step(gm, seed: int = 0):
    """Logits and every adapter gradient of one training step (a fixed seed for dropout)."""
    torch.manual_seed(seed)
    gm.zero_grad(set_to_none=True)
    logits = gm(input_ids=IDS).logits
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), IDS.flatten()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}


def _pair(dtype=torch.float32, **kw):
    """(unfused, fused) results of the same step on the same weights."""
    out = []
    for on in (False, True):
        with fusion(on):
            gm = _model(dtype, **kw)
            out.append((gm, *_step(gm)))
    return out


# ------------------------------------------------------------------------------------------ the rewrite
def test_fires_on_qkv_and_gate_up_of_each_layer():
    (plain, *_), (fused, *_) = _pair()
    # unfused: one GEMM per (site, adapter): 7 + 3 per layer; fused, per adapter and input: default's
    # q/k/v and gate/up, b's q/v (b's up_proj is alone at its input): 6 per layer
    assert len(_nodes(plain, lora_down)) == 2 * 10 and not _nodes(plain, lora_shrink)
    assert len(_nodes(fused, lora_shrink)) == 2 * 3
    assert len(_nodes(fused, lora_down)) == 2 * 3  # o_proj, down_proj (inputs of their own), b's up_proj
    assert _split_sizes(fused) == [(2, 2)] * 2 + [(4, 4)] * 2 + [(4, 4, 4)] * 2
    for node in _nodes(fused, lora_shrink):  # one adapter per fused GEMM (the visualization reads it)
        tags = [d.meta["graphlora"] for d in fused.graph.nodes if d.args and d.args[0] in next(iter(node.users)).users]
        assert {t["adapter"] for t in tags} == {node.meta["graphlora"]["adapter"]}
        assert node.meta["graphlora"]["sites"] == tuple(t["site"] for t in tags)
    # the former lora_down nodes keep their names and become the gate multiply of one slice
    names = {n.name for n in fused.graph.nodes}
    assert {n.name for n in _nodes(plain, lora_down)} <= names
    h = next(n for n in fused.graph.nodes if n.name == "model_layers_0_self_attn_k_proj_default_lora_A")
    assert h.target is torch.ops.aten.mul.Tensor and h.args[0].target is operator.getitem
    assert h.args[1].op == "get_attr" and h.args[1].target.endswith("k_proj.default.gate")


def test_pass_reports_nothing_without_siblings():
    gm = graphlora.inject(models.tiny_llama(), graphlora.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    assert not FuseShrink()(gm).modified
    assert not _nodes(gm, lora_shrink) and len(_nodes(gm, lora_down)) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_and_gradients_equal_the_unfused_graph(dtype):
    (_, logits0, grads0), (_, logits1, grads1) = _pair(dtype, rank_pattern={"q_proj": 8, "up_proj": 3})
    assert set(grads0) == set(grads1) and len(grads0) == 2 * (2 * 7 + 2 * 3)
    if dtype == torch.float32:  # one GEMM sums dx in another order than three GEMMs and two adds
        torch.testing.assert_close(logits1, logits0, rtol=1e-6, atol=1e-6)
        for name in grads0:
            torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7)
        return
    # bf16: the forward is the same GEMM columns; the backward rounds dx once instead of after each add
    torch.testing.assert_close(logits1, logits0, rtol=0, atol=0.05)
    with fusion(False):
        gm = _model(torch.float64, rank_pattern={"q_proj": 8, "up_proj": 3})
        _, exact = _step(gm)
    for name in grads0:
        scale = exact[name].abs().max()
        err0 = (grads0[name].double() - exact[name]).abs().max() / scale
        err1 = (grads1[name].double() - exact[name]).abs().max() / scale
        assert err1 <= 1.5 * err0 + 0.02, name


def test_dropout_branches_are_not_fused():
    """PEFT draws one dropout mask per site: a branch with lora_dropout reads its own dropout node
    and stays unfused; the dropout-free adapter at the same sites is still fused. Same seed, same
    masks, same numbers."""
    (plain, logits0, grads0), (fused, logits1, grads1) = _pair(lora_dropout=0.1)
    downs = _nodes(fused, lora_down)
    assert len(downs) == 2 * (7 + 1)  # every default branch, and b's up_proj (alone at its input)
    assert all(d.args[0].op == "call_module" for d in downs if "_default_" in d.name)
    assert _split_sizes(fused) == [(2, 2)] * 2  # b on q/v; b's up_proj is alone at its input
    torch.testing.assert_close(logits1, logits0, rtol=1e-6, atol=1e-6)
    for name in grads0:  # one fused GEMM sums in another order: 1.4e-7 apart on the 16-core GPU host
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(logits1, _step(fused, seed=1)[0])  # dropout is live in this mode


def test_variants_dora_and_lora_bias_are_fused_exactly():
    for kw in ({"use_dora": True}, {"lora_bias": True}):
        (_, logits0, grads0), (fused, logits1, grads1) = _pair(extra=False, **kw)
        assert _split_sizes(fused) == [(4, 4)] * 2 + [(4, 4, 4)] * 2
        torch.testing.assert_close(logits1, logits0, rtol=1e-6, atol=1e-6)
        for name in grads0:
            torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7)


def test_fused_step_equals_peft():
    """Logits and LoRA gradients of the fused training step against PEFT (q/k/v and gate/up fused)."""
    peft = pytest.importorskip("peft")
    kw = dict(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False, lora_dropout=0.0)
    reference = peft_oracle.peft_model("llama", **kw).train()
    state = peft.get_peft_model_state_dict(reference)
    gm = graphlora.inject(peft_oracle.base("llama"), graphlora.LoraConfig(**kw)).train()
    assert len(_nodes(gm, lora_shrink)) == 4
    with torch.no_grad():
        for key, param in gm.get_adapter_state_dict().items():
            param.copy_(state[key])
    logits, grads = _step(gm)
    expected, _ = _step(reference)
    torch.testing.assert_close(logits, expected)
    theirs = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert len(theirs) == len(grads) == 2 * 7 * 2
    for name, grad in theirs.items():  # base_model.model.<site>.lora_A.default.weight
        site, _, rest = name.removeprefix("base_model.model.").partition(".lora_")
        ours = f"graphlora.{site.replace('.', '_')}.default.lora_{rest.replace('.default', '')}"
        torch.testing.assert_close(grads[ours], grad)


# ------------------------------------------------------------------------------------------ the rest still works
def test_switching_disable_and_serving_programs():
    with fusion(False):
        plain = _model()
    with fusion(True):
        fused = _model()
        with torch.no_grad():
            for gm in (plain, fused):
                gm.set_adapter("b")
            torch.testing.assert_close(fused(input_ids=IDS).logits, plain(input_ids=IDS).logits, rtol=1e-6, atol=1e-6)
            with fused.disable_adapter():  # every gate 0: the base model exactly
                got = fused(input_ids=IDS).logits
            assert torch.equal(got, fused.get_base_model()(input_ids=IDS, use_cache=False).logits)
            fused.eval()  # serving programs read the banks and are not rewritten
            fused.requires_grad_(False)
            fused(input_ids=IDS)
            programs = [p for p in fused.programs if p.module is not fused]
            assert programs and not any(_nodes(p.module, lora_shrink) for p in programs)


def test_specialize_drops_inactive_slices():
    """A zero gate at one site of a fused group (alpha 0 at k_proj) drops its A from the GEMM; an
    inactive adapter's fused GEMM goes as a whole."""
    with fusion(True):
        gm = _model(alpha_pattern={"k_proj": 0.0})
        gm.add_adapter("off", graphlora.LoraConfig(r=3, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
        gm.set_adapter_weights({"default": 0.5, "b": 0.75})
        gm.eval()
        with torch.no_grad():
            expected = gm(input_ids=IDS).logits
        assert _split_sizes(gm) == [(2, 2)] * 2 + [(3, 3)] * 2 + [(4, 4)] * 2 + [(4, 4, 4)] * 2
        fast = graphlora.specialize(gm)
        with torch.no_grad():
            torch.testing.assert_close(models.main_output(fast(input_ids=IDS, use_cache=False)), expected, rtol=1e-6, atol=1e-6)
        reads = [n.target for n in fast.graph.nodes if n.op == "get_attr"]
        assert not [t for t in reads if ".off." in t or t.endswith(".gate")]
        assert _split_sizes(fast) == [(2, 2)] * 2 + [(4, 4)] * 4  # default's q/v and gate/up, b's q/v
        gm.set_adapter("off")  # the specialized module keeps its frozen state
        with torch.no_grad():
            torch.testing.assert_close(models.main_output(fast(input_ids=IDS, use_cache=False)), expected, rtol=1e-6, atol=1e-6)


def test_delete_and_readd_give_the_same_code():
    with fusion(True):
        gm = _model()
        code = gm.code
        gm.delete_adapter("b")
        assert _split_sizes(gm) == [(4, 4)] * 2 + [(4, 4, 4)] * 2
        assert not [n for n in gm.graph.nodes if (n.meta.get("graphlora") or {}).get("adapter") == "b"]
        gm.add_adapter("b", graphlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj"]))
        assert gm.code == code


# ------------------------------------------------------------------------------------------ serving programs
def _serving(gm):
    """The module of ``gm``'s serving (``BANK``) program, after one eval call under ``no_grad``."""
    from graphlora.calls import BANK

    gm.eval()
    with torch.no_grad():
        gm(input_ids=IDS)
    return next(p for p in gm.programs if p.mode == BANK).module


def _switch_form(gm):
    """Logits of the training (switch) form in eval mode: the reference for the serving program."""
    return gm(input_ids=IDS).logits.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_serving_programs_share_one_bank_shrink_per_input_and_equal_the_switch_form(dtype):
    """q/k/v and gate/up read one input: one ``bank_shrink`` GEMM on the stacked gathered factors,
    then each site's expand; o_proj / down_proj keep their own ``lora_bank_``. Two adapters of
    different ranks, float32 adapters over a bf16 base included (one cast of x per group)."""
    from graphlora.passes.ops import bank_shrink, lora_bank_, lora_expand_

    gm = _model(dtype)
    module = _serving(gm)
    assert len(_nodes(module, bank_shrink)) == 2 * 2  # q/k/v and gate/up, per layer
    assert len(_nodes(module, lora_expand_)) == 2 * 5 and len(_nodes(module, lora_bank_)) == 2 * 2
    shrink = _nodes(module, bank_shrink)[0]
    stacked = shrink.args[1]
    assert stacked.op == "get_attr" and stacked.target.startswith("graphlora._banks.a_stack")
    assert shrink.meta["graphlora"]["sites"] == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    with torch.no_grad():
        served = gm(input_ids=IDS).logits
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(served, _switch_form(gm), **tol)
    with fusion(False):
        plain = _model(dtype)
    plain.load_state_dict(gm.state_dict())
    plain_module = _serving(plain)
    assert not _nodes(plain_module, bank_shrink) and len(_nodes(plain_module, lora_bank_)) == 2 * 7
    with torch.no_grad():  # the fused GEMM's column blocks are the unfused GEMMs: equal up to rounding
        torch.testing.assert_close(served, plain(input_ids=IDS).logits, **tol)


def test_fused_serving_follows_switches_hot_adds_width_growth_and_training_steps():
    """The stacked factors are rewritten by every gather: a switch, a third adapter active at once
    (the factors' width grows, the stack buffer is remade, the graph is not re-spliced), a hot add
    into a free slot, an optimizer step on a banked adapter."""
    gm = _model()
    module = _serving(gm)
    code = module.code
    checks = []

    def check():
        with torch.no_grad():
            served = gm(input_ids=IDS).logits
        torch.testing.assert_close(served, _switch_form(gm), rtol=1e-5, atol=1e-5)
        checks.append(served)

    gm.set_adapter("b")
    check()
    gm.add_adapter("c", graphlora.LoraConfig(r=3, target_modules=["k_proj", "gate_proj"], init_lora_weights=False))
    gm.set_adapter(["default", "b", "c"])  # K = 3
    check()
    assert _serving(gm).code == code  # same graph: the chunk count is per site, not per width
    gm.train()
    opt = torch.optim.SGD([p for n, p in gm.named_parameters() if ".c." in n or n.endswith(".c")], lr=0.5)
    _step(gm)
    opt.step()
    gm.eval()
    check()
    assert not torch.equal(checks[-1], checks[-2])


class _InPlaceBetween(torch.nn.Module):
    """Two linears read ``h``; ``h`` is doubled in place between them (an fx graph keeps it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        h = x * 1.0
        y = self.a(h)
        h.mul_(2.0)
        return y + self.b(h)


def test_siblings_with_an_in_place_write_between_them_are_not_fused():
    """Fusing would read ``h`` once, before the write: the second site would see the old ``h``.
    Training and serving programs both keep one shrink per site there; outputs equal the math."""
    from graphlora.passes.ops import bank_shrink

    torch.manual_seed(0)
    model = _InPlaceBetween().eval()
    gm = graphlora.inject(model, graphlora.LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights=False))
    models.randomize_b(gm)
    x = torch.randn(3, 8)
    assert not _nodes(gm, lora_shrink)
    module = _serving_module_for(gm, x)
    assert not _nodes(module, bank_shrink)
    (ka, _, a), (kb, _, b) = sorted(gm.graphlora.branches(), key=lambda t: t[0])
    with torch.no_grad():
        h = x * 1.0
        want = model.a(h) + a.scaling * h @ a.lora_A.weight.t() @ a.lora_B.weight.t()
        want = want + model.b(2 * h) + b.scaling * (2 * h) @ b.lora_A.weight.t() @ b.lora_B.weight.t()
        served = gm(x)
    torch.testing.assert_close(served, want)
    torch.testing.assert_close(gm(x).detach(), want)


def _serving_module_for(gm, x):
    from graphlora.calls import BANK

    gm.eval()
    with torch.no_grad():
        gm(x)
    return next(p for p in gm.programs if p.mode == BANK).module


def test_stacks_no_program_reads_are_not_refilled():
    """Deleting the adapter that made q/k/v siblings leaves q/v siblings (a new stack); the old
    stack is no longer refilled by gathers, and is again once a program reads it."""
    gm = graphlora.inject(models.tiny_llama(), graphlora.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                    init_lora_weights=False))
    gm.add_adapter("k", graphlora.LoraConfig(r=4, target_modules=["k_proj"], init_lora_weights=False))
    gm.set_adapter(["default", "k"])
    _serving(gm)
    banks = gm.graphlora._banks
    first = set(banks._live)
    assert len(first) == 2  # q/k/v of each layer
    gm.delete_adapter("k")
    gm.set_adapter("default")
    _serving(gm)
    assert banks._live and not (banks._live & first)  # q/v stacks now, the q/k/v ones not refilled
    gm.add_adapter("k", graphlora.LoraConfig(r=4, target_modules=["k_proj"], init_lora_weights=False))
    gm.set_adapter(["default", "k"])
    _serving(gm)
    assert set(banks._live) == first
    with torch.no_grad():
        served = gm(input_ids=IDS).logits
    torch.testing.assert_close(served, _switch_form(gm), rtol=1e-5, atol=1e-5)
