"""Input checks that run before anything changes: each raises a graphlora error that names the
offending value and the fix, so a failed call leaves the model, the graph and every adapter as
they were (see ``docs/errors.md``).

- :func:`check_layers_in_range`: ``layers_to_transform`` indices the model does not have.
- :func:`check_target_types`: a target that names a module that is not a linear op.
- :func:`check_placement`: base weights on ``meta``, or adapters on another dtype / device.
- :func:`check_fx_call`: a call that does not fit an fx-traced ``forward`` (what was traced).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any, Union

import torch
from torch import nn

from graphlora.passes import is_targeted
from graphlora.passes.targeting import layer_index

from .errors import ConfigError, PlacementError, SignatureError, TargetTypeError

__all__ = ["check_layers_in_range", "check_target_types", "check_embedding_targets", "check_placement",
           "check_fx_call"]


def _layer_count(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(text, "num_hidden_layers", None)
    return count if isinstance(count, int) and count > 0 else None


def check_layers_in_range(config: Any, site_names: Iterable[str], model: nn.Module) -> None:
    """Refuse ``layers_to_transform`` indices past the model's last layer.

    The layer count is ``model.config.num_hidden_layers`` when the model has one, else one more
    than the largest layer index found in the site paths (with ``layers_pattern``, PEFT's rule).

    Raises:
        ConfigError: naming the indices, the layer count and where it came from.
    """
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or isinstance(config.target_modules, str):
        return  # PEFT applies layers_to_transform to list targets only
    wanted = (layers,) if isinstance(layers, int) else tuple(layers)
    if not wanted:
        return
    count, source = _layer_count(model), "model.config.num_hidden_layers"
    if count is None:
        found = {layer_index(n, getattr(config, "layers_pattern", None)) for n in site_names} - {None}
        if not found:
            raise ConfigError(
                f"layers_to_transform={layers!r} but no linear site path has a layer index"
                f"{' after ' + repr(config.layers_pattern) if config.layers_pattern else ''} "
                "(paths like 'model.layers.3.mlp.up_proj'); set layers_pattern to the layer container's "
                "name, or drop layers_to_transform."
            )
        count, source = max(found) + 1, "the largest layer index in the site paths + 1"
    out = sorted(i for i in wanted if i >= count)
    if out:
        raise ConfigError(
            f"layers_to_transform={layers!r}: layer(s) {out} do not exist; the model has {count} layers "
            f"(indices 0..{count - 1}, from {source}). Use indices below {count}."
        )


def _what(module: nn.Module) -> str:
    children = [name for name, _ in module.named_children()]
    kind = f"a {type(module).__module__}.{type(module).__qualname__}"
    return kind + (f" (a container of {children[:4]}{'...' if len(children) > 4 else ''})" if children else "")


def check_target_types(model: nn.Module, config: Any, targets: Any, site_names: Iterable[str]) -> None:
    """Refuse targets that select a module which is not a linear op (PEFT refuses them too).

    Only explicit targets (a list or a regex) are checked: ``"all-linear"`` and the per-model
    defaults name linear ops by construction. A module counts as a linear op when it is a site
    (``nn.Linear`` calls, ``F.linear`` on its weight, GPT-2's ``Conv1D``) or an ``nn.Linear``
    that the traced forward never calls (left alone, as nothing runs it).

    Raises:
        TargetTypeError: naming the module path, its type, and the linear sites to use instead.
    """
    if targets is None or targets == "all-linear":
        return
    sites = set(site_names)
    for path, module in model.named_modules():
        if not path or path in sites or isinstance(module, nn.Linear):
            continue
        if not is_targeted(
            path, targets, exclude_modules=getattr(config, "exclude_modules", None),
            layers_to_transform=getattr(config, "layers_to_transform", None),
            layers_pattern=getattr(config, "layers_pattern", None),
        ):
            continue
        inside = sorted(s for s in sites if s.startswith(path + "."))
        hint = (f"target the linear ops inside it instead, e.g. {inside[:3]}" if inside else
                "graphlora adapts linear ops only (nn.Linear, F.linear, GPT-2's Conv1D); see gm.sites "
                "or graphlora.list_sites(model) for the names")
        raise TargetTypeError(
            f"target_modules={config.target_modules!r} selects {path!r}, which is {_what(module)}, "
            f"not a linear op; {hint}, or add {path!r} to exclude_modules."
        )


def check_embedding_targets(rule: Any, config: Any, plan: Iterable[str], records: Mapping[str, Any]) -> None:
    """Refuse embedding sites (``Site.kind == "embedding"``) for methods that cannot adapt them:
    only rules with ``embeddings = True`` (LoRA: PEFT's ``lora_embedding_A/B``) can.

    Raises:
        TargetTypeError: naming the site, the method and the fix.
    """
    if getattr(rule, "embeddings", False):
        return
    for site in plan:
        record = records.get(site)
        if record is not None and record.kind == "embedding":
            raise TargetTypeError(
                f"target_modules={config.target_modules!r} selects the embedding {site!r}, but {rule.name} "
                f"adapts linear ops only (graphlora adapts embeddings with LoRA); add {site!r} to "
                "exclude_modules or use a LoraConfig."
            )


def _placed_like(param: torch.Tensor, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``param`` fits a base weight on ``device`` in ``dtype`` (float32 over fp16 / bf16 too)."""
    upcast = param.dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)
    return (param.dtype == dtype or upcast) and param.device == device


def _first_parameter(module: nn.Module) -> Union[torch.Tensor, None]:
    """``next(module.parameters(), None)`` without ``named_modules``' bookkeeping (every add looks
    at one parameter of every loaded adapter on each of its sites)."""
    for param in module._parameters.values():
        if param is not None:
            return param
    for child in module._modules.values():
        found = None if child is None else _first_parameter(child)
        if found is not None:
            return found
    return None


def check_placement(root: nn.Module, records: Mapping[str, Any], store: nn.Module, site_names: Iterable[str],
                    action: str, *, loading: bool = False) -> None:
    """Refuse to add or load an adapter when the adapters already on a site have another dtype or
    device than its base weight (float32 adapters over an fp16 / bf16 base are PEFT's
    ``autocast_adapter_dtype`` and fine) (the base was moved or cast behind the module's back, e.g.
    ``model.to(...)`` on the original model after inject: the graph would fail on the next call),
    or, when ``loading``, when a base weight is on ``meta`` (the loaded tensors would be dropped).
    Each adapter's first parameter stands for its branch (they are made and cast together).

    Args:
        root: the module holding the base weights; ``records``: site name -> its ``Site``;
        store: the adapter store (``graphlora``).
        site_names: the sites the adapter goes on.
        action: what is being done, for the message (``"load adapter 'x'"``).

    Raises:
        PlacementError: naming the site, both dtypes/devices and the fix.
    """
    from graphlora.passes.sites import getattr_path
    from graphlora.passes.splice import site_key

    for site in site_names:
        weight = getattr_path(root, records[site].weight)
        if loading and weight.device.type == "meta":
            raise PlacementError(
                f"cannot {action}: the base weight of {site!r} is on the meta device, so the adapter's "
                "tensors would be dropped. Materialize the module first (gm.to_empty(device='cpu'), then "
                "load the base weights), then load the adapter."
            )
        branches = store._modules.get(site_key(site))
        device, dtype = weight.device, weight.dtype
        for adapter, branch in (branches._modules.items() if branches is not None else ()):
            first = _first_parameter(branch)  # one look per adapter; all of its parameters if it is off
            if first is None or _placed_like(first, device, dtype):
                continue
            for name, param in branch.named_parameters():
                if not _placed_like(param, device, dtype):
                    raise PlacementError(
                        f"cannot {action}: at site {site!r} the base weight is {weight.dtype} on {weight.device} "
                        f"but adapter {adapter!r} has {name} in {param.dtype} on {param.device}. Move or cast "
                        "the whole adapted module (gm.to(device, dtype)), not only the original model."
                    )


def check_fx_call(forward: Any, args: tuple, kwargs: Mapping[str, Any], exc: TypeError) -> None:
    """After an fx-traced ``forward`` raised ``exc`` (a ``TypeError``): if the arguments do not
    bind to its signature, raise a :class:`SignatureError` that says what was traced."""
    sig = inspect.signature(forward)
    try:
        sig.bind(*args, **kwargs)
    except TypeError as bind_error:
        given = [f"<{type(a).__name__}>" for a in args] + [f"{k}=<{type(v).__name__}>" for k, v in kwargs.items()]
        raise SignatureError(
            f"the call ({', '.join(given)}) does not fit the traced signature forward{sig}: {bind_error}. "
            "The fx frontend traced the model's forward with exactly these parameters; call the module "
            "as you would call the original model."
        ) from exc
