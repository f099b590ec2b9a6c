"""The causal-attention base pass: SDPA with a provably causal traced mask runs with ``is_causal=True``.

Every model is checked against PEFT on the same base weights and random adapters (and against the
plain model with adapters disabled) at several sequence lengths, past any sliding window.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import VOCAB, main_output, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from torch import nn

import graphlora
from graphlora import LoraConfig
from graphlora._compat import export_module
from graphlora.passes import CausalAttention, causal_sdpa
from graphlora.prepare import window_lengths

SDPA = torch.ops.aten.scaled_dot_product_attention.default
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_mistral(window: int = 8):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        sliding_window=window)
    return MistralForCausalLM(cfg).eval()


def tiny_qwen2(window: int = 8):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      use_sliding_window=True, sliding_window=window,
                      layer_types=["full_attention", "sliding_attention"])
    return Qwen2ForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------- helpers
def _graphs(gm) -> list[torch.fx.Graph]:
    return [p.module.graph for p in gm.programs]  # the first program's module is gm itself


def _attention(graph: torch.fx.Graph) -> list[str]:
    """Per SDPA call in order: "causal" (is_causal, no mask), "masked" or "causal_sdpa"."""
    out = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target is causal_sdpa:
            out.append("causal_sdpa")
        elif n.op == "call_function" and n.target is SDPA:
            causal = n.args[3:6] == (None, 0.0, True) and not any(k in n.kwargs for k in ("attn_mask", "is_causal"))
            out.append("causal" if causal else "masked")
    return out


def _with_peft(model: nn.Module, targets: list[str]):
    """graphlora and PEFT on copies of ``model`` with the same random (nonzero) LoRA weights."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)).eval()
    gm = graphlora.inject(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    copied = 0
    with torch.no_grad():
        for name, module in ref.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                site = name.removeprefix("base_model.model.").replace(".", "_")
                branch = gm.graphlora.branch(site, "default")
                branch.lora_A.weight.copy_(module.lora_A["default"].weight)
                branch.lora_B.weight.copy_(module.lora_B["default"].weight)
                copied += 1
    assert copied == sum(1 for _ in gm.graphlora.branches()) > 0
    return gm, ref


def _check(gm, ref, base: nn.Module, lengths, batch: int = 2, **extra) -> None:
    with torch.no_grad():
        for n in lengths:
            ids = token_ids(batch, n, seed=n)
            kwargs = {k: v(batch, n) for k, v in extra.items()}
            got, want = main_output(gm(input_ids=ids, **kwargs)), main_output(ref(input_ids=ids, **kwargs))
            torch.testing.assert_close(got, want, **TOL)
            gm.disable_adapters()
            try:
                plain = main_output(gm(input_ids=ids, **kwargs))
            finally:
                gm.enable_adapters()
            torch.testing.assert_close(plain, main_output(base(input_ids=ids, **kwargs)), **TOL)


# ---------------------------------------------------------------------------- transformers models
@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    gm, ref = _with_peft(model, ["q_proj", "v_proj"])
    return gm, ref, model


def test_llama_mask_becomes_is_causal(llama):
    gm, ref, model = llama
    assert _attention(gm.graph) == ["causal", "causal"]
    assert "aten.index" not in gm.code and "new_ones" not in gm.code  # the mask is no longer built
    _check(gm, ref, model, lengths=(1, 5, 16, 40), batch=3)


def test_llama_with_padding_mask_is_left_alone(llama):
    gm, ref, model = llama

    def padded(batch, n):  # right padding on row 0, left padding on the last row
        mask = torch.ones(batch, n, dtype=torch.long)
        mask[0, n - n // 3:] = 0
        mask[-1, : n // 4] = 0
        return mask

    _check(gm, ref, model, lengths=(6, 13), batch=3, attention_mask=padded)
    variants = [p.module.graph for p in gm.programs if "attention_mask" in dict(p.key[0])]
    assert variants and all(_attention(g) == ["masked", "masked"] for g in variants)


def test_sliding_window_mistral_is_left_alone_and_correct_past_the_window():
    model = tiny_mistral(window=8)
    gm, ref = _with_peft(model, ["q_proj", "o_proj"])
    assert _attention(gm.graph) == ["masked", "masked"]
    _check(gm, ref, model, lengths=(5, 9, 20))


def test_qwen2_layer_types_rewrite_only_the_full_attention_layer():
    model = tiny_qwen2(window=8)
    gm, ref = _with_peft(model, ["q_proj", "v_proj"])
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]
    layers = [n.meta["nn_module_stack"][next(reversed(n.meta["nn_module_stack"]))][0] for n in calls]
    assert layers == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert _attention(gm.graph) == ["causal", "masked"]
    _check(gm, ref, model, lengths=(3, 12, 25))


def test_gpt2_is_rewritten_and_correct():
    model = tiny_gpt2()
    gm, ref = _with_peft(model, ["c_attn"])
    assert _attention(gm.graph) == ["causal", "causal"]
    _check(gm, ref, model, lengths=(1, 7, 30))


def test_bert_bidirectional_mask_is_left_alone():
    model = tiny_bert()
    gm, ref = _with_peft(model, ["query", "value"])
    assert all(_attention(g) == ["masked", "masked"] for g in _graphs(gm))
    _check(gm, ref, model, lengths=(4, 11))


def test_window_lengths_come_from_the_config():
    assert window_lengths(tiny_mistral(window=8)) == (9, 10)
    assert window_lengths(tiny_llama()) == ()
    assert window_lengths(nn.Linear(2, 2)) == ()


# ---------------------------------------------------------------------------- hand-built masks
class Attention(nn.Module):
    """One attention layer whose mask is built in ``forward`` in one of several ways."""

    def __init__(self, kind: str, heads: int = 2, dim: int = 8) -> None:
        super().__init__()
        self.kind, self.heads = kind, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.register_buffer("tril", torch.ones(512, 512, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        i = torch.arange(n, device=x.device)
        causal = i[None, :] <= i[:, None]
        dropout, is_causal = 0.0, False
        if self.kind == "bool":
            mask = causal[None, None].expand(b, 1, n, n)
        elif self.kind == "float":
            mask = torch.zeros(n, n, dtype=x.dtype, device=x.device).masked_fill(~causal, torch.finfo(x.dtype).min)
        elif self.kind == "window":  # a window longer than every default probe: found as a constant
            mask = causal & (i[None, :] > i[:, None] - 500)
        elif self.kind == "buffer":  # stored values: could change after the rewrite
            mask = self.tril[:n, :n]
        elif self.kind == "input":  # made from the input's values
            mask = causal & (x[:, None, :, :1] > -100).transpose(-1, -2)
        elif self.kind == "upper":  # not causal
            mask = i[None, :] >= i[:, None]
        elif self.kind == "dropout":
            mask, dropout = causal, 0.5
        else:  # "is_causal"
            mask, is_causal = None, True
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        return out.transpose(1, 2).reshape(b, n, d)


def _export(kind: str):
    torch.manual_seed(0)
    module = Attention(kind).eval()
    return module, export_module(module, {"x": torch.randn(2, 6, 8)})


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_bool_and_float_causal_masks_are_rewritten(kind):
    module, gm = _export(kind)
    assert CausalAttention()(gm).modified
    assert _attention(gm.graph) == ["causal"]
    for n in (1, 2, 9, 70):
        x = torch.randn(3, n, 8)
        torch.testing.assert_close(gm(x=x), module(x), **TOL)


@pytest.mark.parametrize("kind", ["window", "buffer", "input", "upper", "dropout", "is_causal"])
def test_masks_not_shown_causal_are_left_alone(kind):
    _, gm = _export(kind)
    code = gm.code
    assert not CausalAttention()(gm).modified
    assert gm.code == code


def test_lengths_past_the_probe_limit_refuse():
    _, gm = _export("bool")
    assert not CausalAttention(lengths=(10**6,))(gm).modified
    assert CausalAttention(lengths=(301, 302))(gm).modified


class CrossLength(nn.Module):
    """Queries from ``x``, keys from ``y``: two length symbols, a top-left causal mask."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        i, j = torch.arange(x.shape[1]), torch.arange(y.shape[1])
        mask = j[None, :] <= i[:, None]
        return F.scaled_dot_product_attention(x[:, None], y[:, None], y[:, None], attn_mask=mask)[:, 0]


def test_unequal_length_symbols_get_the_runtime_check():
    module = CrossLength()
    gm = export_module(module, {"x": torch.randn(2, 6, 4), "y": torch.randn(2, 7, 4)})
    assert CausalAttention()(gm).modified
    assert _attention(gm.graph) == ["causal_sdpa"]
    for nx, ny in ((5, 5), (1, 1), (3, 8), (9, 4)):
        x, y = torch.randn(2, nx, 4), torch.randn(2, ny, 4)
        torch.testing.assert_close(gm(x=x, y=y), module(x, y), **TOL)


def test_causal_sdpa_falls_back_to_the_mask_when_lengths_differ():
    q, k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    mask = torch.ones(3, 5, dtype=torch.bool).tril(2)  # bottom-right aligned, unlike is_causal
    torch.testing.assert_close(causal_sdpa(q, k, v, mask, scale=0.3),
                               F.scaled_dot_product_attention(q, k, v, mask, scale=0.3), **TOL)
    same = torch.randn(2, 2, 5, 4)
    torch.testing.assert_close(causal_sdpa(same, k, v, torch.zeros(5, 5, dtype=torch.bool)),
                               F.scaled_dot_product_attention(same, k, v, is_causal=True), **TOL)
