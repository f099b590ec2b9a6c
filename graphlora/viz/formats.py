"""Text writers for a view: GraphML and node-link JSON (through networkx), DOT, Mermaid.

Each ``write_*`` takes a view (``networkx.DiGraph`` from :func:`graphlora.to_networkx`) and a
path; each ``*_text`` returns the document as a string.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import networkx as nx

from .style import (
    EDGE,
    REMOVED,
    SWITCH,
    adapter_colors,
    adapter_names,
    look,
    node_lines,
)

__all__ = ["graphml_ready", "write_graphml", "node_link", "json_text", "dot_text", "mermaid_text"]


def _scalar(value: Any) -> Any:
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return str(value)


def graphml_ready(g: nx.DiGraph) -> nx.DiGraph:
    """A copy of ``g`` GraphML can hold: lists become JSON strings, ``None`` values are dropped."""
    out = nx.DiGraph()
    out.graph.update({k: _scalar(v) for k, v in g.graph.items() if v is not None})
    for n, attrs in g.nodes(data=True):
        out.add_node(str(n), **{k: _scalar(v) for k, v in attrs.items() if v is not None})
    for u, v, attrs in g.edges(data=True):
        out.add_edge(str(u), str(v), **{k: _scalar(x) for k, x in attrs.items() if x is not None})
    return out


def write_graphml(g: nx.DiGraph, path: str | Path) -> None:
    """GraphML through ``networkx.write_graphml`` (list attributes stored as JSON strings)."""
    nx.write_graphml(graphml_ready(g), str(path))


def node_link(g: nx.DiGraph) -> dict:
    """networkx's node-link data with the edge list under ``"edges"``."""
    try:
        return nx.node_link_data(g, edges="edges")
    except TypeError:  # networkx < 3.4 names the argument ``link``
        return nx.node_link_data(g, link="edges")


def json_text(g: nx.DiGraph) -> str:
    """Node-link JSON; read it back with ``networkx.node_link_graph(data, edges="edges")``."""
    return json.dumps(node_link(g), indent=1, default=str)


# ---------------------------------------------------------------------------- DOT
def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot_label(lines) -> str:
    body = "".join(line.text.replace("\\", "\\\\").replace('"', '\\"') + "\\l" for line in lines)
    return f'"{body}"'


def _edge_style(g: nx.DiGraph, u: Hashable, v: Hashable, colors: Mapping) -> tuple[str, bool]:
    """(colour, dashed) of an edge: removed edges red and dashed, adapter edges in the adapter's colour."""
    if g[u][v].get("status") == "removed":
        return REMOVED, True
    for end in (v, u):
        attrs = g.nodes[end]
        if attrs.get("role") == "adapter":
            return colors.get(attrs.get("adapter", ""), ("", EDGE))[1], False
        if attrs.get("role") == "switch":
            return SWITCH[1], False
    return EDGE, False


def _colors(g: nx.DiGraph) -> dict:
    names = adapter_names(g)
    return adapter_colors(names)


def dot_text(g: nx.DiGraph) -> str:
    """Graphviz DOT: one box per node with its label lines and colours, edges by role."""
    colors = _colors(g)
    title = f"{g.graph.get('title', 'graph')} — {g.graph.get('view', '')} view"
    out = [
        f"digraph {_dot_quote(g.graph.get('view', 'graph'))} {{",
        f'  graph [rankdir=TB, labelloc=t, fontname="DejaVu Sans Mono", fontsize=14, label={_dot_quote(title)}];',
        '  node [shape=box, style="rounded,filled", fontname="DejaVu Sans Mono", fontsize=10];',
        '  edge [color="#94a3b8", arrowsize=0.7];',
    ]
    for n, attrs in g.nodes(data=True):
        lk = look(attrs, colors)
        style = "rounded,filled" + (",dashed" if lk.dash else "") + (",bold" if lk.highlight else "")
        extra = f', peripheries=2, pencolor="{lk.highlight}"' if lk.highlight else ""
        out.append(f"  {_dot_quote(str(n))} [label={_dot_label(node_lines(attrs, colors))}, "
                   f'fillcolor="{lk.fill}", color="{lk.highlight or lk.stroke}", penwidth={lk.stroke_width}, '
                   f'style="{style}"{extra}];')
    for u, v in g.edges:
        color, dashed = _edge_style(g, u, v, colors)
        out.append(f"  {_dot_quote(str(u))} -> {_dot_quote(str(v))} [color=\"{color}\"{', style=dashed' if dashed else ''}];")
    out.append("}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- Mermaid
def _mermaid_text(text: str) -> str:
    """Mermaid entity codes for the characters its labels cannot hold raw."""
    text = text.replace("#", "#35;").replace("&", "#amp;")
    return text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def mermaid_text(g: nx.DiGraph) -> str:
    """A Mermaid ``flowchart TD`` (renders in GitHub/GitLab Markdown inside a ```` ```mermaid ```` block)."""
    colors = _colors(g)
    ids = {n: f"n{i}" for i, n in enumerate(g.nodes)}
    out = ["flowchart TD"]
    classes: dict[tuple, str] = {}
    assignment: dict[str, list[str]] = {}
    for n, attrs in g.nodes(data=True):
        lines = node_lines(attrs, colors)
        label = "<br/>".join(
            (f"<b>{_mermaid_text(line.text)}</b>" if line.bold else _mermaid_text(line.text)) for line in lines
        )
        shape = ('(["', '"])') if attrs.get("role") in ("input", "output", "switch") else ('["', '"]')
        out.append(f"  {ids[n]}{shape[0]}{label}{shape[1]}")
        lk = look(attrs, colors)
        key = (lk.fill, lk.highlight or lk.stroke, lk.stroke_width + (1 if lk.highlight else 0), lk.dash)
        cls = classes.setdefault(key, f"c{len(classes)}")
        assignment.setdefault(cls, []).append(ids[n])
    link_styles = []
    for i, (u, v) in enumerate(g.edges):
        color, dashed = _edge_style(g, u, v, colors)
        out.append(f"  {ids[u]} {'-.->' if dashed else '-->'} {ids[v]}")
        if color != EDGE:
            link_styles.append(f"  linkStyle {i} stroke:{color},stroke-width:1.5px")
    for (fill, stroke, width, dash), cls in classes.items():
        dash_css = f",stroke-dasharray:{dash}" if dash else ""
        out.append(f"  classDef {cls} fill:{fill},stroke:{stroke},stroke-width:{width}px,color:#0f172a{dash_css}")
    for cls, members in assignment.items():
        out.append(f"  class {','.join(members)} {cls}")
    out.extend(link_styles)
    return "\n".join(out) + "\n"
