"""PEFT's on-disk LoRA format: file names, tensor keys, and the ``adapter_config.json`` dict.

A PEFT LoRA adapter directory (what ``PeftModel.save_pretrained`` writes) holds::

    adapter_config.json         the LoraConfig as JSON (indent 2, sorted keys)
    adapter_model.safetensors   metadata {"format": "pt"}, one pair of tensors per adapted module:
        base_model.model.<module path>.lora_A.weight   [r, d_in]
        base_model.model.<module path>.lora_B.weight   [d_out, r]

The adapter name is not part of the keys. PEFT writes adapter ``"default"`` into the directory
itself and every other adapter into ``<dir>/<adapter name>/``. ``<module path>`` is the
module's name in the base model, which is graphlora's site name.

This module is pure data: it maps names and dicts and knows nothing of graphs or files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Union

from .config import ALL_LINEAR, LoraConfig
from .errors import AdapterFileError

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "LEGACY_WEIGHTS_NAME",
    "KEY_PREFIX",
    "LORA_PARTS",
    "tensor_key",
    "parse_key",
    "adapter_subdir",
    "config_from_peft",
    "config_to_peft",
    "check_writable",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
LORA_PARTS = ("lora_A", "lora_B")
DEFAULT_ADAPTER = "default"

_KEY_RE = re.compile(rf"^{re.escape(KEY_PREFIX)}(?P<site>.+)\.(?P<part>lora_A|lora_B)\.weight$")

#: PEFT config fields that are metadata, or whose effect graphlora reproduces on its own, so any
#: value is accepted on load. ``fan_in_fan_out``: PEFT itself overrides it per module type (True
#: for ``Conv1D``, False for ``nn.Linear``), which is what graphlora detects per site.
INERT_FIELDS = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "megatron_core", "qalora_group_size", "ensure_weight_tying", "fan_in_fan_out",
    "runtime_config",
})

#: Known config fields whose tensors or math graphlora does not read or write yet: a file (or an
#: adapter) with them set is refused rather than saved or loaded without them. (DoRA's
#: ``use_dora`` was here until its ``lora_magnitude_vector`` got read and written: see
#: :mod:`graphlora.methods.lora`.)
UNSUPPORTED_WHEN_SET: tuple[str, ...] = ()

#: ``init_lora_weights`` values that rewrite the base weights at initialisation (PiSSA, OLoRA,
#: CorDA, LoftQ): the saved A/B only make sense against the rewritten base, which graphlora does
#: not have. PEFT's converted form (``path_initial_model_for_weight_conversion``) is plain LoRA
#: with ``init_lora_weights=True`` and loads fine.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")

#: Data-driven initialisations that leave the base weights alone: for loading they are the same as
#: ``True`` (the saved A/B overwrite whatever the init drew).
PLAIN_INITS = ("eva", "orthogonal", "mica")


def tensor_key(site: str, part: str) -> str:
    """``base_model.model.<site>.<part>.weight`` for ``part`` in ``lora_A`` / ``lora_B``."""
    if part not in LORA_PARTS:
        raise ValueError(f"part must be one of {LORA_PARTS}, got {part!r}")
    return f"{KEY_PREFIX}{site}.{part}.weight"


def parse_key(key: str) -> Union[tuple[str, str], None]:
    """``(site, part)`` for a LoRA tensor key, ``None`` for anything else."""
    match = _KEY_RE.match(key)
    return (match.group("site"), match.group("part")) if match else None


def adapter_subdir(adapter_name: str) -> str:
    """Where PEFT puts an adapter inside a save directory: ``""`` for ``default``, else its name."""
    return "" if adapter_name == DEFAULT_ADAPTER else adapter_name


def _is_empty(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, tuple, str)) and len(value) == 0)


def config_from_peft(data: Mapping[str, Any], source: str = "adapter_config.json") -> LoraConfig:
    """A :class:`LoraConfig` from a PEFT ``adapter_config.json`` dict.

    Fields graphlora does not implement are accepted only when they are inert (metadata, see
    :data:`INERT_FIELDS`) or empty/off (``use_dora: false``, ``modules_to_save: null``, ...);
    anything that would change the adapter's math is refused rather than silently ignored.

    Raises:
        AdapterFileError: ``peft_type`` is not ``LORA``, or the config uses a feature graphlora
            cannot reproduce (the message names the field and its value).
    """
    if not isinstance(data, Mapping):
        raise AdapterFileError(f"{source} must hold a JSON object, got {type(data).__name__}.")
    peft_type = data.get("peft_type")
    if peft_type is None or str(peft_type).upper() != LoraConfig.peft_type:
        raise AdapterFileError(
            f"{source}: peft_type={peft_type!r} is not supported; graphlora reads LoRA adapters "
            f"(peft_type 'LORA') only."
        )
    known = {f for f in LoraConfig.__dataclass_fields__}
    fields = dict(data)
    for name, value in data.items():
        if name in known or name in INERT_FIELDS:
            continue
        if not _is_empty(value):
            raise AdapterFileError(
                f"{source}: {name}={value!r} is a PEFT feature graphlora does not implement; it changes "
                f"the adapter's outputs, so loading without it would be wrong. Use an adapter saved "
                f"without {name}."
            )
    for name in UNSUPPORTED_WHEN_SET:
        if not _is_empty(data.get(name)):
            raise AdapterFileError(
                f"{source}: {name}={data[name]!r} is not supported by graphlora's PEFT-format I/O yet "
                "(its extra tensors would be dropped); use an adapter saved without it."
            )
    init = fields.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterFileError(
            f"{source}: init_lora_weights={init!r} rewrote the base model's weights when the adapter was "
            "created, so its A/B only fit that rewritten base. Convert it to plain LoRA with PEFT "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and load the result."
        )
    if isinstance(init, str) and init.lower() in PLAIN_INITS:
        fields["init_lora_weights"] = True
    kwargs = {k: v for k, v in fields.items() if k in known}
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(f"{source}: not a usable LoRA config: {exc}") from exc


def check_writable(config: LoraConfig, adapter_name: str) -> None:
    """Refuse an adapter whose state this format module cannot write completely (see
    :data:`UNSUPPORTED_WHEN_SET`).

    Raises:
        AdapterFileError: naming the adapter and the field.
    """
    for name in UNSUPPORTED_WHEN_SET:
        value = getattr(config, name, None)
        if not _is_empty(value):
            raise AdapterFileError(
                f"adapter {adapter_name!r} has {name}={value!r}; graphlora's PEFT-format I/O does not write "
                "it yet (its extra tensors would be lost)."
            )


def config_to_peft(
    config: LoraConfig,
    sites: Iterable[str],
    *,
    resolved_targets: Any,
    fan_in_fan_out: bool,
    base_model_name_or_path: Union[str, None],
    auto_mapping: Union[Mapping[str, str], None] = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` dict PEFT would write for ``config`` on this model.

    ``target_modules`` is written so that PEFT selects exactly the sites graphlora adapted:
    a list or regex as given; ``None`` as the resolved per-model default (what PEFT resolves it
    to); ``"all-linear"`` as the sorted list of adapted site paths (PEFT matches full paths
    exactly). ``inference_mode`` is written ``True``, as PEFT does.

    Args:
        config: the adapter's config.
        sites: the adapted site names (the plan's keys).
        resolved_targets: ``target_modules`` after graphlora's resolution of ``None``.
        fan_in_fan_out: whether the adapted sites store their weight (in, out) (GPT-2 ``Conv1D``).
        base_model_name_or_path: written when the config has none.
        auto_mapping: PEFT's ``{"base_model_class", "parent_library"}`` when ``task_type`` is unset.
    """
    from .modules_to_save import written_modules_to_save

    out = config.to_dict()
    targets = config.target_modules
    if targets == ALL_LINEAR:
        targets = sorted(sites)
    elif targets is None:
        targets = resolved_targets
    out["target_modules"] = list(targets) if isinstance(targets, (list, tuple)) else targets
    out["fan_in_fan_out"] = bool(config.fan_in_fan_out) if config.fan_in_fan_out is not None else fan_in_fan_out
    out["inference_mode"] = True
    out["base_model_name_or_path"] = config.base_model_name_or_path or base_model_name_or_path
    out["modules_to_save"] = written_modules_to_save(config)  # with task_type's additions, as PEFT writes it
    out.setdefault("use_dora", False)
    out.setdefault("revision", None)
    if config.task_type is None and auto_mapping is not None:
        out["auto_mapping"] = dict(auto_mapping)
    return out
