"""Mixed-adapter batches: ``gm(**inputs, adapter_names=[...])`` gives each row its own adapter.

The mixed program's switch nodes (:func:`graphlora.passes.ops.lora_mixed`) read one buffer,
``graphlora.row_index`` (``[batch]`` int64): row ``i`` uses the adapter in slot ``row_index[i]``
(slots follow the order adapters were added; ``"__base__"`` is the slot past the last one and adds
nothing). :func:`write_row_index` checks the names and writes that buffer, in place when the batch
size is unchanged, so CUDA-graph captures stay valid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import AdapterNotFoundError, AdapterStateError, ConfigError
from .state import AdapterState

__all__ = ["write_row_index"]


def write_row_index(state: AdapterState, names: Any, args: tuple, kwargs: Mapping[str, Any], training: bool) -> None:
    """Check ``names`` (one adapter name or ``"__base__"`` per batch row) and write the row index.

    Raises:
        ConfigError: not a list, wrong length, or an adapter mixed batches cannot run.
        AdapterNotFoundError: an unknown name. AdapterStateError: training, or adapters merged.
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ConfigError(f"adapter_names must be a list with one adapter name per batch row, got {names!r}.")
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    if first is not None and first.shape[0] != len(names):
        raise ConfigError(
            f"adapter_names has {len(names)} names but the batch has {first.shape[0]} rows; "
            "give one adapter name (or '__base__') per row."
        )
    if training and torch.is_grad_enabled():
        raise AdapterStateError(
            "adapter_names (a mixed-adapter batch) is for inference; call gm.eval() or run under torch.no_grad()."
        )
    if state.merge.merged:
        raise AdapterStateError(
            f"adapter_names cannot be used while adapters {list(state.merge.merged)} are merged into the base "
            "weights (every row would carry them); call gm.unmerge_adapter() first."
        )
    slots = state.slots()
    unknown = [n for n in names if n not in state.configs and n != "__base__"]
    if unknown:
        raise AdapterNotFoundError(
            f"adapter_names has unknown adapter {unknown[0]!r}; loaded adapters: "
            f"{list(state.configs)} (or '__base__' for the base model)."
        )
    unbanked = [n for n in dict.fromkeys(names) if n != "__base__" and n not in slots
                and state.rule(n).mixable(state.configs[n])]
    if unbanked:
        raise ConfigError(
            f"adapter_names has {unbanked[0]!r}, which is not in the adapter banks that mixed batches read: it "
            "adapts an embedding, or its parameters have another dtype than the adapters banked at its sites "
            "(autocast_adapter_dtype=False next to float32 adapters). Run it with set_adapter instead."
        )
    unmixable = [n for n in dict.fromkeys(names) if n != "__base__" and not state.rule(n).mixable(state.configs[n])]
    if unmixable:
        name = unmixable[0]
        raise ConfigError(
            f"adapter_names has {name!r}, a {state.rule(name).variant(state.configs[name])} "
            "adapter; mixed-adapter batches support plain LoRA adapters only (as in PEFT). Run it with set_adapter instead."
        )
    rows = names if state.enabled else ["__base__"] * len(names)  # disabled: every row the base model, as PEFT
    index = torch.tensor([slots[n] for n in rows], dtype=torch.long)
    store = state.store
    current = store.row_index
    if current.shape == index.shape:
        current.copy_(index, non_blocking=True)  # in place: CUDA-graph captures stay valid
    else:
        device = next((p.device for p in store.parameters()), current.device)
        store.register_buffer("row_index", index.to(device), persistent=False)
