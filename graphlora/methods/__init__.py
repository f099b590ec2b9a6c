"""Adapter methods as rules: one :class:`~graphlora.methods.base.MethodRule` per method.

Adding a method means writing one rule module here and listing it in :data:`RULES`, or, from
outside the package, calling :func:`register_rule` (see ``docs/adding-a-method.md``). Everything else looks rules up through :func:`rule_for`
(by config) or :func:`rule_for_peft_type` (by a file's ``peft_type``).
"""

from __future__ import annotations

from typing import Any, Union

from graphlora.errors import AdapterFileError, ConfigError

from .base import MethodRule
from .ia3 import IA3Rule
from .loha import LoHaRule
from .lokr import LoKrRule
from .lora import LoraRule

__all__ = ["MethodRule", "RULES", "rule_for", "rule_for_peft_type", "config_types", "register_rule",
           "unregister_rule", "as_config", "plain_config_dict"]

#: every registered rule, in the order they are tried
RULES: list[MethodRule] = [LoraRule(), IA3Rule(), LoHaRule(), LoKrRule()]


def register_rule(rule: MethodRule) -> MethodRule:
    """Make ``rule`` serve its ``config_class`` (and its ``peft_type`` in files); returns it.

    Raises:
        ConfigError: another rule already serves that config class or ``peft_type``.
    """
    for other in RULES:
        if other.config_class is rule.config_class or other.peft_type == rule.peft_type:
            raise ConfigError(
                f"{type(other).__name__} already serves {other.config_class.__name__} / peft_type "
                f"{other.peft_type!r}; unregister_rule it first or give {type(rule).__name__} its own."
            )
    RULES.append(rule)
    return rule


def unregister_rule(rule: MethodRule) -> None:
    """Undo :func:`register_rule` (adapters of that method already loaded stop working)."""
    RULES.remove(rule)


def config_types() -> tuple[type, ...]:
    return tuple(rule.config_class for rule in RULES)


def plain_config_dict(data: Any) -> Any:
    """A PEFT config's ``to_dict()`` as ``adapter_config.json`` holds it: enum members (``PeftType``,
    ``TaskType``, str enums) as their values, sets as sorted lists, nested containers likewise."""
    import enum

    if isinstance(data, enum.Enum):
        return data.value
    if isinstance(data, dict):
        return {k: plain_config_dict(v) for k, v in data.items()}
    if isinstance(data, (set, frozenset)):
        return sorted(plain_config_dict(v) for v in data)
    if isinstance(data, (list, tuple)):
        return [plain_config_dict(v) for v in data]
    return data


def as_config(config: Any) -> Any:
    """``config`` as graphlora's config: a graphlora config as it is; a PEFT config object (its
    ``peft_type`` and ``to_dict()``) read by its method's rule exactly as its ``adapter_config.json``
    would be (a field graphlora does not implement, set to a value that changes the outputs, is
    refused there); anything else as it is (:func:`rule_for` says what works)."""
    if isinstance(config, config_types()) or not callable(getattr(config, "to_dict", None)):
        return config
    peft_type = getattr(config, "peft_type", None)
    rule = rule_for_peft_type(plain_config_dict(peft_type)) if peft_type is not None else None
    if rule is None:
        return config
    try:
        return rule.config_from_peft(plain_config_dict(config.to_dict()), f"the {type(config).__name__} given")
    except AdapterFileError as exc:  # a config object, not a file: say so, and how to fix it
        raise ConfigError(f"{exc} For a config object: leave that field at its default.") from None


def rule_for(config: Any) -> MethodRule:
    """The rule serving ``config``'s class.

    Raises:
        ConfigError: no rule serves it (the message lists the config classes that work).
    """
    for rule in RULES:
        if type(config) is rule.config_class:
            return rule
    names = ", ".join(f"graphlora.{t.__name__}" for t in config_types())
    raise ConfigError(f"config must be one of {names}; got {type(config).__name__}.")


def rule_for_peft_type(peft_type: Any) -> Union[MethodRule, None]:
    """The rule for a PEFT ``peft_type`` string (``None`` if there is none)."""
    peft_type = plain_config_dict(peft_type)  # PeftType.LORA -> "LORA"
    for rule in RULES:
        if str(peft_type).upper() == rule.peft_type:
            return rule
    return None
