"""Presentation rules shared by every writer: colours per role, node label lines, legend entries.

Writers (SVG/HTML, DOT, Mermaid) ask this module how a node looks; they do not decide it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Look", "Line", "look", "adapter_names", "node_lines", "adapter_colors", "legend", "EDGE", "REMOVED", "ADDED", "SWITCH"]

FONT = "DejaVu Sans Mono, Menlo, Consolas, monospace"
EDGE = "#94a3b8"
REMOVED = "#dc2626"
ADDED = "#16a34a"
SWITCH = ("#ede9fe", "#7c3aed")

# (fill, stroke) per role; adapters get a colour of their own from _ADAPTER_PALETTE
_ROLE = {
    "input": ("#dcfce7", "#16a34a"),
    "output": ("#fee2e2", "#dc2626"),
    "base": ("#f8fafc", "#94a3b8"),
    "param": ("#f1f5f9", "#cbd5e1"),
    "module": ("#eff6ff", "#3b82f6"),
    "switch": SWITCH,
}
_ADAPTER_PALETTE = [
    ("#fef3c7", "#d97706"),  # amber
    ("#ccfbf1", "#0d9488"),  # teal
    ("#fce7f3", "#db2777"),  # pink
    ("#ecfccb", "#65a30d"),  # lime
    ("#e0f2fe", "#0284c7"),  # sky
    ("#fae8ff", "#a21caf"),  # fuchsia
]


@dataclass(frozen=True)
class Look:
    """How a node is drawn: fill and stroke colours, stroke width, dashes, corner radius."""

    fill: str
    stroke: str
    stroke_width: float = 1.2
    dash: str = ""
    radius: float = 4.0
    highlight: str = ""  # an outer ring colour (diff view: new nodes)


@dataclass(frozen=True)
class Line:
    """One line of a node label; ``parts`` are ``(text, colour or "")`` runs."""

    parts: tuple[tuple[str, str], ...]
    bold: bool = False
    small: bool = False

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.parts)


def adapter_names(g: Any) -> list[str]:
    """Adapter names of a view in the order they were added (graph attribute), then first seen."""
    names = list(g.graph.get("adapters") or [])
    for _, d in g.nodes(data=True):
        names += [d["adapter"]] if d.get("adapter") else list(d.get("adapters") or [])
    return list(dict.fromkeys(n for n in names if n))


def adapter_colors(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Adapter name -> (fill, stroke), in first-seen order, cycling through the palette."""
    out: dict[str, tuple[str, str]] = {}
    for name in names:
        if name and name not in out:
            out[name] = _ADAPTER_PALETTE[len(out) % len(_ADAPTER_PALETTE)]
    return out


def look(attrs: Mapping[str, Any], colors: Mapping[str, tuple[str, str]]) -> Look:
    """The :class:`Look` of a node from its attributes (any view)."""
    role = attrs.get("role", "base")
    highlight = ADDED if attrs.get("status") == "added" else ""
    dash = "5 3" if attrs.get("status") == "removed" else ""
    if role == "adapter":
        fill, stroke = colors.get(attrs.get("adapter", ""), _ADAPTER_PALETTE[0])
        return Look(fill, stroke, 1.6, dash, 4.0, highlight)
    if role == "switch":
        return Look(*SWITCH, 2.0, dash, 12.0, highlight)
    if role == "module":
        if attrs.get("adapted"):
            first = (attrs.get("adapters") or [""])[0]
            return Look(_ROLE["module"][0], colors.get(first, _ADAPTER_PALETTE[0])[1], 2.4, dash, 6.0, highlight)
        return Look(*_ROLE["module"], 1.2, dash, 6.0, highlight)
    if role == "base" and attrs.get("op") == "get_attr":
        return Look(*_ROLE["param"], 1.0, dash, 2.0, highlight)
    fill, stroke = _ROLE.get(role, _ROLE["base"])
    return Look(fill, stroke, 1.6 if role in ("input", "output") else 1.0, dash,
                10.0 if role in ("input", "output") else 4.0, highlight)


def _short_path(path: str, keep: int = 2) -> str:
    parts = path.split(".")
    return ".".join(parts[-keep:]) if len(parts) > keep else path


def _relative(site: str, group: str) -> str:
    path = site.partition(" ")[0]
    return path[len(group) + 1:] if group and path.startswith(group + ".") else path


def _site_line(site: str, group: str, colors: Mapping[str, tuple[str, str]], pad: int = 0) -> Line:
    """``"model.layers.0.self_attn.q_proj default:8,pred:4"`` -> ``self_attn.q_proj  default r8  pred r4``."""
    ranks = site.partition(" ")[2]
    parts: list[tuple[str, str]] = [("◆ " + _relative(site, group).ljust(pad), "")]
    for item in filter(None, ranks.split(",")):
        name, _, r = item.rpartition(":")
        parts.append(("  ", ""))
        parts.append((f"{name} r{r}", colors.get(name, ("", ""))[1]))
    return Line(tuple(parts), small=True)


def node_lines(attrs: Mapping[str, Any], colors: Mapping[str, tuple[str, str]], *, max_sites: int = 12) -> list[Line]:
    """Label lines of a node: bold title first, then details (shape, type, adapted sites)."""
    role = attrs.get("role", "base")
    if role == "module" or "num_ops" in attrs:
        if role in ("input", "output"):
            return [Line(((attrs.get("label", ""), ""),), bold=True)]
        lines = [Line(((attrs.get("label", ""), ""),), bold=True)]
        detail = " · ".join(x for x in (attrs.get("module_type", ""), f"{attrs.get('num_ops', 0)} op{'' if attrs.get('num_ops') == 1 else 's'}") if x)
        lines.append(Line(((detail, ""),), small=True))
        sites = list(attrs.get("sites") or [])
        pad = max((len(_relative(site, attrs.get("path", ""))) for site in sites[:max_sites]), default=0)
        for site in sites[:max_sites]:
            lines.append(_site_line(site, attrs.get("path", ""), colors, pad))
        if len(sites) > max_sites:
            lines.append(Line(((f"… {len(sites) - max_sites} more adapted sites", ""),), small=True))
        return lines
    shape = attrs.get("shape", "")
    if role in ("input", "output"):
        lines = [Line(((attrs.get("name", ""), ""),), bold=True)]
    elif attrs.get("op") == "get_attr":
        lines = [Line(((_short_path(attrs.get("target", ""), 2), ""),))]
    elif role == "switch":
        lines = [Line((("switch ", ""), (_short_path(attrs.get("site", ""), 2), "")), bold=True)]
    elif role == "adapter":
        color = colors.get(attrs.get("adapter", ""), ("", ""))[1]
        lines = [Line(((attrs.get("label", ""), ""), ("  " + attrs.get("adapter", ""), color)), bold=True)]
    else:
        lines = [Line(((attrs.get("label", ""), ""),), bold=True)]
    if shape:
        lines.append(Line(((shape + (f" {attrs['dtype']}" if attrs.get("dtype") and role != "base" else ""), ""),), small=True))
    return lines


def legend(view: str, adapters: Sequence[str], colors: Mapping[str, tuple[str, str]]) -> list[tuple[str, Look]]:
    """``(caption, look)`` entries for the legend of ``view``."""
    items: list[tuple[str, Look]] = [("input", look({"role": "input"}, colors))]
    if view == "modules":
        items.append(("module", look({"role": "module"}, colors)))
        items.append(("module with adapters (◆ site)", look({"role": "module", "adapted": True,
                                                              "adapters": list(adapters[:1])}, colors)))
    else:
        items.append(("op", look({"role": "base"}, colors)))
        items.append(("weight / buffer", look({"role": "base", "op": "get_attr"}, colors)))
    for name in adapters:
        items.append((f"adapter '{name}'", look({"role": "adapter", "adapter": name}, colors)))
    if view != "modules":
        items.append(("switch (base + adapters)", look({"role": "switch"}, colors)))
    if view == "diff":
        items.append(("new in rewrite", Look("#ffffff", EDGE, 1.0, "", 4.0, ADDED)))
        items.append(("removed edge", Look("#ffffff", REMOVED, 1.4, "5 3", 4.0)))
    items.append(("output", look({"role": "output"}, colors)))
    return items
