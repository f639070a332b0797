"""``streamgraph dump`` and the pictures behind it (``graph.drawing``, ``engine.views.annotate``,
``tools.graph_dump``): the DOT parses and holds every node and edge, the document round-trips
through JSON and carries the passes' decisions, filters keep what they say, errors name the
problem. Rendering to .svg/.png needs Graphviz: those tests skip without it, except in CI."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

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


# ---- requests checked before work, files written whole, pictures that cannot be scripted ----


def _no_planning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any planning fail the test: the checks below must come before it."""

    def planned(*args: object, **kwargs: object) -> None:
        raise AssertionError("planned before checking the request")

    monkeypatch.setattr(graph_dump, "from_model", planned)
    monkeypatch.setattr(graph_dump, "load", planned)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_without_graphviz_dump_stops_before_planning(tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """No ``dot`` on PATH: one ``GraphvizMissing`` saying how to install it, raised before any
    planning (it came at the bottom of a traceback, after the work)."""
    from tools.cli import parser

    monkeypatch.setattr(shutil, "which", lambda name: None)
    _no_planning(monkeypatch)
    out = tmp_path / "x.svg"
    args = parser().parse_args(
        ["dump", "-m", "gemma3-tiny", "-o", str(tmp_path / "x.dot"), "-o", str(out)]
    )
    with pytest.raises(drawing.GraphvizMissing) as info:
        graph_dump.main(args)
    assert "apt-get install graphviz" in str(info.value) and "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())  # not even the .dot, which needs no Graphviz
    assert main(["dump", "-m", "gemma3-tiny", "-o", str(out)]) == 1
    assert "apt-get install graphviz" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "name,fragment",
    [
        ("nodir/x.svg", "nodir does not exist"),
        ("existing.svg", "it is a directory"),
        ("file.txt/x.svg", "file.txt is not a directory"),
        ("x.bmp", "use one of .json, .dot, .svg, .png, .html"),
    ],
)
def test_outputs_are_checked_before_any_work(
    name: str,
    fragment: str,
    tmp_path,
    monkeypatch,
    capsys,  # noqa: ANN001
) -> None:
    """A path that cannot be written is a usage error (exit status 2) naming the file, found
    before planning; these were FileNotFoundError and IsADirectoryError tracebacks after it."""
    (tmp_path / "existing.svg").mkdir()
    (tmp_path / "file.txt").write_text("")
    _no_planning(monkeypatch)
    target = tmp_path / name
    fine = tmp_path / "fine.json"
    assert main(["dump", "-m", "gemma3-tiny", "-o", str(fine), "-o", str(target)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(target) in line and fragment in line
    assert not fine.exists()


def test_a_failed_write_leaves_the_old_file_whole(tmp_path) -> None:  # noqa: ANN001
    """A write that fails half-way (here the file-size limit; a full disk is the same) is one
    line naming the file, and the file it would have replaced is untouched, with no temporary
    file left beside it. The dump used to truncate the old file and leave half of the new."""
    resource = pytest.importorskip("resource")
    target = tmp_path / "g.json"
    target.write_text("old contents\n")
    code = (
        "import resource, signal, sys\n"
        "from tools.cli import main\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
        f"sys.exit(main(['dump', '-m', 'gemma3-tiny', '-o', {str(target)!r}]))\n"
    )
    assert resource.RLIMIT_FSIZE is not None
    root = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120
    )
    assert done.returncode == 1, done.stderr
    line = _one_error_line(done.stderr)
    assert f"cannot write {target}" in line and "too large" in line.lower()
    assert target.read_text() == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json"]


def test_write_errors_name_the_file_and_clean_up(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(graph_dump.OutputError, match=r"cannot write .*g\.dot: No space left"):
        graph_dump.write(graph_dump.from_model("llama-tiny", NUMPY), tmp_path / "g.dot")
    assert not list(tmp_path.iterdir())


HOSTILE = [
    '<a href="javascript:alert(1)">x</a>',
    "</script><script>alert(2)</script>",
    'f32>, URL="javascript:alert(3)", label=<z',  # closes an HTML-like label, adds a link
    '" URL="javascript:alert(4)" x="',  # closes a quoted string
    "& &amp; &lt; \\N \\ \x01",  # entities, escapes, a character XML cannot hold
]


def _hostile(doc: dict) -> dict:
    """``doc`` with every string field of it holding markup, links, quotes and escapes."""
    out = json.loads(json.dumps(doc))
    for k, n in enumerate(out["nodes"]):
        bad = HOSTILE[k % len(HOSTILE)]
        for key in ("name", "label", "dtype", "cause", "fused"):
            if key != "fused" or n[key] is not None:
                n[key] = bad + f" {key}"
        if n["kind"] == "compute":
            n["op"] = bad
        if n["kind"] == "weight":
            n["device"] = bad
    out["title"] = " ".join(HOSTILE)
    for info in out["layers"].values():
        info["where"], info["cause"] = HOSTILE[2], HOSTILE[0]
    out["summary"].update(costs=HOSTILE[1], policy=HOSTILE[3], peak_bytes={HOSTILE[0]: 1})
    return out


def test_svg_shows_hostile_strings_only_as_text(tmp_path) -> None:  # noqa: ANN001
    """Every string of a document reaches the SVG escaped for its context: no element, link
    or attribute comes from one (a dtype became a ``javascript:`` link), and each is shown as
    written."""
    _graphviz()
    placed = Options(backend="cupy", n_ctx=512, offload="*1+1")  # layers, devices, slots
    for k, options in enumerate([placed, NUMPY.replace(streams=3, stack=False)]):  # waits
        doc = graph_dump.from_model("gemma3-tiny", options, prompt_len=2)
        clean = graph_dump.write(doc, tmp_path / f"clean{k}.svg").read_text()
        svg = graph_dump.write(_hostile(doc), tmp_path / f"hostile{k}.svg").read_text()
        _only_text(svg, clean)


def _only_text(svg: str, clean: str) -> None:
    """``svg`` has no element, link or handler that ``clean`` (the same document with its own
    strings) lacks, and shows every hostile string as written."""
    assert "<script" not in svg and "</script>" not in svg  # text's "<" is "&lt;"
    assert not re.search(r"\bhref\s*=\s*[\"']", svg)  # an attribute, not escaped text
    assert svg.count("<a ") == clean.count("<a ")  # Graphviz's own tooltip anchors, no more
    texts, titles = [], []
    for el in ET.fromstring(svg.encode()).iter():
        tag = el.tag.rsplit("}", 1)[-1]
        assert tag not in ("script", "foreignObject", "iframe"), tag
        for attr, value in el.attrib.items():
            name = attr.rsplit("}", 1)[-1]
            assert name != "href" and not name.lower().startswith("on"), (attr, value)
            if name == "title":
                titles.append(value)
        if tag == "text":
            texts.append("".join(el.itertext()))
    shown = "\n".join(texts)
    for bad in HOSTILE[:4]:
        assert bad in shown, bad  # shown as written
    assert "& &amp; &lt; \\N \\ \ufffd" in shown
    assert any(HOSTILE[0] in t for t in titles)  # tooltips too


def test_a_crafted_dump_cannot_reach_the_picture(tmp_path, capsys) -> None:  # noqa: ANN001
    """``dump --graph`` checks a dump document before drawing it: a dtype holding markup is
    an error naming the field, and nothing is written."""
    doc = graph_dump.from_model("llama-tiny", NUMPY)
    doc["nodes"][3]["dtype"] = HOSTILE[2]
    path = tmp_path / "crafted.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "x.dot"
    assert main(["dump", "--graph", str(path), "-o", str(out)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"{path}: nodes[3].dtype" in line and "is not one of f32" in line
    assert not out.exists()
