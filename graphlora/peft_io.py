"""Save and load adapters in PEFT's file layout (see :mod:`graphlora.peft_format`).

Functions over the adapter state and the site records; :class:`~graphlora.AdaptedGraphModule`
exposes them as PEFT's adapter I/O:

- ``get_adapter_state_dict(name)``: ``{"base_model.model.<site>.lora_A.weight": A, ...}``, the
  tensors of ``save_adapter``'s file, in memory (sharing storage with the parameters).
- ``save_adapter(path, adapter_name)``: ``adapter_config.json`` + ``adapter_model.safetensors``,
  ``"default"`` in ``path`` and any other adapter in ``path/<name>/``; every file is staged
  under a temporary name and renamed into place (:mod:`graphlora._atomic`).
- ``load_adapter(path, adapter_name)``: reads a directory written by PEFT's ``save_pretrained``
  (or by ``save_adapter``). The whole file is checked against the model before anything
  changes; loading into an existing adapter with identical shapes copies the tensors in place
  (a *hotswap*: no graph rebuild, compiled code stays valid).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch

from ._atomic import AtomicWriter
from .config import IA3Config, LoraConfig
from .errors import AdapterFileError
from .methods import RULES, rule_for, rule_for_peft_type
from .modules_to_save import extra_tensors
from .peft_format import (
    CONFIG_NAME,
    KEY_PREFIX,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    adapter_subdir,
    check_writable,
    parse_key,
)
from .passes import Site
from .passes.sites import EXPERT
from .planning import ModelFacts, resolve_targets
from .state import AdapterState

__all__ = [
    "read_adapter_dir",
    "read_adapter_config",
    "resolve_dir",
    "adapter_state_dict",
    "peft_config_dict",
    "save_adapters",
    "expected_shapes",
    "check_tensors",
    "check_hotswap",
    "hotswap",
]

PathLike = Union[str, os.PathLike]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


AnyConfig = Union[LoraConfig, IA3Config]


def _module_key(site: str, suffix: str, site_plan: Any = None) -> str:
    """``base_model.model.<site>.<suffix>`` (``suffix``: ``lora_A.weight``, ``ia3_l``, ...); an expert
    site (``target_parameters``) is keyed by its plan's ``peft_module``, the path of PEFT's
    ``ParamWrapper`` (``<experts module>[.base_layer]*k``, see :mod:`graphlora.methods.experts`)."""
    return f"{KEY_PREFIX}{getattr(site_plan, 'peft_module', site)}.{suffix}"


def _config_from_dict(data: Any, source: str) -> AnyConfig:
    """The config of a PEFT ``adapter_config.json`` dict, by its ``peft_type`` (the method's rule reads it)."""
    if not isinstance(data, Mapping):
        raise AdapterFileError(f"{source} must hold a JSON object, got {type(data).__name__}.")
    rule = rule_for_peft_type(data.get("peft_type"))
    if rule is None:
        known = ", ".join(repr(r.peft_type) for r in RULES)
        raise AdapterFileError(
            f"{source}: peft_type={data.get('peft_type')!r} is not supported; graphlora reads {known} adapters."
        )
    return rule.config_from_peft(data, source)


def _read_config(directory: str) -> AnyConfig:
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise AdapterFileError(
            f"no {CONFIG_NAME} in {directory!r}; pass the directory PEFT's save_pretrained or "
            "gm.save_adapter wrote (adapters other than 'default' live in a subdirectory named after them)."
        )
    try:
        with open(config_path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"cannot read {config_path!r}: {exc}") from exc
    return _config_from_dict(data, source=config_path)


def read_adapter_config(path: PathLike, adapter_name: str = "default") -> AnyConfig:
    """The config (:class:`LoraConfig` or :class:`IA3Config`) of a PEFT adapter directory (``path/<adapter_name>/`` for a
    non-default name when it exists, as :meth:`AdaptedGraphModule.load_adapter` resolves it).

    Raises:
        AdapterFileError: no readable config, or one graphlora cannot reproduce.
    """
    return _read_config(resolve_dir(path, adapter_name))


def read_adapter_dir(directory: PathLike) -> tuple[AnyConfig, dict[str, torch.Tensor]]:
    """The config and tensors (on CPU) of a PEFT adapter directory (LoRA, DoRA or IA3).

    Reads ``adapter_model.safetensors``, or PEFT's legacy ``adapter_model.bin`` (with
    ``torch.load(weights_only=True)``) when there is no safetensors file.

    Raises:
        AdapterFileError: a file is missing or unreadable, or the config is not a LoRA config
            graphlora can reproduce.
    """
    directory = os.fspath(directory)
    config = _read_config(directory)

    weights_path = os.path.join(directory, WEIGHTS_NAME)
    legacy_path = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    try:
        if os.path.isfile(weights_path):
            from safetensors.torch import load_file

            tensors = load_file(weights_path, device="cpu")
        elif os.path.isfile(legacy_path):
            tensors = torch.load(legacy_path, map_location="cpu", weights_only=True)
        else:
            raise AdapterFileError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory!r}.")
    except AdapterFileError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterFileError(
            f"cannot read the adapter weights in {directory!r}: {type(exc).__name__}: {exc}. The file is "
            "truncated, corrupt or not in the format its name says (safetensors / torch pickle); save or "
            "download it again."
        ) from exc
    if not isinstance(tensors, Mapping) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise AdapterFileError(f"the adapter weights in {directory!r} are not a mapping of names to tensors.")
    return config, _drop_embedding_tables(directory, dict(tensors))


#: PEFT's ``save_embedding_layers="auto"`` writes the whole base table of an adapted embedding
#: next to its ``lora_embedding_A/B`` (and of an adapted ``lm_head`` next to its ``lora_A/B``), under
#: this suffix of the site path.
EMBEDDING_TABLE = ".base_layer.weight"


def _drop_embedding_tables(directory: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without PEFT's copies of the base embedding tables (``<site>.base_layer.weight`` beside a
    ``<site>.lora_embedding_A``, or beside a ``<site>.lora_A.weight``: an adapted ``lm_head``):
    graphlora keeps the model's own weight. A copy whose shape is not ``[num, dim]`` of the file's
    ``A [r, num]`` / ``B [dim, r]`` (``[d_out, d_in]`` of ``lora_A`` / ``lora_B``) is refused.

    Raises:
        AdapterFileError: naming the key and both shapes.
    """
    out = {}
    for key, t in tensors.items():
        site = key[: -len(EMBEDDING_TABLE)] if key.endswith(EMBEDDING_TABLE) else None
        a, b = (tensors.get(f"{site}.lora_embedding_{p}") for p in "AB") if site else (None, None)
        if a is None and site is not None:  # PEFT saves lm_head's weight the same way ("auto": an embedding name)
            a, b = (tensors.get(f"{site}.lora_{p}.weight") for p in "AB")
            if a is not None and b is not None and a.dim() == b.dim() == 2:
                a, b = b.t(), a.t()  # lora_A [r, d_in], lora_B [d_out, r]: the table is [d_out, d_in]
        if a is None:
            out[key] = t
            continue
        want = (a.shape[1], b.shape[0]) if b is not None and a.dim() == b.dim() == 2 else None
        if want is not None and tuple(t.shape) != want:
            raise AdapterFileError(
                f"{directory!r}: the base weight {key!r} has shape {tuple(t.shape)} but the file's "
                f"LoRA factors give {want}; the file is inconsistent, save it again."
            )
    return out


def resolve_dir(path: PathLike, adapter_name: str) -> str:
    """Where ``adapter_name``'s files are: ``path/<adapter_name>/`` when that holds an adapter (the
    layout ``save_pretrained`` / ``save_adapter`` write for a non-default adapter), else ``path``."""
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.basename(path) in (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        return os.path.dirname(path) or "."
    if not os.path.isdir(path):
        raise AdapterFileError(
            f"{path!r} is not a directory; graphlora loads adapters from local directories only "
            "(no hub downloads): pass the folder that holds adapter_config.json."
        )
    sub = os.path.join(path, adapter_subdir(adapter_name)) if adapter_subdir(adapter_name) else path
    if os.path.isfile(os.path.join(sub, CONFIG_NAME)):
        return sub
    return path


def adapter_state_dict(state: AdapterState, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (see ``AdaptedGraphModule.get_adapter_state_dict``)."""
    check_writable(state.configs[adapter_name], adapter_name)
    rule = state.rule(adapter_name)
    out: dict[str, torch.Tensor] = {}
    for site, site_plan in state.plans[adapter_name].items():
        for suffix, tensor in rule.tensors(state.branch(site, adapter_name)).items():
            out[_module_key(site, suffix, site_plan)] = tensor
    out.update(extra_tensors(state.store, adapter_name))  # modules_to_save copies, bias="all"/"lora_only"
    return out


def peft_config_dict(state: AdapterState, adapter_name: str, facts: ModelFacts,
                     records: Mapping[str, Site]) -> dict[str, Any]:
    """The ``adapter_config.json`` dict PEFT would write for the adapter."""
    config = state.configs[adapter_name]
    rule = rule_for(config)
    plan = state.plans[adapter_name]
    source = facts.source
    name_or_path = getattr(source, "name_or_path", None) or getattr(
        getattr(source, "config", None), "_name_or_path", None
    )
    return rule.config_to_peft(
        rule.resolve_config(config, facts.model_type),
        plan,
        resolve_targets(config, facts),
        any(records[s].fan_in_fan_out for s in plan if records[s].kind != EXPERT),  # experts: never fan_in_fan_out
        base_model_name_or_path=name_or_path or None,
        auto_mapping={"base_model_class": type(source).__name__, "parent_library": type(source).__module__},
    )


def save_adapters(state: AdapterState, facts: ModelFacts, records: Mapping[str, Site], save_directory: PathLike,
                  names: Sequence[str]) -> list[str]:
    """Write ``names`` in PEFT's layout (see ``AdaptedGraphModule.save_adapter``); the directories written."""
    from safetensors.torch import save as safetensors_bytes

    root = os.fspath(save_directory)
    if os.path.isfile(root):
        raise AdapterFileError(f"{root!r} is a file; save_adapter needs a directory path.")
    written = []
    with AtomicWriter() as writer:
        for name in names:
            directory = os.path.join(root, adapter_subdir(name)) if adapter_subdir(name) else root
            os.makedirs(directory, exist_ok=True)
            tensors = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(state, name).items()}
            config = json.dumps(peft_config_dict(state, name, facts, records), indent=2, sort_keys=True)
            writer.stage(os.path.join(directory, WEIGHTS_NAME), safetensors_bytes(tensors, metadata={"format": "pt"}))
            writer.stage(os.path.join(directory, CONFIG_NAME), config.encode("utf-8"))
            written.append(directory)
    return written


def expected_shapes(plan: Mapping[str, Any], config: AnyConfig, records: Mapping[str, Site]) -> dict[str, tuple[int, ...]]:
    """PEFT key -> shape of every tensor an adapter with ``config`` and ``plan`` has."""
    rule = rule_for(config)
    out = {}
    for site, site_plan in plan.items():
        for suffix, shape in rule.shapes(records[site], site_plan, config).items():
            out[_module_key(site, suffix, site_plan)] = shape
    return out


def check_tensors(directory: str, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse a file whose tensors do not match ``expected`` (keys, shapes, floating point).

    Raises:
        AdapterFileError: naming the first offending key and why.
    """
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        key = unexpected[0]
        parsed = parse_key(key)
        if parsed is None:
            why = ("it is not a tensor this adapter's config has (LoRA A/B, DoRA magnitudes with "
                   "use_dora, IA3 vectors, modules_to_save copies, biases with bias='all'/'lora_only', "
                   "lora_embedding_A/B on a selected embedding)")
        else:
            selected = sorted({p[0] for p in (parse_key(k) for k in expected) if p is not None})
            why = (f"the adapter config does not select site {parsed[0]!r} on this model "
                   f"(selected: {selected[:6]}...)")
        raise AdapterFileError(
            f"{directory!r}: unexpected tensor {key!r} ({len(unexpected)} in all): {why}. "
            "Is this adapter for another model?"
        )
    missing = [k for k in expected if k not in tensors]
    if missing:
        key = missing[0]
        raise AdapterFileError(
            f"{directory!r}: missing tensor {key!r} (expected shape {expected[key]}; {len(missing)} missing "
            "in all). The config selects this site but the file has no weights for it; the file is "
            "incomplete or was saved for another model."
        )
    for key, shape in expected.items():
        t = tensors[key]
        if _shape(t) != tuple(shape):
            raise AdapterFileError(
                f"{directory!r}: tensor {key!r} has shape {_shape(t)} in the file but the model expects "
                f"{tuple(shape)} (rank and the site's feature sizes); the adapter does not fit this model "
                "or its config's r/rank_pattern disagrees with its weights."
            )
        if not t.is_floating_point():
            raise AdapterFileError(f"{directory!r}: tensor {key!r} has dtype {t.dtype}; adapter weights are floating point.")


def check_hotswap(state: AdapterState, directory: str, adapter_name: str, config: AnyConfig,
                  plan: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], records: Mapping[str, Site]) -> None:
    """Refuse loading ``tensors`` into the existing ``adapter_name`` unless keys and shapes match.

    Raises:
        AdapterFileError: another method, other sites or other shapes, other trainable token ids.
    """
    old = state.configs[adapter_name]
    if type(old) is not type(config):
        raise AdapterFileError(
            f"{directory!r} holds a {type(config).__name__} adapter but {adapter_name!r} is a {type(old).__name__} "
            f"adapter; delete_adapter({adapter_name!r}) first or load it under another name."
        )
    rows = (getattr(old, "trainable_token_indices", None), getattr(config, "trainable_token_indices", None))
    if rows[0] != rows[1]:  # the rows' ids are fixed when the adapter is added
        raise AdapterFileError(
            f"{directory!r} trains embedding rows trainable_token_indices={rows[1]!r} but {adapter_name!r} trains "
            f"{rows[0]!r}; delete_adapter({adapter_name!r}) first or load it under another name."
        )
    current = adapter_state_dict(state, adapter_name)
    for key, shape in expected_shapes(plan, config, records).items():
        if key not in current:
            raise AdapterFileError(
                f"{directory!r}: tensor {key!r} (shape {shape}) has no counterpart in the loaded adapter "
                f"{adapter_name!r}; its sites differ. delete_adapter({adapter_name!r}) first or load under "
                "another name."
            )
        if _shape(current[key]) != tuple(shape):
            raise AdapterFileError(
                f"{directory!r}: tensor {key!r} has shape {tuple(shape)} in the file but {_shape(current[key])} in "
                f"the loaded adapter {adapter_name!r}; delete_adapter({adapter_name!r}) first or load under "
                "another name."
            )
    stray = [k for k in tensors if k not in current]
    if stray:
        raise AdapterFileError(
            f"{directory!r}: the file has {stray[0]!r} ({len(stray)} in all) but the loaded adapter {adapter_name!r} "
            "does not (other modules_to_save or bias); delete_adapter first or load under another name."
        )
    extra = [k for k in current if k not in tensors]
    if extra:
        raise AdapterFileError(
            f"{directory!r}: the loaded adapter {adapter_name!r} has {extra[0]!r} ({len(extra)} in all) but "
            "the file does not; its sites differ. delete_adapter first or load under another name."
        )


def hotswap(state: AdapterState, adapter_name: str, config: AnyConfig, plan: Mapping[str, Any],
            tensors: Mapping[str, torch.Tensor]) -> bool:
    """Copy ``tensors`` into the existing adapter in place and let its method update the branch
    constants (LoRA: alpha, scaling, dropout). Run inside a transaction (nothing is restored here).

    Returns:
        whether the graphs must be re-spliced (a branch gained or lost a dropout module).
    """
    current = adapter_state_dict(state, adapter_name)
    with torch.no_grad():
        for key, value in tensors.items():
            current[key].copy_(value)
    rule = rule_for(config)
    needs_rebuild = False
    for site, site_plan in plan.items():
        needs_rebuild |= rule.hotswap(state.branch(site, adapter_name), config, site_plan)
    state.configs[adapter_name] = config
    state.plans[adapter_name] = dict(plan)
    return needs_rebuild
