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

While an adapter is merged its gate is 0 in every switch state (``_sync_state`` treats merged
adapters as inactive), so it is never counted twice; its parameters and config are untouched, so it can still be
saved. Un-merging restores **exact copies** of the original weights taken at the first merge
(bit-for-bit restoration in any dtype, at the cost of one copy of each merged weight), then
re-merges any adapters that stay merged.

Supported: any set of adapters (active or not, any weights), merged together or one after
another; unmerging all or some. Refused (:class:`~graphlora.errors.MergeError`): merging an
adapter twice, a weight that is tied to another parameter (merging would change the other
one too), non-floating-point weights, and, with ``safe_merge=True``, results that are not
finite. Not tracked: switching adapters while merged does not unmerge (PEFT unmerges on
``disable_adapters``); call :meth:`MergeMixin.unmerge_adapter` first to get the base model back.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.fx as fx

from .errors import MergeError
from .passes.sites import getattr_path
from .passes.splice import site_key

__all__ = ["MergeMixin", "MergeState", "lora_delta"]


def lora_delta(A: torch.Tensor, B: torch.Tensor, scale: float, fan_in_fan_out: bool) -> torch.Tensor:
    """``scale * B @ A`` in float32 (``[d_out, d_in]``), transposed when ``fan_in_fan_out``."""
    delta = (B.detach().float() @ A.detach().float()) * scale
    return delta.t() if fan_in_fan_out else delta


def set_branch_scaling(branch: torch.nn.Module, value: float) -> None:
    """Set a branch's scaling, and its ``scale`` buffer when it has one (mixed-batch graphs read it)."""
    branch.scaling = value
    scale = getattr(branch, "scale", None)
    if isinstance(scale, torch.Tensor):
        with torch.no_grad():
            scale.fill_(value)


def _maybe_attr(root: torch.nn.Module, path: Union[str, None]) -> Union[torch.Tensor, None]:
    if path is None:
        return None
    try:
        value = getattr_path(root, path)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


@dataclass
class MergeState:
    """What a merge changed, so that it can be undone.

    Attributes:
        originals: weight attribute path -> exact copy of the weight before the first merge.
        merged: adapter -> the weight ``w_a`` it was folded in with (in merge order).
    """

    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    merged: dict[str, float] = field(default_factory=dict)


class MergeMixin:
    """``merge_adapter`` / ``unmerge_adapter`` / ``merge_and_unload`` for
    :class:`~graphlora.AdaptedGraphModule` (see the module docstring for the math and limits)."""

    # ------------------------------------------------------------------ state
    @property
    def _merge_state(self) -> MergeState:
        state = self.__dict__.get("_glora_merge")
        if state is None:
            state = self.__dict__["_glora_merge"] = MergeState()
        return state

    @property
    def merged_adapters(self) -> list[str]:
        """Names of the adapters currently folded into the base weights, in merge order."""
        return list(self._merge_state.merged)

    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into the base weights."""
        return bool(self._merge_state.merged)

    # ------------------------------------------------------------------ merge
    def _site_weights(self) -> dict[str, tuple[str, bool]]:
        """site name -> (weight attribute path, fan_in_fan_out)."""
        out: dict[str, tuple[str, bool]] = {}
        for site in self._primary.sites:  # type: ignore[attr-defined]
            out.setdefault(site.name, (site.weight, site.fan_in_fan_out))
        return out

    def _compute_merge(self, weights: Mapping[str, float], safe_merge: bool) -> dict[str, torch.Tensor]:
        """New values of every weight (and bias) the merged set touches once ``weights`` (adapter ->
        w) join the adapters already merged; nothing is written. Each value is recomputed from the
        exact original: additive methods first, then scaling methods."""
        sites = self._site_weights()
        aliases = self._glora_aliases  # type: ignore[attr-defined]
        state = self._merge_state
        known = self._glora_configs  # type: ignore[attr-defined]
        everything = {**{a: w for a, w in state.merged.items() if a in known}, **weights}
        rules = {a: self._rule(a) for a in everything}  # type: ignore[attr-defined]
        order = sorted(everything, key=lambda a: rules[a].merge_order())
        work: dict[str, list[tuple[str, str, float]]] = {}
        for adapter in order:
            for site in self._glora_plans[adapter]:  # type: ignore[attr-defined]
                path, fan_in_fan_out = sites[site]
                if adapter in weights:
                    tied = aliases.get(path) or aliases.get(f"{site}.weight")
                    if tied:
                        raise MergeError(
                            f"cannot merge adapter {adapter!r}: the weight of site {site!r} is tied to "
                            f"{[t for t in tied if t != path]}; merging would change those too. Serve it "
                            "unmerged (graphlora.specialize) or exclude the site (exclude_modules)."
                        )
                    weight = getattr_path(self, path)
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
            weight = getattr_path(self, path)
            original = state.originals.get(path, weight.detach())
            bias_path = path[: -len("weight")] + "bias" if path.endswith("weight") else None
            bias = _maybe_attr(self, bias_path)
            bias0 = None if bias is None else state.originals.get(bias_path, bias.detach()).float()
            value, bvalue = original.float(), bias0
            fan_in_fan_out = sites[items[0][1]][1]
            for adapter, site, w in items:
                branch = self.graphlora.branch(site_key(site), adapter)  # type: ignore[attr-defined]
                value, bvalue = rules[adapter].merge(value, bvalue, branch, w, fan_in_fan_out, original=original.float())
            value = value.to(weight.device, weight.dtype)
            owners = [f"{a}@{s}" for a, s, _ in items]
            checks = [(path, value)]
            if bias is not None and bvalue is not bias0:
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

    def _apply_merge(self, weights: Mapping[str, float], safe_merge: bool) -> None:
        new = self._compute_merge(weights, safe_merge)
        state = self._merge_state
        with torch.no_grad():
            for path, value in new.items():
                weight = getattr_path(self, path)
                if path not in state.originals:
                    state.originals[path] = weight.detach().clone()
                weight.copy_(value)
        for adapter, w in weights.items():
            state.merged[adapter] = w
        self._sync_state()  # type: ignore[attr-defined]

    def merge_adapter(self, adapter_names: Union[Iterable[str], None] = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights: ``W += w_a s_a B_a A_a`` (see the module doc).

        Args:
            adapter_names: adapters to merge; default: the active ones, each with its current
                weight (an adapter not in the active set merges with weight 1).
            safe_merge: compute every merged weight first and refuse (changing nothing) if any
                value is not finite.

        Raises:
            MergeError: nothing to merge, an adapter already merged, a tied or non-float weight,
                or (``safe_merge``) a non-finite result. The module is then unchanged.
            AdapterNotFoundError: an unknown name.
        """
        if adapter_names is None:
            names = self.active_adapters  # type: ignore[attr-defined]
            if not names:
                raise MergeError(
                    "no active adapter to merge (adapters are disabled); pass adapter_names=[...] or "
                    "enable_adapters() first."
                )
        else:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            if not names:
                raise MergeError("adapter_names is empty; name at least one adapter to merge.")
        self._check_known(names)  # type: ignore[attr-defined]
        again = [n for n in names if n in self._merge_state.merged]
        if again:
            raise MergeError(
                f"adapter(s) {again} are already merged (merged: {self.merged_adapters}); "
                "unmerge_adapter() first to merge them again."
            )
        self._check_scaling_merge(names)
        active = self._glora_weights  # type: ignore[attr-defined]
        self._apply_merge({n: float(active.get(n, 1.0)) for n in names}, safe_merge)

    def _check_scaling_merge(self, names: list[str]) -> None:
        """Refuse folding a scaling method (IA3) under an additive adapter that stays unmerged.

        The graph computes ``v ⊙ (W x + Δx)``; with ``v`` folded into ``W`` and ``Δ`` still a branch
        it would compute ``v ⊙ W x + Δx``, a different function.
        """
        plans = self._glora_plans  # type: ignore[attr-defined]
        live = self._glora_weights if self._glora_enabled else {}  # type: ignore[attr-defined]
        for name in names:
            if self._rule(name).merge_order() == 0:  # type: ignore[attr-defined]
                continue
            for other in live:
                if other in names or other in self._merge_state.merged or self._rule(other).merge_order() != 0:  # type: ignore[attr-defined]
                    continue
                shared = sorted(set(plans[name]) & set(plans[other]))
                if shared:
                    raise MergeError(
                        f"merging {name!r} (it scales the whole layer) while the active adapter {other!r} stays "
                        f"unmerged at {shared[:3]} would move {other!r} outside that scaling and change the "
                        f"outputs; merge them together (merge_adapter([{name!r}, {other!r}])) or deactivate "
                        f"{other!r} first."
                    )

    def unmerge_adapter(self, adapter_names: Union[Iterable[str], None] = None) -> None:
        """Restore the base weights saved at the first merge (exactly), then re-merge the adapters
        not named in ``adapter_names`` (default: unmerge all). Gates follow the switch state again.
        """
        state = self._merge_state
        if not state.merged:
            warnings.warn("no adapter is merged; unmerge_adapter() has nothing to do.", stacklevel=2)
            return
        if adapter_names is None:
            names = list(state.merged)
        else:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            stray = [n for n in names if n not in state.merged]
            if stray:
                raise MergeError(f"adapter(s) {stray} are not merged (merged: {self.merged_adapters}).")
        stay = {n: w for n, w in state.merged.items() if n not in names and n in self._glora_configs}  # type: ignore[attr-defined]
        with torch.no_grad():
            for path, original in state.originals.items():
                getattr_path(self, path).copy_(original)
        self.__dict__["_glora_merge"] = MergeState()
        if stay:
            self._apply_merge(stay, safe_merge=False)
        else:
            self._sync_state()  # type: ignore[attr-defined]

    def merge_and_unload(
        self, adapter_names: Union[Iterable[str], None] = None, safe_merge: bool = False
    ) -> fx.GraphModule:
        """Merge (the active adapters, by default) and return the traced base graph on the merged weights.

        The result is a plain ``torch.fx.GraphModule`` with no adapter nodes: the graph as traced
        (``traced_graph``), sharing the (now merged) base parameters, so it runs at the base model's
        speed and its outputs equal this module's before the merge. Adapters already merged stay
        merged; this module stays in the merged state (``unmerge_adapter()`` undoes it, and changes
        the returned module's weights back too, since they are shared).

        With the export frontend the graph is that of the first traced call signature: call it with
        exactly those arguments (for a transformers model, include ``use_cache=False``).
        """
        if adapter_names is None:
            pending = [n for n in self.active_adapters if n not in self._merge_state.merged]  # type: ignore[attr-defined]
            if pending or not self.merged:
                self.merge_adapter(pending or None, safe_merge=safe_merge)
        else:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            pending = [n for n in names if n not in self._merge_state.merged]
            if pending:
                self.merge_adapter(pending, safe_merge=safe_merge)
        plain = fx.GraphModule(self, self.traced_graph, class_name=self._get_name())  # type: ignore[attr-defined]
        plain.train(self.training)  # type: ignore[attr-defined]
        return plain
