"""Save and load adapters in PEFT's file layout (see :mod:`graphlora.peft_format`).

:class:`PeftFileMixin` gives :class:`~graphlora.AdaptedGraphModule` PEFT's adapter I/O:

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

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from ._atomic import AtomicWriter
from ._checks import check_placement
from .config import IA3Config, LoraConfig
from .merge import set_branch_scaling
from .errors import ConfigError, AdapterFileError, AdapterStateError
from .methods import RULES, rule_for, rule_for_peft_type
from .peft_format import (
    CONFIG_NAME,
    KEY_PREFIX,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    adapter_subdir,
    check_writable,
    parse_key,
)
from .passes.splice import site_key

__all__ = ["PeftFileMixin", "read_adapter_dir", "read_adapter_config"]

PathLike = Union[str, os.PathLike]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


AnyConfig = Union[LoraConfig, IA3Config]


def _module_key(site: str, suffix: str) -> str:
    """``base_model.model.<site>.<suffix>`` (``suffix``: ``lora_A.weight``, ``ia3_l``, ...)."""
    return f"{KEY_PREFIX}{site}.{suffix}"


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
    non-default name when it exists, as :meth:`PeftFileMixin.load_adapter` resolves it).

    Raises:
        AdapterFileError: no readable config, or one graphlora cannot reproduce.
    """
    return _read_config(_resolve_dir(path, adapter_name))


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
    return config, dict(tensors)


def _resolve_dir(path: PathLike, adapter_name: str) -> str:
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


class PeftFileMixin:
    """PEFT-format ``save_adapter`` / ``load_adapter`` / ``get_adapter_state_dict``.

    Mixed into :class:`~graphlora.AdaptedGraphModule`; relies on its adapter store, configs,
    plans and sites.
    """

    # ------------------------------------------------------------------ in memory
    def _site_records(self) -> dict[str, Any]:
        records: dict[str, Any] = {}
        for site in self._primary.sites:  # type: ignore[attr-defined]
            records.setdefault(site.name, site)
        return records

    def get_adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's keys (no adapter name in them).

        ``{"base_model.model.<site>.lora_A.weight": A [r, d_in], "...lora_B.weight": B [d_out, r]}``
        per adapted site, in graph order (plus ``...lora_magnitude_vector`` [d_out] for DoRA; IA3:
        ``...ia3_l`` [d_out, 1] or [1, d_in]). The tensors are detached and share storage with the
        parameters: clone them to keep a snapshot.

        Raises:
            AdapterNotFoundError: unknown adapter.
        """
        self._check_known([adapter_name])  # type: ignore[attr-defined]
        check_writable(self._glora_configs[adapter_name], adapter_name)  # type: ignore[attr-defined]
        rule = self._rule(adapter_name)  # type: ignore[attr-defined]
        out: dict[str, torch.Tensor] = {}
        for site in self._glora_plans[adapter_name]:  # type: ignore[attr-defined]
            branch = self.graphlora.branch(site_key(site), adapter_name)  # type: ignore[attr-defined]
            for suffix, tensor in rule.tensors(branch).items():
                out[_module_key(site, suffix)] = tensor
        return out

    def _peft_config_dict(self, adapter_name: str) -> dict[str, Any]:
        config = self._glora_configs[adapter_name]  # type: ignore[attr-defined]
        rule = rule_for(config)
        plan = self._glora_plans[adapter_name]  # type: ignore[attr-defined]
        records = self._site_records()
        source = self._glora_source  # type: ignore[attr-defined]
        name_or_path = getattr(source, "name_or_path", None) or getattr(
            getattr(source, "config", None), "_name_or_path", None
        )
        return rule.config_to_peft(
            rule.resolve_config(config, self._glora_model_type),  # type: ignore[attr-defined]
            plan,
            self._resolve_targets(config),  # type: ignore[attr-defined]
            any(records[s].fan_in_fan_out for s in plan),
            base_model_name_or_path=name_or_path or None,
            auto_mapping={"base_model_class": type(source).__name__, "parent_library": type(source).__module__},
        )

    # ------------------------------------------------------------------ save
    def save_adapter(
        self, save_directory: PathLike, adapter_name: Union[str, Sequence[str], None] = "default"
    ) -> list[str]:
        """Write adapters in PEFT's layout; returns the directories written.

        ``adapter_name`` is one name, a list of names, or ``None`` for every adapter. As with
        PEFT's ``save_pretrained``, ``"default"`` goes into ``save_directory`` and any other
        adapter into ``save_directory/<name>/``. Each directory gets ``adapter_config.json``
        (sorted keys, ``inference_mode: true``) and ``adapter_model.safetensors`` (metadata
        ``{"format": "pt"}``).

        Every file is first written under a temporary name in its directory, then all of them
        are renamed into place. An error (or a crash) before the renames leaves the previous
        files untouched; each rename is atomic, so no file is ever half-written.

        Raises:
            AdapterNotFoundError: an unknown adapter name.
        """
        from safetensors.torch import save as safetensors_bytes

        if adapter_name is None:
            names = list(self._glora_configs)  # type: ignore[attr-defined]
        elif isinstance(adapter_name, str):
            names = [adapter_name]
        else:
            names = list(adapter_name)
        self._check_known(names)  # type: ignore[attr-defined]
        root = os.fspath(save_directory)
        if os.path.isfile(root):
            raise AdapterFileError(f"{root!r} is a file; save_adapter needs a directory path.")
        written = []
        with AtomicWriter() as writer:
            for name in names:
                directory = os.path.join(root, adapter_subdir(name)) if adapter_subdir(name) else root
                os.makedirs(directory, exist_ok=True)
                tensors = {k: v.to("cpu").contiguous() for k, v in self.get_adapter_state_dict(name).items()}
                config = json.dumps(self._peft_config_dict(name), indent=2, sort_keys=True)
                writer.stage(os.path.join(directory, WEIGHTS_NAME), safetensors_bytes(tensors, metadata={"format": "pt"}))
                writer.stage(os.path.join(directory, CONFIG_NAME), config.encode("utf-8"))
                written.append(directory)
        return written

    # ------------------------------------------------------------------ load
    def _expected_shapes(self, plan: Mapping[str, Any], config: AnyConfig) -> dict[str, tuple[int, ...]]:
        records = self._site_records()
        rule = rule_for(config)
        out = {}
        for site, site_plan in plan.items():
            for suffix, shape in rule.shapes(records[site], site_plan, config).items():
                out[_module_key(site, suffix)] = shape
        return out

    def _check_tensors(
        self, directory: str, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, int]]
    ) -> None:
        unexpected = [k for k in tensors if k not in expected]
        if unexpected:
            key = unexpected[0]
            parsed = parse_key(key)
            if parsed is None:
                why = ("it is not a tensor this adapter's config has (LoRA A/B, DoRA magnitudes with "
                       "use_dora, IA3 vectors); biases, embeddings and modules_to_save are not supported")
            else:
                why = (f"the adapter config does not select site {parsed[0]!r} on this model "
                       f"(selected: {sorted({parse_key(k)[0] for k in expected})[:6]}...)")
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

    def load_adapter(
        self,
        path: PathLike,
        adapter_name: str = "default",
        *,
        is_trainable: bool = False,
        activate: Union[bool, None] = None,
    ) -> None:
        """Load a PEFT LoRA adapter directory under ``adapter_name``.

        Args:
            path: a directory written by PEFT's ``save_pretrained`` or by :meth:`save_adapter`.
                For a name other than ``"default"``, ``path/<adapter_name>/`` is read when it holds
                an adapter (where those functions put it), else ``path`` itself.
            adapter_name: the name to load under. If it exists and the file's tensors have the
                same keys and shapes, the weights are copied in place (hotswap: no graph
                rebuild; the config's alpha / scaling / dropout are updated too).
            is_trainable: as in PEFT, ``False`` loads the adapter frozen (``inference_mode``).
            activate: make it the active adapter. ``None``: only if no adapter was active
                (PEFT's ``load_adapter`` does not switch adapters).

        Raises:
            AdapterFileError: missing files, unknown ``peft_type``, unsupported PEFT features,
                missing/unexpected tensor keys, or shapes that do not fit (the message names the
                key and both shapes).
            AdapterStateError: hotswapping into an adapter that is merged.
        On any error the module and every adapter are exactly as before.
        """
        directory = _resolve_dir(path, adapter_name)
        config, tensors = read_adapter_dir(directory)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        exists = adapter_name in self._glora_configs  # type: ignore[attr-defined]
        if not exists:
            self._check_new_name(adapter_name)  # type: ignore[attr-defined]
        try:
            plan = self._plan(config)  # type: ignore[attr-defined]
        except ConfigError as exc:  # no site, a non-linear target, layers out of range
            raise AdapterFileError(f"{directory!r}: {exc}") from exc
        expected = self._expected_shapes(plan, config)
        self._check_tensors(directory, tensors, expected)
        check_placement(self, plan, f"load adapter {adapter_name!r} from {directory!r}", loading=True)
        if exists and type(self._glora_configs[adapter_name]) is not type(config):  # type: ignore[attr-defined]
            old = type(self._glora_configs[adapter_name]).__name__  # type: ignore[attr-defined]
            raise AdapterFileError(
                f"{directory!r} holds a {type(config).__name__} adapter but {adapter_name!r} is a {old} adapter; "
                f"delete_adapter({adapter_name!r}) first or load it under another name."
            )
        if exists:
            self._hotswap(directory, adapter_name, config, plan, tensors)
        else:
            self._load_new(adapter_name, config, tensors, activate)

    def _load_new(self, adapter_name: str, config: AnyConfig, tensors: Mapping[str, torch.Tensor],
                  activate: Union[bool, None]) -> None:
        previous = dict(self._glora_weights)  # type: ignore[attr-defined]
        self.add_adapter(adapter_name, config)  # type: ignore[attr-defined]
        try:
            with torch.no_grad():
                for key, param in self.get_adapter_state_dict(adapter_name).items():
                    param.copy_(tensors[key])
            keep_previous = activate is False or (activate is None and previous)
            if keep_previous and previous:
                self._set_active(previous)  # type: ignore[attr-defined]
        except BaseException:
            self._forget(adapter_name)  # type: ignore[attr-defined]
            if previous:
                self._set_active(previous)  # type: ignore[attr-defined]
            raise

    def _hotswap(self, directory: str, adapter_name: str, config: AnyConfig,
                 plan: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` into the existing adapter in place; update its scaling and dropout."""
        if adapter_name in getattr(self, "merged_adapters", ()):
            raise AdapterStateError(
                f"adapter {adapter_name!r} is merged into the base weights; unmerge_adapter() before "
                "loading new weights into it."
            )
        current = self.get_adapter_state_dict(adapter_name)
        for key, shape in self._expected_shapes(plan, config).items():
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
        extra = [k for k in current if k not in tensors]
        if extra:
            raise AdapterFileError(
                f"{directory!r}: the loaded adapter {adapter_name!r} has {extra[0]!r} ({len(extra)} in all) but "
                "the file does not; its sites differ. delete_adapter first or load under another name."
            )
        branches = {site: self.graphlora.branch(site_key(site), adapter_name) for site in plan}  # type: ignore[attr-defined]
        backup = {k: v.clone() for k, v in current.items()}
        old = {}
        lora = isinstance(config, LoraConfig)  # IA3 has no scaling or dropout to update
        for site, b in branches.items():
            dropout = b._modules.get("lora_dropout")
            old[site] = (getattr(b, "lora_alpha", None), getattr(b, "scaling", None), dropout, getattr(dropout, "p", None))
        old_config = self._glora_configs[adapter_name]  # type: ignore[attr-defined]
        old_plan = self._glora_plans[adapter_name]  # type: ignore[attr-defined]
        needs_rebuild = False
        try:
            with torch.no_grad():
                for key, value in tensors.items():
                    current[key].copy_(value)
            for site, (r, alpha, scaling) in (plan.items() if lora else ()):
                branch = branches[site]
                branch.lora_alpha = alpha
                set_branch_scaling(branch, scaling)
                dropout = branch._modules.get("lora_dropout")
                if config.lora_dropout > 0 and dropout is not None:
                    dropout.p = config.lora_dropout
                elif config.lora_dropout > 0:
                    branch.lora_dropout = nn.Dropout(config.lora_dropout).train(branch.training)
                    needs_rebuild = True
                elif dropout is not None:
                    del branch._modules["lora_dropout"]
                    needs_rebuild = True
            self._glora_configs[adapter_name] = config  # type: ignore[attr-defined]
            self._glora_plans[adapter_name] = dict(plan)  # type: ignore[attr-defined]
            if needs_rebuild:
                self._rebuild()  # type: ignore[attr-defined]
            self._sync_state()  # type: ignore[attr-defined]
        except BaseException:
            with torch.no_grad():
                for key, value in backup.items():
                    current[key].copy_(value)
            for site, (alpha, scaling, dropout, p) in (old.items() if lora else ()):
                branch = branches[site]
                branch.lora_alpha = alpha
                set_branch_scaling(branch, scaling)
                branch._modules.pop("lora_dropout", None)
                if dropout is not None:
                    dropout.p = p
                    branch._modules["lora_dropout"] = dropout
            self._glora_configs[adapter_name] = old_config  # type: ignore[attr-defined]
            self._glora_plans[adapter_name] = old_plan  # type: ignore[attr-defined]
            if needs_rebuild:
                self._rebuild()  # type: ignore[attr-defined]
            self._sync_state()  # type: ignore[attr-defined]
            raise
