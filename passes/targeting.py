"""PEFT's target-selection rules, as pure functions of a module path.

These reproduce ``peft.tuners.tuners_utils.check_target_module_exists`` and
``peft.utils.other.get_pattern_key`` so that a PEFT config selects the same sites here:

- a **string** target is ``re.fullmatch``-ed against the whole path;
- a **list** target matches a path equal to an entry or ending in ``"." + entry``; only
  this form is further filtered by ``layers_to_transform`` / ``layers_pattern``, where the
  layer index is the first number after ``<layers_pattern>.`` (or after any segment when no
  pattern is given);
- ``exclude_modules`` uses the same string / list forms and wins over targets;
- ``rank_pattern`` / ``alpha_pattern`` keys match with ``re.match(rf"(.*\\.)?({key})$", path)``,
  the first matching key (in dict order) wins.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TypeVar, Union

__all__ = ["is_targeted", "is_excluded", "layer_index", "pattern_value"]

Spec = Union[str, Sequence[str], None]
T = TypeVar("T")


def _matches(spec: Spec, path: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return path in spec or any(path.endswith("." + name) for name in spec)


def is_excluded(exclude_modules: Spec, path: str) -> bool:
    """True when ``exclude_modules`` removes ``path`` from the targets."""
    return bool(exclude_modules) and _matches(exclude_modules, path)


def layer_index(path: str, layers_pattern: Union[str, Sequence[str], None]) -> Union[int, None]:
    """The layer number in ``path`` as PEFT finds it, or ``None``."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_targeted(
    path: str,
    target_modules: Spec,
    *,
    exclude_modules: Spec = None,
    layers_to_transform: Union[int, Sequence[int], None] = None,
    layers_pattern: Union[str, Sequence[str], None] = None,
) -> bool:
    """Whether PEFT would put an adapter on the module at ``path``."""
    if is_excluded(exclude_modules, path):
        return False
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    if path in target_modules:
        return True
    if not any(path.endswith("." + name) for name in target_modules):
        return False
    uses_layers = layers_to_transform is not None and (
        not isinstance(layers_to_transform, (list, tuple)) or len(layers_to_transform) > 0
    )
    if not uses_layers:
        return True
    index = layer_index(path, layers_pattern)
    if index is None:
        return False
    if isinstance(layers_to_transform, int):
        return index == layers_to_transform
    return index in layers_to_transform


def pattern_value(pattern: Mapping[str, T], path: str, default: T) -> T:
    """``pattern[key]`` for the first key matching ``path`` the PEFT way, else ``default``."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return pattern[key]
    return default
