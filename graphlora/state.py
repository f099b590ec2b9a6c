"""Adapter state: the parameters and switch buffers that spliced branches read.

Layout on the emitted module (every get_attr target the splice pass writes lives here)::

    graphlora.<site_key>.<adapter>.lora_A.weight   [r, d_in]    trainable
    graphlora.<site_key>.<adapter>.lora_B.weight   [d_out, r]   trainable
    graphlora.<site_key>.<adapter>.gate            []           switch state (non-persistent)
    graphlora.<site_key>.<adapter>.scale           []           alpha / r (non-persistent)
    graphlora.row_index                            [batch]      mixed-batch adapter slots
    graphlora.<site_key>.<adapter>.lora_dropout    nn.Dropout   (only when lora_dropout > 0)
    graphlora.<site_key>.<adapter>.lora_magnitude_vector  [d_out]  trainable (DoRA only)
    graphlora.<site_key>.<adapter>.dora_scale      []           alpha / r, never parked (DoRA only)
    graphlora.<site_key>.<adapter>.dora_on         []           the adapter's weight or 0 (DoRA only)
    graphlora.<site_key>.<adapter>.ia3_l           [d_out, 1] or [1, d_in]   trainable (IA3)

Every branch has ``apply_state(weight, merged)``, which writes its switch buffers in place from
the adapter's current weight (0 when inactive or disabled).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LoraBranch", "AdapterStore"]


class LoraBranch(nn.Module):
    """One LoRA adapter at one site: ``delta = gate * B A dropout(x)``.

    ``gate`` holds ``scaling * weight`` while the adapter is active and 0 otherwise, with
    ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA); it is updated in place, so
    graphs and compiled code that read it never change.

    Args:
        in_features, out_features: the site's feature sizes.
        r, alpha, scaling: rank, alpha, and the resulting scale.
        dropout: probability of the input dropout (0 means none).
        use_dora: add DoRA's magnitude vector (``lora_magnitude_vector``, ``[d_out]``) and
            its buffers; see :func:`graphlora.passes.method_ops.dora_factor` for the math.
        dtype, device: of the parameters (the base weight's by default).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float = 0.0,
        *,
        use_dora: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.r, self.lora_alpha, self.scaling = r, alpha, scaling
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(r, out_features, bias=False, dtype=dtype, device=device)
        if dropout > 0:
            self.lora_dropout = nn.Dropout(dropout)
        self.register_buffer("gate", torch.zeros((), device=device), persistent=False)
        # the constant scale, read by mixed-adapter batches (where each row picks its adapter)
        self.register_buffer("scale", torch.full((), float(scaling), device=device), persistent=False)
        self.use_dora = use_dora
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device))
            self.register_buffer("dora_scale", torch.full((), float(scaling), device=device), persistent=False)
            self.register_buffer("dora_on", torch.zeros((), device=device), persistent=False)

    @property
    def has_dropout(self) -> bool:
        return "lora_dropout" in self._modules

    def num_parameters(self) -> int:
        """``r * (d_in + d_out)`` (``+ d_out`` with DoRA)."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def init_magnitude(self, weight: torch.Tensor, fan_in_fan_out: bool) -> None:
        """DoRA: ``m = ||W + s B A||_row`` (PEFT's init), so the adapter starts as plain LoRA."""
        from graphlora.passes.method_ops import dora_factor

        ones = torch.ones_like(self.lora_magnitude_vector)
        norm = 1 / dora_factor(weight, self.lora_A.weight, self.lora_B.weight, self.scaling, ones, fan_in_fan_out)
        self.lora_magnitude_vector.copy_(norm)

    @torch.no_grad()
    def reset_parameters(self, init: bool | str = True, generator: torch.Generator | None = None) -> None:
        """PEFT's init: A Kaiming-uniform (``a = sqrt(5)``) or N(0, 1/r), B zeros.

        ``init=False`` keeps ``nn.Linear``'s default (random) init for both, so the adapter is
        not the identity (useful for tests).
        """
        if init is False:
            for layer in (self.lora_A, self.lora_B):
                bound = 1 / math.sqrt(layer.in_features)
                # nn.Linear's default init, drawn from ``generator`` when one is given
                w = torch.empty(layer.weight.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
                layer.weight.copy_(w)
            return
        if init == "gaussian":
            w = torch.empty(self.lora_A.weight.shape, dtype=torch.float32).normal_(0, 1 / self.r, generator=generator)
            self.lora_A.weight.copy_(w)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def set_gate(self, value: float) -> None:
        """Write the gate in place (keeps CUDA-graph captures valid)."""
        self.gate.fill_(value)

    @torch.no_grad()
    def apply_state(self, weight: float, merged: bool = False) -> None:
        """Write the switch buffers in place: ``gate = scaling * weight`` (``weight`` is 0 when the
        adapter is inactive, disabled or merged); the mixed-batch ``scale`` is 0 while merged."""
        self.gate.fill_(self.scaling * weight)
        self.scale.fill_(0.0 if merged else self.scaling)
        if self.use_dora:
            self.dora_scale.fill_(self.scaling)
            self.dora_on.fill_(weight)


class AdapterStore(nn.Module):
    """``graphlora``: per site key, a ``ModuleDict`` of adapter name -> branch."""

    def branch(self, key: str, adapter: str) -> nn.Module:
        return self._modules[key][adapter]  # type: ignore[index]

    def add(self, key: str, adapter: str, branch: nn.Module) -> None:
        if key not in self._modules:
            self.add_module(key, nn.ModuleDict())
        self._modules[key][adapter] = branch  # type: ignore[index]

    def remove(self, key: str, adapter: str) -> None:
        site = self._modules[key]
        del site[adapter]  # type: ignore[union-attr]
        if len(site) == 0:  # type: ignore[arg-type]
            del self._modules[key]

    def branches(self, adapter: str | None = None):
        """``(site_key, adapter, branch)`` triples, optionally for one adapter."""
        for key, site in self._modules.items():
            for name, branch in site.items():  # type: ignore[union-attr]
                if adapter is None or name == adapter:
                    yield key, name, branch
