"""Merge: fold LoRA updates into the (shared) base weights, and undo it exactly.

For an adapter ``a`` at a site with base weight ``W`` (``d_out x d_in``), merging computes

.. math::

    W' = W + w_a \\, s_a \\, B_a A_a \\qquad\\text{or, for a weight stored (in, out) (GPT-2 } \\texttt{Conv1D}\\text{),}
    \\qquad W' = W + w_a \\, s_a \\, (B_a A_a)^\\top

with ``s_a = alpha/r`` (``alpha/sqrt(r)`` with rsLoRA) and ``w_a`` the adapter's weight in the
active set (``set_adapter_weights``; 1 otherwise). The product is formed in float32 and added to
``W`` in float32, then rounded once to ``W``'s dtype. The base weights are the original
model's tensors (graphlora shares them), so the original model sees the merge too, as with PEFT.

Other methods bring their own merge math (their rule's ``merge``): DoRA folds
``W' = W + w [(f - 1) W_0 + f s B A]`` (``f = m / ||W_0 + s B A||_row`` on the unmerged ``W_0``), and
IA3 scales rows (``diag(v) W``, and the bias) or, at feed-forward sites, columns (``W diag(v)``).
Every merged weight is recomputed from the exact original, additive methods first and scaling
methods after them (they wrap the adapted layer, as in the unmerged graph), so the merge order
of adapters does not matter.

While an adapter is merged its gate is 0 in every switch state (:meth:`AdapterState.sync` treats merged
adapters as inactive), so it is never counted twice; its parameters and config are untouched, so it can still be
saved. Un-merging restores **exact copies** of the original weights taken at the first merge
(bit-for-bit restoration in any dtype, at the cost of one copy of each merged weight), then
re-merges any adapters that stay merged.

Supported: any set of adapters (active or not, any weights), merged together or one after
another; unmerging all or some. Refused (:class:`~graphlora.errors.MergeError`): merging an
adapter twice, a weight that is tied to another parameter (merging would change the other
one too), non-floating-point weights, and, with ``safe_merge=True``, results that are not
finite. Switching adapters while merged unmerges first (PEFT's rule; the emitted module does it).

These are functions over the adapter state, the site records and the root module that holds the
weights; :class:`~graphlora.AdaptedGraphModule` calls them inside a transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import torch
from torch import nn

from .errors import MergeError
from .passes import Site
from .passes.sites import getattr_path
from .quantize import check_merge_target, is_quantized
from .state import AdapterState, MergeState

__all__ = ["lora_delta", "compute_merge", "write_merge", "rewritten", "unmerge", "check_scaling_merge"]


def lora_delta(A: torch.Tensor, B: torch.Tensor, scale: float, fan_in_fan_out: bool) -> torch.Tensor:
    """``scale * B @ A`` in float32 (``[d_out, d_in]``), transposed when ``fan_in_fan_out``."""
    delta = (B.detach().float() @ A.detach().float()) * scale
    return delta.t() if fan_in_fan_out else delta


def _maybe_attr(root: nn.Module, path: Union[str, None]) -> Union[torch.Tensor, None]:
    if path is None:
        return None
    try:
        value = getattr_path(root, path)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def _bias_path(path: str) -> Union[str, None]:
    return path[: -len("weight")] + "bias" if path.endswith("weight") else None


def compute_merge(state: AdapterState, records: Mapping[str, Site], root: nn.Module,
                  aliases: Mapping[str, Sequence[str]], weights: Mapping[str, float],
                  safe_merge: bool) -> dict[str, torch.Tensor]:
    """New values of every weight (and bias) the merged set touches once ``weights`` (adapter ->
    w) join the adapters already merged; nothing is written. Each value is recomputed from the
    exact original: additive methods first, then scaling methods.

    Raises:
        MergeError: a tied or non-float weight, or (``safe_merge``) a non-finite result.
    """
    merge = state.merge
    everything = {**{a: w for a, w in merge.merged.items() if a in state.configs}, **weights}
    rules = {a: state.rule(a) for a in everything}
    order = sorted(everything, key=lambda a: rules[a].merge_order())
    work: dict[str, list[tuple[str, str, float]]] = {}
    for adapter in order:
        for site in state.plans[adapter]:
            path = records[site].weight
            if adapter in weights:
                tied = aliases.get(path) or aliases.get(f"{site}.weight")
                if tied:
                    raise MergeError(
                        f"cannot merge adapter {adapter!r}: the weight of site {site!r} is tied to "
                        f"{[t for t in tied if t != path]}; merging would change those too. Serve it "
                        "unmerged (graphlora.specialize) or exclude the site (exclude_modules)."
                    )
                weight = getattr_path(root, path)
                check_merge_target(path, adapter, weight)  # quantized base: only with allow_requantize()
                if not weight.is_floating_point():
                    raise MergeError(
                        f"cannot merge adapter {adapter!r} into {path!r}: its dtype {weight.dtype} is not "
                        "floating point (quantized?); serve it unmerged (graphlora.specialize)."
                    )
            work.setdefault(path, []).append((adapter, site, everything[adapter]))
    new = {}
    for path, items in work.items():
        if not any(a in weights for a, _, _ in items):
            continue  # untouched by this call: its merged value stays as it is
        weight = getattr_path(root, path)
        original = merge.originals.get(path, weight.detach())
        if is_quantized(original):  # merge into the dequantized weight; writing it back requantizes
            original = original.dequantize()
        bias_path = _bias_path(path)
        bias = _maybe_attr(root, bias_path)
        bias0 = None if bias is None else merge.originals.get(bias_path, bias.detach()).float()
        value, bvalue = original.float(), bias0
        fan_in_fan_out = records[items[0][1]].fan_in_fan_out
        for adapter, site, w in items:
            branch = state.branch(site, adapter)
            value, bvalue = rules[adapter].merge(value, bvalue, branch, w, fan_in_fan_out, original=original.float())
        value = value.to(weight.device, weight.dtype)
        owners = [f"{a}@{s}" for a, s, _ in items]
        checks = [(path, value)]
        if bias is not None and bias_path is not None and bvalue is not None and bvalue is not bias0:
            checks.append((bias_path, bvalue.to(bias.device, bias.dtype)))
        for target, tensor in checks:
            if safe_merge and not torch.isfinite(tensor).all():
                raise MergeError(
                    f"safe_merge: merging {owners} into {target!r} gives non-finite values; nothing was "
                    "merged. The adapter's weights (or the base weight) contain inf/NaN or overflow "
                    f"{tensor.dtype}."
                )
            new[target] = tensor
    return new


def write_merge(state: AdapterState, root: nn.Module, new: Mapping[str, torch.Tensor],
                weights: Mapping[str, float]) -> None:
    """Write ``new`` (from :func:`compute_merge`) into the base weights, recording the exact
    original of each weight merged for the first time, and mark ``weights``' adapters merged."""
    merge = state.merge
    with torch.no_grad():
        for path, value in new.items():
            weight = getattr_path(root, path)
            if path not in merge.originals:
                merge.originals[path] = weight.detach().clone()
            weight.copy_(value)
    for adapter, w in weights.items():
        merge.merged[adapter] = w
    state.sync()


def rewritten(state: AdapterState, root: nn.Module, paths: Sequence[str]) -> list[torch.Tensor]:
    """The tensors at ``paths`` that are merged already (a transaction backs those up; a weight
    merged for the first time is restored from the original the merge records)."""
    return [getattr_path(root, p) for p in paths if p in state.merge.originals]


def unmerge(state: AdapterState, records: Mapping[str, Site], root: nn.Module,
            aliases: Mapping[str, Sequence[str]], names: Sequence[str]) -> None:
    """Restore the originals saved at the first merge (exactly), then re-merge the merged adapters
    not in ``names``."""
    stay = {n: w for n, w in state.merge.merged.items() if n not in names and n in state.configs}
    with torch.no_grad():
        for path, original in state.merge.originals.items():
            getattr_path(root, path).copy_(original)
    state.merge = MergeState()
    if stay:
        write_merge(state, root, compute_merge(state, records, root, aliases, stay, safe_merge=False), stay)
    else:
        state.sync()


def check_scaling_merge(state: AdapterState, names: Sequence[str]) -> None:
    """Refuse folding a scaling method (IA3) under an additive adapter that stays unmerged.

    The graph computes ``v ⊙ (W x + Δx)``; with ``v`` folded into ``W`` and ``Δ`` still a branch
    it would compute ``v ⊙ W x + Δx``, a different function.

    Raises:
        MergeError: naming both adapters, the shared sites and the fix.
    """
    live = state.weights if state.enabled else {}
    for name in names:
        if state.rule(name).merge_order() == 0:
            continue
        for other in live:
            if other in names or other in state.merge.merged or state.rule(other).merge_order() != 0:
                continue
            shared = sorted(set(state.plans[name]) & set(state.plans[other]))
            if shared:
                raise MergeError(
                    f"merging {name!r} (it scales the whole layer) while the active adapter {other!r} stays "
                    f"unmerged at {shared[:3]} would move {other!r} outside that scaling and change the "
                    f"outputs; merge them together (merge_adapter([{name!r}, {other!r}])) or deactivate "
                    f"{other!r} first."
                )
