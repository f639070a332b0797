"""``streamgraph dump``: draw a forward pass with every decision the engine made for it.

    streamgraph dump -m gemma3-270m --decode -o step.svg            # a decode step
    streamgraph dump -m llama-7b --dtype bf16 --strategy auto --vram 8 -o 7b.html
    streamgraph dump -m gemma3-tiny --streams 3 --prompt-len 16 -o g.dot -o g.json
    streamgraph dump --graph saved.json --layers 2:4 --ops MUL_MAT,ATTENTION -o part.png

The model is a built-in architecture (``-m NAME``), a GGUF file (``-m PATH``; only its header
is read), or a graph saved as JSON (``--graph``: ``streamgraph graph --json``, or a dump's own
.json). The passes run as a session would run them (``engine.passes.decide`` and
``engine.passes.offload.place``); ``engine.views.annotate`` writes their decisions into a dump
document,
and the output's extension picks the writer: .json (the document), .dot (Graphviz text),
.svg/.png (rendered by Graphviz's ``dot``, a system package), .html (self-contained: pan,
zoom, search, hover details, collapsible layers; no Graphviz needed).

Colours: fill by where a node computes or a weight lives (GPU blue, CPU orange, streamed
green, host grey); border by stream; event waits are dashed red edges; each layer is a
cluster labelled with its placement; fused groups are dotted sub-clusters.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graph import drawing
from graph.ops import GraphError

__all__ = ["from_model", "from_graph", "load", "select", "write", "add_arguments", "main"]

WRITERS = (".json", ".dot", ".svg", ".png", ".html")


def from_graph(graph: Any, backend: str = "numpy", streams: int | str = 1, title: str = "") -> dict:
    """The dump document of a bare graph with the passes a default executor runs."""
    from engine.passes.plans import decide
    from engine.views.annotate import annotate

    d = decide(graph, backend, streams=streams)
    return annotate(graph, d, device="gpu" if backend == "cupy" else "cpu", title=title)


def from_model(
    model: str,
    prompt_len: int = 1,
    n_ctx: int = 512,
    dtype: str = "f32",
    streams: int | str = 1,
    strategy: str | None = None,
    vram: float | None = None,
    backend: str | None = None,
    fusion: bool = True,
    mode: str = "graph",
    stack: bool = True,
) -> dict[str, Any]:
    """The dump document of one forward pass of ``model`` over ``prompt_len`` tokens (1: a
    decode step) with a session's defaults: stacked projections, fusion, the given streams and
    weight placement. Nothing is allocated or run. ``backend`` sizes kernel scratch (CuPy's
    kernels use some, NumPy's none; default: CuPy where it loads); the session's device is
    drawn as the GPU unless ``backend="numpy"`` is asked for."""
    from backends import best_backend
    from engine.passes.offload import HOST, place
    from engine.passes.plans import decide
    from engine.views.annotate import annotate
    from graph.dtypes import dtype_of
    from graph.models import PRESETS, build, kv_slots, preset

    if model in PRESETS:
        cfg = preset(model)
    elif Path(model).is_file():
        from engine.model.gguf import open_gguf

        cfg = open_gguf(model).config
    else:
        raise GraphError(
            f"no built-in model or file {model!r}; built-in: {', '.join(sorted(PRESETS))}"
        )
    cfg = cfg.replace(dtype=dtype_of(dtype))
    if prompt_len < 1:
        raise GraphError(f"--prompt-len must be at least 1, got {prompt_len}")
    if prompt_len > n_ctx:
        raise GraphError(f"--prompt-len {prompt_len} exceeds the context ({n_ctx})")
    # as a session builds it: stacked Q/K/V and gate/up projections (``stack``), f32 caches
    graph = build(cfg, prompt_len, kv_slots(cfg, n_ctx, prompt_len), None, "last", None, stack)
    placement, split, host_tables = None, None, ()
    if strategy is not None:
        budget = None if vram is None else int(vram * 2**30)
        placement = place(graph, strategy, budget)
        host = [p.layer for p in placement.layers if p.where == HOST and p.layer >= 0]
        split = min(host) if host else None
        if placement.where(-1) == HOST and split != 0:
            host_tables = tuple(n.name for n in graph.weights if n.layer == -1)
    device = "cpu" if backend == "numpy" else "gpu"
    backend = backend or best_backend()
    d = decide(graph, backend, fusion=fusion, streams=streams, mode=mode, host_tables=host_tables)
    what = "decode step" if prompt_len == 1 else f"{prompt_len}-token prompt"
    title = f"{Path(model).name} {cfg.dtype.name}: {what}"
    if strategy:
        title += f", {strategy}" + (f" in {vram:g} GiB" if vram is not None else "")
    options = {
        "model": model,
        "prompt_len": prompt_len,
        "n_ctx": n_ctx,
        "dtype": cfg.dtype.name,
        "streams": streams,
        "strategy": strategy,
        "vram": vram,
        "backend": backend,
        "fusion": fusion,
        "stack": stack,
    }
    return annotate(graph, d, placement, device, split, title, options)


def load(path: str | Path) -> dict[str, Any]:
    """A dump document from a .json file: a dump's own, or a graph saved by ``to_json``."""
    from graph.serialize import from_dict

    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise GraphError(f"cannot read {p}: {e}") from e
    if isinstance(doc, dict) and doc.get("format") == drawing.FORMAT:
        return doc
    return from_graph(from_dict(doc), title=p.name)


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
            raise GraphError(
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
    out["summary"] = dict(doc["summary"], shown=len(out["nodes"]))
    return out


def write(
    doc: dict[str, Any], path: str | Path, offsets: bool = False, weights: bool = True
) -> Path:
    """Write ``doc`` to ``path`` in the format its extension names."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in WRITERS:
        raise GraphError(f"cannot write {p.name}: use one of {', '.join(WRITERS)}")
    if ext == ".json":
        p.write_text(json.dumps(doc, indent=1))
    elif ext == ".html":
        from tools.dump_html import to_html

        p.write_text(to_html(doc))
    else:
        dot = drawing.to_dot(doc, offsets=offsets, weights=weights)
        if ext == ".dot":
            p.write_text(dot)
        else:
            p.write_bytes(drawing.render(dot, ext[1:]))
    return p


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
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "-m", "--model", default="gemma3-tiny", help="built-in model name or a GGUF path"
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
    what.add_argument("--decode", action="store_true", help="a decode step (the default)")
    p.add_argument("-c", "--ctx", type=int, default=512, help="context length (default 512)")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"], help="weight type")
    p.add_argument("--streams", default="1", help="compute streams: N or auto (default 1)")
    p.add_argument(
        "--strategy",
        default=None,
        metavar="POLICY",
        help="weight placement: all, auto, ngl=N or *N+K (e.g. *15+5)",
    )
    p.add_argument("--vram", type=float, default=None, help="device budget in GiB")
    p.add_argument(
        "--backend",
        default=None,
        choices=["cupy", "numpy"],
        help="plan for this backend's kernels (default: CuPy where it loads; nothing "
        "runs); numpy also draws the session's device as the CPU",
    )
    p.add_argument("--no-fusion", action="store_true", help="draw the unfused graph")
    p.add_argument(
        "--no-stack",
        action="store_true",
        help="separate Q/K/V and gate/up projections (what streams can overlap)",
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
    if args.graph:
        doc = load(args.graph)
    else:
        streams = args.streams if args.streams == "auto" else int(args.streams)
        doc = from_model(
            args.model,
            prompt_len=args.prompt_len or 1,
            n_ctx=args.ctx,
            dtype=args.dtype,
            streams=streams,
            strategy=args.strategy,
            vram=args.vram,
            backend=args.backend,
            fusion=not args.no_fusion,
            stack=not args.no_stack,
        )
    ops = [o for o in args.ops.split(",") if o.strip()]
    doc = select(doc, args.layers, ops)
    summary = drawing._summary_text(doc)
    for out in args.output:
        path = write(doc, out, offsets=args.offsets, weights=not args.no_weights)
        print(f"wrote {path} ({summary})", file=sys.stderr)
    return 0
