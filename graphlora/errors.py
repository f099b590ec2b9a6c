"""Exception families raised by graphlora.

Every error subclasses both :class:`GraphLoraError` and the built-in type a user would
catch for that family, so ``except ValueError`` keeps working. Messages name the
offending value and say how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "GraphLoraError",
    "ConfigError",
    "NoTargetError",
    "AdapterNotFoundError",
    "AdapterExistsError",
    "AdapterStateError",
    "TraceError",
    "SignatureError",
    "AdapterFileError",
    "MergeError",
    "UnknownFieldError",
    "TargetTypeError",
    "PlacementError",
    "PeftFunctionError",
    "closest",
]


class GraphLoraError(Exception):
    """Base class of every graphlora error."""


class ConfigError(GraphLoraError, ValueError):
    """An adapter config field has a value graphlora cannot use."""


class NoTargetError(ConfigError):
    """The config's target rules matched no linear op in the traced graph."""


class AdapterNotFoundError(GraphLoraError, KeyError):
    """An adapter name that is not loaded."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AdapterExistsError(GraphLoraError, ValueError):
    """An adapter name that is already taken."""


class AdapterStateError(GraphLoraError, ValueError):
    """An operation that the current adapter state does not allow (e.g. deleting the last adapter)."""


class TraceError(GraphLoraError, RuntimeError):
    """No frontend could capture the model as a graph."""


class SignatureError(GraphLoraError, TypeError):
    """A call whose arguments do not fit the traced call signatures."""


class AdapterFileError(GraphLoraError, ValueError):
    """An adapter directory or file that cannot be read or does not fit the model (PEFT format)."""


class MergeError(AdapterStateError):
    """Merging or unmerging adapter weights into the base weights is not possible as asked."""


class UnknownFieldError(ConfigError, TypeError):
    """A config keyword that is not a field (a typo): both a :class:`ConfigError` and the
    ``TypeError`` Python raises for an unexpected keyword argument."""


class TargetTypeError(ConfigError):
    """A target names a module that exists but is not a linear op graphlora can adapt."""


class PlacementError(GraphLoraError, TypeError):
    """Adapter and base weights disagree on dtype or device (or the base is still on ``meta``)."""


class PeftFunctionError(GraphLoraError, AttributeError):
    """A function of the ``peft`` package that walks PEFT's own layer classes (``get_peft_model_state_dict``,
    ``set_peft_model_state_dict``) was given a graphlora module; the message names graphlora's method.
    An ``AttributeError``, so ``hasattr(config, "is_prompt_learning")`` and ``getattr(..., default)``
    answer as for an absent field."""


def closest(value: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The ``n`` candidates most similar to ``value`` (by difflib ratio, then by tail match)."""
    candidates = list(dict.fromkeys(candidates))
    found = difflib.get_close_matches(value, candidates, n=n, cutoff=0.3)
    if len(found) < n:
        tail = value.rsplit(".", 1)[-1]
        found += [c for c in candidates if c not in found and tail and tail in c][: n - len(found)]
    if len(found) < n:
        found += [c for c in candidates if c not in found][: n - len(found)]
    return found
