"""Adapter configs: frozen dataclasses with PEFT's field names.

A :class:`LoraConfig` describes one LoRA adapter. Per targeted linear site with weight
``W`` (``d_out x d_in``) it adds ``A`` (``r x d_in``) and ``B`` (``d_out x r``) and computes

.. math::

    y = W x + s \\cdot B A \\,\\mathrm{dropout}(x), \\qquad
    s = \\frac{\\alpha}{r} \\;\\text{or, with rsLoRA,}\\; \\frac{\\alpha}{\\sqrt{r}}

adding ``r * (d_in + d_out)`` parameters. ``r`` and ``alpha`` may be overridden per site
through ``rank_pattern`` / ``alpha_pattern`` (PEFT's matching rules).

Configs are immutable: graphlora never edits a config in place; use
:func:`dataclasses.replace` to derive a new one.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from .errors import ConfigError, PeftFunctionError, closest

__all__ = ["LoraConfig", "IA3Config", "LoHaConfig", "LoKrConfig", "ALL_LINEAR", "DEFAULT_TARGET_MODULES",
           "DEFAULT_IA3_MODULES", "DEFAULT_LOHA_MODULES", "DEFAULT_LOKR_MODULES"]

ALL_LINEAR = "all-linear"

#: PEFT's default ``target_modules`` per ``model_type`` when a config leaves them unset.
DEFAULT_TARGET_MODULES: Mapping[str, Union[tuple[str, ...], str]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "layoutlm": ("query", "value"),
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "opt": ("q_proj", "v_proj"),
    "bart": ("q_proj", "v_proj"),
    "gptj": ("q_proj", "v_proj"),
    "gpt_neo": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "gpt_bigcode": ("c_attn",),
    "bloom": ("query_key_value",),
    "falcon": ("query_key_value",),
    "codegen": ("qkv_proj",),
    "mpt": ("Wqkv",),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "stablelm": ("q_proj", "v_proj"),
    "llama4": ("q_proj", "v_proj"),
    "deberta": ("in_proj",),
    "deberta-v2": ("query_proj", "value_proj"),
    # not in PEFT's table (PEFT asks for target_modules): graphlora's own choices, see
    # docs/peft-compatibility.md. ViT's attention is q_proj/k_proj/v_proj in transformers 5
    # (PEFT 0.17 dropped its ("query", "value") entry).
    "phi3": ("qkv_proj",),
    "vit": ("q_proj", "v_proj"),
}

#: PEFT keeps one table per method; for LoHa and LoKr it is LoRA's (graphlora's choices included).
DEFAULT_LOHA_MODULES: Mapping[str, Union[tuple[str, ...], str]] = DEFAULT_TARGET_MODULES
DEFAULT_LOKR_MODULES: Mapping[str, Union[tuple[str, ...], str]] = DEFAULT_TARGET_MODULES

TargetSpec = Union[str, Sequence[str], None]
_INIT_CHOICES = (True, False, "gaussian")


def _as_names(value: TargetSpec, field_name: str) -> TargetSpec:
    """Normalise a target spec: a string stays a string (regex), a sequence becomes a tuple of str."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = tuple(dict.fromkeys(sorted(value) if isinstance(value, (set, frozenset)) else value))
        bad = [v for v in names if not isinstance(v, str) or not v]
        if bad:
            raise ConfigError(f"{field_name} entries must be non-empty strings; got {bad!r}.")
        return names
    raise ConfigError(
        f"{field_name}={value!r} is a {type(value).__name__}; give a list of module names, "
        "a regex string, or 'all-linear'."
    )


def _normalize_targets(config: Any, fields: Sequence[str]) -> None:
    """In place on a frozen config: ``"ALL-LINEAR"`` -> ``"all-linear"``, lists -> tuples, regexes checked."""
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        object.__setattr__(config, "target_modules", ALL_LINEAR)
    for name in fields:
        value = _as_names(getattr(config, name), name)
        object.__setattr__(config, name, value)
        if isinstance(value, str) and value != ALL_LINEAR:
            _check_regex(value, name)


def _check_regex(value: str, field_name: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ConfigError(
            f"{field_name}={value!r} is not a valid regular expression ({exc}); "
            "fix the pattern, or pass a list of module names instead."
        ) from None


def _check_modules_to_save(config: Any) -> None:
    """In place on a frozen config: ``modules_to_save`` as a tuple of names (``None`` when empty).

    PEFT's matching applies (a module path that ends with an entry), see :mod:`graphlora.modules_to_save`.
    """
    value = config.modules_to_save
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(
            f"modules_to_save={value!r} must be a list of module names (e.g. ['classifier']), or None."
        )
    bad = [v for v in value if not isinstance(v, str) or not v]
    if bad:
        raise ConfigError(f"modules_to_save entries must be non-empty strings; got {bad!r}.")
    object.__setattr__(config, "modules_to_save", tuple(dict.fromkeys(value)) or None)


def _check_token_indices(config: Any) -> None:
    """In place on a frozen config: ``trainable_token_indices`` as a tuple of token ids (the input
    embedding's rows) or a dict ``{embedding module name: tuple of ids}``; ``None`` when empty.
    See :mod:`graphlora.trainable_tokens`."""
    value = config.trainable_token_indices

    def ids(entry: Any, where: str) -> tuple[int, ...]:
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence):
            raise ConfigError(f"{where}={entry!r} must be a list of token ids (non-negative ints), e.g. [0, 5].")
        bad = [i for i in entry if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0]
        if bad:
            raise ConfigError(f"{where} entries must be non-negative int token ids; got {bad[0]!r}.")
        out = tuple(int(i) for i in entry)
        if len(set(out)) != len(out):
            raise ConfigError(f"{where}={list(out)!r} repeats a token id; list each id once.")
        return out

    if value is None:
        return
    if isinstance(value, Mapping):
        bad_keys = [k for k in value if not isinstance(k, str) or not k]
        if bad_keys:
            raise ConfigError(f"trainable_token_indices keys must be embedding module names; got {bad_keys[0]!r}.")
        rows = {k: ids(v, f"trainable_token_indices[{k!r}]") for k, v in value.items()}
        object.__setattr__(config, "trainable_token_indices", {k: v for k, v in rows.items() if v} or None)
        return
    object.__setattr__(config, "trainable_token_indices", ids(value, "trainable_token_indices") or None)


def _check_target_parameters(config: Any) -> None:
    """In place on a frozen LoraConfig: ``target_parameters`` as a tuple of names (``None`` when
    empty), refusing what PEFT's ``ParamWrapper`` refuses."""
    value = config.target_parameters
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise ConfigError(
            f"target_parameters={value!r} must be a list of parameter names "
            "(e.g. ['experts.gate_up_proj', 'experts.down_proj']), or None."
        )
    bad = [v for v in value if not isinstance(v, str) or not v or v.startswith(".") or v.endswith(".")]
    if bad:
        raise ConfigError(f"target_parameters entries must be parameter names like 'experts.down_proj'; got {bad!r}.")
    names = tuple(sorted(dict.fromkeys(value))) if isinstance(value, (set, frozenset)) else tuple(dict.fromkeys(value))
    object.__setattr__(config, "target_parameters", names or None)
    if not names:
        return
    for field_name, on in (("lora_dropout", config.lora_dropout > 0), ("use_dora", config.use_dora),
                           ("lora_bias", config.lora_bias), ("fan_in_fan_out", bool(config.fan_in_fan_out))):
        if on:
            raise ConfigError(
                f"target_parameters={list(names)!r} cannot be combined with {field_name}="
                f"{getattr(config, field_name)!r} (PEFT's ParamWrapper refuses it too); set {field_name} to its "
                "default or adapt the experts in a separate adapter."
            )


class _PeftConfigIO:
    """``to_dict`` / ``from_dict`` in PEFT's ``adapter_config.json`` shape, for any frozen config
    dataclass with a ``peft_type`` class attribute."""

    peft_type = ""

    @property
    def is_prompt_learning(self) -> bool:
        """Read by PEFT's ``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` (and nothing in
        graphlora). Those functions select tensors by walking PEFT's tuner-layer classes, which a
        graphlora module does not have, so they would return nothing, or load nothing, silently:
        this raises instead, naming graphlora's methods.

        Raises:
            PeftFunctionError: always.
        """
        raise PeftFunctionError(
            f"a graphlora {type(self).__name__} is not a PEFT config: peft.get_peft_model_state_dict / "
            "set_peft_model_state_dict (the readers of is_prompt_learning) cannot read a graphlora module, whose "
            "adapters are not PEFT tuner layers. Use gm.get_adapter_state_dict(adapter_name) for "
            "get_peft_model_state_dict (the same keys and tensors, as gm.save_pretrained writes them) and "
            "gm.load_adapter_state_dict(state_dict, adapter_name) for set_peft_model_state_dict."
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with PEFT's keys (``peft_type`` included)."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = False) -> "_PeftConfigIO":
        """Build from a PEFT ``adapter_config.json`` dict.

        Keys PEFT writes that graphlora does not use are dropped unless ``strict`` is set;
        with ``strict`` an unknown key raises a :class:`ConfigError` naming the closest field.
        """
        from .methods import plain_config_dict

        data = plain_config_dict(dict(data))  # a PEFT config's to_dict(): PeftType / TaskType members, sets
        fields = {f.name for f in dataclasses.fields(cls)}
        peft_type = data.get("peft_type", cls.peft_type)
        if str(peft_type).upper() != cls.peft_type:
            raise ConfigError(
                f"peft_type={peft_type!r} is not {cls.peft_type!r}; this config is for another adapter method."
            )
        unknown = [k for k in data if k not in fields and k != "peft_type"]
        if strict and unknown:
            key = unknown[0]
            raise ConfigError(
                f"unknown {cls.__name__} field {key!r}; did you mean {closest(key, fields, 3)}?"
            )
        return cls(**{k: v for k, v in data.items() if k in fields})


@dataclass(frozen=True)
class LoraConfig(_PeftConfigIO):
    """Configuration of one LoRA adapter (PEFT's ``LoraConfig`` field names).

    Args:
        r: rank of ``A`` and ``B``; must be a positive integer.
        lora_alpha: numerator of the scaling ``s``.
        target_modules: list of module names (a path equal to an entry or ending in
            ``"." + entry``), a regex string (``re.fullmatch`` on the path), or ``"all-linear"``
            (every linear but the output head). ``None`` uses PEFT's default for the model type.
        exclude_modules: same forms as ``target_modules``; matching paths are skipped.
        lora_dropout: dropout probability on the adapter's input (follows ``train()``/``eval()``).
        use_rslora: ``s = alpha / sqrt(r)`` instead of ``alpha / r``.
        init_lora_weights: ``True`` (A Kaiming-uniform with ``a=sqrt(5)``, B zeros: identity at
            injection), ``"gaussian"`` (A ~ N(0, 1/r), B zeros) or ``False`` (both random: not
            the identity; for tests).
        layers_to_transform: layer indices (int or list) to restrict list targets to.
        layers_pattern: name(s) of the layer container (``"layers"``, ``"h"``) for that index.
        rank_pattern / alpha_pattern: per-site overrides of ``r`` / ``lora_alpha``; keys are
            regexes matched as PEFT does (``(.*\\.)?(key)$``).
        fan_in_fan_out: ``True`` when the weight is stored (in, out); ``None`` detects it per site
            (GPT-2's ``Conv1D``).
        use_dora: weight-decomposed LoRA (DoRA): the adapted weight is
            ``m * (W + s B A) / ||W + s B A||_row`` with a learned magnitude ``m`` per output
            feature (``lora_magnitude_vector``), the norm detached as in PEFT.
        bias: which base biases train with the adapter and are saved with it: ``"none"``,
            ``"all"`` (every parameter whose name contains ``bias``) or ``"lora_only"`` (the
            adapted sites' biases); see :mod:`graphlora.modules_to_save`.
        modules_to_save: module names (a path *ending with* an entry, PEFT's rule) of which the
            adapter keeps its own trainable copy, used while it is active (a classification head);
            ``task_type="SEQ_CLS"`` adds ``classifier`` and ``score`` as PEFT does.
        lora_bias: ``B`` gets a trainable bias ``b_B`` (``lora_B.bias``, zeros at init), so the
            update is ``s (B A x + b_B)``; merging folds ``s b_B`` into the base bias (a site
            without a bias cannot merge). Not with ``use_dora`` (PEFT's rule).
        target_parameters: parameter paths (PEFT's rule: a path equal to an entry or ending in
            ``"." + entry``) of 3-D expert weights ``[E, out, in]`` (or ``[E, in, out]``) to adapt
            with one LoRA per expert, e.g. ``["experts.gate_up_proj", "experts.down_proj"]``:
            PEFT's ``lora_A`` ``[E r, in]`` and ``lora_B`` ``[out, r E]`` (see
            :mod:`graphlora.methods.experts`). Not with ``lora_dropout``, ``use_dora``,
            ``lora_bias`` or ``fan_in_fan_out`` (PEFT's rules). ``target_modules`` never selects
            expert weights; with ``target_parameters`` set and no default for the model type,
            ``target_modules=None`` selects no module.
        trainable_token_indices: token ids whose rows of the input embedding the adapter trains
            (PEFT's field): a list (the model's input embedding) or ``{"embed_tokens": [ids]}``
            (a module path ending with the key). While the adapter is active the embedding reads
            ``W.index_copy(0, ids, delta)``; see :mod:`graphlora.trainable_tokens` (not for tied
            embeddings, nor for ``nn.Linear`` targets).

    Raises:
        ConfigError: a field has an unusable value (the message names it and the fix).
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Union[int, Sequence[int], None] = None
    layers_pattern: Union[str, Sequence[str], None] = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    fan_in_fan_out: Union[bool, None] = None
    use_dora: bool = False
    bias: str = "none"
    modules_to_save: Union[Sequence[str], None] = None
    lora_bias: bool = False
    target_parameters: Union[Sequence[str], None] = None
    trainable_token_indices: Union[Sequence[int], Mapping[str, Sequence[int]], None] = None
    task_type: Union[str, None] = None
    base_model_name_or_path: Union[str, None] = None
    inference_mode: bool = False

    peft_type = "LORA"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.r, bool) or not isinstance(self.r, numbers.Integral) or self.r <= 0:
            raise ConfigError(f"r={self.r!r} must be a positive integer (the adapter rank), e.g. r=8.")
        set_(self, "r", int(self.r))
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, numbers.Real) or not math.isfinite(self.lora_alpha):
            raise ConfigError(f"lora_alpha={self.lora_alpha!r} must be a finite number, e.g. lora_alpha=16.")
        _normalize_targets(self, ("target_modules", "exclude_modules"))
        if not isinstance(self.lora_dropout, numbers.Real) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout!r} must be a number in [0, 1).")
        if self.init_lora_weights not in _INIT_CHOICES or (
            isinstance(self.init_lora_weights, str) and self.init_lora_weights != "gaussian"
        ):
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use True, False or 'gaussian'."
            )
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(
                f"bias={self.bias!r} is not supported; use 'none', 'all' (every base bias trains) or 'lora_only' "
                "(the adapted sites' biases train), PEFT's choices."
            )
        _check_modules_to_save(self)
        _check_token_indices(self)
        if not isinstance(self.lora_bias, bool):
            raise ConfigError(f"lora_bias={self.lora_bias!r} must be True or False.")
        if self.lora_bias and self.use_dora:
            raise ConfigError("lora_bias=True cannot be combined with use_dora=True (PEFT does not support it either).")
        layers = self.layers_to_transform
        if layers is not None:
            if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
                layers = int(layers)
            elif isinstance(layers, (list, tuple)) and all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in layers
            ):
                layers = tuple(int(i) for i in layers)
            else:
                raise ConfigError(f"layers_to_transform={layers!r} must be an int or a list of ints.")
            if any(i < 0 for i in ((layers,) if isinstance(layers, int) else layers)):
                raise ConfigError(f"layers_to_transform={layers!r} has a negative index; layer indices start at 0.")
            set_(self, "layers_to_transform", layers)
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ConfigError(
                f"layers_to_transform={self.layers_to_transform!r} cannot be used with target_modules="
                f"{self.target_modules!r} (a string); list the module names instead (PEFT has the same rule)."
            )
        if self.layers_pattern is not None:
            if self.layers_to_transform is None:
                raise ConfigError(
                    f"layers_pattern={self.layers_pattern!r} needs layers_to_transform; set both or neither."
                )
            if not isinstance(self.layers_pattern, str):
                set_(self, "layers_pattern", tuple(self.layers_pattern))
        for name, kind in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
            pattern = dict(getattr(self, name) or {})
            for key, value in pattern.items():
                _check_regex(key, f"{name} key")
                ok = isinstance(value, numbers.Integral) and value > 0 if kind == "r" else isinstance(value, numbers.Real)
                if isinstance(value, bool) or not ok:
                    raise ConfigError(f"{name}[{key!r}]={value!r} is not a valid {kind}.")
            set_(self, name, pattern)
        if self.use_rslora and not isinstance(self.use_rslora, bool):
            raise ConfigError(f"use_rslora={self.use_rslora!r} must be True or False.")
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora={self.use_dora!r} must be True or False.")
        _check_target_parameters(self)

    # ------------------------------------------------------------------ helpers
    def scaling(self, r: int, alpha: float) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


#: PEFT's default IA3 ``target_modules`` / ``feedforward_modules`` per ``model_type``.
DEFAULT_IA3_MODULES: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mixtral": (("k_proj", "v_proj", "w2"), ("w2",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma3_text": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "llama4": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "gpt_bigcode": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    "roberta": (("key", "value", "output.dense"), ("output.dense",)),
    "t5": (("k", "v", "wo"), ("wo",)),
    "mt5": (("k", "v", "wi_1"), ()),
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)),
    "bart": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "gptj": (("q_proj", "v_proj", "fc_out"), ("fc_out",)),
    "gpt_neo": (("q_proj", "v_proj", "c_proj"), ("c_proj",)),
    "gpt_neox": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "bloom": (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)),
    "falcon": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "phi": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "deberta": (("in_proj", "output.dense"), ("output.dense",)),
    "deberta-v2": (("key_proj", "value_proj", "output.dense"), ("output.dense",)),
}


@dataclass(frozen=True)
class IA3Config(_PeftConfigIO):
    """Configuration of one (IA)³ adapter (PEFT's ``IA3Config`` field names).

    Per targeted linear site with ``y = W x + b`` it learns one vector ``l`` and computes

    .. math::

        y = l \\odot (W x + b) \\quad\\text{(output scaling, } l \\in \\mathbb{R}^{d_{out}}\\text{)}
        \\qquad\\text{or}\\qquad
        y = W (l \\odot x) + b \\quad\\text{(feed-forward sites, } l \\in \\mathbb{R}^{d_{in}}\\text{)}

    adding ``d_out`` (or ``d_in``) parameters per site. ``l`` starts at ones: injection is the
    identity.

    Args:
        target_modules: as :class:`LoraConfig` (list, regex string, ``"all-linear"``; ``None``
            uses PEFT's IA3 default for the model type).
        feedforward_modules: which targeted sites scale their *input*: a regex string
            (``re.fullmatch`` on the path) or a list of names (a path *ending with* an entry, PEFT's
            rule: no ``"."`` boundary). ``None`` uses PEFT's default for the model type. Each list
            entry must also be a ``target_modules`` entry when both are lists.
        exclude_modules: as :class:`LoraConfig`.
        init_ia3_weights: ``True``: ``l = 1``; ``False``: ``l ~ N(0, 1)`` (not the identity; tests).
        fan_in_fan_out: weight stored (in, out); ``None`` detects it per site (GPT-2 ``Conv1D``).

    Raises:
        ConfigError: a field has an unusable value (the message names it and the fix).
    """

    target_modules: TargetSpec = None
    feedforward_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    init_ia3_weights: bool = True
    fan_in_fan_out: Union[bool, None] = None
    modules_to_save: Union[Sequence[str], None] = None
    task_type: Union[str, None] = None
    base_model_name_or_path: Union[str, None] = None
    inference_mode: bool = False

    peft_type = "IA3"

    def __post_init__(self) -> None:
        _normalize_targets(self, ("target_modules", "feedforward_modules", "exclude_modules"))
        targets, ff = self.target_modules, self.feedforward_modules
        if isinstance(targets, tuple) and isinstance(ff, tuple):
            stray = [m for m in ff if m not in targets]
            if stray:
                raise ConfigError(
                    f"feedforward_modules={list(ff)!r} has {stray!r}, which is not in target_modules={list(targets)!r}; "
                    "feedforward modules must be a subset of the targets (PEFT's rule): add them to target_modules."
                )
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights={self.init_ia3_weights!r} must be True (ones) or False (random).")
        _check_modules_to_save(self)


def _check_lycoris(config: Any, inits: tuple) -> None:
    """Validation shared by :class:`LoHaConfig` and :class:`LoKrConfig` (in place on a frozen config)."""
    set_ = object.__setattr__
    name = type(config).__name__
    if isinstance(config.r, bool) or not isinstance(config.r, numbers.Integral) or config.r <= 0:
        raise ConfigError(f"r={config.r!r} must be a positive integer (the adapter rank), e.g. r=8.")
    set_(config, "r", int(config.r))
    if isinstance(config.alpha, bool) or not isinstance(config.alpha, numbers.Real) or not math.isfinite(config.alpha):
        raise ConfigError(f"alpha={config.alpha!r} must be a finite number, e.g. alpha=8 (the scale is alpha / r).")
    _normalize_targets(config, ("target_modules", "exclude_modules"))
    for field_name in ("rank_dropout", "module_dropout"):
        value = getattr(config, field_name)
        if not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
            raise ConfigError(f"{field_name}={value!r} must be a number in [0, 1).")
        if value:
            raise ConfigError(
                f"{field_name}={value!r} is not supported by graphlora's {name} (its random masks are "
                f"drawn per call in PEFT's order, which a graph cannot reproduce); use {field_name}=0.0."
            )
    if config.use_effective_conv2d:
        raise ConfigError(
            f"use_effective_conv2d={config.use_effective_conv2d!r} is a convolution option; graphlora's "
            f"{name} adapts linear sites only. Use use_effective_conv2d=False."
        )
    if config.init_weights not in inits or (isinstance(config.init_weights, str) and config.init_weights not in inits):
        raise ConfigError(f"init_weights={config.init_weights!r} is not supported; use one of {list(inits)}.")
    _check_modules_to_save(config)
    layers = config.layers_to_transform
    if layers is not None:
        if isinstance(layers, numbers.Integral) and not isinstance(layers, bool) and layers >= 0:
            set_(config, "layers_to_transform", int(layers))
        elif isinstance(layers, (list, tuple)) and all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in layers
        ):
            set_(config, "layers_to_transform", tuple(int(i) for i in layers))
        else:
            raise ConfigError(f"layers_to_transform={layers!r} must be a non-negative int or a list of them.")
        if isinstance(config.target_modules, str):
            raise ConfigError(
                f"layers_to_transform={layers!r} cannot be used with target_modules={config.target_modules!r} "
                "(a string); list the module names instead (PEFT has the same rule)."
            )
    if config.layers_pattern is not None:
        if config.layers_to_transform is None:
            raise ConfigError(f"layers_pattern={config.layers_pattern!r} needs layers_to_transform; set both or neither.")
        if not isinstance(config.layers_pattern, str):
            set_(config, "layers_pattern", tuple(config.layers_pattern))
    for field_name, kind in (("rank_pattern", "r"), ("alpha_pattern", "alpha")):
        pattern = dict(getattr(config, field_name) or {})
        for key, value in pattern.items():
            _check_regex(key, f"{field_name} key")
            ok = isinstance(value, numbers.Integral) and value > 0 if kind == "r" else isinstance(value, numbers.Real)
            if isinstance(value, bool) or not ok:
                raise ConfigError(f"{field_name}[{key!r}]={value!r} is not a valid {kind}.")
        set_(config, field_name, pattern)


@dataclass(frozen=True)
class LoHaConfig(_PeftConfigIO):
    """Configuration of one LoHa adapter (low-rank Hadamard product; PEFT's ``LoHaConfig`` names).

    Per targeted linear site with weight ``W`` (``d_out x d_in``) it learns ``w1a``, ``w2a``
    (``d_out x r``) and ``w1b``, ``w2b`` (``r x d_in``) and computes

    .. math::

        y = W x + b + \\Delta W x, \\qquad
        \\Delta W = \\big((w_{1a} w_{1b}) \\odot (w_{2a} w_{2b})\\big) \\cdot \\frac{\\alpha}{r}

    adding ``2 r (d_in + d_out)`` parameters. With ``init_weights=True`` ``w2b`` starts at zero
    (injection is the identity); ``False`` draws all four (tests).

    Args:
        r, alpha: rank and the numerator of the scale ``alpha / r`` (per site through
            ``rank_pattern`` / ``alpha_pattern``, PEFT's matching).
        target_modules, exclude_modules, layers_to_transform, layers_pattern: as :class:`LoraConfig`
            (``None`` targets: PEFT's default for the model type, :data:`DEFAULT_LOHA_MODULES`).
        rank_dropout, module_dropout: must be 0 (refused otherwise).
        use_effective_conv2d: a convolution option: must be False (linear sites only).

    Raises:
        ConfigError: a field has an unusable value (the message names it and the fix).
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    init_weights: bool = True
    layers_to_transform: Union[int, Sequence[int], None] = None
    layers_pattern: Union[str, Sequence[str], None] = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    modules_to_save: Union[Sequence[str], None] = None
    task_type: Union[str, None] = None
    base_model_name_or_path: Union[str, None] = None
    inference_mode: bool = False

    peft_type = "LOHA"

    def __post_init__(self) -> None:
        _check_lycoris(self, (True, False))


@dataclass(frozen=True)
class LoKrConfig(_PeftConfigIO):
    """Configuration of one LoKr adapter (Kronecker product; PEFT's ``LoKrConfig`` names).

    Per targeted linear site (``d_out = a c``, ``d_in = b d`` from PEFT's ``factorization`` of
    each dimension with ``decompose_factor``) it computes

    .. math::

        y = W x + b + \\Delta W x, \\qquad \\Delta W = (w_1 \\otimes w_2) \\cdot \\frac{\\alpha}{r}

    with ``w1`` (``a x b``) stored whole, or as ``w1_a w1_b`` when ``decompose_both`` and
    ``r < max(a, b) / 2``; ``w2`` (``c x d``) stored whole unless ``r < max(c, d) / 2``, then as
    ``w2_a w2_b`` (PEFT's rule). ``init_weights=True`` zeros ``w1`` (or ``w1_a``): identity at
    injection; ``"lycoris"`` zeros ``w2`` (or ``w2_b``); ``False`` draws everything (tests).

    Args:
        as :class:`LoHaConfig`, plus ``decompose_both``, ``decompose_factor`` (``-1``: factors
        near the square root) and ``rank_dropout_scale`` (only used with rank dropout).

    Raises:
        ConfigError: a field has an unusable value (the message names it and the fix).
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    init_weights: Union[bool, str] = True
    layers_to_transform: Union[int, Sequence[int], None] = None
    layers_pattern: Union[str, Sequence[str], None] = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    modules_to_save: Union[Sequence[str], None] = None
    task_type: Union[str, None] = None
    base_model_name_or_path: Union[str, None] = None
    inference_mode: bool = False

    peft_type = "LOKR"

    def __post_init__(self) -> None:
        _check_lycoris(self, (True, False, "lycoris"))
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or (factor <= 0 and factor != -1):
            raise ConfigError(f"decompose_factor={factor!r} must be -1 (near the square root) or a positive integer.")
        if not isinstance(self.decompose_both, bool):
            raise ConfigError(f"decompose_both={self.decompose_both!r} must be True or False.")


def _name_unknown_fields(cls: type) -> type:
    """Make ``cls(**kwargs)`` with a misspelt keyword raise :class:`UnknownFieldError` (a
    ``TypeError`` and a :class:`ConfigError`) naming the closest fields, instead of Python's bare
    "unexpected keyword argument"."""
    from .errors import UnknownFieldError

    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in cls.__dataclass_fields__]
        if unknown:
            raise UnknownFieldError(
                f"{cls.__name__} has no field {unknown[0]!r}; did you mean {closest(unknown[0], names, 3)}? "
                f"(PEFT field names; all of them: {names})."
            )
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    setattr(__init__, "__wrapped__", init)  # inspect.signature shows the dataclass fields
    setattr(cls, "__init__", __init__)
    return cls


for _cls in (LoraConfig, IA3Config, LoHaConfig, LoKrConfig):
    _name_unknown_fields(_cls)
