"""A layered (Sugiyama-style) layout for directed graphs, in pure Python on networkx.

Steps: break cycles against a node order (FX graphs are already topologically ordered),
assign layers by longest path (sources pulled down next to their first user), split long
edges with dummy points, order each layer by barycenter sweeps, then place x coordinates by
isotonic regression (each node as close to its neighbours' mean as the spacing allows).
Long, narrow layouts can wrap into several columns so a 32-block chain fits a screen.

The result is geometry only: :class:`Layout` holds node boxes and edge polylines; drawing is
:mod:`graphlora.viz.render`'s job.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field

import networkx as nx

__all__ = ["Box", "Layout", "layered_layout"]

Point = tuple[float, float]


@dataclass
class Box:
    """A node's box: centre ``(x, y)``, size ``(w, h)``, layer index and column."""

    x: float
    y: float
    w: float
    h: float
    layer: int
    column: int = 0

    @property
    def top(self) -> float:
        return self.y - self.h / 2

    @property
    def bottom(self) -> float:
        return self.y + self.h / 2


@dataclass
class Layout:
    """Node boxes, edge polylines (source to target, in drawing order) and the canvas size."""

    boxes: dict[Hashable, Box]
    edges: dict[tuple[Hashable, Hashable], list[Point]]
    width: float
    height: float
    reversed_edges: set[tuple[Hashable, Hashable]] = field(default_factory=set)


def _acyclic(g: nx.DiGraph, order: Mapping[Hashable, int]) -> tuple[nx.DiGraph, set]:
    """``g`` with edges that go against ``order`` reversed (self-loops dropped)."""
    dag = nx.DiGraph()
    dag.add_nodes_from(g.nodes)
    flipped = set()
    for u, v in g.edges:
        if u == v:
            continue
        if order[u] > order[v]:
            flipped.add((u, v))
            dag.add_edge(v, u)
        else:
            dag.add_edge(u, v)
    return dag, flipped


def _layers(dag: nx.DiGraph, order: Mapping[Hashable, int], hidden: set) -> dict[Hashable, int]:
    """Longest-path layers, then nodes with more drawn outputs than drawn inputs sink to their first user.

    Sinking a node one layer shortens each drawn out-edge and lengthens each drawn in-edge by one,
    so it pays when outputs outnumber inputs (weights, constants, rotary tables' per-layer views).
    """
    topo = list(nx.lexicographical_topological_sort(dag, key=lambda n: order[n]))
    layer: dict[Hashable, int] = {}
    for n in topo:
        layer[n] = max((layer[p] + 1 for p in dag.predecessors(n)), default=0)

    def drawn(edges) -> int:
        return sum(1 for e in edges if e not in hidden and e[::-1] not in hidden)

    for n in reversed(topo):
        if dag.out_degree(n) and drawn(dag.out_edges(n)) > drawn(dag.in_edges(n)):
            layer[n] = max(layer[n], min(layer[s] for s in dag.successors(n)) - 1)
        elif dag.in_degree(n) == 0 and dag.out_degree(n):
            layer[n] = min(layer[s] for s in dag.successors(n)) - 1
    return layer


def _split_long_edges(dag: nx.DiGraph, layer: dict) -> tuple[dict[int, list], dict, dict]:
    """Per-layer node lists (with dummies), neighbour maps up/down, and each edge's chain."""
    ranks: dict[int, list] = defaultdict(list)
    for n in dag.nodes:
        ranks[layer[n]].append(n)
    up: dict = defaultdict(list)
    down: dict = defaultdict(list)
    chains: dict = {}
    for u, v in dag.edges:
        chain = [u]
        for k in range(layer[u] + 1, layer[v]):
            d = ("__dummy__", u, v, k)
            ranks[k].append(d)
            layer[d] = k
            chain.append(d)
        chain.append(v)
        for a, b in zip(chain, chain[1:]):
            down[a].append(b)
            up[b].append(a)
        chains[(u, v)] = chain
    return ranks, up, down, chains


def _order(ranks: dict[int, list], up: dict, down: dict, sweeps: int) -> dict[int, list]:
    levels = sorted(ranks)
    pos = {n: i for k in levels for i, n in enumerate(ranks[k])}
    for sweep in range(sweeps):
        seq, nbrs = (levels[1:], up) if sweep % 2 == 0 else (levels[-2::-1], down)
        for k in seq:
            def bary(n):
                ns = nbrs.get(n)
                return sum(pos[m] for m in ns) / len(ns) if ns else pos[n]

            ranks[k].sort(key=lambda n: (bary(n), pos[n]))
            for i, n in enumerate(ranks[k]):
                pos[n] = i
    return ranks


def _isotonic(desired: list[float], gaps: list[float]) -> list[float]:
    """Least-squares ``x`` close to ``desired`` with ``x[i+1] - x[i] >= gaps[i]`` (pool adjacent violators)."""
    offset = [0.0]
    for gap in gaps:
        offset.append(offset[-1] + gap)
    target = [d - o for d, o in zip(desired, offset)]
    blocks: list[list[float]] = []  # [mean, count]
    for t in target:
        blocks.append([t, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, c2 = blocks.pop()
            m1, c1 = blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    y = [m for m, c in blocks for _ in range(int(c))]
    return [a + o for a, o in zip(y, offset)]


def _place_x(ranks, up, down, width, gap, passes: int) -> dict:
    x: dict = {}
    for k, nodes in ranks.items():
        cursor = 0.0
        for n in nodes:
            x[n] = cursor + width(n) / 2
            cursor += width(n) + gap
    levels = sorted(ranks)
    for p in range(passes):
        seq, nbrs = (levels, up) if p % 2 == 0 else (levels[::-1], down)
        for k in seq:
            nodes = ranks[k]
            desired = []
            for n in nodes:
                ns = nbrs.get(n) or (down if nbrs is up else up).get(n)
                desired.append(sum(x[m] for m in ns) / len(ns) if ns else x[n])
            gaps = [(width(a) + width(b)) / 2 + gap for a, b in zip(nodes, nodes[1:])]
            for n, v in zip(nodes, _isotonic(desired, gaps)):
                x[n] = v
    return x


def layered_layout(
    g: nx.DiGraph,
    sizes: Mapping[Hashable, tuple[float, float]],
    *,
    node_gap: float = 24.0,
    layer_gap: float = 44.0,
    dummy_width: float = 12.0,
    sweeps: int = 12,
    max_rows: int | None = None,
    hidden: Iterable[tuple[Hashable, Hashable]] | None = None,
    column_gap: float = 80.0,
    margin: float = 20.0,
) -> Layout:
    """Lay ``g`` out top to bottom in layers.

    Args:
        g: the graph; its node order is the tie-breaking order (and the cycle-breaking one).
        sizes: ``(width, height)`` of every node.
        max_rows: wrap into columns of at most this many layers when the layout is long
            (``None``: never wrap).
        hidden: edges that order the layers but are not drawn (no polyline in the result).

    Returns:
        The :class:`Layout`; edge polylines run from the source's bottom to the target's top
        (for edges reversed to break a cycle the points still run source to target).
    """
    order = {n: i for i, n in enumerate(g.nodes)}
    if nx.is_directed_acyclic_graph(g):  # no edge needs flipping: keep them all pointing down
        order = {n: i for i, n in enumerate(nx.lexicographical_topological_sort(g, key=lambda n: order[n]))}
    full_dag, flipped = _acyclic(g, order)
    hidden = set(hidden or ())
    layer = _layers(full_dag, order, hidden)  # hidden edges still order the layers
    dag = nx.DiGraph()
    dag.add_nodes_from(g.nodes)
    dag.add_edges_from((u, v) for u, v in full_dag.edges if (u, v) not in hidden and (v, u) not in hidden)
    ranks, up, down, chains = _split_long_edges(dag, layer)
    ranks = _order(ranks, up, down, sweeps)

    def width(n):
        return dummy_width if isinstance(n, tuple) and n and n[0] == "__dummy__" else sizes[n][0]

    def height(n):
        return 0.0 if isinstance(n, tuple) and n and n[0] == "__dummy__" else sizes[n][1]

    x = _place_x(ranks, up, down, width, node_gap, passes=8)
    levels = sorted(ranks)
    rows = len(levels)
    ncols = 1 if not max_rows or rows <= max_rows else -(-rows // max_rows)
    per_col = -(-rows // ncols) if rows else 1  # balanced columns
    # columns: consecutive runs of layers; each column keeps its own x range
    col_of = {k: i // per_col for i, k in enumerate(levels)}
    col_min = defaultdict(lambda: float("inf"))
    col_max = defaultdict(lambda: float("-inf"))
    for k in levels:
        for n in ranks[k]:
            c = col_of[k]
            col_min[c] = min(col_min[c], x[n] - width(n) / 2)
            col_max[c] = max(col_max[c], x[n] + width(n) / 2)
    col_left = {}
    cursor = margin
    for c in range(ncols):
        col_left[c] = cursor
        cursor += col_max[c] - col_min[c] + column_gap
    total_w = cursor - column_gap + margin
    y: dict = {}
    col_bottom = defaultdict(float)
    top = margin + (30.0 if ncols > 1 else 0.0)  # room for "continued from" stubs
    cursor_y = {c: top for c in range(ncols)}
    for k in levels:
        c = col_of[k]
        h = max((height(n) for n in ranks[k]), default=0.0)
        for n in ranks[k]:
            y[n] = cursor_y[c] + h / 2
            x[n] = x[n] - col_min[c] + col_left[c]
        cursor_y[c] += h + layer_gap
        col_bottom[c] = cursor_y[c] - layer_gap
    total_h = max(col_bottom.values(), default=0.0) + margin
    boxes = {n: Box(x[n], y[n], sizes[n][0], sizes[n][1], layer[n], col_of[layer[n]]) for n in g.nodes}
    edges: dict = {}
    for (u, v), chain in chains.items():
        pts = [(x[n], y[n]) for n in chain]
        a, b = boxes[u], boxes[v]
        pts[0] = (a.x, a.bottom)
        pts[-1] = (b.x, b.top)
        if (v, u) in flipped:
            edges[(v, u)] = pts[::-1]
        else:
            edges[(u, v)] = pts
    return Layout(boxes, edges, total_w, total_h, {(v, u) for (v, u) in flipped})
