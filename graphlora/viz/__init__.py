"""Visualization: networkx views of where adapters sit, and files people can read.

>>> import graphlora
>>> g = graphlora.to_networkx(gm, view="modules")            # networkx.DiGraph
>>> graphlora.export_graph(gm, "model.svg", view="modules")  # .graphml .json .dot .mmd .svg .html
>>> graphlora.export_graph(gm, "rewrite.html", view="diff", within="model.layers.0.self_attn")

Modules, one job each: :mod:`.graph` (views), :mod:`.layout` (layered layout), :mod:`.style`
(colours, labels, legend), :mod:`.render` (SVG), :mod:`.html` (interactive page),
:mod:`.formats` (GraphML, JSON, DOT, Mermaid), :mod:`.export` (``export_graph``).
"""

from .export import FORMATS, export_graph
from .graph import VIEWS, VizError, before_after, to_networkx
from .html import render_html
from .render import render_svg

__all__ = ["FORMATS", "VIEWS", "VizError", "before_after", "export_graph", "render_html", "render_svg", "to_networkx"]
