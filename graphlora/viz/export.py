"""``export_graph``: write a view to a file, the format chosen by the file's suffix."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

import networkx as nx
import torch.fx as fx

from .formats import dot_text, json_text, mermaid_text, write_graphml
from .graph import VizError, to_networkx
from .html import render_html
from .render import render_svg

__all__ = ["FORMATS", "export_graph", "auto_rows"]

FORMATS = (".graphml", ".json", ".dot", ".mmd", ".svg", ".html")
ENGINES = ("graphlora", "graphviz")


def auto_rows(g: nx.DiGraph) -> Union[int, None]:
    """Wrap long modules views into columns (14 layers each); op-level views stay one column."""
    return 14 if g.graph.get("view") == "modules" else None


def _details(gm: fx.GraphModule, g: nx.DiGraph) -> dict:
    """Module node -> its ops as a ``full``-view subgraph (what the HTML page expands to)."""
    full = to_networkx(gm, "full")
    out = {}
    for n, attrs in g.nodes(data=True):
        if attrs.get("role") == "module" and attrs.get("ops"):
            sub = full.subgraph(attrs["ops"]).copy()
            sub.graph.update(full.graph)
            out[n] = sub
    return out


def _graphviz_svg(g: nx.DiGraph) -> str:
    dot = shutil.which("dot")
    if dot is None:
        raise VizError("engine='graphviz' needs Graphviz's `dot` on PATH (apt-get install graphviz); "
                       "or use engine='graphlora' (the built-in layout).")
    done = subprocess.run([dot, "-Tsvg"], input=dot_text(g), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise VizError(f"Graphviz failed ({done.returncode}): {done.stderr.strip()[:300]}")
    return done.stdout


def export_graph(
    gm: Union[fx.GraphModule, nx.DiGraph],
    path: Union[str, Path],
    view: str = "modules",
    *,
    depth: Union[int, None] = None,
    within: Union[str, None] = None,
    fold: Union[int, str, None] = "auto",
    max_rows: Union[int, None, str] = "auto",
    engine: str = "graphlora",
    example_inputs: Any = None,
) -> Path:
    """Write a view of ``gm`` to ``path``; the suffix picks the format.

    ``.graphml`` and ``.json`` (node-link) go through networkx; ``.dot`` is Graphviz source;
    ``.mmd`` is a Mermaid flowchart for Markdown; ``.svg`` and ``.html`` are drawn by graphlora
    with a layered layout (``engine="graphviz"`` draws the SVG with system Graphviz instead).

    Args:
        gm: an :class:`~graphlora.AdaptedGraphModule` (or any GraphModule), or a view already
            built with :func:`graphlora.to_networkx` / :func:`graphlora.before_after`.
        path: the file to write; parent folders are created.
        view, depth, within, example_inputs: as for :func:`graphlora.to_networkx` (ignored when
            ``gm`` is already a graph).
        fold: SVG/HTML: fold the out-edges of nodes with at least this many consumers.
        max_rows: SVG/HTML: wrap into columns of this many layers; ``"auto"`` wraps modules views
            at 14; ``None`` never wraps.
        engine: ``"graphlora"`` (built-in layout) or ``"graphviz"`` (SVG only; needs ``dot``).

    Returns:
        The path written.

    Raises:
        VizError: an unknown suffix, view or engine (the message lists the valid ones).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise VizError(f"unknown graph format {path.suffix or '(no suffix)'!r} for {str(path)!r}; "
                       f"name the file with one of {', '.join(FORMATS)}.")
    if engine not in ENGINES:
        raise VizError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}.")
    if isinstance(gm, nx.DiGraph):
        g, module = gm, None
    else:
        g, module = to_networkx(gm, view, depth, within=within, example_inputs=example_inputs), gm
    rows = auto_rows(g) if max_rows == "auto" else max_rows
    path.parent.mkdir(parents=True, exist_ok=True)
    writers: dict[str, Callable[[], str]] = {
        ".json": lambda: json_text(g),
        ".dot": lambda: dot_text(g),
        ".mmd": lambda: mermaid_text(g),
        ".svg": lambda: _graphviz_svg(g) if engine == "graphviz" else render_svg(g, fold=fold, max_rows=rows),
        ".html": lambda: render_html(
            g, _details(module, g) if module is not None and g.graph.get("view") == "modules" else None,
            fold=fold, max_rows=rows),
    }
    if suffix == ".graphml":
        write_graphml(g, path)
    else:
        path.write_text(writers[suffix](), encoding="utf-8")
    return path
