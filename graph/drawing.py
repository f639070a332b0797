"""Pictures of a graph: a plain-data *dump document* and its Graphviz DOT text.

    doc = graph.drawing.document(graph)       # nodes, edges, layers: plain data (JSON-able)
    text = graph.drawing.to_dot(doc)          # DOT: clusters per layer, colours by device
    svg = graph.drawing.render(text, "svg")   # Graphviz's ``dot``, if installed

The document is what every picture is drawn from. ``document`` fills it from the graph alone;
``engine.views.annotate`` adds the passes' decisions (device, stream, fused group, memory offset,
placement and its cause, event waits) to the same fields, and ``tools.graph_dump`` writes it
as .dot/.svg/.png/.html/.json. Fields of a node record:

    id, op, name, label, shape, dtype, bytes, kind (input|weight|constant|state|view|compute),
    layer (-1 embedding, 0..n_layer-1 blocks, n_layer head, None before the first layer),
    device (gpu|cpu|streamed|host|None), stream, step (the launching step's anchor id),
    fused (the group's pattern), offset (arena bytes), slot (ring slot), cause (placement)

plus ``n_layer`` (the head's layer tag), ``edges`` ([src, dst] data dependencies),
``waits`` ([producer step, waiting step, producer stream, waiting stream] event waits between
streams), ``layers`` (per layer: where its weights live and why), ``summary`` and ``title``.
Graphs display themselves in Jupyter through ``Graph._repr_svg_``, which uses this module.

Every string of a document reaches DOT escaped for where it goes (a quoted string, an HTML-like
label, a tooltip: ``_quoted``, ``_html``, ``_tip``), and every number is formatted as one
(``_int``), so a document from a file cannot add attributes, links or markup to the picture;
``graph.documents.check_dump`` checks such a document first.
"""

from __future__ import annotations

import html
import operator
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from graph.ops import VIEW_OPS, Op

__all__ = [
    "FORMAT",
    "document",
    "to_dot",
    "render",
    "require_graphviz",
    "GraphvizMissing",
    "GraphvizFailed",
    "DEVICE_COLOURS",
]

FORMAT = "streamgraph-dump/1"
KINDS = {Op.INPUT: "input", Op.WEIGHT: "weight", Op.CONSTANT: "constant", Op.STATE: "state"}
LEAVES = frozenset(KINDS.values())
DEVICE_COLOURS = {  # fill colours: where a node computes, or where a weight lives
    "gpu": "#cfe3ff",
    "cpu": "#ffe2b8",
    "streamed": "#c9efc4",
    "host": "#e4e4e4",
    None: "#ffffff",
}
STREAM_COLOURS = ["#1f5fbf", "#d2691e", "#2e8b57", "#8b3a9b", "#b8860b", "#c0392b", "#008b8b"]
INSTALL = (
    "Graphviz's `dot` is not installed: apt-get install graphviz (or brew install graphviz, "
    "conda install graphviz); .dot, .json and .html dumps work without it"
)
# characters XML 1.0 (so SVG) cannot hold, and lone surrogates, which no encoding can
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


class GraphvizMissing(RuntimeError):
    """Rendering .svg/.png needs Graphviz's ``dot`` program."""


class GraphvizFailed(OSError):
    """Graphviz's ``dot`` ran and failed, or ran out of time: an external program's failure,
    reported in one line as a failed write is."""


def _layers(graph: Any) -> list[int | None]:
    """Each node's layer: a weight's tag, a cache's index (``cache_k.3``), else the largest
    layer among its inputs (a residual add belongs to the layer whose output it takes)."""
    out: list[int | None] = []
    for n in graph.nodes:
        layer = n.layer
        if layer is None and n.op is Op.STATE and n.name.rsplit(".", 1)[-1].isdigit():
            layer = int(n.name.rsplit(".", 1)[-1])
        if layer is None and n.srcs:
            tags = [out[s] for s in n.srcs if out[s] is not None]
            layer = max(tags) if tags else None
        out.append(layer)
    return out


def document(graph: Any, title: str = "") -> dict[str, Any]:
    """The dump document of ``graph`` (a ``graph.ir.Graph``, not imported here: ``ir`` imports
    this module to draw itself) alone: no device, stream or memory decisions."""
    layers = _layers(graph)
    nodes = []
    for n in graph.nodes:
        kind = KINDS.get(n.op, "view" if n.op in VIEW_OPS else "compute")
        nodes.append(
            {
                "id": n.id,
                "op": n.op.name,
                "name": n.name,
                "label": n.name or n.op.name.lower(),
                "shape": list(n.shape),
                "dtype": n.dtype.name,
                "bytes": n.nbytes,
                "kind": kind,
                "layer": layers[n.id],
                "device": None,
                "stream": None,
                "step": None,
                "fused": None,
                "offset": None,
                "slot": None,
                "cause": None,
            }
        )
    edges = [[s, n.id] for n in graph.nodes for s in n.srcs]
    tags = [n.layer for n in graph.weights if n.layer is not None]
    return {
        "format": FORMAT,
        "title": title,
        "n_layer": max(tags) if tags else None,  # the head's tag (rwkv.cpp's rule)
        "nodes": nodes,
        "edges": edges,
        "waits": [],
        "outputs": list(graph.outputs),
        "layers": {},
        "summary": {
            "nodes": len(nodes),
            "edges": len(edges),
            "weights": sum(1 for x in nodes if x["kind"] == "weight"),
            "weight_bytes": sum(x["bytes"] for x in nodes if x["kind"] == "weight"),
            "streams": 1,
            "events": 0,
            "waits": 0,
        },
    }


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _layer_name(layer: int | None, n_layer: int | None) -> str:
    if layer is None:
        return "inputs"
    if layer < 0:
        return "embedding"
    if n_layer is not None and layer == n_layer:
        return f"head (layer {layer})"
    return f"layer {layer}"


def summary_text(doc: Mapping[str, Any]) -> str:
    """The document's summary in one line (nodes, streams, bytes per device, streamed)."""
    s = doc.get("summary", {})
    nodes = f"{s.get('nodes', 0)} nodes"
    if s.get("shown") is not None:
        nodes = f"{s['shown']} of {nodes} shown"
    parts = [nodes, f"{s.get('streams', 1)} stream(s)"]
    if s.get("events"):
        parts.append(f"{s['events']} events, {s.get('waits', 0)} waits")
    split = s.get("device_bytes")
    for dev, peak in (s.get("peak_bytes") or {}).items():
        text = f"{dev} {_bytes(peak)}"
        if split and dev in ("gpu", "cpu") and dev == next(iter(s["peak_bytes"])):
            text += " (" + ", ".join(f"{k} {_bytes(v)}" for k, v in split.items()) + ")"
        parts.append(text)
    if s.get("streamed_bytes"):
        parts.append(f"streamed {_bytes(s['streamed_bytes'])}/pass")
    return " · ".join(parts)


# Long by design: one writer of one DOT document (legend, clusters per layer, nodes, edges,
# waits), in the order Graphviz reads them.
def to_dot(doc: Mapping[str, Any], offsets: bool = False, weights: bool = True) -> str:
    """DOT text of a dump document: a cluster per layer (its placement in the label), fused
    groups as dotted sub-clusters, fill colour by device (GPU blue, CPU orange, streamed green,
    host grey), border colour by stream, event waits as dashed red edges. ``offsets`` adds
    each value's arena offset; ``weights=False`` leaves weight leaves out (their placement is
    in the layer labels) to keep large graphs smaller."""
    nodes = {n["id"]: n for n in doc["nodes"]}
    shown = {i for i, n in nodes.items() if weights or n["kind"] != "weight"}
    multi = doc.get("summary", {}).get("streams", 1) > 1
    n_layer = doc.get("n_layer")
    lines = [
        "digraph streamgraph {",
        "  rankdir=TB; nodesep=0.15; ranksep=0.25;",
        '  node [fontname="Helvetica", fontsize=10, margin="0.06,0.03", height=0.3];',
        '  edge [color="#777777", arrowsize=0.5];',
        f'  graph [fontname="Helvetica", fontsize=12, labelloc=t, label="{_quoted(_title(doc))}"];',
    ]
    # a leaf read all over the graph (positions, cache indices, a tied embedding read again
    # by the head) is drawn again in each layer that reads it: one node with edges into every
    # layer would pull the layers up beside it and cross the picture with long edges
    users: dict[int, int] = {}
    for src, _ in doc["edges"]:
        users[src] = users.get(src, 0) + 1
    proxies: dict[tuple[int, Any], str] = {}
    edge_src: dict[tuple[int, int], str] = {}
    for src, dst in doc["edges"]:
        if src in shown and dst in shown:
            a, b = nodes[src], nodes[dst]
            if a["kind"] in LEAVES and (users[src] > 2 or a["layer"] != b["layer"]):
                key = (src, b["layer"])
                proxies.setdefault(key, f"n{_int(src)}_in{len(proxies)}")
                edge_src[(src, dst)] = proxies[key]
    proxied = {src for src, _ in proxies}
    drawn = {i: _drawn_layer(nodes, i) for i in shown}
    source = {}
    for src, dst in doc["edges"]:
        source.setdefault(dst, src)
    for i in sorted(shown):  # a view is drawn with the value it looks at
        if nodes[i]["kind"] == "view" and source.get(i) in drawn:
            drawn[i] = drawn[source[i]]
    readers: dict[int, set[Any]] = {}
    for src, dst in doc["edges"]:
        if src in shown and dst in shown:
            readers.setdefault(src, set()).add(drawn[dst])
    by_layer: dict[Any, list[Any]] = {}
    for i in sorted(shown):
        if i in proxied:
            continue
        where = drawn[i]
        if nodes[i]["kind"] in LEAVES and len(readers.get(i, ())) == 1:
            where = next(iter(readers[i]))  # beside its reader (a fused group moved it)
        by_layer.setdefault(where, []).append(i)
    for (_, layer), name in proxies.items():
        by_layer.setdefault(layer, []).append(name)
    layer_info = doc.get("layers", {})
    for layer, ids in sorted(by_layer.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0)):
        indent = "  "
        if layer is not None:
            info = layer_info.get(str(layer))
            label = _layer_name(layer, n_layer)
            if info:
                label += f": {info['where']}" + (
                    f" slot {info['slot']}" if info.get("slot") is not None else ""
                )
            lines.append(f'  subgraph "cluster_layer_{_int(layer)}" {{')
            lines.append(
                f'    label="{_quoted(label)}"; style="rounded"; color="#bbbbbb"; fontsize=11;'
            )
            indent = "    "
        groups: dict[int, list[int]] = {}
        loose = []
        for i in ids:
            if isinstance(i, str):  # a leaf drawn again in this layer
                src = int(i[1:].split("_")[0])
                lines.append(indent + _node_line(nodes[src], offsets, multi, i))
                continue
            n = nodes[i]
            if n["fused"] and n["step"] is not None:
                groups.setdefault(n["step"], []).append(i)
            else:
                loose.append(i)
        for i in loose:
            lines.append(indent + _node_line(nodes[i], offsets, multi))
        for anchor, members in groups.items():
            lines.append(f'{indent}subgraph "cluster_fused_{_int(anchor)}" {{')
            lines.append(
                f'{indent}  label="fused: {_quoted(nodes[members[0]]["fused"])}"; style="dotted";'
                ' fontsize=9; color="#555555";'
            )
            for i in members:
                lines.append(indent + "  " + _node_line(nodes[i], offsets, multi))
            lines.append(indent + "}")
        if layer is not None:
            lines.append("  }")
    for src, dst in doc["edges"]:
        if src in shown and dst in shown:
            lines.append(f"  {edge_src.get((src, dst), f'n{_int(src)}')} -> n{_int(dst)};")
    # a layer's weights and inputs start below the layer before it: beside it, they would
    # make the two clusters share ranks and sit side by side, each layer drifting sideways
    order = sorted(k for k in by_layer if k is not None)
    last_of = {}
    for k in order:
        computed = [i for i in by_layer[k] if isinstance(i, int) and nodes[i]["kind"] == "compute"]
        if computed:
            last_of[k] = max(computed)
    for prev, k in zip(order, order[1:], strict=False):
        if prev not in last_of:
            continue
        for i in by_layer[k]:
            if isinstance(i, str) or nodes[i]["kind"] in LEAVES:
                name = i if isinstance(i, str) else f"n{_int(i)}"
                lines.append(f"  n{_int(last_of[prev])} -> {name} [style=invis];")
    lines.append("  " + _legend(doc, multi))
    for w in doc.get("waits", []):
        src, dst = w[0], w[1]
        if src in shown and dst in shown:
            lines.append(
                f'  n{_int(src)} -> n{_int(dst)} [style=dashed, color="#d62728", '
                f'constraint=false, fontsize=8, fontcolor="#d62728", '
                f'label="wait s{_int(w[2])}→s{_int(w[3])}"];'
            )
    lines.append("}")
    return "\n".join(lines) + "\n"


def _legend(doc: Mapping[str, Any], multi: bool) -> str:
    """A key to the colours this picture uses."""
    used = {n["device"] for n in doc["nodes"] if n["device"]}
    names = {"gpu": "GPU", "cpu": "CPU backend", "streamed": "streamed", "host": "host memory"}
    cells = [f'<TD BGCOLOR="{DEVICE_COLOURS[d]}">{names[d]}</TD>' for d in names if d in used]
    if multi:
        streams = sorted({_int(n["stream"]) for n in doc["nodes"] if n["stream"] is not None})
        cells += [
            f'<TD><FONT COLOR="{STREAM_COLOURS[k % len(STREAM_COLOURS)]}">stream {k}</FONT></TD>'
            for k in streams
        ]
        cells.append('<TD><FONT COLOR="#d62728">- - event wait</FONT></TD>')
    rows = "".join(cells) or "<TD>no placement</TD>"
    table = f'<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="2"><TR>{rows}</TR></TABLE>'
    return f"legend [shape=plaintext, fontsize=9, label=<{table}>];"


def _drawn_layer(nodes: Mapping[int, Mapping[str, Any]], i: int) -> Any:
    """The layer cluster a node is drawn in: a fused group's members all go with the group's
    anchor (a norm with the previous layer's residual fuses into this layer's product)."""
    n = nodes[i]
    if n["fused"] and n["step"] in nodes:
        return nodes[n["step"]]["layer"]
    return n["layer"]


def _title(doc: Mapping[str, Any]) -> str:
    title = doc.get("title") or "graph"
    return f"{title}\n{summary_text(doc)}"


def _int(v: Any) -> int:
    """``v`` if it is an int: a number written into DOT is a number, never text that might
    hold quotes or markup (a ``TypeError`` for anything else)."""
    return operator.index(v)


def _text(v: Any) -> str:
    """``v`` as text XML can carry: characters it cannot hold become U+FFFD."""
    return _NOT_XML.sub("\ufffd", str(v))


def _quoted(v: Any) -> str:
    """``v`` inside a DOT quoted string (``label="..."``), shown as written: backslashes are
    doubled (``\\N`` would be the node's name), quotes escaped, ``&`` written as an entity
    (Graphviz reads entities in labels), line breaks as ``\\n``."""
    text = _text(v).replace("\\", "\\\\").replace('"', '\\"').replace("&", "&amp;")
    return text.replace("\r", "").replace("\n", "\\n")


def _html(v: Any) -> str:
    """``v`` inside an HTML-like label (``label=<...>``): markup escaped so that no text can
    close the label or add an element (``<TABLE HREF=...>`` would be a link), backslashes
    doubled as in quoted strings, line breaks as spaces."""
    text = html.escape(_text(v), quote=True).replace("\\", "\\\\")
    return text.replace("\r", " ").replace("\n", " ")


def _tip(v: Any) -> str:
    """``v`` inside a quoted tooltip: Graphviz reads a tooltip's escapes twice (``\\n`` there
    is a line break), so its backslashes are doubled once more than a label's."""
    return _quoted(_text(v).replace("\\", "\\\\"))


def _node_line(n: Mapping[str, Any], offsets: bool, multi: bool, name: str | None = None) -> str:
    shape = "x".join(str(_int(d)) for d in n["shape"]) or "scalar"
    head = n["op"] if n["kind"] == "compute" else n["kind"]
    rows = [f"<B>{_html(head)}</B> {_html(n['label'])}"]
    rows.append(_html(f"{shape} {_text(n['dtype'])} · {_bytes(n['bytes'])}"))
    extra = []
    if multi and n["stream"] is not None:
        extra.append(f"stream {_int(n['stream'])}")
    if n["kind"] == "weight" and n["device"]:
        slot = f" slot {_int(n['slot'])}" if n["slot"] is not None else ""
        extra.append(_text(n["device"]) + slot)
    if offsets and n["offset"] is not None:
        extra.append(f"@{_int(n['offset']):#x}")
    if extra:
        rows.append(_html(" · ".join(extra)))
    label = "<" + "<BR/>".join(rows) + ">"
    fill = DEVICE_COLOURS.get(n["device"], "#ffffff") if isinstance(n["device"], str) else None
    fill = fill or DEVICE_COLOURS[None]
    attrs = [f"label={label}", f'fillcolor="{fill}"', f'tooltip="{_tip(_tooltip(n))}"']
    kind = n["kind"]
    if kind == "weight":
        attrs += ["shape=box", 'style="filled"', "fontsize=8"]
    elif kind == "state":
        attrs += ["shape=cylinder", 'style="filled"']
    elif kind in ("input", "constant"):
        attrs += ["shape=parallelogram", 'style="filled"']
    elif kind == "view":
        attrs += ["shape=box", 'style="rounded,filled,dashed"', "fontsize=8"]
    else:
        attrs += ["shape=box", 'style="rounded,filled"']
    if multi and n["stream"] is not None:
        colour = STREAM_COLOURS[_int(n["stream"]) % len(STREAM_COLOURS)]
        attrs += [f'color="{colour}"', "penwidth=2"]
    if name is not None:  # a leaf drawn again where it is read
        attrs.append("peripheries=2")
    return f"{name or 'n' + str(_int(n['id']))} [{', '.join(attrs)}];"


def _tooltip(n: Mapping[str, Any]) -> str:
    parts = [f"%{n['id']} {n['op']} {n['label']}", f"shape {tuple(n['shape'])} {n['dtype']}"]
    for key in ("layer", "device", "stream", "fused", "offset", "slot", "cause"):
        if n.get(key) is not None:
            parts.append(f"{key}: {n[key]}")
    return "\n".join(parts)


def require_graphviz() -> str:
    """The path of Graphviz's ``dot``, or ``GraphvizMissing`` saying how to install it: asked
    before any work by those who will need it (``streamgraph dump -o x.svg``)."""
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizMissing(INSTALL)
    return exe


def render(dot_text: str, fmt: str, timeout: float = 300.0) -> bytes:
    """``dot_text`` rendered by Graphviz to ``fmt`` (svg, png, pdf...); ``GraphvizMissing``
    without it, ``GraphvizFailed`` (one line, Graphviz's first complaint) when it fails."""
    exe = require_graphviz()
    try:
        done = subprocess.run(
            [exe, f"-T{fmt}"],
            input=dot_text.encode("utf-8", "replace"),
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise GraphvizFailed(
            f"dot -T{fmt} took more than {timeout:g} s; draw fewer nodes "
            "(--layers, --ops, --no-weights) or write .html"
        ) from None
    except OSError as e:
        raise GraphvizFailed(f"dot -T{fmt} could not run: {e.strerror or e}") from None
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").split("\n")
        first = next((line.strip() for line in said if line.strip()), "no message")
        raise GraphvizFailed(f"dot -T{fmt} failed (exit status {done.returncode}): {first[:300]}")
    return done.stdout


def svg_or_none(doc: Mapping[str, Any], **kw: Any) -> str | None:
    """SVG text for notebooks, or None where Graphviz is missing (they then show the text)."""
    try:
        return render(to_dot(doc, **kw), "svg").decode()
    except (GraphvizMissing, GraphvizFailed, OSError):
        return None


def ids_in_layers(doc: Mapping[str, Any], first: int, last: int) -> Sequence[int]:
    """Node ids whose layer lies in first..last (inclusive)."""
    return [n["id"] for n in doc["nodes"] if n["layer"] is not None and first <= n["layer"] <= last]
