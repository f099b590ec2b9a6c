"""Build networkx views of an (adapted) FX graph.

Three views, all ``networkx.DiGraph`` with plain JSON/GraphML-friendly attributes
(strings, ints, bools; lists only where noted):

- ``full``: one node per FX node. Attributes: ``name``, ``op``, ``target``, ``shape``,
  ``dtype``, ``module`` (source module path, ``""`` for the root), ``module_type``, ``role``
  (``input`` / ``output`` / ``base`` / ``adapter`` / ``switch``), ``adapter`` and ``site``
  (``""`` on base nodes), ``label``. Edges follow data flow (``arg -> user``).
- ``modules``: FX nodes collapsed by module path cut at ``depth``; edges where tensors cross
  between groups (size-only and unused nodes, :func:`is_plumbing`, are left out) (attribute ``weight``: how many FX edges were collapsed). Module nodes
  (``role="module"``) carry ``path``, ``module_type``, ``num_ops``, ``sites`` (list of
  ``"path adapter:r,..."`` strings), ``adapters`` (list of names) and ``adapted``; inputs and
  the output stay their own nodes.
- ``diff``: the traced graph and the rewritten one merged by node name; every node and edge has
  ``status`` ``kept`` / ``added`` / ``removed`` (see :func:`before_after`).

The graph-level attribute ``view`` names the view; ``title`` describes the model.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Union

import networkx as nx
import torch
import torch.fx as fx

from ..errors import GraphLoraError
from ..passes._compat import OpOverload, OpOverloadPacket

__all__ = ["VIEWS", "VizError", "to_networkx", "before_after", "module_of", "block_depth", "group_path", "is_plumbing"]

VIEWS = ("full", "modules", "diff")
_EMPTY_STACK = "_empty_nn_module_stack"
_STRICT_PREFIX = re.compile(r"^(L\['self'\]\.|L__self___?)")


class VizError(GraphLoraError, ValueError):
    """A visualization argument graphlora cannot use (unknown view, format, depth...)."""


# ---------------------------------------------------------------------------- node facts
def _clean_path(path: str) -> str:
    if path.startswith(_EMPTY_STACK):
        return ""
    return _STRICT_PREFIX.sub("", path)


def _stack_entry(node: fx.Node) -> Union[tuple[str, str], None]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, typ = list(stack.values())[-1][:2]
    typ = typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))
    return _clean_path(str(path)), typ.rsplit(".", 1)[-1]


def _role(node: fx.Node) -> str:
    tag = node.meta.get("graphlora")
    if tag:
        return str(tag.get("role", "adapter"))
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    return "base"


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, OpOverload | OpOverloadPacket):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    if module.startswith("graphlora.passes"):
        module = "graphlora.passes.ops"
    return f"{module}.{name}" if module else name


def _short_op(node: fx.Node) -> str:
    """A short op label: ``linear``, ``mul``, ``lora_switch``, ``fc1``..."""
    if node.op == "call_function":
        target = node.target
        if isinstance(target, OpOverload):
            return target._opname if hasattr(target, "_opname") else str(target).split(".")[1]
        return getattr(target, "__name__", _target_name(node).rsplit(".", 1)[-1])
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "get_attr":
        return str(node.target).rsplit(".", 1)[-1]
    return str(node.target) if node.op == "call_module" else node.op


def _val_facts(node: fx.Node) -> tuple[str, str]:
    """(shape, dtype) as strings from ``meta['val']`` or ``meta['tensor_meta']``; ``""`` if unknown."""
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    if val is None:
        return "", ""
    if isinstance(val, (list, tuple)) and not hasattr(val, "shape"):  # TensorMetadata is a namedtuple
        parts = [_val_facts_of(v) for v in val]
        shapes = [s for s, _ in parts if s]
        dtypes = sorted({d for _, d in parts if d})
        return (", ".join(shapes), ",".join(dtypes)) if shapes else ("", "")
    return _val_facts_of(val)


def _val_facts_of(val: Any) -> tuple[str, str]:
    shape = getattr(val, "shape", None)
    dtype = getattr(val, "dtype", None)
    if shape is not None:
        return "[" + ", ".join(str(d) for d in shape) + "]", str(dtype).replace("torch.", "") if dtype else ""
    if isinstance(val, torch.SymInt | int):
        return "", "int"
    if isinstance(val, torch.SymBool | bool):
        return "", "bool"
    return "", ""


def module_of(gm: fx.GraphModule, graph: Union[fx.Graph, None] = None) -> dict[str, tuple[str, str]]:
    """FX node name -> (module path, module class name) for every node of ``graph``.

    Sources, in order: ``nn_module_stack`` (export); ``call_module`` / ``get_attr`` targets
    (symbolic_trace, lifted weights); nodes graphlora inserted follow their site's base op.
    The root module is ``""``.
    """
    graph = gm.graph if graph is None else graph
    out: dict[str, tuple[str, str]] = {}
    for node in graph.nodes:
        entry = _stack_entry(node)
        if entry is not None:
            out[node.name] = entry
        elif node.op == "call_module":
            out[node.name] = (node.target, _type_name(gm, node.target))
        elif node.op == "get_attr" and not node.meta.get("graphlora"):
            owner = node.target.rsplit(".", 1)[0] if "." in node.target else ""
            out[node.name] = (owner, _type_name(gm, owner))
        else:
            out[node.name] = ("", "")
    # inserted nodes without a stack sit where their site's base op sits
    site_home: dict[str, tuple[str, str]] = {}
    for node in graph.nodes:
        tag = node.meta.get("graphlora")
        if tag and tag.get("role") == "switch" and node.args and isinstance(node.args[0], fx.Node):
            # the switch carries its base op's module stack (lora_linear replaced that op: its
            # first argument is the site's input, which may live in another module)
            site_home[tag["site"]] = out[node.name] if "nn_module_stack" in node.meta else out[node.args[0].name]
    for node in graph.nodes:
        tag = node.meta.get("graphlora")
        if tag and "nn_module_stack" not in node.meta:
            out[node.name] = site_home.get(tag.get("site", ""), (tag.get("site", ""), ""))
    return out


def _type_name(gm: fx.GraphModule, path: str) -> str:
    """Class name of ``gm``'s submodule at ``path``; ``""`` when unknown or a bare container."""
    try:
        name = type(gm.get_submodule(path)).__name__ if path else ""
    except AttributeError:
        return ""
    return "" if name == "Module" else name


def is_plumbing(node: fx.Node) -> bool:
    """Whether ``node`` carries no tensor data flow: a size/bool value, or an op nobody uses.

    Export graphs are full of these (``sym_size`` reads, the ``_guards_fn`` check); the
    ``modules`` view leaves them out so its edges show where tensors go.
    """
    if node.op in ("placeholder", "output"):
        return False
    if not node.users:
        return True
    val = node.meta.get("val")
    return isinstance(val, torch.SymInt | torch.SymBool | torch.SymFloat | int | bool | float)


def _node_attrs(node: fx.Node, home: tuple[str, str]) -> dict[str, Any]:
    tag = node.meta.get("graphlora") or {}
    shape, dtype = _val_facts(node)
    short = _short_op(node)
    role = _role(node)
    return {
        "name": node.name,
        "op": node.op,
        "target": _target_name(node),
        "shape": shape,
        "dtype": dtype,
        "module": home[0],
        "module_type": home[1],
        "role": role,
        "adapter": str(tag.get("adapter") or ""),
        "site": str(tag.get("site") or ""),
        "label": _adapter_label(node, tag) if role == "adapter" else
        node.name if role in ("input", "output") or node.op == "get_attr" else short,
    }


def _adapter_label(node: fx.Node, tag: Mapping[str, Any]) -> str:
    """``model_layers_0_q_proj_default_lora_A_weight`` -> ``lora_A.weight`` (the part after site and adapter)."""
    prefix = f"{str(tag.get('site', '')).replace('.', '_')}_{tag.get('adapter', '')}_"
    rest = node.name[len(prefix):] if node.name.startswith(prefix) else _short_op(node)
    return rest.replace("_weight", ".weight")


# ---------------------------------------------------------------------------- views
def _full(gm: fx.GraphModule, graph: fx.Graph) -> nx.DiGraph:
    homes = module_of(gm, graph)
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name, **_node_attrs(node, homes[node.name]))
    for node in graph.nodes:
        for arg in node.all_input_nodes:
            g.add_edge(arg.name, node.name)
    return g


def block_depth(paths: Iterable[str]) -> Union[int, None]:
    """Depth of the repeated blocks: components up to the first numeric one (``model.layers.0`` -> 3).

    The most common such depth among ``paths`` wins; ``None`` when no path has a numeric part.
    """
    depths = Counter()
    for path in set(paths):
        parts = path.split(".") if path else []
        for i, part in enumerate(parts):
            if part.isdigit():
                depths[i + 1] += 1
                break
    return depths.most_common(1)[0][0] if depths else None


def group_path(path: str, depth: Union[int, None], blocks: Union[int, None]) -> str:
    """The module path ``path`` is collapsed into.

    With an integer ``depth``, the first ``depth`` components. With ``depth=None`` (auto), paths
    inside a repeated block collapse to the block (``model.layers.3``), others to the block
    container's depth less one (``model.embed_tokens``), or their first component when the model
    has no repeated blocks.
    """
    parts = path.split(".") if path else []
    if depth is None:
        if blocks is None:
            depth = 1
        elif len(parts) >= blocks and parts[blocks - 1].isdigit():
            depth = blocks
        else:
            depth = max(1, blocks - 1)
    return ".".join(parts[:depth])


def _adapter_ranks(gm: fx.GraphModule, graph: fx.Graph) -> dict[str, dict[str, int]]:
    """site -> {adapter: rank}, from ``gm.sites`` when the module has it, else from lora_A shapes."""
    ranks: dict[str, dict[str, int]] = defaultdict(dict)
    sites = getattr(gm, "sites", None)
    if sites is not None and not callable(sites):
        for info in sites:
            if info.ranks:
                ranks[info.name].update(info.ranks)
    for node in graph.nodes:  # fills gaps (and covers plain GraphModules)
        tag = node.meta.get("graphlora")
        if not tag or tag.get("role") != "adapter" or not tag.get("adapter"):
            continue
        site, adapter = tag["site"], tag["adapter"]
        if adapter in ranks[site] or node.op != "get_attr" or not node.target.endswith("lora_A.weight"):
            continue
        try:
            ranks[site][adapter] = int(gm.get_parameter(node.target).shape[0])
        except AttributeError:
            continue
    return {s: r for s, r in ranks.items() if r}


def _modules(gm: fx.GraphModule, graph: fx.Graph, depth: Union[int, None]) -> nx.DiGraph:
    homes = module_of(gm, graph)
    blocks = block_depth(p for p, _ in homes.values())
    types: dict[str, str] = {}
    for path, typ in homes.values():
        if path and typ and typ != "Module":
            types.setdefault(path, typ)
    ranks = _adapter_ranks(gm, graph)
    root_label = gm._get_name() if hasattr(gm, "_get_name") else type(gm).__name__

    def key(node: fx.Node) -> str:
        if node.op == "placeholder":
            return f"input:{node.name}"
        if node.op == "output":
            return "output"
        return group_path(homes[node.name][0], depth, blocks) or "(root)"

    g = nx.DiGraph()
    members: dict[str, list[fx.Node]] = defaultdict(list)
    kept = [n for n in graph.nodes if not is_plumbing(n)]
    for node in kept:
        members[key(node)].append(node)
    index = {n: i for i, n in enumerate(graph.nodes)}

    def first_op(nodes: list[fx.Node]) -> int:  # groups in order of their first computation
        return min((index[n] for n in nodes if n.op != "get_attr"), default=index[nodes[0]])

    members = dict(sorted(members.items(), key=lambda item: first_op(item[1])))
    for gid, nodes in members.items():
        if gid.startswith("input:") or gid == "output":
            role = "input" if gid != "output" else "output"
            g.add_node(gid, role=role, path="", label=nodes[0].name, module_type="", num_ops=0,
                       sites=[], adapters=[], adapted=False, ops=[n.name for n in nodes])
            continue
        path = "" if gid == "(root)" else gid
        site_names = list(dict.fromkeys(n.meta["graphlora"]["site"] for n in nodes if n.meta.get("graphlora")))
        sites = [
            f"{s} " + ",".join(f"{a}:{r}" for a, r in ranks.get(s, {}).items())
            for s in site_names
        ]
        adapters = list(dict.fromkeys(a for s in site_names for a in ranks.get(s, {})))
        g.add_node(
            gid, role="module", path=path, label=path or "(root)",
            module_type=types.get(path, root_label if not path else ""),
            num_ops=sum(1 for n in nodes if n.op in ("call_function", "call_method", "call_module")),
            sites=sites, adapters=adapters, adapted=bool(sites), ops=[n.name for n in nodes],
        )
    for node in kept:
        dst = key(node)
        for arg in node.all_input_nodes:
            src = key(arg)
            if src == dst or is_plumbing(arg):
                continue
            if g.has_edge(src, dst):
                g[src][dst]["weight"] += 1
            else:
                g.add_edge(src, dst, weight=1)
    return g


def before_after(gm: fx.GraphModule) -> nx.DiGraph:
    """The traced graph and the rewritten one, merged by node name.

    Nodes and edges get ``status``: ``kept`` (in both), ``added`` (only after the rewrite:
    adapter branches, switch nodes, rerouted uses) or ``removed`` (only before: the base op's
    former direct uses, now routed through the switch, and the base ``linear`` nodes that a
    ``lora_linear`` switch took over together with their edges).

    Raises:
        VizError: ``gm`` has no ``traced_graph`` (it is not an :class:`AdaptedGraphModule`).
    """
    traced = getattr(gm, "traced_graph", None)
    if not isinstance(traced, fx.Graph):
        raise VizError(
            f"before_after needs a graphlora AdaptedGraphModule (it reads gm.traced_graph); got "
            f"{type(gm).__name__}. Build one with graphlora.inject(model, config)."
        )
    before, after = _full(gm, traced), _full(gm, gm.graph)
    g = nx.DiGraph()
    for name, attrs in after.nodes(data=True):
        g.add_node(name, **attrs, status="kept" if name in before else "added")
    for name, attrs in before.nodes(data=True):
        if name not in g:
            g.add_node(name, **attrs, status="removed")
    for u, v in after.edges:
        g.add_edge(u, v, status="kept" if before.has_edge(u, v) else "added")
    for u, v in before.edges:
        if not g.has_edge(u, v):
            g.add_edge(u, v, status="removed")
    return g


def _within(g: nx.DiGraph, prefix: str) -> nx.DiGraph:
    """The subgraph of nodes whose module path is ``prefix`` or below it (plus edges among them)."""
    def inside(attrs: Mapping[str, Any]) -> bool:
        path = attrs.get("module", attrs.get("path", ""))
        return path == prefix or path.startswith(prefix + ".")

    keep = [n for n, a in g.nodes(data=True) if inside(a)]
    if not keep:
        paths = sorted({a.get("module", a.get("path", "")) for _, a in g.nodes(data=True)} - {""})
        from ..errors import closest

        raise VizError(f"within={prefix!r} matches no module path; closest: {closest(prefix, paths)}.")
    sub = g.subgraph(keep).copy()
    sub.graph.update(g.graph)
    return sub


def to_networkx(
    gm: fx.GraphModule,
    view: str = "full",
    depth: Union[int, None] = None,
    *,
    within: Union[str, None] = None,
    example_inputs: Union[tuple, None] = None,
) -> nx.DiGraph:
    """A ``networkx.DiGraph`` view of ``gm``'s graph (see the module docstring for attributes).

    Args:
        gm: a ``torch.fx.GraphModule``; an :class:`~graphlora.AdaptedGraphModule` adds ranks
            and the ``diff`` view.
        view: ``"full"`` (one node per FX node), ``"modules"`` (collapsed by module path) or
            ``"diff"`` (traced vs rewritten, see :func:`before_after`).
        depth: ``modules`` view only: how many path components to keep (``3`` gives
            ``model.layers.0``); ``None`` collapses to the repeated blocks (decoder layers).
        within: keep only nodes whose module path is this path or below it (``full`` / ``diff``
            views: ops; ``modules``: module nodes).
        example_inputs: positional inputs to run ``torch.fx.passes.shape_prop.ShapeProp`` with,
            filling shapes on graphs traced without them (``symbolic_trace``). Optional.

    Raises:
        VizError: unknown ``view``, a bad ``depth``, or a ``within`` that matches nothing.
    """
    if view not in VIEWS:
        raise VizError(f"unknown view {view!r}; use one of {', '.join(VIEWS)}.")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise VizError(f"depth must be a positive int (e.g. 3 for 'model.layers.0') or None for auto; got {depth!r}.")
    if not isinstance(gm, fx.GraphModule):
        raise VizError(f"expected a torch.fx.GraphModule (e.g. from graphlora.inject); got {type(gm).__name__}.")
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        ShapeProp(gm).propagate(*example_inputs)
    if view == "full":
        g = _full(gm, gm.graph)
    elif view == "modules":
        g = _modules(gm, gm.graph, depth)
    else:
        g = before_after(gm)
    adapters = getattr(gm, "adapters", None)
    g.graph.update(view=view, title=_title(gm))
    if isinstance(adapters, Mapping):
        g.graph["adapters"] = list(adapters)
    if view == "modules":
        g.graph["depth"] = depth if depth is not None else "auto"
    return _within(g, within) if within else g


def _title(gm: fx.GraphModule) -> str:
    name = gm._get_name() if hasattr(gm, "_get_name") else type(gm).__name__
    adapters = getattr(gm, "adapters", None)
    if isinstance(adapters, Mapping) and adapters:
        return f"{name} · adapters: {', '.join(adapters)}"
    return name
