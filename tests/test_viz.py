"""graphlora.viz: networkx views, every file format, pictures that are not blank, the CLI."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from collections import Counter
from html.parser import HTMLParser

import networkx as nx
import pytest
import torch
import torch.fx as fx

import graphlora
from graphlora.passes.ops import lora_linear
from graphlora.viz import FORMATS, VizError, before_after, export_graph, to_networkx
from graphlora.viz.layout import _isotonic, layered_layout
from graphlora.viz.style import adapter_colors
from models import FunctionalMLP, tiny_bert, tiny_gpt2, tiny_llama

# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def llama():
    """A 4-layer Llama with two adapters: 'default' (q, v; r=4) and 'pred' (q, down; r=8)."""
    gm = graphlora.inject(tiny_llama(layers=4), graphlora.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    gm.add_adapter("pred", graphlora.LoraConfig(r=8, target_modules=["q_proj", "down_proj"]))
    return gm


@pytest.fixture(scope="module")
def gpt2():
    return graphlora.inject(tiny_gpt2(), graphlora.LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))


@pytest.fixture(scope="module")
def bert():
    return graphlora.inject(tiny_bert(), graphlora.LoraConfig(r=2, target_modules=["query", "value"]))


@pytest.fixture(scope="module")
def models(llama, gpt2, bert):
    return {"llama": llama, "gpt2": gpt2, "bert": bert}


def adapted_paths(gm) -> list[str]:
    return [s.name for s in gm.sites if s.ranks]


def inserted(gm) -> Counter:
    return Counter(n.meta["graphlora"]["role"] for n in gm.graph.nodes if n.meta.get("graphlora"))


# ---------------------------------------------------------------------------- views


def test_modules_view_of_4_layer_llama_is_a_chain_of_blocks(llama):
    g = to_networkx(llama, "modules")
    blocks = sorted(n for n in g if n.startswith("model.layers."))
    assert blocks == [f"model.layers.{i}" for i in range(4)]
    for i, block in enumerate(blocks):
        attrs = g.nodes[block]
        assert attrs["role"] == "module" and attrs["module_type"] == "LlamaDecoderLayer"
        assert attrs["adapted"] and attrs["adapters"] == ["default", "pred"]
        assert sorted(attrs["sites"]) == sorted([
            f"{block}.self_attn.q_proj default:4,pred:8",
            f"{block}.self_attn.v_proj default:4",
            f"{block}.mlp.down_proj pred:8",
        ])
        # data flows block to block, never skipping one
        later = {b for b in g.successors(block) if b in blocks}
        assert later == ({f"model.layers.{i + 1}"} if i < 3 else set())
    assert not g.nodes["model.embed_tokens"]["adapted"]
    assert g.has_edge("input:input_ids", "model.embed_tokens") and g.has_edge("lm_head", "output")
    assert nx.is_directed_acyclic_graph(g)


def test_modules_view_depth(llama):
    g = to_networkx(llama, "modules", depth=4)
    assert {"model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.3.input_layernorm"} <= set(g)
    assert g.nodes["model.layers.0.mlp"]["sites"] == ["model.layers.0.mlp.down_proj pred:8"]
    assert not g.nodes["model.layers.0.input_layernorm"]["adapted"]
    # attention output reaches the MLP through the layer's own residual add and the second norm
    assert nx.has_path(g, "model.layers.0.self_attn", "model.layers.0.mlp")
    assert not nx.has_path(g, "model.layers.1.self_attn", "model.layers.0.mlp")


def test_full_view_one_node_per_fx_node(llama):
    g = to_networkx(llama, "full")
    assert g.number_of_nodes() == len(llama.graph.nodes)
    assert g.number_of_edges() == sum(len(n.all_input_nodes) for n in llama.graph.nodes)
    roles = Counter(a["role"] for _, a in g.nodes(data=True))
    assert roles["adapter"] == inserted(llama)["adapter"] and roles["switch"] == inserted(llama)["switch"]
    assert roles["switch"] == len(adapted_paths(llama)) == 12
    assert roles["input"] == 2 and roles["output"] == 1
    sw = g.nodes["model_layers_2_self_attn_q_proj_switch"]
    assert sw["site"] == "model.layers.2.self_attn.q_proj" and sw["module"] == "model.layers.2.self_attn.q_proj"
    assert sw["shape"].endswith(", 32]") and sw["dtype"] == "float32"
    branch = [a for _, a in g.nodes(data=True) if a["role"] == "adapter" and a["site"] == sw["site"]]
    assert {a["adapter"] for a in branch} == {"default", "pred"}
    # the switch (lora_linear: it took the base linear over) reads x, W and every branch's h and B
    assert g.in_degree("model_layers_2_self_attn_q_proj_switch") == 2 + 2 * 2


def test_before_after_highlights_the_rewrite(llama):
    d = before_after(llama)
    status = Counter(a["status"] for _, a in d.nodes(data=True))
    assert status["added"] == sum(inserted(llama).values())
    # every adapted site here is a plain linear: its lora_linear switch replaced the base node
    fused = {n.name: n for n in llama.graph.nodes if n.target is lora_linear}
    sites = {s.name: s.node for s in llama.programs.primary.sites}
    base_nodes = {sites[fused[name].meta["graphlora"]["site"]] for name in fused}
    assert len(fused) == 12 and status["removed"] == len(base_nodes) == 12
    assert status["kept"] == len(llama.traced_graph.nodes) - 12
    assert {n for n, a in d.nodes(data=True) if a["status"] == "removed"} == base_nodes
    added = {n for n, a in d.nodes(data=True) if a["status"] == "added"}
    assert added == {n.name for n in llama.graph.nodes if n.meta.get("graphlora")}
    removed = [(u, v) for u, v, a in d.edges(data=True) if a["status"] == "removed"]
    # each removed edge touches a removed base node; its former users now read that site's switch
    assert removed and all(u in base_nodes or v in base_nodes for u, v in removed)
    for u, v in removed:
        if u in base_nodes:
            switch = next(n for n in fused if sites[fused[n].meta["graphlora"]["site"]] == u)
            assert d.has_edge(switch, v) and d[switch][v]["status"] == "added"
    assert to_networkx(llama, "diff").number_of_nodes() == d.number_of_nodes()


def test_within_restricts_to_a_module(llama):
    g = to_networkx(llama, "full", within="model.layers.1.self_attn")
    assert g.number_of_nodes() > 10
    assert all(a["module"].startswith("model.layers.1.self_attn") for _, a in g.nodes(data=True))


def test_plain_module_fx_frontend_with_shapes():
    model = FunctionalMLP()
    gm = graphlora.inject(model, graphlora.LoraConfig(r=2, target_modules=["fc1", "proj"]))
    g = to_networkx(gm, "modules")
    assert g.nodes["fc1"]["sites"] == ["fc1 default:2"] and not g.nodes["fc2"]["adapted"]
    # F.linear(h, proj.weight) runs in the root module: its switch sits there too
    assert g.nodes["(root)"]["sites"] == ["proj default:2"]
    full = to_networkx(gm, "full", example_inputs=(torch.randn(3, 12),))
    assert full.nodes["fc2"]["shape"] == "[3, 6]"


def test_bad_arguments_name_the_value_and_the_fix(llama, tmp_path):
    with pytest.raises(VizError, match=r"unknown view 'modulez'.*full, modules, diff"):
        to_networkx(llama, "modulez")
    with pytest.raises(VizError, match=r"depth must be a positive int.*got 0"):
        to_networkx(llama, "modules", depth=0)
    with pytest.raises(VizError, match=r"within='model.layerz.0' matches no module path; closest"):
        to_networkx(llama, "full", within="model.layerz.0")
    with pytest.raises(VizError, match=r"unknown graph format '\.png'.*\.graphml, \.json"):
        export_graph(llama, tmp_path / "x.png")
    with pytest.raises(VizError, match=r"unknown engine 'dot'"):
        export_graph(llama, tmp_path / "x.svg", engine="dot")
    with pytest.raises(VizError, match=r"needs a graphlora AdaptedGraphModule"):
        before_after(fx.symbolic_trace(FunctionalMLP()))
    assert isinstance(VizError("x"), ValueError) and isinstance(VizError("x"), graphlora.GraphLoraError)


# ---------------------------------------------------------------------------- formats


class _Balance(HTMLParser):
    """Checks that every non-void tag is closed in order."""

    VOID = {"meta", "link", "br", "hr", "img", "input", "source", "col", "area", "base", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _roles(g: nx.DiGraph) -> dict:
    return {str(n): a["role"] for n, a in g.nodes(data=True)}


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("view", ["modules", "full"])
def test_every_format(models, name, view, tmp_path):
    gm = models[name]
    g = to_networkx(gm, view)
    paths = {suffix: export_graph(gm, tmp_path / f"{name}{suffix}", view) for suffix in FORMATS}
    assert all(p.stat().st_size > 0 for p in paths.values())

    back = nx.read_graphml(paths[".graphml"])
    assert (back.number_of_nodes(), back.number_of_edges()) == (g.number_of_nodes(), g.number_of_edges())
    assert _roles(back) == _roles(g)

    data = json.loads(paths[".json"].read_text())
    back = nx.node_link_graph(data, directed=True, multigraph=False, edges="edges")
    assert (back.number_of_nodes(), back.number_of_edges()) == (g.number_of_nodes(), g.number_of_edges())
    assert _roles(back) == _roles(g)
    if view == "modules":
        sites = sorted(s for _, a in back.nodes(data=True) for s in a["sites"])
        assert [s.split()[0] for s in sites] == sorted(adapted_paths(gm))

    svg = ET.parse(paths[".svg"]).getroot()
    text = " ".join(svg.itertext())
    assert svg.tag.endswith("svg") and len(svg.findall(".//{*}g[@class='node']")) == g.number_of_nodes()
    missing = [p for p in adapted_paths(gm) if p not in text]
    assert not missing, f"adapted paths not in the SVG: {missing}"

    checker = _Balance()
    checker.feed(paths[".html"].read_text())
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors[:5], checker.stack)
    html_text = " ".join(checker.text)
    assert not [p for p in adapted_paths(gm) if p not in html_text]

    dot = paths[".dot"].read_text().splitlines()
    assert dot[0].startswith("digraph") and dot[-1] == "}"
    assert sum(" -> " in line for line in dot) == g.number_of_edges()

    mmd = paths[".mmd"].read_text().splitlines()
    assert mmd[0] == "flowchart TD"
    assert sum(1 for line in mmd if " --> " in line or " -.-> " in line) == g.number_of_edges()


def test_html_modules_view_expands_into_ops(llama, tmp_path):
    page = export_graph(llama, tmp_path / "m.html", "modules").read_text()
    full = to_networkx(llama, "full")
    g = to_networkx(llama, "modules")
    for i, n in enumerate(g):
        if g.nodes[n]["role"] == "module":
            assert f'<template id="ops-n{i}">' in page
    start = page.index('<template id="ops-n')
    layer1 = page[page.index(f'<template id="ops-n{list(g).index("model.layers.1")}">'):]
    layer1 = layer1[: layer1.index("</template>")]
    assert "model_layers_1_self_attn_q_proj_switch" in layer1 and "model_layers_2" not in layer1
    ops = g.nodes["model.layers.1"]["ops"]
    assert layer1.count('class="node"') == len(ops)
    assert all(full.nodes[op]["module"].startswith("model.layers.1") for op in ops)
    assert start > 0 and "<script src" not in page and "http" not in page.replace("http://www.w3.org", "")


def test_diff_svg_marks_new_nodes_and_removed_edges(llama, tmp_path):
    svg = export_graph(llama, tmp_path / "d.svg", "diff", within="model.layers.0.self_attn").read_text()
    root = ET.fromstring(svg)
    nodes = root.findall(".//{*}g[@class='node']")
    ring = [n for n in nodes if any(r.get("stroke") == "#16a34a" and r.get("fill") == "none" for r in n.findall("{*}rect"))]
    d = to_networkx(llama, "diff", within="model.layers.0.self_attn")
    assert len(ring) == sum(1 for _, a in d.nodes(data=True) if a["status"] == "added") > 0
    dashed_red = [p for p in root.iter("{http://www.w3.org/2000/svg}path") if p.get("stroke") == "#dc2626"]
    assert len(dashed_red) == sum(1 for *_, a in d.edges(data=True) if a["status"] == "removed") > 0


def test_svg_renders_to_a_picture_that_is_not_blank(llama, tmp_path):
    import cairosvg  # pip install cairosvg pillow; needs the system library libcairo2
    from PIL import Image

    for view in ("modules", "diff"):
        svg = export_graph(llama, tmp_path / f"{view}.svg", view, within=None if view == "modules" else
                           "model.layers.0.self_attn")
        png = cairosvg.svg2png(url=str(svg))
        img = Image.open(io.BytesIO(png)).convert("RGB")
        w, h = img.size
        assert w > 300 and h > 300
        pixels = Counter({rgb: n for n, rgb in img.getcolors(maxcolors=w * h)})
        white = pixels[(255, 255, 255)]
        assert 0.02 < 1 - white / (w * h) < 0.6, f"{view}: {1 - white / (w * h):.1%} non-white"
        colors = {tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in
                  [adapter_colors(["default", "pred"])[a][1] for a in ("default", "pred")]}
        for rgb in colors:  # both adapters' colours reach the picture
            assert sum(n for px, n in pixels.items() if max(abs(a - b) for a, b in zip(px, rgb)) < 12) > 50, rgb


# ---------------------------------------------------------------------------- layout


def test_layout_wraps_a_long_chain_into_columns():
    g = nx.path_graph(30, create_using=nx.DiGraph)
    lay = layered_layout(g, {n: (60, 20) for n in g}, max_rows=10)
    assert sorted({b.column for b in lay.boxes.values()}) == [0, 1, 2]
    for u, v in g.edges:
        a, b = lay.boxes[u], lay.boxes[v]
        if a.column == b.column:
            assert b.top > a.bottom
        else:
            assert b.column == a.column + 1 and b.x > a.x
    assert lay.height < 10 * (20 + 44) + 80 and lay.width > 3 * 60


def test_layout_breaks_cycles_and_keeps_spacing():
    g = nx.DiGraph([(0, 1), (1, 2), (2, 0), (0, 3), (3, 2)])
    lay = layered_layout(g, {n: (50, 20) for n in g})
    assert set(lay.edges) == set(g.edges) and lay.reversed_edges
    for (u, v), pts in lay.edges.items():
        assert pts[0][1] in (lay.boxes[u].bottom, lay.boxes[u].top)
    xs = _isotonic([0.0, 0.0, 0.0], [10.0, 10.0])
    assert xs == pytest.approx([-10.0, 0.0, 10.0])


# ---------------------------------------------------------------------------- CLI and demo


def test_cli_viz_writes_the_demo_llama(tmp_path, capsys):
    from graphlora.cli import main

    out = tmp_path / "demo.svg"
    assert main(["viz", "--target", "q_proj,v_proj", "-o", str(out)]) == 0
    assert "wrote the modules view" in capsys.readouterr().out
    text = " ".join(ET.parse(out).getroot().itertext())
    assert "model.layers.1.self_attn.v_proj" in text and "model.layers.2" not in text
    assert main(["viz", "-o", str(tmp_path / "x.pdf")]) == 2
    assert "one of .graphml" in capsys.readouterr().err


def test_demo_writes_the_modules_svg(tmp_path):
    from graphlora.demo import run_demo

    result = run_demo(steps=1, svg=str(tmp_path / "demo.svg"))
    root = ET.parse(result["svg"]).getroot()
    text = " ".join(root.itertext())
    assert "model.layers.0.mlp.down_proj" in text and "pred" in text and "succ" in text


@pytest.mark.skipif(__import__("shutil").which("dot") is None, reason="system Graphviz is optional (apt-get install graphviz)")
def test_graphviz_reads_the_dot_file_and_draws_the_svg(llama, tmp_path):
    import subprocess

    dot = export_graph(llama, tmp_path / "m.dot", "diff", within="model.layers.0.self_attn")
    done = subprocess.run(["dot", "-Tsvg", str(dot)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count('class="node"') == to_networkx(llama, "diff", within="model.layers.0.self_attn").number_of_nodes()
    svg = export_graph(llama, tmp_path / "g.svg", "modules", engine="graphviz").read_text()
    assert "model.layers.3" in svg and ET.fromstring(svg.encode()).tag.endswith("svg")
