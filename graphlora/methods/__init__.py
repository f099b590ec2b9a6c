"""Adapter methods as rules: one :class:`~graphlora.methods.base.MethodRule` per method.

Adding a method means writing one rule module here and registering it in :data:`RULES`
(see ``docs/adding-a-method.md``). Everything else looks rules up through :func:`rule_for`
(by config) or :func:`rule_for_peft_type` (by a file's ``peft_type``).
"""

from __future__ import annotations

from typing import Any

from graphlora.errors import ConfigError

from .base import MethodRule
from .ia3 import IA3Rule
from .lora import LoraRule

__all__ = ["MethodRule", "RULES", "rule_for", "rule_for_peft_type", "config_types"]

#: every registered rule, in the order they are tried
RULES: tuple[MethodRule, ...] = (LoraRule(), IA3Rule())


def config_types() -> tuple[type, ...]:
    return tuple(rule.config_class for rule in RULES)


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


def rule_for_peft_type(peft_type: Any) -> MethodRule:
    """The rule for a PEFT ``peft_type`` string (``None`` if there is none)."""
    for rule in RULES:
        if str(peft_type).upper() == rule.peft_type:
            return rule
    return None  # type: ignore[return-value]
