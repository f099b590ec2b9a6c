"""``bias="none" | "all" | "lora_only"`` against PEFT: which base biases train, the file keys, and
outputs after loading trained biases both ways (tiny BERT and GPT-2 with ``Conv1D``, fp32)."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import graphlora
from graphlora import AdapterFileError, ConfigError, LoraConfig
from graphlora import peft_io
from graphlora.peft_format import WEIGHTS_NAME

from models import token_ids
from peft_oracle import base, peft_from_pretrained, peft_model, run
from snapshot import assert_unchanged, snapshot

pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-5)
IDS = token_ids(batch=2, seq=7)
TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"]}


@pytest.fixture(scope="module")
def gms():
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arch in TARGETS:
            out[arch] = graphlora.inject(base(arch), LoraConfig(r=2, target_modules=TARGETS[arch]))
    return out


@pytest.fixture
def clean(gms):
    """After a test: only ``default`` remains and every base tensor has its original value."""
    saved = {arch: {n: p.detach().clone() for n, p in gm.get_base_model().named_parameters()}
             for arch, gm in gms.items()}
    yield gms
    for arch, gm in gms.items():
        gm.set_adapter("default")
        for name in [n for n in gm.adapters if n != "default"]:
            gm.delete_adapter(name)
        with torch.no_grad():
            for n, p in gm.get_base_model().named_parameters():
                p.copy_(saved[arch][n])


def _peft_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _perturb(params, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)


CASES = [(arch, bias) for arch in TARGETS for bias in ("all", "lora_only")]


@pytest.mark.parametrize("arch,bias", CASES)
def test_trainable_biases_and_file_keys_match_peft(clean, tmp_path, arch, bias):
    gm = clean[arch]
    gm.add_adapter("b", LoraConfig(r=4, target_modules=TARGETS[arch], bias=bias))
    ours = {n for n, p in gm.get_base_model().named_parameters() if p.requires_grad}
    ref = peft_model(arch, r=4, target_modules=TARGETS[arch], bias=bias)
    theirs = {_peft_name(n) for n, p in ref.named_parameters() if p.requires_grad and "lora_" not in n}
    assert ours == theirs and ours
    gm.save_adapter(tmp_path, "b")
    ref.save_pretrained(tmp_path / "peft")
    assert set(load_file(str(tmp_path / "b" / WEIGHTS_NAME))) == set(load_file(str(tmp_path / "peft" / WEIGHTS_NAME)))
    gm.set_adapter("default")  # bias="none": no base bias trains
    assert not any(p.requires_grad for p in gm.get_base_model().parameters())


@pytest.mark.parametrize("arch,bias", CASES)
def test_peft_trained_biases_load(clean, tmp_path, arch, bias):
    ref = peft_model(arch, r=4, target_modules=TARGETS[arch], bias=bias)
    _perturb([p for n, p in ref.named_parameters() if p.requires_grad and "lora_" not in n])
    ref.save_pretrained(tmp_path)
    gm = clean[arch]
    gm.load_adapter(tmp_path, "b", activate=True)
    gm.set_adapter("b")
    torch.testing.assert_close(run(gm, IDS), run(ref, IDS), **TOL)


@pytest.mark.parametrize("arch,bias", CASES)
def test_graphlora_trained_biases_load_in_peft(clean, tmp_path, arch, bias):
    gm = clean[arch]
    gm.add_adapter("b", LoraConfig(r=4, target_modules=TARGETS[arch], bias=bias, init_lora_weights=False))
    _perturb([p for p in gm.get_base_model().parameters() if p.requires_grad], seed=3)
    gm.save_adapter(tmp_path, "b")
    expected = run(gm, IDS)
    torch.testing.assert_close(run(peft_from_pretrained(arch, str(tmp_path / "b")), IDS), expected, **TOL)


def test_bias_trains_by_gradient(clean):
    gm = clean["bert"]
    gm.add_adapter("b", LoraConfig(r=4, target_modules=["query"], bias="lora_only"))
    bias = gm.get_base_model().encoder.layer[0].attention.self.query.bias
    other = gm.get_base_model().encoder.layer[0].attention.self.key.bias
    assert bias.requires_grad and not other.requires_grad
    gm(input_ids=IDS).last_hidden_state.sum().backward()
    assert bias.grad is not None and other.grad is None
    bias.grad = None


def test_bad_bias_value_refused():
    with pytest.raises(ConfigError, match="bias='some'"):
        LoraConfig(bias="some")


def test_bad_bias_file_refused_unchanged(clean, tmp_path):
    gm = clean["bert"]
    ref = peft_model("bert", r=4, target_modules=TARGETS["bert"], bias="all")
    ref.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    key = "base_model.model.pooler.dense.bias"
    before = snapshot(gm, gm.get_base_model())
    save_file({k: v for k, v in tensors.items() if k != key}, str(tmp_path / WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match=r"missing tensor .*pooler\.dense\.bias"):
        gm.load_adapter(tmp_path, "b")
    assert_unchanged(before, snapshot(gm, gm.get_base_model()))
    save_file(dict(tensors, **{key: torch.zeros(3)}), str(tmp_path / WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match=r"pooler\.dense\.bias"):
        gm.load_adapter(tmp_path, "b")
    assert_unchanged(before, snapshot(gm, gm.get_base_model()))


def test_failed_load_restores_base_biases(clean, tmp_path, monkeypatch):
    """A load that fails after the file's biases were written puts the base biases back."""
    gm = clean["bert"]
    ref = peft_model("bert", r=4, target_modules=TARGETS["bert"], bias="all")
    _perturb([p for n, p in ref.named_parameters() if p.requires_grad and "lora_" not in n])
    ref.save_pretrained(tmp_path)
    before = snapshot(gm, gm.get_base_model())
    real = peft_io.adapter_state_dict

    class Boom:
        def copy_(self, value, non_blocking=False):
            raise RuntimeError("simulated failure after the biases were written")

    def failing(state, name):
        out = real(state, name)
        biases = {k: v for k, v in out.items() if k.endswith("bias")}
        last = next(k for k in out if "lora_" in k)
        return {**biases, last: Boom()}

    monkeypatch.setattr(peft_io, "adapter_state_dict", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        gm.load_adapter(tmp_path, "b")
    monkeypatch.undo()
    after = snapshot(gm, gm.get_base_model())
    # the base model (biases, requires_grad) and the adapter state are as before
    keys = ("model_state", "model_grad", "configs", "plans", "active", "requires_grad", "code", "modules")
    assert_unchanged({k: before[k] for k in keys}, {k: after[k] for k in keys})


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def test_bias_all_trains_what_peft_trains_and_peft_files_load(tmp_path):
    """``bias="all"``: parameters named ``bias`` or ending in ``.bias`` (PEFT 0.21), so T5's
    ``relative_attention_bias.weight`` stays frozen and PEFT's T5 file (which has none) loads."""
    import peft

    config = dict(r=4, target_modules=["q"], bias="all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(_tiny_t5(), peft.LoraConfig(**config))
    gm = graphlora.inject(_tiny_t5(), LoraConfig(**config))
    theirs = sorted(n for n, p in ref.named_parameters() if p.requires_grad and "lora_" not in n)
    ours = sorted(n for n, p in gm.named_parameters() if p.requires_grad and ".lora_" not in n)
    assert theirs == ours == []
    assert gm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    ref.save_pretrained(tmp_path)
    graphlora.inject(_tiny_t5(), str(tmp_path))
