"""``streamgraph dump`` and the pictures behind it (``graph.drawing``, ``engine.views.annotate``,
``tools.graph_dump``): the DOT parses and holds every node and edge, the document round-trips
through JSON and carries the passes' decisions, filters keep what they say, errors name the
problem. Rendering to .svg/.png needs Graphviz: those tests skip without it, except in CI."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from engine.model.session import Session
from engine.model.weights import random_weights
from engine.options import Options
from graph import drawing
from graph.models import build, kv_slots, preset
from graph.ops import GraphError
from graph.serialize import to_json
from tools import graph_dump
from tools.cli import main

pydot = pytest.importorskip("pydot")


def _graphviz() -> None:
    if shutil.which("dot") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Graphviz's dot is missing in CI: .ci/run installs it with apt-get")
        pytest.skip("Graphviz's dot is not installed (apt-get install graphviz)")


def _parsed_ids(dot_text: str) -> tuple[set[str], list[tuple[str, str]], list]:
    (g,) = pydot.graph_from_dot_data(dot_text)
    names: set[str] = set()
    edges: list[tuple[str, str]] = []
    styled = []

    def walk(sub) -> None:  # noqa: ANN001
        for n in sub.get_nodes():
            names.add(n.get_name().strip('"'))
        for e in sub.get_edges():
            if e.get_style() == "invis":  # layout hints: a layer's leaves below the layer before
                continue
            edges.append((str(e.get_source()).strip('"'), str(e.get_destination()).strip('"')))
            styled.append(e)
        for s in sub.get_subgraphs():
            walk(s)

    walk(g)
    return names, edges, styled


@pytest.mark.parametrize("name", ["gemma3-tiny", "llama-tiny"])
def test_dot_parses_and_holds_every_node_and_edge(name: str) -> None:
    doc = graph_dump.from_model(name, NUMPY, prompt_len=3)
    text = drawing.to_dot(doc)
    names, edges, _ = _parsed_ids(text)
    # a leaf read in several layers is drawn once per layer (n<id>_in<k>); all else once
    drawn_ids = {int(n[1:].split("_")[0]) for n in names if re.match(r"n\d", n)}
    assert drawn_ids == {n["id"] for n in doc["nodes"]}
    shown = {(int(a[1:].split("_")[0]), int(b[1:])) for a, b in edges if a != "legend"}
    for src, dst in doc["edges"]:
        assert (src, dst) in shown, f"edge {src} -> {dst} missing"
    (step,) = graph_dump.plans(name, NUMPY, prompt_len=3)[1]  # what a session runs
    assert doc["summary"]["nodes"] == len(doc["nodes"]) == len(step.graph.nodes)


NUMPY = Options(backend="numpy", n_ctx=512)


def build_graph(name: str):  # noqa: ANN201
    cfg = preset(name)
    return build(cfg, 3, kv_slots(cfg, 512, 3), None, "last", None, True)


def test_the_document_carries_every_decision() -> None:
    """Streams and waits from the schedule, fused groups, arena offsets, placements with their
    causes: the same numbers the passes produced, and the document round-trips through JSON."""
    options = NUMPY.replace(streams=3, stack=False)
    doc = graph_dump.from_model("gemma3-tiny", options, prompt_len=4)
    _, (sp,) = graph_dump.plans("gemma3-tiny", options, prompt_len=4)
    d = sp.decisions
    assert d.schedule is not None
    s = doc["summary"]
    assert s["streams"] == d.schedule.n_streams > 1
    assert s["waits"] == d.schedule.n_waits == len(doc["waits"])
    assert s["events"] == len(d.schedule.records)
    assert s["arena_bytes"] == d.plan.arena_bytes
    nodes = {n["id"]: n for n in doc["nodes"]}
    for step in d.schedule.steps:
        assert nodes[step]["stream"] == d.schedule.stream[step]
    for f in d.fusions:
        assert all(nodes[i]["fused"] == f.pattern for i in f.nodes)
    offsets = d.plan.offset_of()
    assert all(nodes[i]["offset"] == off for i, off in offsets.items())
    for a, b, sa, sb in doc["waits"]:
        assert nodes[a]["stream"] == sa != sb == nodes[b]["stream"]
    assert json.loads(json.dumps(doc)) == doc


def test_placements_colour_weights_and_split_layers() -> None:
    gpu = Options(backend="cupy", n_ctx=512)  # planned for the GPU, with or without one here
    doc = graph_dump.from_model("gemma3-tiny", gpu.replace(offload="*1+1"))
    weights = [n for n in doc["nodes"] if n["kind"] == "weight"]
    streamed = [n for n in weights if n["device"] == "streamed"]
    assert streamed and all(n["layer"] >= 1 and len(n["shape"]) == 2 for n in streamed)
    assert all(n["slot"] is not None and "streamed" in n["cause"] for n in streamed)
    norms = [n for n in weights if n["layer"] == 1 and len(n["shape"]) == 1]
    assert norms and all(n["device"] == "gpu" and "resident" in n["cause"] for n in norms)
    assert doc["summary"]["streamed_bytes"] == sum(n["bytes"] for n in streamed)
    assert doc["layers"]["1"]["where"] == "streamed"
    embedding = next(n for n in weights if n["layer"] == -1)
    assert embedding["device"] == "host"
    split = graph_dump.from_model("gemma3-tiny", gpu.replace(offload="ngl=1"))
    for n in split["nodes"]:
        if n["kind"] == "compute" and n["layer"] is not None and n["layer"] >= 1:
            assert n["device"] == "cpu"
    assert "CPU backend" in drawing.to_dot(split)  # the legend names what the colours mean


def test_filters_keep_layers_and_op_kinds() -> None:
    doc = graph_dump.from_model("gemma3-tiny", NUMPY)
    part = graph_dump.select(doc, (1, 1))
    assert part["nodes"] and all(n["layer"] == 1 for n in part["nodes"])
    assert part["summary"]["shown"] == len(part["nodes"]) < doc["summary"]["nodes"]
    products = graph_dump.select(doc, None, ["mul_mat"])
    kinds = {n["op"] for n in products["nodes"]}
    assert kinds == {"MUL_MAT", "WEIGHT"}
    kept = {n["id"] for n in products["nodes"]}
    assert all(a in kept and b in kept for a, b in products["edges"])
    with pytest.raises(GraphError, match="no node has op SOFTMAX; this graph has"):
        graph_dump.select(doc, None, ["SOFTMAX"])


def test_cli_writes_each_format(tmp_path, capsys) -> None:  # noqa: ANN001
    outs = [tmp_path / f"g.{ext}" for ext in ("json", "dot")]
    args = ["dump", "-m", "llama-tiny", "--prompt-len", "4", "--streams", "2", "--no-stack"]
    assert main([*args, *[a for o in outs for a in ("-o", str(o))]]) == 0
    doc = json.loads(outs[0].read_text())
    assert doc["format"] == drawing.FORMAT and doc["options"]["prompt_len"] == 4
    assert outs[1].read_text().startswith("digraph streamgraph {")
    assert "wrote" in capsys.readouterr().err
    again = graph_dump.load(outs[0])  # a saved dump reads back as itself
    assert again == doc


def test_a_saved_graph_json_is_drawn_too(tmp_path) -> None:  # noqa: ANN001
    from graph.serialize import to_json

    path = tmp_path / "graph.json"
    path.write_text(to_json(build_graph("llama-tiny")))
    doc = graph_dump.load(path)
    assert doc["summary"]["nodes"] == len(build_graph("llama-tiny").nodes)
    assert doc["summary"]["steps"] > 0


def test_errors_name_the_problem(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(GraphError, match="-m nope: no such file, packaged model"):
        graph_dump.from_model("nope", NUMPY)
    with pytest.raises(GraphError, match="use one of .json, .dot, .svg, .png, .html"):
        graph_dump.write(graph_dump.from_model("llama-tiny", NUMPY), tmp_path / "x.bmp")
    with pytest.raises(GraphError, match="cannot read"):
        graph_dump.load(tmp_path / "missing.json")
    with pytest.raises(GraphError, match="--prompt-len 600 exceeds what one pass takes"):
        graph_dump.from_model("llama-tiny", NUMPY, prompt_len=600)


def test_without_graphviz_svg_says_how_to_install(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(drawing.GraphvizMissing, match="apt-get install graphviz"):
        drawing.render("digraph {}", "svg")
    assert build_graph("llama-tiny")._repr_svg_() is None  # notebooks fall back to the text


def test_svg_and_png_render_with_graphviz(tmp_path) -> None:  # noqa: ANN001
    _graphviz()
    doc = graph_dump.from_model("random:gemma3-270m", NUMPY)  # the 270M shape's decode step
    svg = graph_dump.write(doc, tmp_path / "step.svg").read_text()
    assert svg.count('class="node"') >= len(doc["nodes"])
    png = graph_dump.write(doc, tmp_path / "step.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    graph = build_graph("gemma3-tiny")
    assert graph._repr_svg_().lstrip().startswith(("<?xml", "<svg"))
    from engine.passes import scheduler

    sched = scheduler.schedule(graph, 3)
    assert "<svg" in sched._repr_svg_()


def test_a_gguf_file_is_drawn_from_its_header(tmp_path) -> None:  # noqa: ANN001
    """Only the header is read: the config comes from the file, the weights are never loaded."""
    from tests.gguf_fixtures import GEMMA3, GEMMA3_TYPES, write_model

    path = tmp_path / "tiny.gguf"
    write_model(path, GEMMA3, GEMMA3_TYPES)
    doc = graph_dump.from_model(str(path), NUMPY, prompt_len=2)
    assert doc["title"].startswith("tiny.gguf f32: 2-token prompt")
    layers = {n["layer"] for n in doc["nodes"] if n["kind"] == "weight"}
    assert max(layers) == doc["n_layer"] == GEMMA3.n_layer


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"streams": 3, "stack": False},
        {"offload": "*1+1"},
        {"offload": "ngl=1", "dtype": "bf16"},
        {"offload": "auto", "vram": 0.001, "fusion": False, "mode": "eager"},
    ],
)
@pytest.mark.parametrize("prompt_len", [1, 4])
def test_dump_draws_the_plans_a_session_runs(opts: dict, prompt_len: int) -> None:
    """``dump`` (and ``graph``) plan through the functions a session calls, with the same
    options and costs: the model plan and every step plan equal the session's, field by field."""
    options = NUMPY.replace(**opts)
    mp, steps = graph_dump.plans("gemma3-tiny", options, prompt_len)
    cfg = preset("gemma3-tiny")
    sess = Session(cfg, random_weights(cfg, seed=1), options=options)
    assert mp.to_dict() == sess.plan.to_dict()
    n_end = options.n_ctx if prompt_len == 1 else prompt_len
    ex = sess.executor(sess.step_key(prompt_len, n_end))
    parts = getattr(ex, "parts", [ex])
    assert len(parts) == len(steps) == (2 if "ngl" in str(opts) else 1)
    for sp, part in zip(steps, parts, strict=True):
        assert sp.to_dict() == part.plan.to_dict()
        assert to_json(sp.graph) == to_json(part.plan.graph)
        assert str(sp) == str(part.plan)
    doc = graph_dump.from_model("gemma3-tiny", options, prompt_len)
    assert doc["summary"]["launches"] == ex.n_launches
    assert doc["summary"]["costs"] == sess.plan.costs_source
