"""Execution timelines: a run's ``engine.views.trace.Trace`` as a Chrome trace (JSON) and a PNG.

    streamgraph bench -m llama-tiny -p 32 -n 8 --streams 3 --trace out.json   # + out.png
    streamgraph bench -m gemma3-270m -p 0 -n 8 --strategy '*6+2' --trace ring.json
    streamgraph generate -m gemma3-270m "The capital of France is" -n 16 --trace gen.json
    python -m tools.timeline out.json [picture.png]     # the PNG again, from a saved trace

Open the JSON in https://ui.perfetto.dev or chrome://tracing. One row per track: ``forward
passes`` (one span per executor run), ``host (Python)`` (how long Python took to issue each
launch, and the wait in ``synchronize``), ``stream 0``, ``stream 1``... (each launch, timed on
the device by marks queued on its stream), ``copy stream`` (weight-streaming fetches, "fetch
blk.12 (slot 1)") and ``CPU backend`` (the host segment of a split model, ``ngl=N``). Event
waits and records are instants (ticks) on the stream that waited or recorded; a span's
arguments name its node, op, shape, bytes and layer. ``streamgraph bench`` traces one extra,
untimed run of each test after its timed repetitions, each test its own process (section)
starting at 0 so that configurations line up; tracing runs launch by launch (no CUDA-graph
replay), so its spans show where time goes, not the replayed speed.

From Python::

    from engine.views.trace import Trace
    from tools import timeline
    sess.trace = Trace(); sess.generate(...); timeline.save(sess.trace, "out.json")
    doc = timeline.load("out.json"); timeline.render_png(doc, "out.png")

The PNG needs matplotlib (``pip install 'streamgraph[viz]'``); the JSON needs nothing.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine.views.trace import COPY, CPU, HOST, PASSES, Trace
from tools.files import atomic_path, write_atomic

__all__ = [
    "to_chrome",
    "validate",
    "write_chrome",
    "load",
    "render_png",
    "check_path",
    "save",
    "main",
]

COLORS = {
    "kernel": "#4C72B0",
    "fused": "#8172B3",
    "copy": "#DD8452",
    "fetch": "#55A868",
    "issue": "#937860",
    "sync": "#C8C8C8",
    "run": "#DA8BC3",
    "wait": "#C44E52",
    "record": "#2A9D8F",
}
OTHER = "#777777"
VIZ = "pip install 'streamgraph[viz]'"


def _rank(track: str) -> tuple[int, int, str]:
    """Rows top to bottom: passes, host, compute streams in order, copy stream, CPU backend."""
    m = re.fullmatch(r"stream (\d+)", track)
    if m:
        return (2, int(m.group(1)), track)
    order = {PASSES: 0, HOST: 1, COPY: 3}
    if track in order:
        return (order[track], 0, track)
    return (4 if track.startswith(CPU) else 5, 0, track)


def to_chrome(trace: Trace) -> dict[str, Any]:
    """The trace in the Trace Event Format: a process per section, a thread per track, a
    complete event ("X") per span, a thread-scoped instant ("i") per wait or record; times in
    microseconds from the section's first event. Records still pending (work issued after the
    last run, never synchronized) are left out."""
    sections: list[str] = []
    for section, _ in trace.tracks:
        if section not in sections:
            sections.append(section)
    pid = {s: i + 1 for i, s in enumerate(sections)}
    tid: dict[tuple[str, str], int] = {}
    events: list[dict[str, Any]] = []
    for section in sections:
        p = pid[section]
        events.append(_meta("process_name", p, 0, {"name": section}))
        events.append(_meta("process_sort_index", p, 0, {"sort_index": p}))
        tracks = sorted((t for s, t in trace.tracks if s == section), key=_rank)
        for i, track in enumerate(tracks):
            tid[(section, track)] = i + 1
            events.append(_meta("thread_name", p, i + 1, {"name": track}))
            events.append(_meta("thread_sort_index", p, i + 1, {"sort_index": i + 1}))
    t0: dict[str, float] = {}
    for sp in trace.spans:
        t0[sp.section] = min(t0.get(sp.section, math.inf), sp.start)
    for ev in trace.instants:
        t0[ev.section] = min(t0.get(ev.section, math.inf), ev.time)
    timed: list[dict[str, Any]] = []
    for sp in trace.spans:
        timed.append(
            {
                "name": sp.name,
                "cat": sp.cat,
                "ph": "X",
                "ts": round((sp.start - t0[sp.section]) * 1e6, 3),
                "dur": round((sp.end - sp.start) * 1e6, 3),
                "pid": pid[sp.section],
                "tid": tid[(sp.section, sp.track)],
                "args": dict(sp.args),
            }
        )
    for ev in trace.instants:
        timed.append(
            {
                "name": ev.name,
                "cat": ev.cat,
                "ph": "i",
                "s": "t",
                "ts": round((ev.time - t0[ev.section]) * 1e6, 3),
                "pid": pid[ev.section],
                "tid": tid[(ev.section, ev.track)],
                "args": dict(ev.args),
            }
        )
    timed.sort(key=lambda e: (e["pid"], e["tid"], e["ts"]))
    return {
        "traceEvents": events + timed,
        "displayTimeUnit": "ms",
        "otherData": {"generator": "streamgraph", "sections": sections},
    }


def _meta(name: str, pid: int, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args}


def validate(doc: Any) -> None:
    """Raise ``ValueError`` unless ``doc`` is a Chrome trace this module can draw: complete
    ("X") and instant ("i") events with finite times, none ending before it starts, each on a
    track named by a ``thread_name`` metadata event."""
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        raise ValueError("not a Chrome trace: expected an object with a 'traceEvents' list")
    events = doc["traceEvents"]
    named = {
        (e.get("pid"), e.get("tid"))
        for e in events
        if isinstance(e, dict) and e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    bad = []
    for i, e in enumerate(events):
        if not isinstance(e, dict):
            bad.append(f"event {i} is not an object")
            continue
        ph, what = e.get("ph"), f"event {i} ({e.get('name')!r})"
        if ph == "M":
            continue
        if ph not in ("X", "i"):
            bad.append(f"{what} has phase {ph!r}: only X, i and M are written here")
            continue
        if not _finite(e.get("ts")):
            bad.append(f"{what} has no finite ts")
        if ph == "X" and not (_finite(e.get("dur")) and e["dur"] >= 0):
            bad.append(f"{what} ends before it starts (dur {e.get('dur')})")
        if (e.get("pid"), e.get("tid")) not in named:
            bad.append(f"{what} is on track pid={e.get('pid')} tid={e.get('tid')}, never named")
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(f"invalid trace: {'; '.join(bad[:5])}{more}")


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def write_chrome(trace: Trace | dict[str, Any], path: str | Path) -> Path:
    """Write the Chrome trace JSON of ``trace`` (checked by ``validate`` first)."""
    doc = to_chrome(trace) if isinstance(trace, Trace) else trace
    validate(doc)
    path = Path(path)
    write_atomic(path, json.dumps(doc, separators=(",", ":")))
    return path


def load(path: str | Path) -> dict[str, Any]:
    """A Chrome trace JSON file, checked by ``validate``."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    validate(doc)
    return doc


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise ImportError(f"drawing a timeline PNG needs matplotlib: {VIZ}") from None
    return Figure, Patch


# Long by design: one matplotlib figure drawn track by track; the steps share its axes.
def render_png(source: Trace | dict[str, Any] | str | Path, path: str | Path) -> Path:
    """A picture of the timeline: a lane per track (labelled ``section: track`` when there are
    several sections), a bar per span coloured by category, a tick per wait or record, time in
    milliseconds. ``source``: a ``Trace``, a Chrome trace dict, or a path to one.

    Drawn on a bare ``matplotlib.figure.Figure`` (the Agg canvas, no pyplot), so it works
    without a display and leaves matplotlib's global backend alone."""
    if isinstance(source, Trace):
        doc = to_chrome(source)
    elif isinstance(source, dict):
        doc = source
    else:
        doc = load(source)
    validate(doc)
    figure, patch = _matplotlib()
    events = doc["traceEvents"]
    names = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e["ph"] == "M" and e["name"] == "thread_name"
    }
    procs = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e["ph"] == "M" and e["name"] == "process_name"
    }
    sort = {
        (e["pid"], e["tid"]): e["args"]["sort_index"]
        for e in events
        if e["ph"] == "M" and e["name"] == "thread_sort_index"
    }
    lanes = sorted(names, key=lambda k: (k[0], sort.get(k, k[1])))
    row = {k: i for i, k in enumerate(lanes)}
    several = len({pid for pid, _ in lanes}) > 1
    spans = [e for e in events if e["ph"] == "X"]
    marks = [e for e in events if e["ph"] == "i"]
    end = max([(e["ts"] + e["dur"]) / 1e3 for e in spans] + [e["ts"] / 1e3 for e in marks] + [0])
    least = max(end, 1e-3) * 2e-4  # the narrowest bar drawn: every launch stays visible

    fig = figure(figsize=(14, 1.4 + 0.42 * max(len(lanes), 1)), dpi=110)
    ax = fig.add_subplot()
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for e in spans:
        bars.setdefault((row[(e["pid"], e["tid"])], e.get("cat", "")), []).append(
            (e["ts"] / 1e3, max(e["dur"] / 1e3, least))
        )
    for (y, cat), xr in bars.items():
        ax.broken_barh(xr, (y - 0.38, 0.76), facecolors=COLORS.get(cat, OTHER), linewidth=0)
    ticks: dict[str, tuple[list[float], list[float]]] = {}
    for e in marks:
        xs, ys = ticks.setdefault(e.get("cat", ""), ([], []))
        xs.append(e["ts"] / 1e3)
        ys.append(row[(e["pid"], e["tid"])])
    for cat, (xs, ys) in ticks.items():
        ax.scatter(xs, ys, marker="|", s=140, linewidths=1.2, color=COLORS.get(cat, OTHER))
    labels = [f"{procs.get(p, p)}: {names[(p, t)]}" if several else names[(p, t)] for p, t in lanes]
    ax.set_yticks(range(len(lanes)), labels, fontsize=8)
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    ax.set_xlim(0, end * 1.01 if end else 1)
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", alpha=0.3)
    cats = sorted(
        {c for _, c in bars} | set(ticks),
        key=lambda c: list(COLORS).index(c) if c in COLORS else 99,
    )
    ax.legend(
        handles=[patch(color=COLORS.get(c, OTHER), label=c or "other") for c in cats],
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=7,
        ncol=len(cats) or 1,
        frameon=False,
    )
    ax.set_title(
        f"streamgraph timeline: {len(spans)} spans, {len(marks)} waits/records",
        fontsize=9,
        loc="left",
    )
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches="tight", format="png")
    return path


def check_path(path: str | Path) -> Path:
    """The JSON path of ``--trace``, refused before a long run rather than after it: a ``.png``
    name (the PNG goes beside the JSON) or a folder that does not exist."""
    from tools.args import UsageError

    path = Path(path)
    if path.suffix.lower() == ".png":
        raise UsageError(
            f"--trace takes the JSON path ({path.with_suffix('.json')}); the PNG is written "
            "beside it"
        )
    if path.is_dir():
        raise UsageError(f"--trace {path} is a directory; give a .json file name")
    if not path.parent.is_dir():
        raise UsageError(f"--trace {path}: folder {path.parent} does not exist")
    return path


def save(
    trace: Trace,
    path: str | Path,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> list[Path]:
    """Write ``path`` (the Chrome trace) and the PNG beside it (``out.json`` -> ``out.png``);
    without matplotlib, the JSON alone and one line saying how to get the PNG."""
    path = check_path(path)
    doc = to_chrome(trace)
    written = [write_chrome(doc, path)]
    png = path.with_suffix(".png")
    try:
        written.append(render_png(doc, png))
    except ImportError as e:
        log(f"trace: wrote {path}; no {png.name}: {e}")
        return written
    log(f"trace: wrote {path} and {png}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tools.timeline TRACE.json [OUT.png]``: the PNG of a saved trace."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 2 or args[0] in ("-h", "--help"):
        print("usage: python -m tools.timeline TRACE.json [OUT.png]", file=sys.stderr)
        return 2
    src = Path(args[0])
    out = Path(args[1]) if len(args) == 2 else src.with_suffix(".png")
    try:
        render_png(src, out)
    except (ValueError, ImportError) as e:
        print(f"timeline: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
