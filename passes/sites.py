"""Locate: find every linear op (and embedding lookup) in a graph and describe it as a :class:`Site`.

A site is named by the path of its weight parameter without a trailing ``.weight``:
``model.layers.0.self_attn.q_proj`` for an ``nn.Linear`` (PEFT's name for it), ``proj`` for
``F.linear(x, self.proj.weight)`` called inside any module.

Recognised ops (a rule table, not class-name matching):

============================  =========  =====  ======  =============
op                            kind       input  weight  weight layout
============================  =========  =====  ======  =============
``call_module`` nn.Linear     linear     0      module  (out, in)
``F.linear`` / aten.linear    linear*    0      1       (out, in)
``torch.addmm`` / aten.addmm  addmm      1      2       (in, out)
``matmul_linear``             linear*    0      1       (out, in)
``aten.embedding``            embedding  1      0       (num, dim)
``call_module`` nn.Embedding  embedding  0      module  (num, dim)
grouped mm of a 3-D weight    expert     0      1       [E, out, in] (``W.transpose(-2, -1)``)
                                                        or [E, in, out]
============================  =========  =====  ======  =============

(*) ``functional_linear`` when the op was not called by the module that owns the weight.
The weight must come from a ``get_attr`` node (a parameter of the traced module).
``matmul_linear(x, W, b)`` is a hand-written linear ``x @ W.T (+ b)`` (Falcon's ``FalconLinear``),
made by the base pass :class:`~graphlora.passes.matmul_linear.MatmulAsLinear`; its bias is argument 2,
as ``linear``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from ._compat import grouped_mm_ops
from .matmul_linear import matmul_linear

__all__ = ["Site", "OpRule", "LINEAR_OPS", "EMBEDDING", "EXPERT", "grouped_mm_ops", "locate_sites", "module_path"]

#: ``Site.kind`` of an embedding lookup (``aten.embedding(weight, ids)`` or a call of an
#: ``nn.Embedding``): ``in_features`` is ``num_embeddings``, ``out_features`` ``embedding_dim`` and
#: ``input_index`` points at the ids. Only LoRA adapts these (PEFT's ``lora_embedding_A/B``).
EMBEDDING = "embedding"

#: ``Site.kind`` of a grouped matmul over a 3-D expert weight ``[E, ...]`` (a mixture of experts:
#: ``grouped_mm(x_sorted, W_e^T, offs)``, rows ``offs[e-1]:offs[e]`` use expert ``e``). The site is
#: named by the parameter's path (``model.layers.0.mlp.experts.gate_up_proj``, PEFT's
#: ``target_parameters`` key); ``in_features`` / ``out_features`` are one expert's, and
#: ``fan_in_fan_out`` says the weight is stored ``[E, in, out]`` (else ``[E, out, in]``, read through
#: ``transpose(-2, -1)``). Only LoRA's ``target_parameters`` adapts these; ``target_modules`` never
#: selects them.
EXPERT = "expert"


@dataclass(frozen=True)
class OpRule:
    """Where a linear-like op keeps its input and weight, and how the weight is laid out."""

    kind: str
    input_index: int
    weight_index: int
    fan_in_fan_out: bool  # weight stored (in, out)


aten = torch.ops.aten
LINEAR_OPS: Mapping[Any, OpRule] = {
    aten.linear.default: OpRule("linear", 0, 1, False),
    F.linear: OpRule("linear", 0, 1, False),
    torch._C._nn.linear: OpRule("linear", 0, 1, False),
    matmul_linear: OpRule("linear", 0, 1, False),
    aten.addmm.default: OpRule("addmm", 1, 2, True),
    torch.addmm: OpRule("addmm", 1, 2, True),
}


@dataclass(frozen=True)
class Site:
    """One linear op that can carry adapters.

    Attributes:
        name: weight path without ``.weight`` (PEFT's module name for ``nn.Linear``).
        kind: ``"linear"``, ``"functional_linear"``, ``"addmm"`` (GPT-2 ``Conv1D``),
            ``"embedding"`` (a lookup: ``in_features`` = rows, ``out_features`` = embedding dim) or
            ``"expert"`` (a grouped matmul over a 3-D expert weight, see :data:`EXPERT`).
        node: name of the base op's node in the graph it was found in.
        weight: attribute path of the weight on the traced module.
        in_features / out_features: sizes of the op's input and output feature dims.
        fan_in_fan_out: the weight is stored (in, out) (``Conv1D``).
        input_index: position of the activation among the node's args (``-1``: call_module arg 0).
    """

    name: str
    kind: str
    node: str
    weight: str
    in_features: int
    out_features: int
    fan_in_fan_out: bool
    input_index: int


def module_path(node: fx.Node) -> Union[str, None]:
    """The innermost module path recorded for ``node`` by export (``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path or None


def _site_name(weight_target: str, owner: Union[str, None], aliases: Mapping[str, Sequence[str]]) -> str:
    names = list(aliases.get(weight_target, ())) or [weight_target]
    if owner is not None:
        # tied weights: prefer the alias that lives under the module that made the call
        for name in names:
            if name.rsplit(".", 1)[0] == owner:
                weight_target = name
                break
        else:
            for name in names:
                if name.startswith(owner + "."):
                    weight_target = name
                    break
    return weight_target[: -len(".weight")] if weight_target.endswith(".weight") else weight_target


def locate_sites(
    gm: fx.GraphModule,
    aliases: Mapping[str, Sequence[str]] | None = None,
    extra_ops: Mapping[Callable, OpRule] | None = None,
) -> list[Site]:
    """Every linear op of ``gm`` as a :class:`Site`, in graph order.

    Args:
        gm: the traced module (its attributes resolve ``get_attr`` weights).
        aliases: other names of a parameter (tied weights), keyed by the traced name.
        extra_ops: additional op rules, merged over :data:`LINEAR_OPS`.
    """
    aliases = aliases or {}
    rules = {**LINEAR_OPS, **(extra_ops or {})}
    sites: list[Site] = []
    grouped = grouped_mm_ops()
    for node in gm.graph.nodes:
        embedding = _embedding_site(gm, node, aliases)
        if embedding is not None:
            sites.append(embedding)
            continue
        expert = _expert_site(gm, node, aliases, grouped)
        if expert is not None:
            sites.append(expert)
            continue
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if not isinstance(module, torch.nn.Linear):
                continue
            weight = f"{node.target}.weight"
            sites.append(
                Site(_site_name(weight, node.target, aliases), "linear", node.name, weight,
                     module.in_features, module.out_features, False, -1)
            )
            continue
        if node.op != "call_function" or node.target not in rules:
            continue
        rule = rules[node.target]
        if len(node.args) <= max(rule.input_index, rule.weight_index):
            continue
        weight_node = node.args[rule.weight_index]
        if not isinstance(weight_node, fx.Node) or weight_node.op != "get_attr":
            continue
        weight = getattr_path(gm, weight_node.target)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            continue  # a scaled addmm is not a plain linear
        owner = module_path(node)
        name = _site_name(weight_node.target, owner, aliases)
        kind = "functional_linear" if rule.kind == "linear" and owner != name else rule.kind
        d0, d1 = weight.shape
        in_f, out_f = (d0, d1) if rule.fan_in_fan_out else (d1, d0)
        sites.append(Site(name, kind, node.name, weight_node.target, in_f, out_f, rule.fan_in_fan_out, rule.input_index))
    return sites


def _embedding_site(gm: fx.GraphModule, node: fx.Node, aliases: Mapping[str, Sequence[str]]) -> Union[Site, None]:
    """An embedding lookup as a :data:`EMBEDDING` site: ``aten.embedding(W, ids, ...)`` with ``W``
    a ``get_attr`` (``[num_embeddings, embedding_dim]``), or a call of an ``nn.Embedding`` without
    ``max_norm`` (which renormalises rows in place)."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if not isinstance(module, torch.nn.Embedding) or module.max_norm is not None:
            return None
        weight = f"{node.target}.weight"
        return Site(_site_name(weight, str(node.target), aliases), EMBEDDING, node.name, weight,
                    module.num_embeddings, module.embedding_dim, False, -1)
    if node.op != "call_function" or node.target is not aten.embedding.default or len(node.args) < 2:
        return None
    weight_node = node.args[0]
    if not isinstance(weight_node, fx.Node) or weight_node.op != "get_attr":
        return None
    weight = getattr_path(gm, str(weight_node.target))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    name = _site_name(str(weight_node.target), module_path(node), aliases)
    return Site(name, EMBEDDING, node.name, str(weight_node.target), weight.shape[0], weight.shape[1], False, 1)


def _expert_site(gm: fx.GraphModule, node: fx.Node, aliases: Mapping[str, Sequence[str]],
                 grouped: tuple[Any, ...]) -> Union[Site, None]:
    """A grouped matmul ``op(x, W', offs)`` as an :data:`EXPERT` site, where ``W'`` is a 3-D
    ``get_attr`` (stored ``[E, in, out]``) or its ``transpose(-2, -1)`` (stored ``[E, out, in]``)."""
    if node.op != "call_function" or node.target not in grouped or len(node.args) < 3 or node.kwargs:
        return None
    weight_arg = node.args[1]
    if not isinstance(weight_arg, fx.Node):
        return None
    stored_in_out = weight_arg.op == "get_attr"
    if not stored_in_out:
        if weight_arg.target is not aten.transpose.int or len(weight_arg.args) != 3:
            return None
        dims = {d % 3 for d in weight_arg.args[1:] if isinstance(d, int)}
        if dims != {1, 2} or not isinstance(weight_arg.args[0], fx.Node) or weight_arg.args[0].op != "get_attr":
            return None
        weight_arg = weight_arg.args[0]
    weight = getattr_path(gm, str(weight_arg.target))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
        return None
    _, d1, d2 = weight.shape
    in_f, out_f = (d1, d2) if stored_in_out else (d2, d1)
    name = _site_name(str(weight_arg.target), module_path(node), aliases)
    return Site(name, EXPERT, node.name, str(weight_arg.target), in_f, out_f, stored_in_out, 0)


def getattr_path(root: torch.nn.Module, target: str) -> Any:
    """``root.a.b.c`` for ``target == "a.b.c"``."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
