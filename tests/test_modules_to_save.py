"""``modules_to_save`` (and PEFT's automatic heads for ``task_type="SEQ_CLS"``) against PEFT.

Tiny ``BertForSequenceClassification`` (head ``classifier``, weight and bias) and
``LlamaForSequenceClassification`` (head ``score``, no bias), fp32, outputs within 1e-5 both ways.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import graphlora
from graphlora import AdapterFileError, ConfigError, LoraConfig
from graphlora.peft_format import CONFIG_NAME, WEIGHTS_NAME

from snapshot import assert_unchanged, snapshot

peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB = 96
IDS = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))  # no pad token (0)


def bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def llama_cls():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.detach().clone()


def peft_model(make, adapter="default", seed=0, **kwargs):
    """PEFT model with random LoRA weights and a perturbed copy of each saved module."""
    kwargs.setdefault("init_lora_weights", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(make(), peft.LoraConfig(**kwargs), adapter_name=adapter).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"modules_to_save.{adapter}." in name:
                param.add_(torch.randn(param.shape, generator=gen))
    return model


def perturb_copies(gm, adapter, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if name.startswith("graphlora.modules_to_save.") and f".copies.{adapter}." in name:
                param.add_(torch.randn(param.shape, generator=gen))


def peft_load(make, path, adapter="default"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(make(), path, adapter_name=adapter).eval()


@pytest.fixture(scope="module")
def bert_gm():
    """One traced BERT classifier with a plain LoRA ``default`` (no copy), shared by the BERT tests."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return graphlora.inject(bert_cls(), LoraConfig(r=4, target_modules=["query"], init_lora_weights=False))


@pytest.fixture
def bert(bert_gm):
    """``bert_gm``, left after the test with only ``default``, active, enabled, unmerged, and the
    base model's tensors as they were (loading ``bias="all"`` files writes base biases)."""
    saved = {n: p.detach().clone() for n, p in bert_gm.get_base_model().named_parameters()}
    yield bert_gm
    if bert_gm.merged:
        bert_gm.unmerge_adapter()
    bert_gm.enable_adapters()
    bert_gm.set_adapter("default")
    for name in [n for n in bert_gm.adapters if n != "default"]:
        bert_gm.delete_adapter(name)
    assert not any("modules_to_save" in n for n, _ in bert_gm.named_parameters())
    with torch.no_grad():
        for n, p in bert_gm.get_base_model().named_parameters():
            p.copy_(saved[n])


# ------------------------------------------------------------------------------- PEFT -> graphlora
def test_peft_seq_cls_file_loads_bert(bert, tmp_path):
    """task_type="SEQ_CLS": PEFT adds classifier/score itself; its file loads and matches, active and disabled."""
    ref = peft_model(bert_cls, target_modules=["query", "value"], task_type="SEQ_CLS")
    assert "base_model.model.classifier.modules_to_save.default.weight" in dict(ref.named_parameters())
    ref.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["modules_to_save"] == ["classifier", "score"]
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(
        load_file(str(tmp_path / WEIGHTS_NAME)))
    bert.load_adapter(tmp_path, "seq", activate=True)
    torch.testing.assert_close(logits(bert), logits(ref), **TOL)
    with ref.disable_adapter():
        base_out = logits(ref)
    bert.disable_adapters()
    torch.testing.assert_close(logits(bert), base_out, **TOL)
    assert torch.equal(logits(bert), logits(bert_cls()))  # disabled: the original head, bit for bit
    bert.enable_adapters()
    bert.set_adapter("default")  # no copy: the original head
    bert.disable_adapters()
    assert "classifier_weight_switch" in bert.code and "classifier_bias_switch" in bert.code


# ------------------------------------------------------------------------------- graphlora -> PEFT
@pytest.fixture(scope="module")
def llama_gm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = graphlora.inject(llama_cls(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"],
                                                      init_lora_weights=False))
    perturb_copies(gm, "default")
    gm.add_adapter("plain", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    gm.set_adapter("default")
    return gm


def test_state_dict_layout(llama_gm):
    names = dict(llama_gm.named_parameters())
    assert "graphlora.modules_to_save.score.copies.default.weight" in names
    assert not any(".copies.plain." in n for n in names)  # "plain" has no copy: it runs the original
    sd = llama_gm.get_adapter_state_dict("default")
    assert "base_model.model.score.weight" in sd
    assert "base_model.model.score.weight" not in llama_gm.get_adapter_state_dict("plain")


def test_graphlora_files_load_in_peft_both_adapters(llama_gm, tmp_path):
    gm = llama_gm
    gm.save_adapter(tmp_path, adapter_name=None)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["modules_to_save"] == ["score"]
    ref = peft_load(llama_cls, tmp_path)
    ref.load_adapter(str(tmp_path / "plain"), adapter_name="plain")
    code = gm.code
    for name in ("default", "plain"):
        gm.set_adapter(name)
        ref.set_adapter(name)
        torch.testing.assert_close(logits(gm), logits(ref), **TOL)
    gm.set_adapter("default")
    assert gm.code == code  # switching writes the slot buffer: no re-trace, same graph
    # PEFT's in-model key for the copy holds what graphlora has
    peft_copy = dict(ref.named_parameters())["base_model.model.score.modules_to_save.default.weight"]
    torch.testing.assert_close(peft_copy, dict(gm.named_parameters())["graphlora.modules_to_save.score.copies.default.weight"])


def test_graphlora_seq_cls_task_type_matches_peft(bert, tmp_path):
    """graphlora's own LoraConfig(task_type="SEQ_CLS") saves the head as PEFT does (automatic modules_to_save)."""
    bert.add_adapter("seq", LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS", init_lora_weights=False))
    perturb_copies(bert, "seq")
    assert "graphlora.modules_to_save.classifier.copies.seq.bias" in dict(bert.named_parameters())
    bert.save_adapter(tmp_path, "seq")
    ours = set(load_file(str(tmp_path / "seq" / WEIGHTS_NAME)))
    ref = peft_load(bert_cls, tmp_path / "seq")
    torch.testing.assert_close(logits(bert), logits(ref), **TOL)
    theirs_dir = tmp_path / "peft"
    ref.save_pretrained(theirs_dir)
    assert ours == set(load_file(str(theirs_dir / WEIGHTS_NAME)))  # the same keys PEFT writes
    theirs = json.loads((theirs_dir / CONFIG_NAME).read_text())["modules_to_save"]  # PEFT re-extends on load
    assert json.loads((tmp_path / "seq" / CONFIG_NAME).read_text())["modules_to_save"] == list(dict.fromkeys(theirs))


# ------------------------------------------------------------------------------- training state
def test_copy_trains_original_frozen(bert):
    bert.add_adapter("head", LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    params = dict(bert.named_parameters())
    copy_w = params["graphlora.modules_to_save.classifier.copies.head.weight"]
    orig_w = params["classifier.weight"]
    assert copy_w.requires_grad and not orig_w.requires_grad
    bert.train()
    try:
        bert(input_ids=IDS).logits.sum().backward()
    finally:
        bert.eval()
    assert copy_w.grad is not None and copy_w.grad.abs().sum() > 0
    assert orig_w.grad is None
    bert.set_adapter("default")  # active now, no copy
    assert not copy_w.requires_grad
    bert.set_adapter(["default", "head"])  # one of the two has a copy: it is used and trains
    assert copy_w.requires_grad


def test_two_copies_active_refused_unchanged(bert):
    bert.add_adapter("a", LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    bert.add_adapter("b", LoraConfig(r=2, target_modules=["value"], modules_to_save=["classifier"]))
    perturb_copies(bert, "b", seed=5)
    before = snapshot(bert)
    with pytest.raises(ConfigError, match="classifier"):
        bert.set_adapter(["a", "b"])
    with pytest.raises(ConfigError, match="classifier"):
        bert.set_adapter_weights({"a": 1.0, "b": 0.5})
    assert_unchanged(before, snapshot(bert))
    out_b = logits(bert)
    bert.set_adapter("a")
    assert not torch.equal(out_b, logits(bert))  # each adapter runs its own copy
    bert.delete_adapter("b")
    assert not any(".copies.b." in n for n, _ in bert.named_parameters())


# ------------------------------------------------------------------------------- merge
def test_merge_and_unload_uses_active_copy(bert, tmp_path):
    ref = peft_model(bert_cls, target_modules=["query", "value"], modules_to_save=["classifier"])
    ref.save_pretrained(tmp_path)
    bert.load_adapter(tmp_path, "m", activate=True)
    bert.set_adapter("m")
    expected = logits(ref)
    merged_ref = logits(ref.merge_and_unload())
    torch.testing.assert_close(merged_ref, expected, **TOL)
    merged = bert.merge_and_unload()
    torch.testing.assert_close(logits(merged), merged_ref, **TOL)
    torch.testing.assert_close(logits(bert), expected, **TOL)
    bert.unmerge_adapter()  # restores the original head exactly
    assert torch.equal(bert.get_base_model().classifier.weight, bert_cls().classifier.weight)
    bert.disable_adapters()
    assert torch.equal(logits(bert), logits(bert_cls()))


def test_a_new_adapter_on_a_seq_cls_model_saves_the_head_as_peft_and_peft_files_of_it_load(tmp_path):
    """PEFT's ``PeftModelForSequenceClassification.add_adapter`` gives a new adapter (no task type of
    its own) the head copies ``classifier`` / ``score``; its saved file lists both, though this model
    has only ``score``, and loads on its own."""
    ref = peft_model(llama_cls, task_type="SEQ_CLS", r=4, target_modules=["q_proj"])
    gm = graphlora.inject(llama_cls(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"]))
    ref.add_adapter("c", peft.LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    gm.add_adapter("c", LoraConfig(r=2, target_modules=["o_proj"]))
    ref.set_adapter("c")
    gm.set_adapter("c")
    assert list(gm.peft_config["c"].modules_to_save) == ref.peft_config["c"].modules_to_save == ["classifier", "score"]
    assert gm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert any(p.requires_grad for n, p in gm.named_parameters() if ".copies.c." in n)  # its own head trains
    ref.save_pretrained(tmp_path)
    loaded = graphlora.inject(llama_cls(), str(tmp_path / "c"))
    torch.testing.assert_close(logits(loaded), logits(peft_load(llama_cls, str(tmp_path / "c"))))
    gm.delete_adapter("default")  # the model stays a SEQ_CLS model: later adapters still save the head
    gm.add_adapter("d", LoraConfig(r=2, target_modules=["o_proj"]))
    assert list(gm.peft_config["d"].modules_to_save) == ["classifier", "score"]


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(target_modules=["value"], modules_to_save=["clasifier"]), "'clasifier' names no module.*'classifier'"),
    (dict(target_modules=["query", "dense"], modules_to_save=["pooler"]), "holds the adapted site"),
    (dict(target_modules=["value"], modules_to_save="classifier"), "must be a list"),
    (dict(target_modules=["value"], modules_to_save=["pooler", "pooler.dense"]), "is inside"),
    (dict(target_modules=["value"], modules_to_save=["dropout"]), "no parameters"),
])
def test_bad_configs_refused(bert, kwargs, match):
    before = snapshot(bert)
    with pytest.raises(ConfigError, match=match):
        bert.add_adapter("bad", LoraConfig(**kwargs))
    assert_unchanged(before, snapshot(bert))


def test_site_inside_saved_module_refused(bert):
    bert.add_adapter("head", LoraConfig(r=2, target_modules=["value"], modules_to_save=["pooler"]))
    before = snapshot(bert)
    with pytest.raises(ConfigError, match="bert.pooler"):
        bert.add_adapter("inside", LoraConfig(r=2, target_modules=["pooler.dense"]))
    assert_unchanged(before, snapshot(bert))


def test_bad_file_refused_unchanged(bert, tmp_path):
    peft_model(bert_cls, target_modules=["query"], modules_to_save=["classifier"]).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    save_file({k: v for k, v in tensors.items() if k != "base_model.model.classifier.bias"},
              str(tmp_path / WEIGHTS_NAME), metadata={"format": "pt"})
    before = snapshot(bert)
    with pytest.raises(AdapterFileError, match=r"missing tensor .*classifier\.bias"):
        bert.load_adapter(tmp_path, "other")
    assert_unchanged(before, snapshot(bert))
    tensors["base_model.model.classifier.weight"] = torch.zeros(5, 32)
    save_file(tensors, str(tmp_path / WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match=r"classifier\.weight"):
        bert.load_adapter(tmp_path, "other")
    assert_unchanged(before, snapshot(bert))


def test_hotswap_copies_in_place(bert, tmp_path):
    """Loading into an existing adapter with a copy writes the copy in place (no new graph)."""
    first, second = tmp_path / "a", tmp_path / "b"
    peft_model(bert_cls, target_modules=["query"], modules_to_save=["classifier"], seed=0).save_pretrained(first)
    ref = peft_model(bert_cls, target_modules=["query"], modules_to_save=["classifier"], seed=7)
    ref.save_pretrained(second)
    bert.load_adapter(first, "hs", activate=True)
    bert.set_adapter("hs")
    logits(bert)
    code = bert.code
    bert.load_adapter(second, "hs")
    torch.testing.assert_close(logits(bert), logits(ref), **TOL)
    assert bert.code == code


def test_seq_cls_with_bias_all_both_ways(bert, tmp_path):
    """PEFT writes ``classifier.original_module.bias`` and ``classifier.modules_to_save.bias`` with
    ``bias="all"``; both directions still match."""
    ref = peft_model(bert_cls, target_modules=["query"], task_type="SEQ_CLS", bias="all")
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.5)
    ref.save_pretrained(tmp_path / "peft")
    assert "base_model.model.classifier.original_module.bias" in load_file(str(tmp_path / "peft" / WEIGHTS_NAME))
    bert.load_adapter(tmp_path / "peft", "seq", activate=True)
    bert.set_adapter("seq")
    expected = logits(ref)
    torch.testing.assert_close(logits(bert), expected, **TOL)
    bert.save_adapter(tmp_path, "seq")
    back = peft_load(bert_cls, tmp_path / "seq")
    torch.testing.assert_close(logits(back), expected, **TOL)


def test_loha_modules_to_save_both_ways(bert, tmp_path):
    """LoHa has PEFT's modules_to_save too (the machinery is method-agnostic)."""
    bert.add_adapter("h", graphlora.LoHaConfig(r=2, target_modules=["query"], modules_to_save=["classifier"],
                                               init_weights=False))
    perturb_copies(bert, "h")
    bert.save_adapter(tmp_path, "h")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(bert_cls(), str(tmp_path / "h")).eval()
    torch.testing.assert_close(logits(bert), logits(ref), **TOL)
    bert.set_adapter("default")
    bert.delete_adapter("h")
    bert.load_adapter(tmp_path / "h", "h2", activate=True)
    bert.set_adapter("h2")
    torch.testing.assert_close(logits(bert), logits(ref), **TOL)


def test_param_select_is_exact_and_routes_gradients():
    from graphlora.passes.param_switch import param_select

    base = torch.randn(3, 4)
    copies = (torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True))
    for k, want in ((0, base), (1, copies[0]), (2, copies[1])):
        assert torch.equal(param_select(torch.tensor(k), base, copies), want)
    param_select(torch.tensor(2), base, copies).sum().backward()
    assert torch.equal(copies[1].grad, torch.ones(3, 4)) and not copies[0].grad.any()


def test_fx_called_module_refused():
    """symbolic_trace keeps nn.Linear as a call_module node: no parameter reads to switch."""
    from models import FunctionalMLP

    gm = graphlora.inject(FunctionalMLP(), LoraConfig(r=2, target_modules=["fc1"]))
    before = snapshot(gm)
    with pytest.raises(ConfigError, match="called as a module"):
        gm.add_adapter("head", LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["fc2"]))
    assert_unchanged(before, snapshot(gm))


def test_mixed_batch_refused(bert):
    bert.add_adapter("head", LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    with pytest.raises(ConfigError, match="mixed-adapter batches"):
        bert(input_ids=IDS, adapter_names=["default", "head"])
    torch.testing.assert_close(logits(bert), logits(bert), **TOL)  # the module still runs


@pytest.mark.parametrize("direction", ["peft_to_graphlora", "graphlora_to_peft"])
def test_ia3_file_with_modules_to_save_both_ways(tmp_path, direction):
    """An IA3 adapter with a trainable ``classifier`` copy (PEFT's ``modules_to_save``) loads both ways."""
    kwargs = dict(target_modules=["query", "value", "output.dense"], feedforward_modules=["output.dense"],
                  modules_to_save=["classifier"], init_ia3_weights=False)
    gen = torch.Generator().manual_seed(5)
    if direction == "peft_to_graphlora":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = peft.get_peft_model(bert_cls(), peft.IA3Config(**kwargs)).eval()
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if "modules_to_save" in name:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        ref.save_pretrained(tmp_path)
        gm = graphlora.inject(bert_cls(), str(tmp_path))
        torch.testing.assert_close(logits(gm), logits(ref), **TOL)
    else:
        gm = graphlora.inject(bert_cls(), graphlora.IA3Config(**kwargs))
        with torch.no_grad():
            for name, p in gm.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        gm.save_pretrained(tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = peft.PeftModel.from_pretrained(bert_cls(), str(tmp_path)).eval()
        torch.testing.assert_close(logits(gm), logits(ref), **TOL)
    assert (logits(gm) - logits(bert_cls())).abs().max() > 1e-3  # the saved head is not the base head
