"""Calls: how a call to the emitted module maps to a program (one per call signature).

With the ``export`` frontend a graph serves one call signature: which keyword arguments, the values
of non-tensor ones, tensor ranks and dtypes. :class:`CallSpec` holds what graphlora read from the
source model's ``forward`` once at inject time, binds every call to its parameter names and gives
its :data:`ProgramKey`. The ``fx`` frontend's graph serves any signature: its key is ``(None, mixed)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from .capture import call_key, forward_params, is_constant
from .errors import SignatureError

__all__ = ["CallSpec", "ProgramKey", "describe_key", "SWITCH", "BANK", "MIXED", "BASE", "MODES", "CACHE_NAMES",
           "raise_for_guard"]

#: How a program applies the adapters (the second half of its key):
#: ``SWITCH``: every loaded adapter's own branch behind the site's switch (training, and every
#: call with grad enabled or in training mode; the emitted module's own graph);
#: ``BANK``: serving (eval mode, no grad): the banked LoRA adapters from their site's bank
#: (:mod:`graphlora.banks`), costing what the active ones cost, other methods as in ``SWITCH``;
#: ``MIXED``: a mixed-adapter batch (``adapter_names=``), each row's adapter from the banks;
#: ``BASE``: no adapter contributes (all disabled, merged, or at weight 0) in an eager call with grad
#: disabled: the graph without adapter branches (what the base model costs), modules_to_save kept.
SWITCH, BANK, MIXED, BASE = "switch", "bank", "mixed", "base"
MODES = (SWITCH, BANK, MIXED, BASE)

#: ``(signature, mode)``: the call signature (``None`` with the fx frontend) and one of :data:`MODES`.
ProgramKey = tuple[Union[tuple, None], str]

#: The KV-cache argument's two names: transformers 5.24 calls it ``cache``, 5.17 ``past_key_values``.
CACHE_NAMES = ("cache", "past_key_values")


@dataclass(frozen=True)
class CallSpec:
    """The source model's call signature, as graphlora binds calls to it.

    Attributes:
        frontend: ``"fx"`` or ``"export"``.
        name: the model's class name (for messages).
        arg_names: ``forward``'s positional parameter names (export only).
        defaults: values graphlora adds when a call leaves them out (``use_cache=False``).
        none_defaults: parameters whose default is ``None``: passing ``None`` is leaving them out.
        var_keyword: ``forward`` takes ``**kwargs`` (constants there are traced into the program).
        keyword_names: ``forward``'s keyword-only parameters.
        aliases: another name a call may use for a parameter -> ``forward``'s own name (the KV
            cache's, :data:`CACHE_NAMES`: code written for either transformers release calls the
            model as the other release names it).
    """

    frontend: str
    name: str
    arg_names: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    none_defaults: frozenset[str] = frozenset()
    var_keyword: bool = False
    keyword_names: frozenset[str] = frozenset()
    #: ``arg_names`` and ``keyword_names`` together (what :meth:`graph_inputs` keeps; made once)
    named: frozenset[str] = frozenset()
    aliases: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, frontend: str) -> "CallSpec":
        names, defaults = forward_params(model) if frontend == "export" else ((), {})
        params = inspect.signature(model.forward).parameters
        none = frozenset(p.name for p in params.values() if p.default is None and p.name not in defaults)
        var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
        keyword = frozenset(p.name for p in params.values() if p.kind == p.KEYWORD_ONLY)
        own = [n for n in CACHE_NAMES if n in params]
        aliases = {other: own[0] for other in CACHE_NAMES if other != own[0]} if len(own) == 1 else {}
        return cls(frontend, type(model).__name__, names, dict(defaults), none, var_kw, keyword,
                   frozenset(names) | keyword, aliases)

    def graph_inputs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """A bound call's arguments the traced graph takes: constants ``forward`` reaches only
        through ``**kwargs`` (``output_hidden_states=True``, ...) are baked into the program, not
        inputs (:func:`graphlora.capture.split_var_keyword`)."""
        if not self.var_keyword:
            return dict(kwargs)
        named = self.named
        return {k: v for k, v in kwargs.items() if k in named or not is_constant(v)}

    def normalize(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """``kwargs`` with ``None``-for-default dropped and graphlora's defaults added."""
        out = {k: v for k, v in kwargs.items() if not (v is None and k in self.none_defaults)}
        for key, value in self.defaults.items():
            out.setdefault(key, value)
        return out

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Positional and keyword arguments as one normalized keyword dict.

        A parameter given under its alias (:attr:`aliases`: ``past_key_values=`` for a forward that
        names it ``cache``, and the other way round) is bound to ``forward``'s own name.

        Raises:
            SignatureError: too many positional arguments, or one given twice (under either name).
        """
        names = self.arg_names
        if len(args) > len(names):
            raise SignatureError(
                f"{self.name} takes at most {len(names)} positional arguments ({', '.join(names)}), "
                f"got {len(args)}; pass the rest by keyword."
            )
        bound = dict(zip(names, args))
        clash = sorted(set(bound) & set(kwargs))
        if clash:
            raise SignatureError(f"got multiple values for argument(s) {clash}.")
        bound.update(kwargs)
        for alias, own in self.aliases.items():
            if alias in bound:
                if own in bound and bound[own] is not None and bound[alias] is not None:
                    raise SignatureError(
                        f"got the KV cache twice, as {own}= and {alias}= ({self.name}.forward calls it {own}); "
                        "pass one of them."
                    )
                value = bound.pop(alias)
                if value is not None or own not in bound:
                    bound[own] = value
        return self.normalize(bound)

    def key(self, kwargs: Mapping[str, Any], mode: str) -> ProgramKey:
        """The program key of a bound call (``kwargs`` from :meth:`bind`; ignored with fx)."""
        return (call_key(kwargs) if self.frontend == "export" else None, mode)


def describe_key(key: ProgramKey) -> str:
    """``(input_ids=<tensor>, use_cache=False)`` for a program key (empty for fx)."""
    sig, mode = key
    if sig is None:
        return ""
    desc = ", ".join(f"{name}={_describe_value(d)}" for name, d in sig if not name.startswith("__graphlora"))
    return f"({desc}{', adapter_names=...' if mode == MIXED else ''})"


def _describe_value(d: tuple) -> str:
    if d[0] == "tensor":
        return "<tensor>"
    if d[0] == "cache":  # ("cache", type, layers, leaves, windows): see graphlora.generation.describe_cache
        return f"<{d[1]}, {'empty' if d[3] == 0 else f'{d[3]} tensors'}>"
    if d[0] == "dict":  # ("dict", ((key, description), ...)): see graphlora.capture.call_key
        return "{" + ", ".join(f"{k!r}: {_describe_value(v)}" for k, v in d[1]) + "}"
    return repr(d[-1])


def describe_call(kwargs: Mapping[str, Any]) -> str:
    """``input_ids=<tensor>, use_cache=True, cache=DynamicCache(layers=[DynamicLayer])`` (constants as
    their repr, other objects by type: an ``encoder_outputs`` full of tensors stays one word)."""
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return "<tensor>"
        if is_constant(v):
            return repr(v)
        text = repr(v)
        return text if len(text) <= 120 else f"<{type(v).__name__}>"

    return ", ".join(f"{k}={one(v)}" for k, v in kwargs.items() if not k.startswith("__graphlora"))


def raise_for_runtime_assert(exc: RuntimeError, kwargs: Mapping[str, Any]) -> None:
    """Turn a size relation that an exported program checks while it runs (``Runtime assertion
    failed for expression Eq(u0 + 1, s53)``: a size read from a tensor, such as OPT's count of
    cached tokens, against an input's length) into a :class:`SignatureError` naming the call; any
    other ``RuntimeError`` is left as it is.

    Raises:
        SignatureError: for a failed runtime size assertion (the original chained).
    """
    text = str(exc)
    if "Runtime assertion failed" not in text:
        return
    expr = text.split("for expression", 1)[-1].strip().splitlines()[0][:200]
    raise SignatureError(
        f"this call ({describe_call(kwargs)}) does not fit the sizes its graph checks while it runs: {expr}. "
        "With a KV cache, attention_mask must cover the cached and the new positions ([batch, past + new]), "
        "as transformers builds it in generate; call with sizes that satisfy it."
    ) from exc


def raise_for_guard(exc: AssertionError, kwargs: Mapping[str, Any]) -> None:
    """Turn an exported program's failed shape guard into a :class:`SignatureError` that says what
    the call was and what the graph needs; any other ``AssertionError`` is left as it is.

    ``torch.export`` records the size relations its trace relied on (``attention_mask.size()[1] <=
    cache length + input length``) and checks them before the program computes, so the call
    changed nothing.

    Raises:
        SignatureError: for a guard failure (the original chained).
    """
    text = str(exc)
    if "Guard failed" not in text:
        return
    guard = text.split("Guard failed:", 1)[-1].strip().splitlines()[0][:300]
    hint = ""
    if "attention_mask" in guard and "cache" in guard:
        hint = (" With a KV cache, attention_mask must cover the cached and the new positions "
                "([batch, past + new]), as transformers builds it in generate.")
    raise SignatureError(
        f"this call ({describe_call(kwargs)}) does not fit the sizes its graph was traced for: {guard}.{hint} "
        "Nothing was computed; call with sizes that satisfy it (or without the argument it names)."
    ) from exc
