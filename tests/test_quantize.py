"""A quantized frozen base (QLoRA): graphlora.quantize_base, merging into it, PEFT round trips, bitsandbytes.

References: torchao's own NF4 dequantization (``NF4Tensor.get_original_weight``), a graph injected on
a model whose base weights are the dequantized NF4 weights (dense), and PEFT on the same quantized
base.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.testing import assert_close

import graphlora
from models import randomize_b, tiny_llama, token_ids

from graphlora.passes.quantize import QuantizedWeight, quantize_tensor  # noqa: E402
from graphlora.passes.sites import getattr_path  # noqa: E402
from graphlora.passes.splice import site_key  # noqa: E402
from graphlora.quantize import QuantizationError  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = token_ids(2, 7)


def _lora(**kw) -> graphlora.LoraConfig:
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("target_modules", TARGETS)
    return graphlora.LoraConfig(**kw)


def _logits(model, ids=IDS, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def _dequantized_model(fmt: str = "nf4"):
    """tiny_llama whose linear weights (not lm_head) are replaced by their dequantized ``fmt`` values."""
    model = tiny_llama(layers=1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(quantize_tensor(module.weight, fmt).dequantize())
    return model


def _quantized_model(fmt: str = "nf4"):
    """tiny_llama whose linear weights (not lm_head) are QuantizedWeight buffers (the base PEFT sees)."""
    model = tiny_llama(layers=1)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            q = quantize_tensor(module.weight, fmt)
            del module.weight
            module.register_buffer("weight", q)
    return model


def _peft_on(base, path, names=("default",)):
    """PEFT with the adapters saved under ``path`` on ``base`` (first name is ``path`` itself)."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(base, str(path), is_trainable=True)
        for name in names[1:]:
            model.load_adapter(str(path / name), adapter_name=name, is_trainable=True)
    return model.eval()


@pytest.fixture(scope="module")
def quant():
    """A quantized gm (1-layer tiny Llama, NF4) with adapter ``default`` (random B), the labels
    signature traced before quantizing, and its report."""
    gm = graphlora.inject(tiny_llama(layers=1), _lora())
    randomize_b(gm, seed=3)
    report = graphlora.quantize_base(gm, "nf4", trace=[{"input_ids": IDS, "labels": IDS}])
    return gm, report


@pytest.fixture(scope="module")
def ref(quant, tmp_path_factory):
    """PEFT on the dequantized weights (dense), with the quantized gm's adapter: the reference."""
    pytest.importorskip("peft")
    gm, _ = quant
    path = tmp_path_factory.mktemp("qlora_ref")
    gm.save_adapter(path)
    return _peft_on(_dequantized_model(), path)


def _copy_adapter(src, dst, name: str) -> None:
    """Give ``dst``'s adapter ``name`` the tensors of ``src``'s (the state dicts share storage)."""
    theirs = dst.get_adapter_state_dict(name)
    with torch.no_grad():
        for key, value in src.get_adapter_state_dict(name).items():
            theirs[key].copy_(value)


def _lora_grads_graphlora(gm) -> dict:
    return {(key, name, part): getattr(branch, part).weight.grad.clone()
            for key, name, branch in gm.graphlora.branches() for part in ("lora_A", "lora_B")}


def _lora_grads_peft(model) -> dict:
    out = {}
    for pname, param in model.named_parameters():
        if param.grad is None:
            continue
        head, part, adapter, _ = pname.rsplit(".", 3)
        out[(site_key(head[len("base_model.model."):]), adapter, part)] = param.grad.clone()
    return out


# ---------------------------------------------------------------------------- the NF4 format
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_packing_and_dequantize_match_torchao(dtype):
    pytest.importorskip("torchao", reason="torchao is not installed (the reference NF4 implementation)")
    from torchao.quantization import to_nf4

    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0)).to(dtype)
    q = quantize_tensor(w, "nf4")
    theirs = to_nf4(w, 64, q.params[1])
    assert torch.equal(q.inner["data"], theirs.quantized_data)
    assert torch.equal(q.inner["scalers"], theirs.quantized_scalers)
    assert torch.equal(q.inner["factor"], theirs.quantization_factor)
    assert torch.equal(q.dequantize(), theirs.get_original_weight())
    assert q.dtype == dtype and q.shape == w.shape
    assert q.nbytes_packed <= 0.3 * w.numel() * 2  # against bf16


def test_int8_error_bound():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_tensor(w, "int8")
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()


# ---------------------------------------------------------------------------- the graph
def test_quantized_graph_equals_dequantized_reference(quant, ref):
    gm, report = quant
    assert all(isinstance(getattr_path(gm, f"{m}.weight"), QuantizedWeight) for m in report.modules)
    assert ("lm_head", "output head") in report.skipped and len(report.modules) == 7
    assert report.ratio_vs_bf16 <= 0.3
    gm.set_adapter("default")
    assert_close(_logits(gm), _logits(ref), rtol=1e-5, atol=1e-5)
    gm.disable_adapters()
    try:  # the base alone: the source model, on the same QuantizedWeight tensors
        assert_close(_logits(gm), _logits(gm.programs.source), rtol=1e-5, atol=1e-5)
    finally:
        gm.enable_adapters()


def test_training_step_matches_dequantized_reference(quant, ref):
    gm, _ = quant
    losses, grads = [], []
    for model, read in ((gm, _lora_grads_graphlora), (ref, _lora_grads_peft)):
        model.train()
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(read(model))
        model.zero_grad(set_to_none=True)
        model.eval()
    assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert len(grads[0]) == 6 and grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        assert_close(grads[0][key], grads[1][key], rtol=1e-4, atol=1e-6)
    assert not any(isinstance(p, QuantizedWeight) for p in gm.parameters())


def test_switching_and_mixed_batch_on_quantized_base(quant, tmp_path):
    gm, _ = quant
    gm.add_adapter("other", _lora(r=2))  # re-splices every program over the quantized base
    try:
        randomize_b(gm, "other", seed=5)
        gm.save_adapter(tmp_path, adapter_name=None)
        theirs = _peft_on(_dequantized_model(), tmp_path, ("default", "other"))
        outs = {}
        for name in ("default", "other"):
            gm.set_adapter(name)
            theirs.set_adapter(name)
            outs[name] = _logits(gm)
            assert_close(outs[name], _logits(theirs), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(outs["default"], outs["other"])
        gm.set_adapter("default")
        mixed = _logits(gm, adapter_names=["other", "default"])
        assert_close(mixed[0], outs["other"][0], rtol=1e-5, atol=1e-5)
        assert_close(mixed[1], outs["default"][1], rtol=1e-5, atol=1e-5)
    finally:
        gm.set_adapter("default")
        gm.delete_adapter("other")
    assert isinstance(getattr_path(gm, "model.layers.0.mlp.down_proj.weight"), QuantizedWeight)


def test_compile_on_quantized_base(quant, ref):
    gm, _ = quant
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True, dynamic=False)
    assert_close(_logits(compiled), _logits(ref), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- bad input
def test_quantizing_twice_is_an_error(quant):
    gm, _ = quant
    before = _logits(gm)
    with pytest.raises(QuantizationError, match="already quantized"):
        graphlora.quantize_base(gm, "int8")
    with pytest.raises(QuantizationError, match="unknown format 'fp3'"):
        graphlora.quantize_base(gm, "fp3")
    assert_close(_logits(gm), before, rtol=0, atol=0)


def test_merge_refused_without_permission_then_requantized(quant, ref):
    gm, _ = quant
    weight = getattr_path(gm, "model.layers.0.self_attn.q_proj.weight")
    packed = {k: v.clone() for k, v in weight.inner.items()}
    before = _logits(gm)
    with pytest.raises(graphlora.MergeError, match="allow_requantize"):
        gm.merge_adapter()
    assert not gm.merged and all(torch.equal(packed[k], v) for k, v in weight.inner.items())
    with graphlora.allow_requantize():
        gm.merge_adapter()
    try:
        assert gm.merged
        # the merged weight is quant(dequant(W) + s B A), still packed NF4
        assert isinstance(getattr_path(gm, "model.layers.0.self_attn.q_proj.weight"), QuantizedWeight)
        ref.merge_adapter()
        expected = quantize_tensor(ref.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, "nf4")
        ref.unmerge_adapter()
        assert torch.equal(weight.dequantize(), expected.dequantize())
        assert (_logits(gm) - before).abs().max() < 0.2  # rounding only
    finally:
        gm.unmerge_adapter()
    assert all(torch.equal(packed[k], v) for k, v in weight.inner.items())  # exact restore
    assert_close(_logits(gm), before, rtol=0, atol=0)


def test_new_signature_after_quantizing_is_a_clear_error(quant):
    gm, _ = quant
    with pytest.raises(graphlora.SignatureError, match="before quantizing"):
        _logits(gm, attention_mask=torch.ones_like(IDS))


# ---------------------------------------------------------------------------- PEFT round trip
def test_peft_loads_adapters_on_the_same_quantized_base(quant, tmp_path):
    pytest.importorskip("peft")
    gm, _ = quant
    gm.set_adapter("default")
    gm.save_adapter(tmp_path)
    theirs = _peft_on(_quantized_model(), tmp_path)
    assert_close(_logits(theirs), _logits(gm), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- bitsandbytes models
def _bnb_llama():
    """A one-layer Llama whose linear widths are multiples of bitsandbytes' 4-bit block size (64):
    bitsandbytes 0.50's CPU inference path repacks weights per block row and fails on narrower ones
    on some CPUs (``shape '[32, 0]' is invalid``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models import VOCAB

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _bnb_configs():
    from transformers import BitsAndBytesConfig

    return {
        "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
        "8bit": BitsAndBytesConfig(load_in_8bit=True),
    }


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_bitsandbytes_model_injects_trains_and_round_trips_with_peft(bits, tmp_path):
    """A model loaded with BitsAndBytesConfig: inject, train, save; PEFT loads the adapter on the same
    quantized base (loaded again from disk) with equal outputs."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    pytest.importorskip("peft")
    import peft
    from transformers import AutoModelForCausalLM

    from graphlora.quantize import inject_bnb

    _bnb_llama().save_pretrained(tmp_path / "base")

    def load():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=_bnb_configs()[bits],
                                                        device_map="cpu").eval()

    model = load()
    assert type(model.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    base_out = _logits(model)
    gm = inject_bnb(model, _lora())
    weight = getattr_path(gm, "model.layers.0.mlp.down_proj.weight")
    assert isinstance(weight, QuantizedWeight) and weight.fmt == ("bnb4" if bits == "4bit" else "bnb8")
    gm.disable_adapters()
    assert_close(_logits(gm), base_out, rtol=0, atol=0)  # the same base function as bitsandbytes'
    gm.enable_adapters()
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=1.0)
    gm.train()
    for _ in range(2):  # train (loss from the logits: no second trace)
        logits = gm(input_ids=IDS).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    gm.eval()
    ours = _logits(gm)
    assert (ours - base_out).abs().max() > 1e-3  # it trained
    with pytest.raises(graphlora.MergeError, match="bitsandbytes"):
        gm.merge_adapter()
    gm.save_adapter(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(load(), str(tmp_path / "adapter")).eval()
    assert_close(_logits(theirs), ours, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- int8, fx frontend
def test_int8_on_an_fx_traced_mlp_matches_dequantized_reference():
    """int8 weight-only on a symbolic_trace graph (nn.Linear module calls and an F.linear site)."""
    import copy

    from models import FunctionalMLP

    torch.manual_seed(0)
    model = FunctionalMLP()
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("fc1", "proj", "fc2"):
            w = getattr(dense, name).weight
            w.copy_(quantize_tensor(w, "int8").dequantize())
    config = graphlora.LoraConfig(r=2, target_modules=["fc1", "proj", "fc2"])
    gm, ref = graphlora.inject(model, config), graphlora.inject(dense, config)
    randomize_b(gm, seed=1)
    _copy_adapter(gm, ref, "default")
    report = graphlora.quantize_base(gm, "int8")
    assert set(report.modules) == {"fc1", "proj", "fc2"}
    assert report.packed_bytes == report.values + 4 * (20 + 20 + 6)  # int8 values + one fp32 scale a row
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert_close(gm(x), ref(x), rtol=1e-5, atol=1e-6)
        gm.disable_adapters()
        assert_close(gm(x), dense(x), rtol=1e-5, atol=1e-6)
        gm.enable_adapters()
