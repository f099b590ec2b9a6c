"""A self-contained interactive HTML page for a view: inline SVG, inline JS, no CDN.

- zoom (buttons, ctrl+wheel) and fit; a search box that highlights matching nodes;
- click a node: its details (and, through folded edges too, its neighbours) light up;
- modules view: a module expands into its ops (double-click, or the button in the side panel):
  an op-level drawing of that module, laid out in Python and kept in a ``<template>``, so the
  page works offline; "back" returns to the whole graph. ``page.html#model.layers.1`` opens
  with that node selected, ``page.html?expand#model.layers.1`` with it expanded.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping
from xml.sax.saxutils import escape

import networkx as nx

from .render import draw

__all__ = ["render_html"]

_CSS = """
:root { font-family: DejaVu Sans Mono, Menlo, Consolas, monospace; color: #0f172a; }
body { margin: 0; background: #f8fafc; }
header { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid #e2e8f0;
         padding: 8px 16px; display: flex; gap: 12px; align-items: center; flex-wrap: wrap; }
header h1 { font-size: 15px; margin: 0 12px 0 0; }
button { font: inherit; padding: 2px 10px; border: 1px solid #cbd5e1; background: #fff; border-radius: 4px; cursor: pointer; }
input[type=search] { font: inherit; padding: 3px 8px; border: 1px solid #cbd5e1; border-radius: 4px; width: 240px; }
#hint { color: #64748b; font-size: 12px; }
main { display: flex; align-items: flex-start; }
#canvas { flex: 1 1 auto; overflow: auto; height: calc(100vh - 48px); }
#canvas svg { display: block; }
#panel { flex: 0 0 420px; height: calc(100vh - 48px); overflow: auto; background: #fff;
         border-left: 1px solid #e2e8f0; padding: 10px 14px; box-sizing: border-box; }
#panel h2 { font-size: 14px; margin: 4px 0 8px; word-break: break-all; }
#panel pre { font-size: 11px; white-space: pre-wrap; background: #f1f5f9; padding: 8px; border-radius: 4px; }
#panel-graph svg { max-width: 100%; height: auto; border: 1px solid #e2e8f0; border-radius: 4px; margin-top: 8px; }
#where { font-weight: bold; color: #7c3aed; }
g.node { cursor: pointer; }
g.node.dim { opacity: 0.25; }
g.node.match > rect:first-of-type, g.node.sel > rect:first-of-type { stroke: #e11d48 !important; stroke-width: 3 !important; }
g.node.near > rect:first-of-type { stroke: #e11d48 !important; stroke-dasharray: 4 2; stroke-width: 2.5 !important; }
"""

_JS = """
(function () {
  var data = JSON.parse(document.getElementById('graph-data').textContent);
  var canvas = document.getElementById('canvas');
  var mainView = canvas.firstElementChild, svg, baseW, baseH, scale = 1;
  function show(view, label) {
    canvas.innerHTML = ''; canvas.appendChild(view);
    svg = canvas.querySelector('svg');
    baseW = parseFloat(svg.getAttribute('width')); baseH = parseFloat(svg.getAttribute('height'));
    zoom(1);
    document.getElementById('back').hidden = view === mainView;
    document.getElementById('where').textContent = label || '';
  }
  function zoom(s) {
    scale = Math.max(0.05, Math.min(4, s));
    svg.setAttribute('width', baseW * scale); svg.setAttribute('height', baseH * scale);
  }
  document.getElementById('zoom-in').onclick = function () { zoom(scale * 1.25); };
  document.getElementById('zoom-out').onclick = function () { zoom(scale / 1.25); };
  document.getElementById('zoom-fit').onclick = function () {
    var c = document.getElementById('canvas');
    zoom(Math.min(c.clientWidth / baseW, c.clientHeight / baseH));
  };
  document.getElementById('canvas').addEventListener('wheel', function (e) {
    if (!e.ctrlKey) return;
    e.preventDefault(); zoom(scale * (e.deltaY < 0 ? 1.1 : 1 / 1.1));
  }, { passive: false });
  var nodes = Array.prototype.slice.call(mainView.querySelectorAll('g.node'));
  function clear(cls) { nodes.forEach(function (n) { n.classList.remove(cls); }); }
  document.getElementById('search').addEventListener('input', function () {
    var q = this.value.trim().toLowerCase();
    clear('match'); clear('dim');
    if (!q) return;
    nodes.forEach(function (n) {
      var t = (n.getAttribute('data-id') + ' ' + n.querySelector('title').textContent).toLowerCase();
      n.classList.add(t.indexOf(q) >= 0 ? 'match' : 'dim');
    });
  });
  function select(g) {
    clear('sel'); clear('near');
    g.classList.add('sel');
    var info = data.nodes[g.id] || {};
    (info.near || []).forEach(function (id) { var m = document.getElementById(id); if (m) m.classList.add('near'); });
    document.getElementById('panel-title').textContent = g.getAttribute('data-id');
    document.getElementById('panel-body').innerHTML = '';
    var pre = document.createElement('pre');
    pre.textContent = g.querySelector('title').textContent;
    document.getElementById('panel-body').appendChild(pre);
    var box = document.getElementById('panel-graph');
    box.innerHTML = '';
    var tpl = document.getElementById('ops-' + g.id);
    if (tpl) {
      var open = document.createElement('button');
      open.textContent = 'expand into its ' + info.ops + ' ops (' + info.weights + ' weights)';
      open.onclick = function () { expand(g); };
      box.appendChild(open);
      var thumb = tpl.content.cloneNode(true);
      box.appendChild(thumb);
    }
  }
  function expand(g) {
    var tpl = document.getElementById('ops-' + g.id);
    if (!tpl) return;
    var view = document.createElement('div');
    view.appendChild(tpl.content.cloneNode(true));
    show(view, 'inside ' + g.getAttribute('data-id'));
  }
  nodes.forEach(function (g) {
    g.addEventListener('click', function () { select(g); });
    g.addEventListener('dblclick', function () { expand(g); });
  });
  document.getElementById('back').onclick = function () { show(mainView, ''); };
  show(mainView, '');
  var start = decodeURIComponent((location.hash || '').slice(1));
  nodes.forEach(function (g) {
    if (!start || g.getAttribute('data-id') !== start) return;
    select(g); if (location.search.indexOf('expand') >= 0) expand(g);
  });
})();
"""


def render_html(
    g: nx.DiGraph,
    details: Mapping[Hashable, nx.DiGraph] | None = None,
    *,
    title: str | None = None,
    fold: int | str | None = "auto",
    max_rows: int | None = None,
) -> str:
    """The HTML page of view ``g``.

    Args:
        g: a view from :func:`graphlora.to_networkx`.
        details: node id -> op-level graph to show when that node is expanded (modules view).
        title: page heading (default: the graph's title and view).
        fold, max_rows: as for :func:`graphlora.viz.render.draw`.
    """
    drawing = draw(g, title=title, fold=fold, max_rows=max_rows)
    heading = title or f"{g.graph.get('title', 'graph')} — {g.graph.get('view', '')} view"
    index = {n: f"n{i}" for i, n in enumerate(drawing.ids)}
    info: dict[str, dict] = {}
    templates = []
    for n in drawing.ids:
        near = [index[m] for m in list(g.successors(n)) + list(g.predecessors(n)) if m in index]
        entry: dict = {"near": near}
        sub = (details or {}).get(n)
        if sub is not None and sub.number_of_nodes():
            weights = sum(1 for _, a in sub.nodes(data=True) if a.get("op") == "get_attr")
            entry.update(ops=sub.number_of_nodes() - weights, weights=weights)
            ops_svg = draw(sub, fold=fold, show_legend=False).svg
            templates.append(f'<template id="ops-{index[n]}">{ops_svg}</template>')
        info[index[n]] = entry
    hint = "Click a module for details; double-click (or its expand button) opens its ops." if details else "Click a node for its details."
    payload = json.dumps({"nodes": info}).replace("</", "<\\/")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{escape(heading)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<header>",
        f"<h1>{escape(heading)}</h1>",
        '<button id="zoom-in" title="zoom in">+</button>',
        '<button id="zoom-out" title="zoom out">&#8722;</button>',
        '<button id="zoom-fit" title="fit to window">fit</button>',
        '<input id="search" type="search" placeholder="find a module, op or adapter">',
        '<button id="back" hidden>&#8592; back to the whole graph</button>',
        '<span id="where"></span>',
        f'<span id="hint">{escape(hint)}</span>',
        "</header>",
        "<main>",
        f'<div id="canvas">{drawing.svg}</div>',
        '<aside id="panel"><h2 id="panel-title">Details</h2>'
        f'<div id="panel-body"><p>{escape(hint)}</p></div><div id="panel-graph"></div></aside>',
        "</main>",
        *templates,
        f'<script type="application/json" id="graph-data">{payload}</script>',
        f"<script>{_JS}</script>",
        "</body>",
        "</html>",
        "",
    ])
