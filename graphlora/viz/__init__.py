"""Visualization: networkx views of where adapters sit, and files people can read.

>>> import graphlora
>>> g = graphlora.to_networkx(gm, view="modules")          # networkx.DiGraph
>>> graphlora.export_graph(gm, "model.svg", view="modules")  # .graphml .json .dot .mmd .svg .html
"""

from .graph import VIEWS, VizError, before_after, to_networkx

__all__ = ["VIEWS", "VizError", "before_after", "to_networkx"]
