"""``streamgraph dump``: draw a forward pass with every decision the engine made for it.

    streamgraph dump -m gemma3-270m --decode -o step.svg            # a decode step
    streamgraph dump -m llama-7b --dtype bf16 --offload auto --vram 8 --backend cupy -o 7b.html
    streamgraph dump -m random:gemma3-tiny --streams 3 --prompt-len 16 -o g.dot -o g.json
    streamgraph dump --graph saved.json --layers 2:4 --ops MUL_MAT,ATTENTION -o part.png

The model is what ``-m`` names everywhere (``tools.args.ModelArg``: a GGUF file, of which only
the header is read; a packaged model; ``random:ARCH``), or a graph saved as JSON (``--graph``:
``streamgraph graph --json``, or a dump's own .json). The run flags are every command's
(``tools.args``), and the plans are made by the functions a session calls, with the costs it
would use (``engine.model.session.plan_for``, ``engine.passes.plans.plan_step``); on a machine
without the device, ``--backend cupy`` plans with its nominal spec and costs, and the summary
says which costs were used. ``engine.views.annotate`` writes the decisions into a dump
document, and the output's extension picks the writer: .json (the document), .dot (Graphviz
text), .svg/.png (rendered by Graphviz's ``dot``, a system package), .html (self-contained:
pan, zoom, search, hover details, collapsible layers; no Graphviz needed).

Colours: fill by where a node computes or a weight lives (GPU blue, CPU orange, streamed
green, host grey); border by stream; event waits are dashed red edges; each layer is a
cluster labelled with its placement; fused groups are dotted sub-clusters.

Failing cleanly: every ``-o`` is checked before any work (a writer's extension, an existing
directory, not a directory itself: ``UsageError``), and Graphviz too where an output needs it
(``drawing.GraphvizMissing``); a file read with ``--graph`` is checked in full
(``graph.documents``: ``DocumentError`` naming the file and the field); each output is written
whole or not at all (``OutputError`` naming the file when the disk refuses).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.options import Options
from graph import documents, drawing
from graph.ops import GraphError
from tools.args import ModelArg, UsageError, options_from
from tools.files import write_atomic

__all__ = [
    "from_model",
    "from_graph",
    "plans",
    "load",
    "select",
    "write",
    "check_output",
    "OutputError",
    "add_arguments",
    "main",
]

WRITERS = (".json", ".dot", ".svg", ".png", ".html")
RENDERED = (".svg", ".png")  # drawn by Graphviz's dot
DUMP_FAMILY = drawing.FORMAT.split("/")[0]  # "streamgraph-dump", of any version


class OutputError(OSError):
    """An output file that could not be written (the disk, its permissions): the work failed,
    and the message names the file. Nothing half-written is left behind."""


def from_graph(graph: Any, options: Options | None = None, title: str = "") -> dict:
    """The dump document of a bare graph with the passes an ``Executor`` of it runs."""
    from backends import device_spec
    from engine.passes.plans import plan_graph
    from engine.views.annotate import annotate

    options = options or Options()
    return annotate(plan_graph(graph, device_spec(options.backend), options), title=title)


def plans(
    model: str, options: Options, prompt_len: int = 1, logits: str = "last"
) -> tuple[Any, tuple[Any, ...]]:
    """The model plan and the step plans of one forward pass of ``model`` over ``prompt_len``
    tokens (1: a decode step at the end of the context; more: a prompt from an empty cache),
    made by the functions a session calls, with the costs it would use (``plan_for``)."""
    from engine.model.session import plan_for
    from engine.passes.plans import plan_step

    if prompt_len < 1:
        raise UsageError(f"--prompt-len must be at least 1, got {prompt_len}")
    if prompt_len > min(options.n_batch, options.n_ctx):
        raise UsageError(
            f"--prompt-len {prompt_len} exceeds what one pass takes "
            f"(-b {options.n_batch}, -c {options.n_ctx})"
        )
    mp = plan_for(ModelArg.parse(model).config(options), options)
    n_end = options.n_ctx if prompt_len == 1 else prompt_len
    return mp, plan_step(mp, mp.step_key(prompt_len, n_end, logits))


def from_model(model: str, options: Options, prompt_len: int = 1) -> dict[str, Any]:
    """The dump document of one forward pass of ``model`` (see ``plans``). Nothing is
    allocated or run; a machine without the device plans with its nominal spec."""
    from engine.views.annotate import annotate

    mp, steps = plans(model, options, prompt_len)
    what = "decode step" if prompt_len == 1 else f"{prompt_len}-token prompt"
    title = f"{ModelArg.parse(model).name} {mp.config.storage}: {what}"
    if options.offload:
        vram = options.vram
        title += f", {options.offload}" + (f" in {vram:g} GiB" if vram is not None else "")
    info = {"model": model, "prompt_len": prompt_len, **options.to_dict()}
    info["backend"] = mp.spec.backend
    return annotate(steps, mp, title, info)


def load(path: str | Path, options: Options | None = None) -> dict[str, Any]:
    """A dump document from a .json file: a dump's own, or a graph saved by ``to_json`` (planned
    with ``options``). Either is checked in full first (``graph.documents``): a malformed or
    hostile file is one ``DocumentError`` naming the file and the field; a path that cannot be
    opened is a ``UsageError``."""
    from graph.serialize import from_dict

    p = Path(path)
    name = documents.one_line(str(p))
    doc = documents.parse(_read(p), name)
    if isinstance(doc, dict) and str(doc.get("format")).startswith(DUMP_FAMILY):
        return documents.check_dump(doc, name)  # this version's, or an error saying which
    try:
        graph = from_dict(doc)
    except GraphError as e:
        raise documents.DocumentError(f"{name}: {e}") from None
    return from_graph(graph, options, title=p.name)


def _read(p: Path) -> bytes:
    """The file's bytes, at most ``MAX_DOCUMENT_BYTES`` of them (a device or a pipe named as a
    file is read no further than that either)."""
    name = documents.one_line(str(p))
    limit = documents.MAX_DOCUMENT_BYTES
    if p.is_dir():
        raise UsageError(f"cannot read {name}: it is a directory; give a .json file")
    try:
        with p.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UsageError(f"cannot read {name}: {e.strerror or e}") from None
    if len(data) > limit:
        raise documents.DocumentError(
            f"cannot read {name}: larger than {documents.human_bytes(limit)}, more than any "
            "graph or dump document is (a 7B model's dump is ~340 KB)"
        )
    return data


def select(
    doc: dict[str, Any], layers: tuple[int, int] | None = None, ops: Sequence[str] = ()
) -> dict[str, Any]:
    """Only the nodes of layers first..last (inclusive) and/or of the given op kinds (with the
    weights they read); edges and waits between kept nodes stay. The summary still describes
    the whole graph, plus how many nodes are shown."""
    keep = {n["id"] for n in doc["nodes"]}
    if layers is not None:
        first, last = layers
        keep &= set(drawing.ids_in_layers(doc, first, last))
    if ops:
        wanted = {o.upper() for o in ops}
        known = {n["op"] for n in doc["nodes"]}
        unknown = wanted - known
        if unknown:
            raise UsageError(
                f"no node has op {', '.join(sorted(unknown))}; this graph has "
                f"{', '.join(sorted(known))}"
            )
        chosen = {n["id"] for n in doc["nodes"] if n["op"] in wanted}
        feeds = {s for s, d in doc["edges"] if d in chosen}
        weights = {n["id"] for n in doc["nodes"] if n["kind"] == "weight" and n["id"] in feeds}
        keep &= chosen | weights
    if keep == {n["id"] for n in doc["nodes"]}:
        return doc
    out = dict(doc)
    out["nodes"] = [n for n in doc["nodes"] if n["id"] in keep]
    out["edges"] = [e for e in doc["edges"] if e[0] in keep and e[1] in keep]
    out["waits"] = [w for w in doc.get("waits", []) if w[0] in keep and w[1] in keep]
    out["outputs"] = [o for o in doc.get("outputs", []) if o in keep]
    out["summary"] = dict(doc["summary"], shown=len(out["nodes"]))
    return out


def check_output(path: str | Path) -> Path:
    """``path`` if a dump can be written there, else a ``UsageError`` saying why: its extension
    names a writer, it is not a directory, and its directory exists. ``main`` checks every
    ``-o`` before any work, so that a typo costs nothing."""
    p = Path(path)
    name = documents.one_line(str(p))
    if p.suffix.lower() not in WRITERS:
        raise UsageError(f"cannot write {name}: use one of {', '.join(WRITERS)}")
    if p.is_dir():
        raise UsageError(f"cannot write {name}: it is a directory; name a file inside it")
    parent = p.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise UsageError(f"cannot write {name}: {documents.one_line(str(parent))} {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {name}: no permission to create files in its directory")
    return p


def write(
    doc: dict[str, Any], path: str | Path, offsets: bool = False, weights: bool = True
) -> Path:
    """Write ``doc`` to ``path`` in the format its extension names: whole or not at all (a
    temporary file beside it, renamed over it), so a failure leaves no half-written file.
    A path that cannot be written is a ``UsageError``; a write that fails, ``OutputError``."""
    p = check_output(path)
    _replace(p, _encoded(doc, p.suffix.lower(), offsets, weights))
    return p


def _encoded(doc: dict[str, Any], ext: str, offsets: bool, weights: bool) -> bytes:
    """The file's bytes in the format ``ext`` names. JSON and the page are ASCII; DOT text is
    UTF-8, the encoding Graphviz reads by default."""
    if ext == ".json":  # NaN and infinities are not JSON: a dump must read back
        return json.dumps(documents.finite(doc), indent=1).encode("ascii")
    if ext == ".html":
        from tools.dump_html import to_html

        return to_html(doc).encode("ascii")
    dot = drawing.to_dot(doc, offsets=offsets, weights=weights)
    if ext == ".dot":
        return dot.encode("utf-8")
    return drawing.render(dot, ext[1:])


def _replace(p: Path, data: bytes) -> None:
    """``data`` into ``p``, whole or not at all (``tools.files``); a write the disk refuses is
    an ``OutputError`` naming the file."""
    try:
        write_atomic(p, data)
    except OSError as e:
        raise OutputError(f"cannot write {documents.one_line(str(p))}: {e.strerror or e}") from None


def _layer_range(text: str) -> tuple[int, int]:
    try:
        a, sep, b = text.partition(":")
        first = int(a) if a else 0
        last = int(b) if b else (10**9 if sep else first)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers takes FIRST:LAST (e.g. 2:5, or 3 for one layer), got {text!r}"
        ) from None
    if last < first:
        raise argparse.ArgumentTypeError(f"--layers {text}: LAST is before FIRST")
    return first, last


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The dump's own flags (the run flags come from ``tools.args.run_flags``)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "-m",
        "--model",
        default="random:gemma3-tiny",
        help="a GGUF path (only its header is read), a packaged model, or random:ARCH "
        "(default random:gemma3-tiny)",
    )
    src.add_argument("--graph", default=None, help="a graph or dump saved as JSON")
    p.add_argument(
        "-o",
        "--output",
        action="append",
        required=True,
        metavar="FILE",
        help=f"output file, by extension: {', '.join(WRITERS)} (repeatable)",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt-len", type=int, default=None, help="tokens of a prompt pass")
    what.add_argument(
        "--decode", action="store_true", help="a decode step at the end of the context (default)"
    )
    p.add_argument(
        "--layers",
        type=_layer_range,
        default=None,
        metavar="FIRST:LAST",
        help="only these layers (the head is layer n_layer, the embedding -1)",
    )
    p.add_argument("--ops", default="", help="only these op kinds, comma-separated (MUL_MAT,...)")
    p.add_argument("--offsets", action="store_true", help="show each value's arena offset")
    p.add_argument(
        "--no-weights",
        action="store_true",
        help="leave weight nodes out of .dot/.svg/.png (placements stay in labels)",
    )


def main(args: argparse.Namespace) -> int:
    """Check every output (and Graphviz, where one needs it), then plan, select and write.
    Problems with the request are found before any work (``UsageError``, ``GraphvizMissing``)."""
    outputs = [check_output(out) for out in args.output]
    if any(p.suffix.lower() in RENDERED for p in outputs):
        drawing.require_graphviz()
    options = options_from(args, n_ctx=args.ctx_size or 512)
    if args.graph:
        doc = load(args.graph, options)
    else:
        doc = from_model(args.model, options, args.prompt_len or 1)
    ops = [o for o in args.ops.split(",") if o.strip()]
    doc = select(doc, args.layers, ops)
    summary = drawing.summary_text(doc)
    for out in outputs:
        path = write(doc, out, offsets=args.offsets, weights=not args.no_weights)
        print(f"wrote {path} ({summary})", file=sys.stderr)
    return 0
