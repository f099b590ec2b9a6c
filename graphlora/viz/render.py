"""Draw a view (from :mod:`graphlora.viz.graph`) as a standalone SVG with a layered layout.

No system Graphviz needed: geometry comes from :func:`graphlora.viz.layout.layered_layout`,
looks from :mod:`graphlora.viz.style`. Nodes with many consumers (rotary tables, masks,
shared weights) have their out-edges *folded*: not drawn, counted on the node and listed in
its tooltip, so a 32-block chain stays a chain.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

import networkx as nx

from .layout import Layout, layered_layout
from .style import (
    ADDED,
    EDGE,
    FONT,
    REMOVED,
    SWITCH,
    Line,
    Look,
    adapter_colors,
    adapter_names,
    legend,
    look,
    node_lines,
)

__all__ = ["Drawing", "auto_fold", "draw", "render_svg"]

CHAR_W = 7.5  # DejaVu Sans Mono advance at 12px is 0.602 em; headroom for fallback glyphs
SMALL_W = 6.9  # at 11px
LINE_H = 15.0
SMALL_H = 14.0
PAD_X = 10.0
PAD_Y = 6.0


@dataclass
class Drawing:
    """An SVG document and what it was drawn from (node ids in drawing order, folded fan-outs)."""

    svg: str
    ids: list[Hashable]
    folded: dict[Hashable, list[Hashable]]
    width: float
    height: float


def _line_width(line: Line) -> float:
    return len(line.text) * (SMALL_W if line.small else CHAR_W)


def _size(lines: list[Line]) -> tuple[float, float]:
    w = max((_line_width(line) for line in lines), default=40.0) + 2 * PAD_X
    h = sum(SMALL_H if line.small else LINE_H for line in lines) + 2 * PAD_Y
    return max(w, 48.0), h


def auto_fold(g: nx.DiGraph) -> int:
    """Default fold threshold: 4 consumers in a modules view, 10 in op-level views."""
    return 4 if g.graph.get("view") == "modules" else 10


def _folded(g: nx.DiGraph, fold: int | str | None) -> dict[Hashable, list[Hashable]]:
    """Nodes whose out-edges get folded: at least ``fold`` consumers (diff edges never fold)."""
    fold = auto_fold(g) if fold == "auto" else fold
    if not fold:
        return {}
    out = {}
    for n in g.nodes:
        targets = [v for v in g.successors(n) if g[n][v].get("status", "kept") == "kept"]
        if len(targets) >= fold and g.nodes[n].get("role") != "switch":
            out[n] = targets
    return out


def _edge_color(g: nx.DiGraph, u: Hashable, v: Hashable, colors: Mapping[str, tuple[str, str]]) -> tuple[str, str]:
    """(colour, dash) of edge ``u -> v``."""
    status = g[u][v].get("status")
    if status == "removed":
        return REMOVED, "6 4"
    for end in (v, u):
        attrs = g.nodes[end]
        if attrs.get("role") == "adapter":
            return colors.get(attrs.get("adapter", ""), ("", EDGE))[1], ""
    if g.nodes[v].get("role") == "switch" or g.nodes[u].get("role") == "switch":
        return SWITCH[1], ""
    if status == "added":
        return ADDED, ""
    return EDGE, ""


def _curve(points: list[tuple[float, float]]) -> str:
    """A smooth path through ``points`` with vertical tangents at each point."""
    (x0, y0), rest = points[0], points[1:]
    d = [f"M{x0:.1f},{y0:.1f}"]
    px, py = x0, y0
    for x, y in rest:
        dy = max(abs(y - py) * 0.5, 12.0)
        sy = 1 if y >= py else -1
        d.append(f"C{px:.1f},{py + sy * dy:.1f} {x:.1f},{y - sy * dy:.1f} {x:.1f},{y:.1f}")
        px, py = x, y
    return " ".join(d)


def _stub(x: float, y0: float, y1: float, text: str, color: str, marker_id: str, text_y: float) -> str:
    """A short vertical arrow with a caption: one end of an edge that continues in another column."""
    return (f'<path d="M{x:.1f},{y0:.1f} L{x:.1f},{y1:.1f}" stroke="{color}" stroke-width="1.3" '
            f'marker-end="url(#{marker_id})"/><text x="{x + 6:.1f}" y="{text_y:.1f}" font-size="10" '
            f'fill="#64748b">{escape(text)}</text>')


def _tooltip(attrs: Mapping, folded: list | None, g: nx.DiGraph) -> str:
    keys = ("path", "module_type", "num_ops", "name", "op", "target", "shape", "dtype", "module", "role",
            "adapter", "site", "status")
    rows = [f"{k}: {attrs[k]}" for k in keys if attrs.get(k) not in (None, "", [])]
    if attrs.get("sites"):
        rows.append("adapted sites:")
        rows += [f"  {s}" for s in attrs["sites"]]
    if folded:
        rows.append(f"feeds {len(folded)} nodes (edges folded):")
        rows += [f"  {g.nodes[t].get('label', t)}" for t in folded[:40]]
        if len(folded) > 40:
            rows.append(f"  … {len(folded) - 40} more")
    return "\n".join(rows)


def _text_lines(lines: list[Line], x_left: float, y_top: float) -> list[str]:
    out = []
    y = y_top + PAD_Y
    for line in lines:
        h = SMALL_H if line.small else LINE_H
        y += h
        size = 11 if line.small else 12
        weight = ' font-weight="bold"' if line.bold else ""
        spans = "".join(
            f'<tspan fill="{c}" font-weight="bold">{escape(t)}</tspan>' if c else escape(t)
            for t, c in line.parts
        )
        out.append(f'<text x="{x_left + PAD_X:.1f}" y="{y - 3.5:.1f}" font-size="{size}"{weight} '
                   f'fill="#0f172a" xml:space="preserve">{spans}</text>')
    return out


def _legend_svg(items: list[tuple[str, Look]], title: str, width: float) -> tuple[list[str], float]:
    """Title and legend rows at the top; returns elements and the band's height."""
    out = [f'<text x="20" y="28" font-size="16" font-weight="bold" fill="#0f172a">{escape(title)}</text>']
    x, y = 20.0, 44.0
    for caption, lk in items:
        w = 22 + len(caption) * SMALL_W + 18
        if x + w > max(width, 400) - 10 and x > 20:
            x, y = 20.0, y + 22
        if lk.highlight:
            out.append(f'<rect x="{x - 2:.1f}" y="{y - 2:.1f}" width="20" height="16" rx="4" fill="none" '
                       f'stroke="{lk.highlight}" stroke-width="2.5"/>')
        dash = f' stroke-dasharray="{lk.dash}"' if lk.dash else ""
        out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="16" height="12" rx="{min(lk.radius, 6)}" '
                   f'fill="{lk.fill}" stroke="{lk.stroke}" stroke-width="{lk.stroke_width}"{dash}/>')
        out.append(f'<text x="{x + 22:.1f}" y="{y + 10:.1f}" font-size="11" fill="#334155">{escape(caption)}</text>')
        x += w
    return out, y + 26


def draw(
    g: nx.DiGraph,
    *,
    title: str | None = None,
    fold: int | str | None = "auto",
    max_rows: int | None = None,
    show_legend: bool = True,
) -> Drawing:
    """Lay out and draw ``g`` (any graphlora view).

    Args:
        g: a view from :func:`graphlora.to_networkx`.
        title: heading text (default: the graph's ``title`` and ``view``).
        fold: fold the out-edges of nodes with at least this many consumers (``None``: draw all;
            ``"auto"``: 4 in a modules view, 10 in op-level views).
        max_rows: wrap the layers into columns of at most this many (``None``: one column).
        show_legend: draw the title and legend band.
    """
    view = g.graph.get("view", "full")
    adapters = adapter_names(g)
    colors = adapter_colors(adapters)
    folded = _folded(g, fold)
    hidden = {(u, v) for u, targets in folded.items() for v in targets}
    labels = {}
    for n, attrs in g.nodes(data=True):
        lines = node_lines(attrs, colors)
        if n in folded:
            lines.append(Line(((f"⇉ feeds {len(folded[n])} nodes (edges folded)", "#64748b"),), small=True))
        labels[n] = lines
    sizes = {n: _size(lines) for n, lines in labels.items()}
    lay: Layout = layered_layout(g, sizes, max_rows=max_rows, hidden=hidden)
    items = legend(view, adapters, colors) if show_legend else []
    heading = title if title is not None else f"{g.graph.get('title', 'graph')} — {view} view"
    band, band_h = _legend_svg(items, heading, max(lay.width, len(heading) * 9.8 + 40)) if show_legend else ([], 0.0)
    width = max(lay.width, (len(heading) * 9.8 + 40) if show_legend else 0.0)
    height = lay.height + band_h
    body: list[str] = []
    markers = {}

    def marker(color: str) -> str:
        if color not in markers:
            markers[color] = f"arrow{len(markers)}"
        return markers[color]

    body.append(f'<g class="edges" transform="translate(0,{band_h:.1f})">')
    for (u, v), pts in lay.edges.items():
        color, dash = _edge_color(g, u, v, colors)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        a, b = lay.boxes[u], lay.boxes[v]
        if a.column != b.column:  # wrapped layout: a stub out of u and a stub into v, each naming the other end
            body.append(_stub(a.x, a.bottom, a.bottom + 16, f"↪ {g.nodes[v].get('label', v)}", color,
                              marker(color), a.bottom + 28))
            body.append(_stub(b.x, b.top - 18, b.top, f"{g.nodes[u].get('label', u)} ↩", color,
                              marker(color), b.top - 22))
            continue
        body.append(f'<path d="{_curve(pts)}" fill="none" stroke="{color}" stroke-width="1.3"{dash_attr} '
                    f'marker-end="url(#{marker(color)})" data-u={quoteattr(str(u))} data-v={quoteattr(str(v))}/>')
    body.append("</g>")
    body.append(f'<g class="nodes" transform="translate(0,{band_h:.1f})">')
    ids = list(g.nodes)
    for i, n in enumerate(ids):
        attrs, box = g.nodes[n], lay.boxes[n]
        lk = look(attrs, colors)
        x0, y0 = box.x - box.w / 2, box.top
        body.append(f'<g class="node" id="n{i}" data-id={quoteattr(str(n))} data-role="{escape(attrs.get("role", ""))}">')
        body.append(f"<title>{escape(_tooltip(attrs, folded.get(n), g))}</title>")
        if lk.highlight:
            body.append(f'<rect x="{x0 - 3.5:.1f}" y="{y0 - 3.5:.1f}" width="{box.w + 7:.1f}" height="{box.h + 7:.1f}" '
                        f'rx="{lk.radius + 3}" fill="none" stroke="{lk.highlight}" stroke-width="2.5"/>')
        dash = f' stroke-dasharray="{lk.dash}"' if lk.dash else ""
        if n in folded:
            dash = ' stroke-dasharray="6 3"'
        body.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{box.w:.1f}" height="{box.h:.1f}" rx="{lk.radius}" '
                    f'fill="{lk.fill}" stroke="{lk.stroke}" stroke-width="{lk.stroke_width}"{dash}/>')
        body.extend(_text_lines(labels[n], x0, y0))
        body.append("</g>")
    body.append("</g>")
    defs = "".join(
        f'<marker id="{mid}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        f'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{color}"/></marker>'
        for color, mid in markers.items()
    )
    svg = "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{FONT}">',
        f"<defs>{defs}</defs>",
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="#ffffff"/>',
        *band,
        *body,
        "</svg>",
    ])
    return Drawing(svg, ids, folded, width, height)


def render_svg(g: nx.DiGraph, **kwargs) -> str:
    """The SVG document of ``g`` (see :func:`draw` for the options)."""
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + draw(g, **kwargs).svg + "\n"
