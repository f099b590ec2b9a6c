"""Hand-written linears (``x @ W.T (+ b)``, Falcon's ``FalconLinear``) as linear sites, with PEFT as the oracle.

Falcon's ``FalconLinear(nn.Linear)`` computes ``input @ self.weight.T`` (then ``+ self.bias``), so its
trace holds ``matmul`` + ``add`` instead of ``linear``; the base pass ``MatmulAsLinear`` turns each into
one ``matmul_linear`` node, which the site finder reads as the module's linear site. PEFT wraps
``FalconLinear`` as a ``Linear``, so its numbers are the reference for LoRA, IA3 and DoRA.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphlora
from graphlora import IA3Config, LoraConfig
from graphlora.passes import MatmulAsLinear, locate_sites, matmul_linear, run_passes
from graphlora.passes.sites import getattr_path

from models import VOCAB, main_output, randomize_b, token_ids
from peft_oracle import run

peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-5)
IDS = token_ids(batch=2, seq=7)
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
#: (new_decoder_architecture, bias): both attention layouts, with and without biases
VARIANTS = [(False, False), (False, True), (True, False), (True, True)]
VARIANT_IDS = [f"{'new' if new else 'old'}-{'bias' if bias else 'nobias'}" for new, bias in VARIANTS]


def tiny_falcon(new_decoder_architecture: bool = False, bias: bool = False, seed: int = 0):
    """A tiny Falcon (64 wide, 2 layers, 4 heads) built from its config: no download."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(seed)
    cfg = FalconConfig(vocab_size=max(128, VOCAB), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       new_decoder_architecture=new_decoder_architecture, bias=bias,
                       num_kv_heads=2 if new_decoder_architecture else None)
    model = FalconForCausalLM(cfg).eval()
    if bias:  # non-zero biases, so a bias left out (or added twice) shows
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias") and "ln" not in name:
                    p.normal_(std=0.1)
    return model


def _peft(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config).eval()


def _load_peft(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(model, path).eval()


def _randomize(model, marker: str, seed: int = 0, around: float = 0.0):
    """Give every adapter parameter whose name contains ``marker`` random values (init is identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name:
                p.copy_(around + 0.3 * torch.randn(p.shape, generator=gen))


# ---------------------------------------------------------------------------------- locate
@pytest.mark.parametrize("new,bias", VARIANTS, ids=VARIANT_IDS)
def test_falcon_linears_are_sites_and_selected_as_peft_selects_them(new, bias):
    for targets in (TARGETS, "all-linear", ["dense"]):
        gm = graphlora.inject(tiny_falcon(new, bias), LoraConfig(r=4, target_modules=targets))
        ours = {s.name for s in gm.sites if s.ranks}
        theirs = {n.removeprefix("base_model.model.")
                  for n in _peft(tiny_falcon(new, bias), peft.LoraConfig(r=4, target_modules=targets)).targeted_module_names}
        assert ours == theirs and len(ours) >= 2, targets
    shapes = {s.name: (s.kind, s.in_features, s.out_features) for s in gm.sites}
    assert shapes["transformer.h.0.mlp.dense_h_to_4h"] == ("linear", 64, 256)
    assert shapes["transformer.h.1.mlp.dense_4h_to_h"] == ("linear", 256, 64)


def test_a_target_matching_nothing_suggests_linear_sites_not_the_embedding():
    with pytest.raises(graphlora.NoTargetError) as info:
        graphlora.inject(tiny_falcon(), LoraConfig(r=4, target_modules=["q_proj"]))
    suggested = str(info.value).split("Closest linear sites:")[1]
    assert "query_key_value" in suggested and "word_embeddings" not in suggested


# ---------------------------------------------------------------------------------- LoRA numbers
@pytest.mark.parametrize("new,bias", VARIANTS, ids=VARIANT_IDS)
def test_lora_peft_to_graphlora_to_peft(new, bias, tmp_path):
    ref = _peft(tiny_falcon(new, bias), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                         init_lora_weights=False))
    ref.save_pretrained(tmp_path / "theirs")
    expected = run(ref, IDS)
    assert not torch.allclose(expected, run(tiny_falcon(new, bias), IDS), atol=1e-3)  # the adapter does something
    gm = graphlora.inject(tiny_falcon(new, bias), str(tmp_path / "theirs"))
    torch.testing.assert_close(run(gm, IDS), expected, **TOL)
    gm.save_adapter(tmp_path / "ours")
    torch.testing.assert_close(run(_load_peft(tiny_falcon(new, bias), tmp_path / "ours"), IDS), expected, **TOL)


@pytest.mark.parametrize("new,bias", [(False, True), (True, False)], ids=["old-bias", "new-nobias"])
def test_lora_training_step_gives_peft_gradients(new, bias, tmp_path):
    gm = graphlora.inject(tiny_falcon(new, bias), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_b(gm)
    gm.save_adapter(tmp_path)
    ref = _load_peft(tiny_falcon(new, bias), tmp_path)
    for name, p in ref.named_parameters():
        p.requires_grad_("lora_" in name)
    gm.train(), ref.train()
    main_output(gm(input_ids=IDS)).square().mean().backward()
    main_output(ref(input_ids=IDS)).square().mean().backward()
    theirs = {n.removeprefix("base_model.model."): p.grad for n, p in ref.named_parameters() if p.grad is not None}
    ours = {key: p.grad for key, p in _peft_keyed_parameters(gm).items()}
    assert set(ours) == set(theirs) and len(ours) == 16
    for key, grad in theirs.items():
        torch.testing.assert_close(ours[key], grad, **TOL)


def _peft_keyed_parameters(gm):
    """The default adapter's LoRA parameters keyed as PEFT names them (without ``base_model.model.``)."""
    out = {}
    for site in gm.sites:
        if site.ranks:
            branch = gm.graphlora.branch(site.name.replace(".", "_"), "default")
            out[f"{site.name}.lora_A.default.weight"] = branch.lora_A.weight
            out[f"{site.name}.lora_B.default.weight"] = branch.lora_B.weight
    return out


@pytest.mark.parametrize("new,bias", [(False, True), (True, True)], ids=["old-bias", "new-bias"])
def test_disabled_adapter_is_the_base_model_bit_for_bit(new, bias):
    model = tiny_falcon(new, bias)
    expected = run(model, IDS)
    gm = graphlora.inject(model, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    assert not torch.allclose(run(gm, IDS), expected, atol=1e-4)
    with gm.disable_adapter():
        assert torch.equal(run(gm, IDS), expected)
        gm.train()  # the switch form (gates at zero) too
        with torch.no_grad():
            assert torch.equal(main_output(gm(input_ids=IDS)), expected)
        gm.eval()


# ---------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("new,bias", [(False, True), (True, False)], ids=["old-bias", "new-nobias"])
def test_merge_equals_peft_and_unmerge_restores_exactly(new, bias, tmp_path):
    ref = _peft(tiny_falcon(new, bias), peft.LoraConfig(r=3, lora_alpha=7, target_modules=TARGETS,
                                                         init_lora_weights=False))
    ref.save_pretrained(tmp_path)
    gm = graphlora.inject(tiny_falcon(new, bias), str(tmp_path))
    weights = {s.name: getattr_path(gm, f"{s.name}.weight") for s in gm.sites if s.ranks}
    before = {name: w.clone() for name, w in weights.items()}
    expected = run(gm, IDS)
    gm.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = dict(copy.deepcopy(ref).merge_and_unload().named_parameters())
    for name, w in weights.items():
        assert not torch.equal(w, before[name]), name
        torch.testing.assert_close(w, merged[f"{name}.weight"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run(gm, IDS), expected, **TOL)
    gm.unmerge_adapter()
    for name, w in weights.items():
        assert torch.equal(w, before[name]), name
    assert torch.equal(run(gm, IDS), expected)
    plain = gm.merge_and_unload()
    torch.testing.assert_close(run(plain, IDS), expected, **TOL)


# ---------------------------------------------------------------------------------- other methods
@pytest.mark.parametrize("new,bias", [(False, True), (True, False)], ids=["old-bias", "new-nobias"])
def test_ia3_peft_to_graphlora_to_peft(new, bias, tmp_path):
    config = peft.IA3Config(target_modules=["query_key_value", "dense_4h_to_h"], feedforward_modules=["dense_4h_to_h"])
    ref = _peft(tiny_falcon(new, bias), config)
    _randomize(ref, "ia3_l", around=1.0)
    ref.save_pretrained(tmp_path / "theirs")
    expected = run(ref, IDS)
    gm = graphlora.inject(tiny_falcon(new, bias), str(tmp_path / "theirs"))
    assert isinstance(gm.adapters["default"], IA3Config)
    torch.testing.assert_close(run(gm, IDS), expected, **TOL)
    gm.save_adapter(tmp_path / "ours")
    torch.testing.assert_close(run(_load_peft(tiny_falcon(new, bias), tmp_path / "ours"), IDS), expected, **TOL)


@pytest.mark.parametrize("new,bias", [(False, True), (True, False)], ids=["old-bias", "new-nobias"])
def test_dora_peft_to_graphlora_to_peft(new, bias, tmp_path):
    ref = _peft(tiny_falcon(new, bias), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value", "dense"],
                                                         use_dora=True, init_lora_weights=False))
    with torch.no_grad():  # magnitudes away from ||W + sBA|| so the rescaling matters
        gen = torch.Generator().manual_seed(3)
        for name, p in ref.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
    ref.save_pretrained(tmp_path / "theirs")
    expected = run(ref, IDS)
    gm = graphlora.inject(tiny_falcon(new, bias), str(tmp_path / "theirs"))
    assert gm.adapters["default"].use_dora
    torch.testing.assert_close(run(gm, IDS), expected, **TOL)
    gm.save_adapter(tmp_path / "ours")
    torch.testing.assert_close(run(_load_peft(tiny_falcon(new, bias), tmp_path / "ours"), IDS), expected, **TOL)


# ---------------------------------------------------------------------------------- the general rule
class HandWritten(nn.Module):
    """Hand-written linears in several spellings, next to matmuls that are not linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 12, bias=False)
        self.c = nn.Linear(12, 6)
        self.w = nn.Parameter(torch.randn(6, 6) * 0.3)
        self.register_buffer("fixed", torch.randn(6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ self.a.weight.T + self.a.bias)  # FalconLinear's spelling
        h = torch.tanh(torch.matmul(h, self.b.weight.permute(1, 0)))
        h = self.c.bias + h.matmul(self.c.weight.transpose(-1, -2))  # bias first
        h = h @ self.w.t()  # a bare parameter
        h = h @ self.fixed.T  # a buffer: not a trainable layer, not a site
        return h @ h.transpose(-1, -2)  # activation x activation: not a site


def _hand_written_reference(model, x, lora):
    """The model's forward with ``y += s (x A^T) B^T`` after each adapted layer (``lora``: name -> (A, B, s))."""
    def layer(name, h, weight, bias=None):
        y = F.linear(h, weight, bias)
        if name in lora:
            a, b, s = lora[name]
            y = y + s * (h @ a.t()) @ b.t()
        return y

    h = torch.tanh(layer("a", x, model.a.weight, model.a.bias))
    h = torch.tanh(layer("b", h, model.b.weight))
    h = layer("c", h, model.c.weight, model.c.bias)
    h = layer("w", h, model.w)
    h = h @ model.fixed.T
    return h @ h.transpose(-1, -2)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_hand_written_linears_in_a_plain_module(frontend):
    torch.manual_seed(0)
    model = HandWritten().eval()
    x = torch.randn(2, 5, 8)
    expected = model(x)
    traced = (torch.fx.symbolic_trace(model) if frontend == "fx"
              else torch.export.export(model, (x,), strict=False).module())
    result = run_passes(traced, [MatmulAsLinear()])
    assert result.modified
    graph = result.graph_module
    assert sum(n.target is matmul_linear for n in graph.graph.nodes) == 4
    torch.testing.assert_close(graph(x), expected, rtol=0, atol=0)  # the same ops: bit for bit
    assert {s.name for s in locate_sites(graph)} == {"a", "b", "c", "w"}
    assert run_passes(graph, [MatmulAsLinear()]).modified is False  # nothing left to rewrite


def test_lora_on_hand_written_linears_of_a_plain_module():
    torch.manual_seed(0)
    model = HandWritten().eval()
    x = torch.randn(2, 5, 8)
    expected = model(x)
    gm = graphlora.inject(model, LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b", "c", "w"],
                                            init_lora_weights=False))
    # the bare parameter w is no site: PEFT adapts nn.Linear layers only (the pass alone, above, reads it)
    assert {s.name: (s.in_features, s.out_features) for s in gm.sites if s.ranks} == {
        "a": (8, 12), "b": (12, 12), "c": (12, 6)}
    lora = {name: (gm.graphlora.branch(name, "default").lora_A.weight,
                   gm.graphlora.branch(name, "default").lora_B.weight, 2.0) for name in "abc"}
    with torch.no_grad():
        torch.testing.assert_close(gm(x), _hand_written_reference(model, x, lora), **TOL)
        with gm.disable_adapter():
            assert torch.equal(gm(x), expected)


def test_a_bias_of_another_module_or_a_shared_matmul_stays_outside_the_site():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Linear(4, 4)
            self.q = nn.Linear(4, 4)

        def forward(self, x):
            y = x @ self.p.weight.T  # read twice: its adds are not the layer's bias
            return (y + self.p.bias) * y + self.q.bias

    torch.manual_seed(0)
    model = Shared().eval()
    x = torch.randn(3, 4)
    graph = run_passes(torch.export.export(model, (x,), strict=False).module(), [MatmulAsLinear()]).graph_module
    (node,) = [n for n in graph.graph.nodes if n.target is matmul_linear]
    assert len(node.args) == 2  # no bias taken in
    torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)

    gm = graphlora.inject(model, LoraConfig(r=2, lora_alpha=2, target_modules=["p"], init_lora_weights=False))
    branch = gm.graphlora.branch("p", "default")
    with torch.no_grad():
        y = x @ model.p.weight.T + (x @ branch.lora_A.weight.T) @ branch.lora_B.weight.T
        torch.testing.assert_close(gm(x), (y + model.p.bias) * y + model.q.bias, **TOL)


class _TiedHead(torch.nn.Module):
    """An embedding whose table is also the output head, written out: ``h @ embed.weight.T``."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, ids):
        return self.lin(self.embed(ids)) @ self.embed.weight.T


class _MemoryKeys(torch.nn.Module):
    """Attention against learned keys: ``q(x) @ mem.T`` with ``mem`` a raw 2-D parameter."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(8, 8)
        self.mem = torch.nn.Parameter(torch.randn(5, 8))

    def forward(self, x):
        return torch.softmax(self.q(x) @ self.mem.T, -1)


def test_only_linear_layers_weights_are_hand_written_linears():
    """``x @ W.T`` is a site only where ``W`` is an ``nn.Linear``'s weight, as PEFT adapts only those:
    a tied head ``h @ embed.weight.T`` keeps the embedding's LoRA on the lookup alone (it was
    spliced onto the float hidden state too, and the forward failed), and a learned key matrix is
    neither an ``all-linear`` site nor a target (PEFT: ``NoMatchingPeftModuleError``)."""
    import peft

    torch.manual_seed(0)
    tied, ids = _TiedHead().eval(), torch.randint(0, 20, (2, 5))
    cfg = dict(r=2, lora_alpha=4, target_modules=["embed"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(copy.deepcopy(tied), peft.LoraConfig(**cfg)).eval()
    gm = graphlora.inject(copy.deepcopy(tied), graphlora.LoraConfig(**cfg))
    gm.load_adapter_state_dict(peft.get_peft_model_state_dict(ref))
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), ref(ids), rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    keys = _MemoryKeys().eval()
    gm = graphlora.inject(copy.deepcopy(keys), graphlora.LoraConfig(r=2, target_modules="all-linear"))
    saved = list(gm.get_adapter_state_dict("default"))
    assert saved and all(".q.lora_" in k for k in saved), saved  # PEFT's all-linear: q alone
    with pytest.raises(graphlora.NoTargetError):
        graphlora.inject(copy.deepcopy(keys), graphlora.LoraConfig(r=2, target_modules=["mem"]))


@pytest.mark.parametrize("new", [False, True])
def test_static_cache_generate_equals_peft(new, tmp_path):
    """``generate(cache_implementation="static")``: the cache graphlora allocates up front has the
    heads Falcon writes (multi-query: one; the new architecture: every head), not the config's
    ``num_kv_heads`` (was: index_copy_ failed on multi-query Falcon, the default config)."""
    targets = ["query_key_value", "dense"]
    ref = _peft(tiny_falcon(new), peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    ref.save_pretrained(tmp_path)
    gm = graphlora.inject(tiny_falcon(new), str(tmp_path)).eval()
    ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=1,
              cache_implementation="static")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(gm.generate(input_ids=ids, **kw), ref.generate(input_ids=ids, **kw))
