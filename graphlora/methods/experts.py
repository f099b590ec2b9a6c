r"""LoRA on mixture-of-experts weights: PEFT's ``target_parameters`` on a 3-D expert parameter.

A transformers 5 experts module keeps every expert's weight in one parameter
``W [E, out, in]`` (``gate_up_proj``, ``down_proj``; ``[E, in, out]`` when the module is
``is_transposed``) and runs the routed tokens through grouped matmuls: the rows ``x`` sorted by
expert, ``offs`` the running row counts, expert ``e`` owning rows ``offs[e-1]:offs[e]``::

    y = grouped_mm(x, W^T, offs)                       y_rows(e) = x_rows(e) W_e^T

PEFT's ``ParamWrapper`` gives the parameter one LoRA per expert, stored as one ``nn.Linear`` pair
whose rows / columns interleave the experts (``lora_A.weight [E r, in]``,
``lora_B.weight [out, r E]``)::

    A_e = lora_A[e r : (e + 1) r, :]                   [r, in]
    B_e = lora_B[:, e :: E]                            [out, r]   (column k of B_e is column k E + e)
    W_e' = W_e + s B_e A_e                             s = alpha / r (rsLoRA: alpha / sqrt(r))

and forms ``W'`` for the whole stack on every forward. Here the graph keeps ``W`` and adds, next
to the traced grouped matmul and with the same op, the low-rank path per routed group::

    h     = grouped_mm(x, A_stack, offs)               A_stack = [A_e^T]_e     [E, in, r]   -> h [S, r]
    delta = grouped_mm(h, g B_stack, offs)             B_stack = [B_e^T]_e     [E, r, out]  -> [S, out]
    y'    = y + delta                                  g = s * weight (0: exactly y)

which never materialises ``Delta W_e`` (``E * out * in`` values) and costs ``2 S r (in + out)``
multiply-adds. Merging folds ``s B_e A_e`` (transposed for ``[E, in, out]`` storage) into ``W``.

PEFT nests one ``ParamWrapper`` per targeted parameter of a module, the first parameter (in
registration order) innermost, so its file keys are ``<module>[.base_layer]*k.lora_A.weight`` with
``k`` the number of targeted parameters registered after it on the same module
(:func:`peft_module_path`).

Expert branches are never banked and do not run in mixed-adapter batches (PEFT's ParamWrapper
refuses mixed batches too); on CUDA the grouped matmul wants ``r`` a multiple of 8 (16-byte rows
in bf16).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor, nn

from graphlora.errors import NoTargetError, TargetTypeError
from graphlora.passes import BranchSpec, Site
from graphlora.passes.sites import EXPERT
from graphlora.passes.splice import SiteBuilder

from .lora import LoraBranch

__all__ = [
    "ExpertSitePlan",
    "LoraExpertBranch",
    "make_expert_branch",
    "expert_lora_a",
    "expert_lora_b",
    "emit_experts",
    "merge_experts",
    "expert_delta_weight",
    "select_parameters",
    "peft_module_path",
]

Gate = Union[Tensor, float]


class ExpertSitePlan(NamedTuple):
    """Per-site constants of expert LoRA (unpacks as LoRA's ``r, alpha, scaling`` first).

    ``peft_module`` is the module path PEFT's file keys use for this parameter's wrapper,
    ``num_experts`` the weight's first dimension ``E``.
    """

    r: int
    alpha: float
    scaling: float
    peft_module: str
    num_experts: int


class LoraExpertBranch(LoraBranch):
    """One LoRA per expert over a 3-D expert weight (see the module docstring): PEFT's
    ``lora_A [E r, in]`` and ``lora_B [out, r E]``, the gate and scaling of :class:`LoraBranch`
    (``r`` is the per-expert rank, PEFT's ``r``). No dropout (PEFT refuses it on parameters)."""

    def __init__(self, in_features: int, out_features: int, num_experts: int, plan: ExpertSitePlan, *,
                 dtype: Union[torch.dtype, None] = None, device: Union[torch.device, str, None] = None) -> None:
        super().__init__(in_features, out_features, plan.r * num_experts, plan.alpha, plan.scaling, 0.0,
                         dtype=dtype, device=device)
        self.r = plan.r  # per expert: the gaussian init draws N(0, 1/r) as PEFT does
        self.num_experts = num_experts
        self.peft_module = plan.peft_module


def make_expert_branch(site: Site, plan: ExpertSitePlan, weight: Tensor, init: Union[bool, str]) -> LoraExpertBranch:
    """The branch of one expert site (``weight``: the 3-D base weight), with PEFT's init (A
    Kaiming-uniform or N(0, 1/r), B zeros; ``init=False``: both random)."""
    branch = LoraExpertBranch(site.in_features, site.out_features, weight.shape[0], plan,
                              dtype=weight.dtype, device=weight.device)
    branch.reset_parameters(init)
    return branch


# ---------------------------------------------------------------------------- runtime
def expert_lora_a(lora_A: Tensor, num_experts: int, like: Tensor) -> Tensor:
    """``[A_e^T]_e``: ``lora_A [E r, in]`` as ``[E, in, r]`` in ``like``'s dtype (a view when the
    dtypes agree)."""
    return lora_A.to(like.dtype).view(num_experts, -1, lora_A.shape[-1]).transpose(1, 2)


def expert_lora_b(lora_B: Tensor, gate: Gate, num_experts: int, like: Tensor) -> Tensor:
    """``[g B_e^T]_e``: ``lora_B [out, r E]`` (column ``k E + e`` is ``B_e``'s column ``k``) as
    ``[E, r, out]`` (each expert's block column-major, as the grouped matmul reads ``W^T``),
    scaled by the gate, in ``like``'s dtype."""
    b = lora_B.view(lora_B.shape[0], -1, num_experts).permute(2, 0, 1)  # [E, out, r]
    return (b * gate).to(like.dtype).contiguous().transpose(1, 2)


def emit_experts(builder: SiteBuilder, spec: BranchSpec) -> None:
    """The expert branch at a grouped-matmul site ``op(x, W^T, offs)``: two more calls of the
    same ``op`` through the stacked factors, added to the base output as a residual."""
    p, a, tag = spec.prefix, spec.adapter, f"{builder.key}_{spec.adapter}"
    base = builder.base
    op, offs, experts = base.target, base.args[2], spec.option("num_experts")
    lora_a = builder.get_attr(f"{p}.lora_A.weight", f"{tag}_lora_A_weight", a)
    lora_b = builder.get_attr(f"{p}.lora_B.weight", f"{tag}_lora_B_weight", a)
    gate = builder.get_attr(f"{p}.gate", f"{tag}_gate", a)
    stack_a = builder.call(expert_lora_a, (lora_a, experts, builder.x), f"{tag}_experts_A", a)
    h = builder.call(op, (builder.x, stack_a, offs), f"{tag}_lora_A", a)
    stack_b = builder.call(expert_lora_b, (lora_b, gate, experts, h), f"{tag}_experts_B", a)
    builder.add_residual(builder.call(op, (h, stack_b, offs), f"{tag}_lora_B", a))


def branch_spec(adapter: str, prefix: str, branch: nn.Module) -> BranchSpec:
    return BranchSpec(adapter, prefix, emit_experts, options=(("num_experts", branch.num_experts),))


# ---------------------------------------------------------------------------- merge
def expert_delta_weight(branch: nn.Module, stored_in_out: bool) -> Tensor:
    """``s B_e A_e`` for every expert, float32: ``[E, out, in]`` (``[E, in, out]`` when
    ``stored_in_out``), PEFT's ``ParamWrapper.get_delta_weight``."""
    experts, r = branch.num_experts, branch.r
    A = branch.lora_A.weight.detach().float().view(experts, r, -1)  # [E, r, in]
    B = branch.lora_B.weight.detach().float()
    B = B.view(B.shape[0], r, experts).permute(2, 0, 1)  # [E, out, r]
    delta = torch.bmm(B, A) * branch.scaling
    return delta.transpose(1, 2) if stored_in_out else delta


def merge_experts(weight: Tensor, branch: nn.Module, w: float, stored_in_out: bool) -> Tensor:
    """``W + w s B_e A_e`` per expert (float32 ``weight``, stored layout)."""
    return weight + expert_delta_weight(branch, stored_in_out) * w


# ---------------------------------------------------------------------------- planning
def _matches(path: str, entry: str) -> bool:
    return path == entry or path.endswith("." + entry)


def select_parameters(config: Any, site_names: Sequence[str], records: Mapping[str, Site],
                      model: nn.Module) -> list[str]:
    """The expert sites ``config.target_parameters`` selects (PEFT's rule: a parameter path equal
    to an entry or ending in ``"." + entry``), in graph order.

    Raises:
        NoTargetError: an entry names no parameter of the model (the message names the entry and
            the closest parameter paths).
        TargetTypeError: an entry names a parameter that no grouped matmul of the traced graph
            reads as a 3-D expert weight (a 2-D weight: use ``target_modules``; experts run by
            another implementation: ``experts_implementation="grouped_mm"``).
    """
    entries = tuple(getattr(config, "target_parameters", None) or ())
    experts = [n for n in site_names if records[n].kind == EXPERT]
    chosen: list[str] = []
    params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for entry in entries:
        hits = [n for n in experts if _matches(n, entry)]
        if hits:
            chosen += [h for h in hits if h not in chosen]
            continue
        named = [n for n in params if _matches(n, entry)]
        if not named:
            near = difflib.get_close_matches(entry, params, n=3, cutoff=0.3) or [
                n for n in params if n.rsplit(".", 1)[-1] == entry.rsplit(".", 1)[-1]][:3]
            raise NoTargetError(
                f"target_parameters entry {entry!r} names no parameter of this model (PEFT's rule: a path equal "
                f"to it or ending in '.{entry}'); expert parameters here: "
                f"{sorted(experts)[:4] or 'none'}; closest parameters: {near}. Fix or remove the entry."
            )
        param = model.get_parameter(named[0])
        hint = ("it is 2-D: adapt its module with target_modules instead" if param.dim() == 2 else
                "graphlora adapts 3-D expert weights read by a grouped matmul; load the model with "
                "experts_implementation='grouped_mm' (transformers' default)")
        raise TargetTypeError(
            f"target_parameters entry {entry!r} selects {named[0]!r} (shape {tuple(param.shape)}), which the traced "
            f"graph does not read as an expert weight of a grouped matmul; {hint}, or remove the entry."
        )
    return chosen


def peft_module_path(model: nn.Module, site: str, selected: Iterable[str]) -> str:
    """The module path of ``site``'s ParamWrapper in PEFT's files: the owner module followed by one
    ``.base_layer`` per selected parameter registered after it on the same module."""
    owner, _, name = site.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return owner
    chosen = set(selected)
    names = [n for n, _ in module.named_parameters(recurse=False) if f"{owner}.{n}" in chosen]
    if name not in names:
        return owner
    return owner + ".base_layer" * (len(names) - 1 - names.index(name))
