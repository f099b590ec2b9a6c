"""Everything a failed call must leave alone, captured so that a test can compare before and after.

``snapshot(gm, model)`` records the rewritten graph of every program (``gm.code`` and each traced
signature's code), every parameter and buffer (base weights, adapter weights, gates, scales),
their ``requires_grad``, the module tree, the adapter configs, plans, active set, weights,
enabled flag, merged set and the training mode, plus the original model's state dict.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def _tensors(named) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in named}


def snapshot(gm: Any = None, model: torch.nn.Module | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if gm is not None:
        out.update(
            code=gm.code,
            programs={p.key: (p.module.code if p.module is not None else None) for p in gm.programs},
            params=_tensors(gm.named_parameters(remove_duplicate=False)),
            buffers=_tensors(gm.named_buffers(remove_duplicate=False)),
            requires_grad={n: p.requires_grad for n, p in gm.named_parameters(remove_duplicate=False)},
            modules=[n for n, _ in gm.named_modules(remove_duplicate=False)],
            configs=dict(gm.adapters),
            plans=copy.deepcopy(gm.adapter_state.plans),
            active=list(gm.active_adapters),
            weights=dict(gm.adapter_state.weights),
            enabled=gm.adapter_state.enabled,
            merged=list(getattr(gm, "merged_adapters", ())),
            training=gm.training,
        )
    if model is not None:
        out.update(
            model_state=_tensors(model.state_dict(keep_vars=True).items()),
            model_grad={n: p.requires_grad for n, p in model.named_parameters()},
            model_training=model.training,
            model_modules=[(n, type(m)) for n, m in model.named_modules()],
        )
    return out


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        if key in ("params", "buffers", "model_state"):
            assert a.keys() == b.keys(), f"{key}: names changed: {set(a) ^ set(b)}"
            for name in a:
                assert a[name].dtype == b[name].dtype and a[name].device == b[name].device, f"{key}[{name}] moved"
                assert a[name].shape == b[name].shape, f"{key}[{name}] reshaped"
                if a[name].device.type != "meta":
                    assert torch.equal(a[name], b[name]), f"{key}[{name}] changed"
        else:
            assert a == b, f"{key} changed"
