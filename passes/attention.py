r"""Run provably causal attention as ``is_causal=True`` instead of through a materialized mask.

Called with ``input_ids`` alone, a transformers decoder runs eagerly with no mask and
``scaled_dot_product_attention(q, k, v, is_causal=True)`` (flash attention on GPU). Traced, the
same model materializes the mask (transformers' ``masking_utils`` does not skip it while tracing)
and the graph calls ``aten.scaled_dot_product_attention(q, k, v, mask)``: the masked kernel
instead of the causal one, plus the ops that build a ``[B, 1, L, L]`` mask on every call (on an
H200 the model-level difference was within run-to-run noise, docs/performance.md).

For a mask ``M`` shown causal (below), the call is rewritten. With ``L = shape[-2]``:

- when ``L_q`` and ``L_k`` are one size symbol (self-attention; the graph's shapes make them
  equal on every call), into ``aten.scaled_dot_product_attention(q, k, v, None, 0.0, True)``,
  and the mask's subgraph is erased once nothing else reads it;
- otherwise into :func:`causal_sdpa`, which decides on each call:

.. math::

    \operatorname{causal\_sdpa}(q, k, v, M) =
    \begin{cases}
        \operatorname{sdpa}(q, k, v, \text{is\_causal}) & L_q = L_k \\
        \operatorname{sdpa}(q, k, v, M) & \text{otherwise.}
    \end{cases}

Both agree with the masked call (up to the kernels' rounding) when ``M`` is the causal mask at ``L_q = L_k``: ``M[..., i, j]``
keeps (``True`` / ``0``) ``j <= i`` and drops (``False`` / ``-inf`` or a value at most half the
dtype's lowest, which ``softmax`` turns into an exact 0 since the diagonal is always kept)
``j > i``, the same for every batch row and head.

The rewrite needs evidence, and the node is left alone whenever any part of it is missing:

1. ``attn_mask`` is a node, ``dropout_p == 0`` and ``is_causal`` is False.
2. The mask depends on no values from outside the graph: its ancestors are ``call_function``
   ops only (no ``get_attr``, no ``call_module``, no seeded-random op), and a placeholder is
   reached only through ``aten.sym_size.int`` (a size query, as for ``input_ids``). A
   user-passed ``attention_mask`` or ``position_ids`` makes the mask data-dependent: no rewrite.
   No op mutates any ancestor or any view of one. A higher-order op that reads one (the
   ``wrap_with_set_grad_enabled`` call of a ``no_grad`` region, say transformers 5.17's rotary
   embedding fed the positions) is looked into: its nested graph writes into no input and
   returns no input or view of one.
3. The sequence lengths ``q.shape[-2]`` and ``k.shape[-2]`` are plain symbols or ints, and so are
   the dims of every placeholder whose size the mask reads.
4. Evaluated on CPU for concrete sizes (meta-device placeholders of the right shape, every
   ``torch.device`` argument replaced by CPU), the mask is exactly the causal pattern, broadcast
   to ``q.shape[:-1] + (L,)``, at every probe: the traced example sizes, and each length in
   :data:`PROBE_LENGTHS`, in the caller's ``lengths``, and ``|c| + 1``, ``|c| + 2`` for every
   integer constant ``c`` in the mask's subgraph (a sliding window or chunk size shows up
   there), each with the other size symbols (batch) at 1, 2 and 3 (1 only past 300). A probe
   length beyond :data:`MAX_PROBE_LENGTH` cannot be checked cheaply, so it refuses the rewrite.

A sliding-window mask (Mistral, Qwen2 ``sliding_attention`` layers) is causal up to its window
and fails the probe past it, so it is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import free_symbols

from ._compat import OpOverload, called_graph_modules, size_hint
from .result import GraphPass

__all__ = ["CausalAttention", "causal_sdpa", "PROBE_LENGTHS", "MAX_PROBE_LENGTH"]

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_SIZE = torch.ops.aten.sym_size.int
_SENTINEL = 2**62  # slice ends such as sys.maxsize: not lengths

#: Sequence lengths every mask is checked at (besides the traced one).
PROBE_LENGTHS = (1, 2, 3, 7, 33, 300)
#: The longest probe; a mask that would need a longer one is not rewritten.
MAX_PROBE_LENGTH = 8194
_BATCHES = (1, 2, 3)
_BATCHES_LONG = (1,)  # past PROBE_LENGTHS[-1]
_CPU = torch.device("cpu")


def causal_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor,
    dropout_p: float = 0.0,
    scale: Union[float, None] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``scaled_dot_product_attention`` with ``is_causal=True`` when query and key lengths agree.

    ``attn_mask`` must be the causal mask (the pass checks it); it is used only when the lengths
    differ, where ``is_causal`` would align the triangle top-left rather than as the mask does.
    """
    if query.shape[-2] == key.shape[-2]:
        return F.scaled_dot_product_attention(
            query, key, value, None, dropout_p, True, scale=scale, enable_gqa=enable_gqa
        )
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, False, scale=scale, enable_gqa=enable_gqa
    )


# ---------------------------------------------------------------------------- arguments
def _bind(node: fx.Node) -> dict[str, Any]:
    """The SDPA node's arguments by schema name, defaults filled in."""
    bound: dict[str, Any] = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _shape(node: Any) -> Union[tuple, None]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, Tensor) else None


def _symbol(dim: Any) -> Union[int, str, None]:
    """An int dim as is, a plain symbol (``s70``) by name; None for an expression (``2*s70``)."""
    if isinstance(dim, int):
        return dim
    if isinstance(dim, torch.SymInt):
        syms = free_symbols(dim)
        if len(syms) == 1 and str(next(iter(syms))) == str(dim):
            return str(dim)
    return None


def _hint(dim: Any) -> Union[int, None]:
    """The example value a symbolic dim was traced with, when torch says."""
    try:
        return int(size_hint(dim))
    except Exception:  # no hint recorded
        return None


# ---------------------------------------------------------------------------- the mask subgraph
def _is_view(node: fx.Node) -> bool:
    """The node's output may alias an input (a view, or ``to`` that may return its input)."""
    target = node.target
    if not isinstance(target, OpOverload):
        return False
    return any(r.alias_info is not None for r in target._schema.returns)


def _mutates(node: fx.Node) -> bool:
    """``node`` may write into its inputs: a mutable ATen op, or anything opaque."""
    target = node.target
    if node.op == "output" or target is causal_sdpa:
        return False
    if node.op == "call_function" and isinstance(target, OpOverload):
        return target._schema.is_mutable
    subs = called_graph_modules(node)  # a higher-order op (a no_grad / autocast region): look inside
    if subs:
        return any(_writes_or_returns_inputs(sub.graph) for sub in subs)
    return not (node.op == "call_function" and getattr(target, "__module__", None) == "_operator")


def _writes_or_returns_inputs(graph: fx.Graph) -> bool:
    """A nested graph may write into one of its inputs, or return one or a view of one."""
    aliases = {n for n in graph.nodes if n.op == "placeholder"}
    stack = list(aliases)
    while stack:
        node = stack.pop()
        for user in node.users:
            if user.op == "output" or _mutates(user):
                return True
            if _is_view(user) and user not in aliases:
                aliases.add(user)
                stack.append(user)
    return False


def _mask_subgraph(mask: fx.Node) -> Union[list[fx.Node], None]:
    """The nodes that compute ``mask`` in graph order, or None when it is not a pure function of sizes."""
    seen: set[fx.Node] = set()
    stack = [mask]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            continue
        if node.op != "call_function":
            return None  # get_attr (stored values), call_module / call_method (opaque)
        target = node.target
        if isinstance(target, OpOverload) and torch.Tag.nondeterministic_seeded in target.tags:
            return None
        stack.extend(node.all_input_nodes)  # through a size query too: a placeholder's dummy has the shape
    for node in seen:  # graph inputs are read for their sizes only
        if node.op == "placeholder" and any(u in seen and u.target is not _SIZE for u in node.users):
            return None
    if _mutated(seen):
        return None
    return [n for n in mask.graph.nodes if n in seen]


def _mutated(nodes: set[fx.Node]) -> bool:
    """Some op writes into a tensor of ``nodes`` or into a view of one."""
    aliases = {n for n in nodes if n.op != "placeholder" and not _scalar(n)}
    stack = list(aliases)
    while stack:
        node = stack.pop()
        for user in node.users:
            if _mutates(user):
                return True
            if _is_view(user) and user not in aliases:
                aliases.add(user)
                stack.append(user)
    return False


def _scalar(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def _constants(nodes: Sequence[fx.Node]) -> set[int]:
    """Absolute values of the integer literals in the subgraph's arguments (window sizes live here)."""
    found: set[int] = set()

    def visit(value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) < _SENTINEL:
            found.add(abs(value))
        return value

    for node in nodes:
        fx.node.map_aggregate((node.args, node.kwargs), visit)
    return found


# ---------------------------------------------------------------------------- probing
def _on_cpu(value: Any) -> Any:
    return _CPU if isinstance(value, torch.device) else value


def _evaluate(nodes: Sequence[fx.Node], sizes: dict[str, int]) -> Union[Tensor, None]:
    """The last node's value on CPU with every size symbol set from ``sizes``; None on failure."""
    last_use = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last_use[arg] = i
    env: dict[fx.Node, Any] = {}
    try:
        for i, node in enumerate(nodes):
            if node.op == "placeholder":
                dims = [sizes[d] if isinstance(d, str) else d for d in map(_symbol, _shape(node))]
                env[node] = torch.empty(dims, device="meta")  # only its sizes are read
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            args, kwargs = fx.node.map_aggregate((args, kwargs), _on_cpu)
            env[node] = node.target(*args, **kwargs)
            for arg in node.all_input_nodes:
                if last_use[arg] == i:
                    del env[arg]  # keeps the memory of a long probe to a few [L, L] tensors
    except Exception:  # any failure is a refusal, never an error of the pass
        return None
    out = env[nodes[-1]]
    return out if isinstance(out, Tensor) and out.device.type == "cpu" else None


def _causal_pattern(mask: Tensor, shape: tuple[int, ...]) -> bool:
    """``mask`` broadcasts to ``shape`` (..., L, L) and is the causal mask there."""
    try:
        if tuple(torch.broadcast_shapes(mask.shape, shape)) != shape:
            return False
    except RuntimeError:
        return False
    keep = torch.ones(shape[-2:], dtype=torch.bool).tril()  # compared unexpanded: repeats change nothing
    if mask.dtype == torch.bool:
        return bool((mask == keep).all())
    if mask.is_floating_point():
        low = torch.finfo(mask.dtype).min / 2
        return bool(((mask == 0) | ~keep).all()) and bool(((mask <= low) | keep).all())
    return False


def _sizes(shapes: Iterable[tuple]) -> Union[tuple[set[str], dict[str, int]], None]:
    """The size symbols of ``shapes`` and their traced values; None if a dim is an expression."""
    symbols: set[str] = set()
    hints: dict[str, int] = {}
    for shape in shapes:
        for dim in shape:
            name = _symbol(dim)
            if name is None:
                return None
            if isinstance(name, str):
                symbols.add(name)
                hint = _hint(dim)
                if hint is not None:
                    hints[name] = hint
    return symbols, hints


def _probes(seqs: set[str], static: Union[int, None], symbols: set[str], hints: dict[str, int],
            lengths: Iterable[int]) -> Union[list[dict[str, int]], None]:
    """Size assignments to check, every one with ``L_q = L_k``; None if one would be too long.

    ``seqs`` are the symbols of the query and key lengths, ``static`` their value when one of them
    is an int (then the only length the graph runs at with ``L_q = L_k``).
    """
    lengths = [static] if static is not None else sorted(set(lengths))
    if lengths[-1] > MAX_PROBE_LENGTH:
        return None
    others = sorted(symbols - seqs)
    probes = []
    if symbols <= hints.keys() and len({hints[s] for s in seqs} | ({static} if static is not None else set())) <= 1:
        probes.append(dict(hints))  # the traced example
    for length in lengths:
        for batch in (_BATCHES if length <= PROBE_LENGTHS[-1] else _BATCHES_LONG):
            probes.append({**{s: batch for s in others}, **{s: length for s in seqs}})
    return probes


def _verdict(query: fx.Node, key: fx.Node, mask: fx.Node, lengths: Sequence[int]) -> Union[list[fx.Node], None]:
    """The mask's subgraph when the mask is shown causal at every probe (conditions 2-4), else None."""
    q_shape, k_shape = _shape(query), _shape(key)
    if q_shape is None or k_shape is None or len(q_shape) < 2 or len(k_shape) < 2:
        return None
    q_dims = [_symbol(d) for d in q_shape[:-1]]
    k_seq = _symbol(k_shape[-2])
    if None in q_dims or k_seq is None:
        return None
    ends = {q_dims[-1], k_seq}
    statics = {e for e in ends if isinstance(e, int)}
    if len(statics) > 1:
        return None  # never equal: causal_sdpa would always fall back
    nodes = _mask_subgraph(mask)
    if nodes is None:
        return None
    found = _sizes([_shape(n) or (None,) for n in nodes if n.op == "placeholder"] + [q_shape[:-1], k_shape[-2:-1]])
    if found is None:
        return None
    symbols, hints = found
    wanted = [*PROBE_LENGTHS, *lengths, *(c + d for c in _constants(nodes) for d in (1, 2))]
    probes = _probes(ends - statics, next(iter(statics), None), symbols, hints, wanted)
    if probes is None:
        return None
    for sizes in probes:
        target = tuple(sizes[d] if isinstance(d, str) else d for d in q_dims)
        value = _evaluate(nodes, sizes)
        if value is None or not _causal_pattern(value, (*target, target[-1])):
            return None
    return nodes


def _rewritable(node: fx.Node) -> Union[dict[str, Any], None]:
    """The bound SDPA arguments when the node is a candidate (condition 1), else None."""
    if node.op != "call_function" or node.target is not _SDPA:
        return None
    bound = _bind(node)
    mask, dropout, causal = bound.get("attn_mask"), bound.get("dropout_p"), bound.get("is_causal")
    if not isinstance(mask, fx.Node) or causal is not False or not isinstance(dropout, (int, float)) or dropout != 0:
        return None
    return bound


def _replacement(graph: fx.Graph, bound: dict[str, Any]) -> fx.Node:
    """The new call: plain ``is_causal`` SDPA when the two lengths are one symbol, else :func:`causal_sdpa`."""
    query, key, value, mask = bound["query"], bound["key"], bound["value"], bound["attn_mask"]
    if _symbol(_shape(query)[-2]) == _symbol(_shape(key)[-2]):
        kwargs = {name: bound[name] for name, default in (("scale", None), ("enable_gqa", False))
                  if bound[name] != default}
        return graph.call_function(_SDPA, (query, key, value, None, bound["dropout_p"], True), kwargs)
    return graph.call_function(
        causal_sdpa,
        (query, key, value, mask),
        {"dropout_p": bound["dropout_p"], "scale": bound["scale"], "enable_gqa": bound["enable_gqa"]},
    )


def _pure(node: fx.Node) -> bool:
    target = node.target
    if isinstance(target, OpOverload):
        return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags
    return getattr(target, "__module__", None) == "_operator"


def _erase_unused(graph: fx.Graph, nodes: set[fx.Node]) -> None:
    """Erase the nodes of the mask subgraphs that nothing reads any more, users first."""
    for node in reversed(graph.nodes):
        if node in nodes and node.op == "call_function" and not node.users and _pure(node):
            graph.erase_node(node)


class CausalAttention(GraphPass):
    """Rewrite SDPA calls whose mask is shown causal to ``is_causal=True`` (see the module docstring).

    A call whose query and key lengths are one size symbol (self-attention) becomes
    ``aten.scaled_dot_product_attention(q, k, v, None, dropout_p, True, ...)`` and the mask's
    subgraph goes once nothing else reads it; any other becomes a :func:`causal_sdpa` call.
    ``modified`` is False when no call was shown causal.

    Args:
        lengths: further sequence lengths to check each mask at, e.g. one past a model's
            sliding window or attention chunk (the caller knows the model's config; this pass
            does not). A length beyond :data:`MAX_PROBE_LENGTH` leaves every node as it is.
    """

    def __init__(self, lengths: Iterable[int] = ()) -> None:
        self.lengths = tuple(int(n) for n in lengths)

    def rewrite(self, gm: fx.GraphModule) -> bool:
        verdicts: dict[tuple, Union[list[fx.Node], None]] = {}
        masks: set[fx.Node] = set()
        for node in list(gm.graph.nodes):
            bound = _rewritable(node)
            if bound is None:
                continue
            query, key, mask = bound["query"], bound["key"], bound["attn_mask"]
            cache = (mask, tuple(map(str, _shape(query) or ())), tuple(map(str, _shape(key) or ())))
            if cache not in verdicts:
                verdicts[cache] = _verdict(query, key, mask, self.lengths)
            if verdicts[cache] is None:
                continue
            with gm.graph.inserting_before(node):
                new = _replacement(gm.graph, bound)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            masks.update(verdicts[cache])
        _erase_unused(gm.graph, masks)
        return bool(masks)
