"""PEFT as the reference implementation in tests (graphlora itself never imports peft)."""

from __future__ import annotations

import warnings

import torch

import models

ARCHS = {"llama": models.tiny_llama, "gpt2": models.tiny_gpt2, "bert": models.tiny_bert}


def base(arch: str):
    """A fresh base model; the same seed gives the same weights every call."""
    return ARCHS[arch](seed=0)


def peft_model(arch: str, adapter_name: str = "default", **lora_kwargs):
    """``get_peft_model`` on a fresh base with random (non-identity) LoRA weights."""
    import peft

    lora_kwargs.setdefault("init_lora_weights", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base(arch), peft.LoraConfig(**lora_kwargs), adapter_name=adapter_name)
    return model.eval()


def peft_from_pretrained(arch: str, path: str, adapter_name: str = "default"):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base(arch), path, adapter_name=adapter_name).eval()


def run(model, ids: torch.Tensor) -> torch.Tensor:
    """The main output tensor of a graphlora or PEFT model on ``ids``."""
    with torch.no_grad():
        return models.main_output(model(input_ids=ids)).detach().clone()
