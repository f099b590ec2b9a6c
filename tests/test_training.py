"""Training: transformers' Trainer (and TRL's SFTTrainer) on a graphlora model, and gradient checkpointing.

PEFT is the reference: the same base weights, the same LoRA weights (copied from the PEFT model),
the same data and seed give the same losses and the same trained adapter weights.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import graphlora
import models
import peft_oracle

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]
SEQ = 8


def _lora(**kw):
    kw.setdefault("lora_dropout", 0.0)
    return dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **kw)


def _pair(**kw):
    """(graphlora model, PEFT model) on equal base weights with equal LoRA weights."""
    reference = peft_oracle.peft_model("llama", **_lora(**kw))
    gm = graphlora.inject(peft_oracle.base("llama"), graphlora.LoraConfig(**_lora(**kw)))
    state = peft.get_peft_model_state_dict(reference)
    with torch.no_grad():
        for key, param in gm.get_adapter_state_dict().items():
            param.copy_(state[key])
    return gm, reference


def _rows(n: int, seed: int) -> list[dict]:
    ids = models.token_ids(n, SEQ, seed=seed)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # padding in one row: attention_mask must reach the model
    labels = ids.masked_fill(mask == 0, -100)
    return [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels)]


TRAIN, EVAL = _rows(8, seed=3), _rows(4, seed=4)


def _args(out, **kw):
    kw.setdefault("max_steps", 3)
    return transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-2,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy=kw.pop("save_strategy", "no"),
        disable_tqdm=True, **kw)


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _adapter(gm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in gm.get_adapter_state_dict().items()}


# ---------------------------------------------------------------------------------------- Trainer
def test_signature_is_the_source_models():
    import inspect

    gm = graphlora.inject(peft_oracle.base("llama"), graphlora.LoraConfig(target_modules=["q_proj"]))
    params = inspect.signature(gm.forward).parameters
    assert {"input_ids", "attention_mask", "labels"} <= set(params)
    assert transformers.utils.find_labels(type(gm)) == ["labels"]


def test_trainer_default_arguments_match_peft(tmp_path):
    gm, reference = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = transformers.Trainer(model=gm, args=_args(tmp_path / "g"), train_dataset=TRAIN, eval_dataset=EVAL)
        theirs = transformers.Trainer(model=reference, args=_args(tmp_path / "p"), train_dataset=TRAIN,
                                      eval_dataset=EVAL)
        ours.train()
        theirs.train()
    assert len(_losses(ours)) == 3
    torch.testing.assert_close(_losses(ours), _losses(theirs))
    expected = peft.get_peft_model_state_dict(reference)
    for key, value in _adapter(gm).items():
        torch.testing.assert_close(value, expected[key])

    metrics, reference_metrics = ours.evaluate(), theirs.evaluate()
    assert "eval_loss" in metrics
    torch.testing.assert_close(metrics["eval_loss"], reference_metrics["eval_loss"])

    predicted = ours.predict(EVAL)
    logits = predicted.predictions[0] if isinstance(predicted.predictions, tuple) else predicted.predictions
    assert logits.shape == (len(EVAL), SEQ, models.VOCAB)
    torch.testing.assert_close(predicted.metrics["test_loss"], reference_metrics["eval_loss"])


def test_checkpoints_hold_adapter_files_and_resume(tmp_path):
    from graphlora.training import AdapterTrainer

    gm, _ = _pair()
    trainer = AdapterTrainer(model=gm, args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
                             train_dataset=TRAIN)
    trainer.train()
    trained = _adapter(gm)
    checkpoint = tmp_path / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, files
    # PEFT reads it
    loaded = peft_oracle.peft_from_pretrained("llama", str(checkpoint))
    for key, value in peft.get_peft_model_state_dict(loaded).items():
        torch.testing.assert_close(value, trained[key])

    fresh = graphlora.inject(peft_oracle.base("llama"), graphlora.LoraConfig(**_lora()))
    assert not torch.equal(next(iter(_adapter(fresh).values())), next(iter(trained.values())))
    resumed = AdapterTrainer(model=fresh, args=_args(tmp_path / "again", max_steps=2), train_dataset=TRAIN)
    resumed.train(resume_from_checkpoint=str(checkpoint))  # at step 2 already: loads, trains no further
    for key, value in _adapter(fresh).items():
        torch.testing.assert_close(value, trained[key])
    assert all(p.requires_grad for p in fresh.graphlora.parameters())


def _tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {f"w{i}": i for i in range(models.VOCAB - 3)}
    vocab.update({"<unk>": models.VOCAB - 3, "<pad>": models.VOCAB - 2, "</s>": models.VOCAB - 1})
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                eos_token="</s>")


def _sft(model, out, dataset, **kw):
    trl = pytest.importorskip("trl")
    config = trl.SFTConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                           report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, max_length=SEQ + 2,
                           disable_tqdm=True, seed=0, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=_tiny_tokenizer())
        trainer.train()
    return trainer


@pytest.mark.parametrize("settings", [dict(bf16=False, gradient_checkpointing=False), {}], ids=["fp32", "defaults"])
def test_sft_trainer_trains_as_peft_does(tmp_path, settings):
    """TRL's SFTTrainer patches ``forward`` on the instance with its fused LM head, which calls the
    replaced forward and ``model.base_model(...)`` for the hidden states: both run the adapters.
    In float32 the losses and trained weights equal PEFT's under the same trainer. SFTConfig's
    defaults (bf16 autocast, gradient checkpointing) train too, within bf16 rounding of PEFT:
    graphlora scales ``A x`` before ``B`` (the switch), PEFT scales ``B A x``, and in bf16 the two
    orders round differently."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"text": [" ".join(f"w{(i * 7 + j) % 90}" for j in range(SEQ))
                                                 for i in range(8)]})
    gm, reference = _pair()
    before = _adapter(gm)
    ours = _sft(gm, tmp_path / "ours", data, **settings)
    theirs = _sft(reference, tmp_path / "peft", data, **settings)
    assert not torch.is_autocast_enabled("cpu")  # accelerate's autocast wrapper ran once per call (not re-entered)
    exact = bool(settings)
    losses = _losses(ours)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert losses == pytest.approx(_losses(theirs), rel=1e-6 if exact else 1e-3)
    trained = peft.get_peft_model_state_dict(reference)
    for key, value in _adapter(gm).items():
        assert not torch.equal(before[key], value)
        if exact:  # (in bf16, Adam's first steps of +-lr turn rounding-level gradient differences into lr-sized ones)
            torch.testing.assert_close(value, trained[key], atol=1e-5, rtol=1e-4)


def test_base_model_runs_the_adapters():
    """``gm.base_model(...)`` is the backbone with the adapters: its ``last_hidden_state`` equals
    the PEFT model's backbone output; the source backbone (no adapters) differs."""
    gm, reference = _pair()
    gm.eval(), reference.eval()
    ids = models.token_ids()
    with torch.no_grad():
        ours = gm.base_model(input_ids=ids).last_hidden_state
        theirs = reference.get_base_model().base_model(input_ids=ids).last_hidden_state
        plain = gm.get_base_model().base_model  # the source's: unchanged weights, no adapters
        with reference.disable_adapter():
            without = plain(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, without, atol=1e-4)
    assert gm.base_model.embed_tokens is gm.get_base_model().model.embed_tokens


# ---------------------------------------------------------------------------------------- checkpointing
def _step(model, ids):
    """(loss, saved-for-backward bytes, adapter grads) of one training step."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.train()
    with torch.no_grad():  # trace this signature first (tracing runs fake tensors through the hooks)
        model(input_ids=ids, labels=ids)
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), saved[0], grads


def _step_eval_saved(gm, ids, off: bool = False) -> int:
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    if off:
        gm.gradient_checkpointing_disable()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gm(input_ids=ids, labels=ids).loss.backward()
    gm.zero_grad(set_to_none=True)
    if off:
        gm.gradient_checkpointing_enable()
    return saved[0]


def _peft_saved(ids, checkpointing: bool) -> int:
    base = peft_oracle.base("llama")
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.LoraConfig(**_lora(lora_dropout=0.1)))
    return _step(model, ids)[1]


def test_gradient_checkpointing_same_grads_less_memory():
    ids = models.token_ids(2, SEQ)
    gm = graphlora.inject(peft_oracle.base("llama"), graphlora.LoraConfig(**_lora(lora_dropout=0.1)))
    loss, saved, grads = _step(gm, ids)
    gm.gradient_checkpointing_enable()
    assert gm.is_gradient_checkpointing
    loss_ckpt, saved_ckpt, grads_ckpt = _step(gm, ids)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=0)  # dropout replayed
    peft_saved = _peft_saved(ids, checkpointing=True)
    print(f"saved for backward: graphlora {saved} -> {saved_ckpt}; PEFT with checkpointing {peft_saved}, "
          f"without {_peft_saved(ids, checkpointing=False)}")
    assert saved_ckpt < saved and saved_ckpt <= peft_saved

    gm.eval()  # eval: the regions run their bodies directly, nothing is saved
    with torch.no_grad():
        logits = gm(input_ids=ids).logits
    assert _step_eval_saved(gm, ids) == _step_eval_saved(gm, ids, off=True)
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids).logits, logits, rtol=0, atol=0)
    gm.gradient_checkpointing_disable()
    assert not gm.is_gradient_checkpointing
    assert not [n for n, _ in gm.named_children() if n.startswith("checkpoint_block_")]
    assert _step(gm, ids)[1] == saved
    assert "checkpoint_block_0" not in gm.code

    keys = list(gm.state_dict())  # regions own no tensor; reentrant is asked for, non-reentrant runs
    gm.gradient_checkpointing_enable({"use_reentrant": True}, every_n_layers=2)
    assert list(gm.state_dict()) == keys
    assert "checkpoint_block_0" in gm.code and "checkpoint_block_1" not in gm.code
    _, saved_half, grads_half = _step(gm, ids)
    assert saved_ckpt < saved_half < saved
    for name in grads:
        torch.testing.assert_close(grads_half[name], grads[name], rtol=0, atol=0)


def test_gradient_checkpointing_enabled_before_inject():
    base = peft_oracle.base("llama")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gm = graphlora.inject(base, graphlora.LoraConfig(**_lora()))
    assert gm.is_gradient_checkpointing
    assert gm.programs.checkpointing.options == {"use_reentrant": False}
    ids = models.token_ids(2, SEQ)
    saved = _step(gm, ids)[1]
    gm.gradient_checkpointing_disable()
    assert _step(gm, ids)[1] > saved


def test_trainer_gradient_checkpointing(tmp_path):
    gm, reference = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = _args(tmp_path, max_steps=2, gradient_checkpointing=True)
        trainer = transformers.Trainer(model=gm, args=args, train_dataset=TRAIN)
        trainer.train()
        plain = transformers.Trainer(model=reference, args=_args(tmp_path / "p", max_steps=2), train_dataset=TRAIN)
        plain.train()
    assert gm.is_gradient_checkpointing
    torch.testing.assert_close(_losses(trainer), _losses(plain))
