"""LoRA and its DoRA variant, as one rule.

LoRA at a site with base weight ``W`` (``d_out x d_in``)::

    y = W x + b + w * s * B A dropout(x)                       s = alpha / r (or alpha / sqrt(r))

DoRA (``LoraConfig(use_dora=True)``) adds a magnitude ``m`` (``[d_out]``) and, with
``f = m / ||W + s B A||_row`` (norm detached, per output row, PEFT's math)::

    y = W x + b + w * [ (f - 1) * W dropout?(x) + f * s * B A dropout(x) ]

which at ``w = 1`` is ``f * (W + s B A) x + b``, the DoRA layer. ``W dropout?(x)`` is
``base - b`` without adapter dropout (or in eval mode) and ``W dropout(x)`` with it, as in PEFT.
The LoRA part is the low-rank ``(h, B)`` term of the switch; DoRA contributes ``(h, f * B)`` and a
residual ``(f - 1) * W x`` gated by ``dora_on``.

This module holds the whole method: the branch module (:class:`LoraBranch`), the emitters
(:func:`emit_low_rank`, :func:`emit_dora`), DoRA's runtime ops (:func:`dora_factor`,
:func:`dora_residual`, :func:`row_scale`), DoRA's specialize step (:func:`freeze_dora_residual`)
and the rule (:class:`LoraRule`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn

from graphlora.config import DEFAULT_TARGET_MODULES, LoraConfig
from graphlora.errors import ConfigError, MergeError, TargetTypeError
from graphlora.passes import BranchSpec, Site
from graphlora.passes.sites import EMBEDDING, EXPERT
from graphlora.passes.fuse_shrink import freeze_shrink
from graphlora.passes.ops import lora_bank, lora_bank_, lora_bank_rows, lora_down, lora_shrink
from graphlora.passes.specialize import FreezeStep, GateReader
from graphlora.passes.splice import SiteBuilder
from graphlora.passes.targeting import pattern_value
from graphlora.peft_format import config_from_peft, config_to_peft

from .base import MethodRule

__all__ = [
    "LoraBranch",
    "LoraRule",
    "LoraSitePlan",
    "emit_low_rank",
    "emit_dora",
    "dora_factor",
    "dora_residual",
    "row_scale",
    "gated_bias",
    "freeze_dora_residual",
    "bank_spec",
    "emit_bank",
    "LoraEmbeddingBranch",
    "emit_embedding",
    "lora_embedding_delta",
]

aten = torch.ops.aten

Gate = Union[Tensor, float]


# ---------------------------------------------------------------------------- DoRA's runtime ops
def dora_factor(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: Gate, magnitude: Tensor, fan_in_fan_out: bool
) -> Tensor:
    r"""DoRA's per-output-row factor ``f = m / ||W + s B A||_row`` with the norm detached.

    .. math::

        f_o = \frac{m_o}{\big\lVert W_{o,:} + s\,(B A)_{o,:} \big\rVert_2}

    The norm is computed from detached tensors (DoRA paper §4.3, as PEFT does), so only ``m``
    receives a gradient through ``f``.

    Args:
        weight: the base weight, ``[out, in]`` (``[in, out]`` when ``fan_in_fan_out``).
        lora_A / lora_B: ``[r, in]`` / ``[out, r]``.
        scale: ``s`` (``alpha / r`` or rsLoRA's), a 0-dim tensor or float.
        magnitude: ``m``, ``[out]``.
        fan_in_fan_out: the weight is stored (in, out) (GPT-2 ``Conv1D``).
    """
    with torch.no_grad():
        w = weight.detach()
        w = w.t() if fan_in_fan_out else w
        lora_weight = (lora_B.detach() @ lora_A.detach()).to(w.dtype)
        norm = torch.linalg.norm(w + scale * lora_weight, dim=1).to(w.dtype)
    return magnitude / norm


def dora_residual(base: Tensor, wx: Union[Tensor, None], bias: Union[Tensor, None], factor: Tensor, on: Gate) -> Tensor:
    r"""DoRA's rescaling of the base output: ``on * (f - 1) * W x``.

    ``W x`` is ``wx`` when given (with adapter dropout, PEFT rescales ``W dropout(x)``), else
    ``base - bias`` (the base op's output without its bias). With ``on = 0`` it is exactly 0.
    """
    if wx is None:
        wx = base if bias is None else base - bias
    return wx * ((factor - 1) * on).to(wx.dtype)


def gated_bias(bias: Tensor, gate: Gate, like: Tensor) -> Tensor:
    """``lora_bias``'s term ``gate * b_B`` (``gate = s w``), in the dtype of the site's output ``like``."""
    return (bias * gate).to(like.dtype)


def row_scale(matrix: Tensor, factor: Tensor) -> Tensor:
    """``matrix * factor[:, None]``: scale each row (output feature) of ``B`` by DoRA's ``f``."""
    return matrix * factor.to(matrix.dtype).unsqueeze(-1)


# ---------------------------------------------------------------------------- the branch module


class _GatedBranch(nn.Module):
    """What every LoRA-style branch shares: ``scaling``, its ``gate`` (``scaling * weight`` while
    active, 0 otherwise) and the mixed-batch ``scale``, both buffers written in place."""

    def num_parameters(self) -> int:
        """The branch's parameter count (``r * (d_in + d_out)`` for plain LoRA)."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def set_scaling(self, value: float) -> None:
        """Set the scaling (a hotswap's new ``alpha / r``) and the ``scale`` buffer mixed batches read."""
        self.scaling = value
        self.scale.fill_(value)

    @torch.no_grad()
    def set_gate(self, value: float) -> None:
        """Write the gate in place (keeps CUDA-graph captures valid)."""
        self.gate.fill_(value)

    @torch.no_grad()
    def apply_state(self, weight: float, merged: bool = False) -> None:
        """``gate = scaling * weight`` (``weight`` is 0 when inactive, disabled or merged); the
        mixed-batch ``scale`` is 0 while merged."""
        self.gate.fill_(self.scaling * weight)
        self.scale.fill_(0.0 if merged else self.scaling)


class LoraBranch(_GatedBranch):
    """One LoRA adapter at one site: ``delta = gate * B A dropout(x)``.

    ``gate`` holds ``scaling * weight`` while the adapter is active and 0 otherwise, with
    ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA); it is updated in place, so
    graphs and compiled code that read it never change.

    Args:
        in_features, out_features: the site's feature sizes.
        r, alpha, scaling: rank, alpha, and the resulting scale.
        dropout: probability of the input dropout (0 means none).
        use_dora: add DoRA's magnitude vector (``lora_magnitude_vector``, ``[d_out]``) and
            its buffers; see :func:`dora_factor` for the math.
        lora_bias: ``B`` has a bias (``lora_B.bias``, ``[d_out]``): ``delta = gate * (B A x + b_B)``.
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
        lora_bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.r, self.lora_alpha, self.scaling = r, alpha, scaling
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(r, out_features, bias=lora_bias, dtype=dtype, device=device)
        if dropout > 0:
            self.lora_dropout = nn.Dropout(dropout)
        self.register_buffer("gate", torch.zeros((), device=device), persistent=False)
        # the constant scale, read by mixed-adapter batches (where each row picks its adapter); written
        # as apply_state writes it, so the first apply_state finds it written (see _fill_changed)
        self.register_buffer("scale", torch.empty((), device=device), persistent=False)
        _fill_changed(self, "scale", scaling)
        self.use_dora = use_dora
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device))
            self.register_buffer("dora_scale", torch.full((), float(scaling), device=device), persistent=False)
            self.register_buffer("dora_on", torch.zeros((), device=device), persistent=False)

    @property
    def has_dropout(self) -> bool:
        return "lora_dropout" in self._modules

    @torch.no_grad()
    def init_magnitude(self, weight: torch.Tensor, fan_in_fan_out: bool) -> None:
        """DoRA: ``m = ||W + s B A||_row`` (PEFT's init), so the adapter starts as plain LoRA."""
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
        if self.lora_B.bias is not None:
            nn.init.zeros_(self.lora_B.bias)

    @torch.no_grad()
    def apply_state(self, weight: float, merged: bool = False) -> None:
        """Write the switch buffers in place: ``gate = scaling * weight`` (``weight`` is 0 when the
        adapter is inactive, disabled or merged); the mixed-batch ``scale`` is 0 while merged.
        Each is written only when its value changed (an add deactivates the previous adapter:
        its gate changes, its scale does not)."""
        _fill_changed(self, "gate", self.scaling * weight)
        _fill_changed(self, "scale", 0.0 if merged else self.scaling)
        if self.use_dora:
            self.dora_scale.fill_(self.scaling)
            self.dora_on.fill_(weight)


def _fill_changed(module: nn.Module, name: str, value: float) -> None:
    """``module.<name>.fill_(value)`` unless the last such write put ``value`` into this very buffer
    and nothing wrote it since (same tensor, same version counter: a restore's or a move's new
    buffers, or any other write, are written again). Sync visits every branch it may change."""
    buffer = module._buffers[name]
    assert buffer is not None
    filled = module.__dict__.setdefault("_filled", {})
    if filled.get(name) != (value, id(buffer), buffer._version):
        buffer.fill_(value)
        filled[name] = (value, id(buffer), buffer._version)


class LoraEmbeddingBranch(_GatedBranch):
    r"""LoRA on an embedding lookup (PEFT's ``lora.Embedding``): for ids ``i`` and base table ``E``
    (``[num, dim]``)::

        y = E[i] + gate * A^T[i] B^T          A: lora_embedding_A [r, num], B: lora_embedding_B [dim, r]

    with ``gate = scaling * weight`` (0 when inactive, so the lookup is exactly ``E[i]``). Merged,
    ``E += s (B A)^T``. PEFT's init: ``A`` zeros, ``B`` normal (the identity at init). PEFT applies
    no dropout to embeddings; neither does this branch. Never banked (banks hold linear LoRA).
    """

    use_dora = False
    has_dropout = False

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int, alpha: float, scaling: float, *,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.r, self.lora_alpha, self.scaling = r, alpha, scaling
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num_embeddings, dtype=dtype, device=device))
        self.lora_embedding_B = nn.Parameter(torch.zeros(embedding_dim, r, dtype=dtype, device=device))
        self.register_buffer("gate", torch.zeros((), device=device), persistent=False)
        self.register_buffer("scale", torch.full((), float(scaling), device=device), persistent=False)

    @torch.no_grad()
    def reset_parameters(self, init: bool | str = True, generator: torch.Generator | None = None) -> None:
        """PEFT's init (``A`` zeros, ``B`` N(0, 1)); ``init=False``: both N(0, 1) (not the identity)."""
        for p, zero in ((self.lora_embedding_A, init is not False), (self.lora_embedding_B, False)):
            w = torch.zeros(p.shape) if zero else torch.empty(p.shape).normal_(generator=generator)
            p.copy_(w)



def lora_embedding_delta(ids: Tensor, lora_A: Tensor, lora_B: Tensor, gate: Gate, like: Tensor,
                         padding_idx: Union[int, None] = None) -> Tensor:
    r"""``gate * A^T[ids] B^T`` (``[..., dim]``), in the dtype of the base lookup ``like``.

    ``A`` is ``[r, num]`` and ``B`` ``[dim, r]`` (PEFT's ``lora_embedding_A/B``); with ``gate == 0``
    the term is exactly 0. ``padding_idx``: the base table's (PEFT looks ``A^T`` up with it), so the
    column of ``A`` at the padding id gets no gradient.
    """
    after_a = torch.nn.functional.embedding(ids, lora_A.t(), padding_idx=padding_idx)
    return ((after_a @ lora_B.t()) * gate).to(like.dtype)


def _padding_idx(builder: SiteBuilder) -> Union[int, None]:
    """The base lookup's ``padding_idx`` (``None`` when it has none): an ``nn.Embedding`` call, or
    ``aten.embedding(weight, ids, padding_idx=-1, ...)`` / ``F.embedding(ids, weight, padding_idx)``."""
    base = builder.base
    if base.op == "call_module":
        return getattr(builder.gm.get_submodule(str(base.target)), "padding_idx", None)
    if base.target is torch.ops.aten.embedding.default:
        value = base.args[2] if len(base.args) > 2 else base.kwargs.get("padding_idx", -1)
        return None if value == -1 else value
    value = base.args[2] if len(base.args) > 2 else base.kwargs.get("padding_idx")
    return value if isinstance(value, int) else None


def emit_embedding(builder: SiteBuilder, spec: BranchSpec) -> None:
    """The embedding branch: the residual ``lora_embedding_delta(ids, A, B, gate, base, padding_idx)``."""
    tag = f"{builder.key}_{spec.adapter}"
    a = builder.get_attr(f"{spec.prefix}.lora_embedding_A", f"{tag}_lora_embedding_A", spec.adapter)
    b = builder.get_attr(f"{spec.prefix}.lora_embedding_B", f"{tag}_lora_embedding_B", spec.adapter)
    gate = builder.get_attr(f"{spec.prefix}.gate", f"{tag}_gate", spec.adapter)
    args = (builder.x, a, b, gate, builder.base, _padding_idx(builder))
    builder.add_residual(builder.call(lora_embedding_delta, args, f"{tag}_lora_embedding", spec.adapter))


class LoraSitePlan(NamedTuple):
    """Per-site LoRA constants (unpacks as ``r, alpha, scaling``)."""

    r: int
    alpha: float
    scaling: float


# ---------------------------------------------------------------------------- emitters
def emit_low_rank(builder: SiteBuilder, spec: BranchSpec) -> fx.Node:
    """The LoRA branch: ``h = lora_down(dropout(x), A, gate)``, contributed as ``(h, B)``; returns ``h``.

    Reads ``P.lora_A.weight``, ``P.lora_B.weight``, ``P.gate`` and (with ``spec.dropout``)
    calls ``P.lora_dropout``, for ``P = spec.prefix`` (a :class:`LoraBranch`).
    """
    tag = f"{builder.key}_{spec.adapter}"
    xin = builder.x
    if spec.dropout:
        xin = builder.node("call_module", f"{spec.prefix}.lora_dropout", (xin,), f"{tag}_lora_dropout", spec.adapter)
    a = builder.get_attr(f"{spec.prefix}.lora_A.weight", f"{tag}_lora_A_weight", spec.adapter)
    gate = builder.get_attr(f"{spec.prefix}.gate", f"{tag}_gate", spec.adapter)
    h = builder.call(lora_down, (xin, a, gate), f"{tag}_lora_A", spec.adapter)
    b = builder.get_attr(f"{spec.prefix}.lora_B.weight", f"{tag}_lora_B_weight", spec.adapter)
    builder.add_low_rank(h, b)
    if spec.option("lora_bias"):  # s * b_B, gated like the low-rank term
        bias = builder.get_attr(f"{spec.prefix}.lora_B.bias", f"{tag}_lora_B_bias", spec.adapter)
        builder.add_residual(builder.call(gated_bias, (bias, gate, builder.base), f"{tag}_lora_bias", spec.adapter))
    return h


def emit_dora(builder: SiteBuilder, spec: BranchSpec) -> None:
    """The DoRA branch: LoRA's ``h``, ``B`` scaled per row by ``f``, and the residual ``(f - 1) W x``."""
    p, a, tag = spec.prefix, spec.adapter, f"{builder.key}_{spec.adapter}"
    h = emit_low_rank(builder, spec)
    _, b = builder.low_rank.pop()  # re-added below with B scaled by f
    weight = builder.weight(a)
    A = builder.get_attr(f"{p}.lora_A.weight", f"{tag}_dora_A_weight", a)
    scale = builder.get_attr(f"{p}.dora_scale", f"{tag}_dora_scale", a)
    m = builder.get_attr(f"{p}.lora_magnitude_vector", f"{tag}_lora_magnitude_vector", a)
    f = builder.call(dora_factor, (weight, A, b, scale, m, spec.option("fan_in_fan_out")), f"{tag}_dora_factor", a)
    builder.add_low_rank(h, builder.call(row_scale, (b, f), f"{tag}_dora_B", a))
    wx = None
    if spec.dropout:  # PEFT rescales W dropout(x): one more product with W
        x_drop = h.args[0]  # the dropout node feeding lora_down
        w2d = weight if not spec.option("fan_in_fan_out") else builder.call(aten.t.default, (weight,), f"{tag}_dora_Wt", a)
        wx = builder.call(aten.linear.default, (x_drop, w2d), f"{tag}_dora_Wx", a)
    on = builder.get_attr(f"{p}.dora_on", f"{tag}_dora_on", a)
    term = builder.call(dora_residual, (builder.base, wx, builder.bias(a), f, on), f"{tag}_dora_residual", a)
    builder.add_residual(term)


#: the adapter name bank branches carry in node names and metadata
BANK = "bank"


def emit_bank(builder: SiteBuilder, spec: BranchSpec) -> None:
    """A site's bank (:mod:`graphlora.banks`): ``y = lora_bank(y, x, a_hat, b_hat)`` (the gathered
    active factors), or with ``spec.option("mixed")``, ``y = lora_bank_rows(y, x, row_index, A_bank,
    B_bank, scale)``.

    Reads ``P.a_hat`` and ``P.b_hat`` (mixed: ``P.lora_A``, ``P.lora_B``, ``P.scale`` and the slots
    at ``spec.option("index")``) for ``P = spec.prefix`` (a :class:`graphlora.banks.SiteBank`).
    """
    p, tag = spec.prefix, f"{builder.key}_{BANK}"
    if not spec.option("mixed", False):
        a_hat = builder.get_attr(f"{p}.a_hat", f"{tag}_a_hat")
        b_hat = builder.get_attr(f"{p}.b_hat", f"{tag}_b_hat")
        builder.add_update(lora_bank, (builder.x, a_hat, b_hat), inplace=lora_bank_)
        return
    index = builder.get_attr(spec.option("index"), f"{tag}_rows")
    a = builder.get_attr(f"{p}.lora_A", f"{tag}_lora_A")
    b = builder.get_attr(f"{p}.lora_B", f"{tag}_lora_B")
    scale = builder.get_attr(f"{p}.scale", f"{tag}_scale")
    builder.add_update(lora_bank_rows, (builder.x, index, a, b, scale))


def bank_spec(prefix: str, index: str, mixed: bool) -> BranchSpec:
    """The bank branch of one site (``prefix``: its :class:`~graphlora.banks.SiteBank`; ``index``:
    the ``active`` slots, or the mixed batch's ``row_index``)."""
    return BranchSpec(BANK, prefix, emit_bank, options=(("index", index), ("mixed", mixed)))


def check_embedding_config(config: LoraConfig, site: str) -> None:
    """Refuse LoRA options graphlora does not reproduce on an embedding site.

    Raises:
        TargetTypeError: ``use_dora`` or ``lora_bias`` with an embedding target.
    """
    for field in ("use_dora", "lora_bias"):
        if getattr(config, field, False):
            raise TargetTypeError(
                f"{field}=True is not supported on the embedding site {site!r} (graphlora adapts embeddings "
                f"with plain LoRA: lora_embedding_A/B); set {field}=False or add {site!r} to exclude_modules."
            )


# ---------------------------------------------------------------------------- specialize
def freeze_dora_residual(gm: fx.GraphModule, node: fx.Node, read: GateReader) -> list[fx.Node]:
    """DoRA's specialize step for ``dora_residual(base, wx, bias, f, on)`` (see
    :class:`graphlora.passes.specialize.FreezeSwitches`).

    ``on == 0`` removes the residual and the ``add`` consuming it (its low-rank term is dropped
    with the ``lora_switch`` branch, whose gate is 0 too); any other ``on`` becomes a constant.
    Returns the nodes left unused (empty when ``on`` is a constant already).
    """
    base, wx, bias, factor, on = node.args
    value = read(on)
    dead: list[fx.Node] = [on] if isinstance(on, fx.Node) else []
    if value == 0.0:
        for add in list(node.users):  # y + residual -> y
            other = add.args[0] if add.args[1] is node else add.args[1]
            add.replace_all_uses_with(other)
            dead.append(add)
        dead.append(node)
    elif dead:
        node.args = (base, wx, bias, factor, value)
    return dead


def freeze_embedding_delta(gm: fx.GraphModule, node: fx.Node, read: GateReader) -> list[fx.Node]:
    """The embedding branch's specialize step for ``lora_embedding_delta(ids, A, B, gate, base, pad)``:
    ``gate == 0`` removes the term and the ``add`` consuming it; any other gate becomes a constant."""
    ids, a, b, gate, like, *padding = node.args
    value = read(gate)
    dead: list[fx.Node] = [gate] if isinstance(gate, fx.Node) else []
    if value == 0.0:
        for add in list(node.users):  # y + term -> y
            other = add.args[0] if add.args[1] is node else add.args[1]
            add.replace_all_uses_with(other)
            dead.append(add)
        dead += [node, a, b]
    elif dead:
        node.args = (ids, a, b, value, like, *padding)
    return dead


class LoraRule(MethodRule):
    """LoRA (and DoRA with ``use_dora=True``)."""

    name = "lora"
    config_class = LoraConfig
    peft_type = "LORA"
    #: adapts embedding sites too (:class:`LoraEmbeddingBranch`; see ``check_embedding_targets``)
    embeddings = True

    def default_targets(self, model_type):
        return DEFAULT_TARGET_MODULES.get(model_type or "")

    def site_plan(self, config: LoraConfig, site: str) -> LoraSitePlan:
        r = int(pattern_value(config.rank_pattern, site, config.r))
        alpha = float(pattern_value(config.alpha_pattern, site, config.lora_alpha))
        return LoraSitePlan(r, alpha, config.scaling(r, alpha))

    def variant(self, config: LoraConfig) -> str:
        if config.target_parameters:
            return "lora+experts"
        return "dora" if config.use_dora else ("lora+bias" if config.lora_bias else "lora")

    def rank(self, plan: LoraSitePlan) -> int:
        return plan.r

    def mixable(self, config: LoraConfig) -> bool:
        # mixed batches read the banks; expert LoRA (target_parameters) is never banked
        return not config.use_dora and not config.lora_bias and not config.target_parameters

    def autocast(self, config: LoraConfig) -> bool:
        return not config.use_dora  # DoRA's factor and residual compute in the base dtype

    # ------------------------------------------------------------------ state and graph
    def make_branch(self, config: LoraConfig, site: Site, plan: LoraSitePlan, weight: torch.Tensor) -> nn.Module:
        if site.kind == EXPERT:  # target_parameters: one LoRA per expert (graphlora.methods.experts)
            from .experts import make_expert_branch

            return make_expert_branch(site, plan, weight, config.init_lora_weights)
        if site.kind == EMBEDDING:
            check_embedding_config(config, site.name)
            emb = LoraEmbeddingBranch(site.in_features, site.out_features, plan.r, plan.alpha, plan.scaling,
                                      dtype=weight.dtype, device=weight.device)
            emb.reset_parameters(config.init_lora_weights)
            return emb
        branch = LoraBranch(site.in_features, site.out_features, plan.r, plan.alpha, plan.scaling,
                            config.lora_dropout, use_dora=config.use_dora, lora_bias=config.lora_bias,
                            dtype=weight.dtype, device=weight.device)
        branch.reset_parameters(config.init_lora_weights)
        if config.use_dora:
            branch.init_magnitude(weight, site.fan_in_fan_out)
        return branch

    def branch_spec(self, adapter: str, prefix: str, branch: nn.Module, site: Site) -> BranchSpec:
        if site.kind == EXPERT:
            from .experts import branch_spec as expert_spec

            return expert_spec(adapter, prefix, branch)
        if isinstance(branch, LoraEmbeddingBranch):
            return BranchSpec(adapter, prefix, emit_embedding)
        if getattr(branch, "use_dora", False):
            return BranchSpec(adapter, prefix, emit_dora, dropout=branch.has_dropout,
                              options=(("fan_in_fan_out", site.fan_in_fan_out),))
        options = (("lora_bias", True),) if branch.lora_B.bias is not None else ()
        return BranchSpec(adapter, prefix, emit_low_rank, dropout=branch.has_dropout, options=options)

    def freeze_steps(self) -> dict[Any, FreezeStep]:
        return {dora_residual: freeze_dora_residual, lora_embedding_delta: freeze_embedding_delta,
                lora_shrink: freeze_shrink}  # fused sibling down-projections (passes/fuse_shrink.py)

    def bank_factors(self, branch: nn.Module) -> Union[tuple[Tensor, Tensor, float], None]:
        """Plain LoRA banks (:mod:`graphlora.banks`); DoRA keeps its own branch, and so do parameters
        that are not plain tensors (FSDP2's sharded DTensors: a bank slot cannot be a view of a shard),
        and embedding branches (banks hold linear LoRA only)."""
        from .experts import LoraExpertBranch

        if isinstance(branch, (LoraEmbeddingBranch, LoraExpertBranch)):  # experts: their own branch
            return None
        if getattr(branch, "use_dora", False) or branch.lora_B.bias is not None:
            return None
        if any(type(p.data) is not torch.Tensor for p in (branch.lora_A.weight, branch.lora_B.weight)):
            return None
        return branch.lora_A.weight, branch.lora_B.weight, branch.scaling

    # ------------------------------------------------------------------ files
    def tensors(self, branch: nn.Module) -> dict[str, torch.Tensor]:
        if isinstance(branch, LoraEmbeddingBranch):  # PEFT's keys: no ".weight" (nn.Parameter entries)
            return {"lora_embedding_A": branch.lora_embedding_A.detach(),
                    "lora_embedding_B": branch.lora_embedding_B.detach()}
        out = {"lora_A.weight": branch.lora_A.weight.detach(), "lora_B.weight": branch.lora_B.weight.detach()}
        if branch.lora_B.bias is not None:
            out["lora_B.bias"] = branch.lora_B.bias.detach()
        if getattr(branch, "use_dora", False):
            out["lora_magnitude_vector"] = branch.lora_magnitude_vector.detach()
        return out

    def shapes(self, site: Site, plan: LoraSitePlan, config: LoraConfig) -> dict[str, tuple[int, ...]]:
        if site.kind == EXPERT:  # PEFT's ParamWrapper: lora_A [E r, in], lora_B [out, r E]
            ranks = plan.r * plan.num_experts
            return {"lora_A.weight": (ranks, site.in_features), "lora_B.weight": (site.out_features, ranks)}
        if site.kind == EMBEDDING:
            check_embedding_config(config, site.name)
            return {"lora_embedding_A": (plan.r, site.in_features), "lora_embedding_B": (site.out_features, plan.r)}
        out = {"lora_A.weight": (plan.r, site.in_features), "lora_B.weight": (site.out_features, plan.r)}
        if config.lora_bias:
            out["lora_B.bias"] = (site.out_features,)
        if config.use_dora:
            out["lora_magnitude_vector"] = (site.out_features,)
        return out

    def config_from_peft(self, data, source):
        return config_from_peft(data, source=source)

    def config_to_peft(self, config, sites, resolved, fan_in_fan_out, **meta):
        if isinstance(sites, dict):  # expert sites come from target_parameters, never from target_modules
            sites = [s for s, plan in sites.items() if not hasattr(plan, "peft_module")]
        return config_to_peft(config, sites, resolved_targets=resolved, fan_in_fan_out=fan_in_fan_out, **meta)

    # ------------------------------------------------------------------ merge
    def merge(self, weight, bias, branch, w, fan_in_fan_out, original=None):
        """``W += w s B A``; DoRA: ``W += w [(f - 1) W0 + f s B A]`` with ``f`` from the unmerged ``W0``;
        an embedding table: ``E += w s (B A)^T`` (PEFT's ``lora.Embedding`` merge)."""
        from .experts import LoraExpertBranch, merge_experts

        if isinstance(branch, LoraExpertBranch):  # a 3-D expert weight: W_e += w s B_e A_e
            return merge_experts(weight, branch, w, fan_in_fan_out), bias
        if isinstance(branch, LoraEmbeddingBranch):
            A, B = branch.lora_embedding_A.detach().float(), branch.lora_embedding_B.detach().float()
            return weight + (B @ A).t() * (branch.scaling * w), bias
        A, B = branch.lora_A.weight.detach().float(), branch.lora_B.weight.detach().float()
        delta = (B @ A) * branch.scaling  # [out, in]
        if getattr(branch, "use_dora", False):
            w0 = (weight if original is None else original).float()
            w0 = w0.t() if fan_in_fan_out else w0
            norm = torch.linalg.norm(w0 + delta, dim=1)
            f = (branch.lora_magnitude_vector.detach().float() / norm).unsqueeze(1)
            delta = (f - 1) * w0 + f * delta
        delta = delta * w
        if branch.lora_B.bias is not None:  # lora_bias: b += w s b_B
            if bias is None:
                raise MergeError("cannot merge an adapter with lora_bias=True into a site without a bias (as in PEFT); "
                                 "serve it unmerged (graphlora.specialize).")
            bias = bias + branch.lora_B.bias.detach().float() * (branch.scaling * w)
        return weight + (delta.t() if fan_in_fan_out else delta), bias

    # ------------------------------------------------------------------ weighted combination
    def combine(self, state, facts, records, adapters, weights, combination_type, svd_rank=None, svd_clamp=None,
                svd_full_matrices=True, svd_driver=None, **options):
        from .weighted import combine_lora

        experts = [a for a in adapters if getattr(state.configs.get(a), "target_parameters", None)]
        if experts:
            raise ConfigError(
                f"add_weighted_adapter does not combine expert LoRA (target_parameters) yet: adapter "
                f"{experts[0]!r} adapts {list(state.configs[experts[0]].target_parameters)}; combine adapters "
                "without target_parameters."
            )
        embedded = [(a, s) for a in adapters for s in state.plans.get(a, ())
                    if isinstance(state.branch(s, a), LoraEmbeddingBranch)]
        if embedded:
            raise ConfigError(
                f"add_weighted_adapter does not combine embedding LoRA yet: adapter {embedded[0][0]!r} adapts the "
                f"embedding {embedded[0][1]!r}; exclude it (exclude_modules) or combine other adapters."
            )
        return combine_lora(state, facts, records, adapters, weights, combination_type, svd_rank=svd_rank,
                            svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver)

    # ------------------------------------------------------------------ hotswap
    def hotswap(self, branch: nn.Module, config: LoraConfig, plan: LoraSitePlan) -> bool:
        """Take the new file's alpha, scaling and dropout; True when a dropout module came or went."""
        branch.lora_alpha = plan.alpha
        branch.set_scaling(plan.scaling)
        if isinstance(branch, LoraEmbeddingBranch):
            return False  # no dropout on embeddings (PEFT's too)
        dropout = branch._modules.get("lora_dropout")
        if config.lora_dropout > 0 and dropout is not None:
            dropout.p = config.lora_dropout
            return False
        if config.lora_dropout > 0:
            branch.lora_dropout = nn.Dropout(config.lora_dropout).train(branch.training)
            return True
        if dropout is not None:
            del branch._modules["lora_dropout"]
            return True
        return False
