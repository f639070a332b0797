"""An execution trace: what each stream of a run did, and when, measured on the device itself.

    trace = Trace()
    sess = Session(cfg, weights, streams=3, trace=trace)   # or: sess.trace = trace
    sess.prefill(ids); sess.decode(tok)
    [sp for sp in trace.spans if sp.track == "stream 1"]   # Span(name='attn.0', ...)
    tools.timeline.write_chrome(trace, "out.json")          # Perfetto / chrome://tracing

A *track* is one in-order timeline: a compute stream (``stream 0``, ``stream 1``...), the
weight-streaming ``copy stream``, the ``CPU backend`` of a split model, and two kept by the host:
``host (Python)``, how long Python took to issue each launch (the overhead this project
fights), and ``forward passes``, one span per executor run. A *span* is a launch bracketed by two
marks queued on its stream (``Backend.mark``): on a GPU the device stamps them when it gets
there, so a span is the launch's device time, gaps included where a stream waited. An
*instant* is a point on a track: an event a stream waits on or records.

Marks are read (``resolve``) after the run that queued them is synchronized; ``Executor.run``
does it, so a trace holds plain numbers between runs. Each run starts a ``Clock``: a host time
and a mark queued at that moment on the main stream, so device times land on the host's
``time.perf_counter`` axis (exact on the CPU; on a GPU off by the latency of the first mark,
microseconds, since the device is idle when a run starts). ``section`` groups what follows
under a name (``streamgraph bench`` names each test's run), shown as its own process.

This module holds data and the wrappers the executor and the weight ring use while tracing;
it draws nothing (``tools.timeline`` does).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from graph.ir import Graph, Node
from graph.ops import VIEW_OPS, Op

__all__ = [
    "Trace",
    "Span",
    "Instant",
    "Clock",
    "Recorder",
    "step_info",
    "HOST",
    "PASSES",
    "COPY",
    "CPU",
]

HOST = "host (Python)"
PASSES = "forward passes"
COPY = "copy stream"
CPU = "CPU backend"


@dataclass(frozen=True, slots=True)
class Span:
    """Something that took time on one track; times are ``time.perf_counter`` seconds."""

    section: str
    track: str
    name: str
    cat: str  # kernel, fused, copy, fetch, issue, sync, run
    start: float
    end: float
    args: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dur(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Instant:
    """A point on one track: a wait satisfied (``cat="wait"``) or an event recorded."""

    section: str
    track: str
    name: str
    cat: str
    time: float
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Clock:
    """One run's time base on one backend: ``origin`` (a mark) was queued at host time
    ``host``, so a mark's time is ``host + backend.mark_seconds(mark, origin)``."""

    backend: Any
    host: float
    origin: Any


class Trace:
    """A recorder of spans and instants over any number of runs, backends and streams.

    Not thread-safe, and need not be: every record is made by the thread that issues work.
    """

    def __init__(self, section: str = "streamgraph") -> None:
        self.section = section
        self.tracks: dict[tuple[str, str], int] = {}  # (section, track) -> order of first use
        self.spans: list[Span] = []
        self.instants: list[Instant] = []
        self._pending: list[tuple] = []  # records whose marks are not read yet
        self._clocks: dict[int, Clock] = {}  # id(backend) -> the clock of its current run

    def track(self, name: str) -> str:
        """Declare track ``name`` in the current section (done by every record)."""
        self.tracks.setdefault((self.section, name), len(self.tracks))
        return name

    # -- clocks ------------------------------------------------------------------------------
    def start(self, backend: Any) -> Clock:
        """A new time base for ``backend`` (a run starts one): a mark on its main stream now."""
        origin = backend.mark(None)
        clock = Clock(backend, time.perf_counter(), origin)
        self._clocks[id(backend)] = clock
        return clock

    def clock(self, backend: Any) -> Clock:
        """The clock of ``backend``'s current run, or a new one (work issued between runs,
        such as ``Session.prepare``'s fetches)."""
        clock = self._clocks.get(id(backend))
        return clock if clock is not None else self.start(backend)

    # -- records -----------------------------------------------------------------------------
    def span(
        self,
        clock: Clock,
        track: str,
        name: str,
        cat: str,
        start: Any,
        end: Any,
        args: Mapping[str, Any] | None = None,
    ) -> None:
        """A span between two marks of ``clock``'s backend, read at the next ``resolve``."""
        self.track(track)
        self._pending.append((clock, self.section, track, name, cat, start, end, args or {}))

    def instant(
        self,
        clock: Clock,
        track: str,
        name: str,
        cat: str,
        mark: Any,
        args: Mapping[str, Any] | None = None,
    ) -> None:
        """An instant at a mark of ``clock``'s backend."""
        self.track(track)
        self._pending.append((clock, self.section, track, name, cat, mark, None, args or {}))

    def host_span(
        self,
        track: str,
        name: str,
        cat: str,
        start: float,
        end: float,
        args: Mapping[str, Any] | None = None,
    ) -> None:
        """A span measured on the host (``time.perf_counter`` seconds)."""
        self.track(track)
        self.spans.append(Span(self.section, track, name, cat, start, end, args or {}))

    def resolve(self) -> None:
        """Turn every pending mark into seconds. Call once the streams that hold them are
        synchronized (``Executor.run`` does, at its end)."""
        pending, self._pending = self._pending, []
        for clock, section, track, name, cat, a, b, args in pending:
            seconds = clock.backend.mark_seconds
            t = clock.host + seconds(a, clock.origin)
            if b is None:
                self.instants.append(Instant(section, track, name, cat, t, args))
            else:
                end = clock.host + seconds(b, clock.origin)
                self.spans.append(Span(section, track, name, cat, t, end, args))

    def discard(self) -> None:
        """Drop the pending records (a run failed: some of its marks will never be reached)."""
        self._pending.clear()
        self._clocks.clear()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def __len__(self) -> int:
        return len(self.spans) + len(self.instants)

    def __repr__(self) -> str:
        return (
            f"Trace({len(self.spans)} spans, {len(self.instants)} instants on "
            f"{len(self.tracks)} tracks, {len(self._pending)} pending)"
        )


class Recorder:
    """One issuer's view of a trace: its backend and the track of each of its streams.

    ``wrap`` turns a launch into a traced launch (a mark on its stream before and after it, its
    host issue time on ``HOST``); ``note`` records an instant at a mark queued now. Wrapped
    launches are built once per executor and trace, so an untraced run pays nothing.
    """

    def __init__(self, trace: Trace, backend: Any, tracks: Mapping[int, str]) -> None:
        self.trace, self.backend = trace, backend
        self.tracks = dict(tracks)  # id(stream) -> track name

    def track_of(self, stream: Any) -> str:
        return self.tracks[id(stream if stream is not None else self.backend.main_stream())]

    def note(self, stream: Any, name: str, cat: str, args: Mapping[str, Any] | None = None) -> None:
        trace, be = self.trace, self.backend
        clock = trace.clock(be)
        trace.instant(clock, self.track_of(stream), name, cat, be.mark(stream), args)

    def wrap(
        self,
        launch: Callable[[], None],
        stream: Any,
        name: str,
        cat: str,
        args: Mapping[str, Any] | None = None,
        waits: Sequence[str] = (),
        record: str | None = None,
    ) -> Callable[[], None]:
        """``launch`` bracketed by marks on ``stream``. ``waits``: names of the events its
        issuer waits on just before it (instants at its start mark, the moment the stream
        went on); ``record``: the event recorded just after it (an instant at its end)."""
        trace, be, track = self.trace, self.backend, self.track_of(stream)
        args = dict(args or {})
        perf = time.perf_counter

        def traced() -> None:
            clock = trace.clock(be)
            start = be.mark(stream)
            t0 = perf()
            launch()
            t1 = perf()
            end = be.mark(stream)
            trace.span(clock, track, name, cat, start, end, args)
            trace.host_span(HOST, name, "issue", t0, t1, {"track": track})
            for w in waits:
                trace.instant(clock, track, f"wait {w}", "wait", start)
            if record is not None:
                trace.instant(clock, track, f"record {record}", "record", end)

        return traced

    def bracket(
        self,
        launches: Sequence[Callable[[], None]],
        stream: Any,
        name: str,
        cat: str,
        args: Mapping[str, Any] | None = None,
    ) -> list[Callable[[], None]]:
        """Several launches as one traced span (the copies of a run's inputs or outputs); an
        empty list stays empty."""
        if not launches:
            return []
        items = list(launches)

        def all_of() -> None:
            for launch in items:
                launch()

        return [self.wrap(all_of, stream, name, cat, args)]


def step_info(
    graph: Graph, members: Sequence[Node], pattern: str | None = None
) -> tuple[str, dict[str, Any]]:
    """The name and arguments a step shows: its node's name (or op), or a fused group's
    pattern; op, shape, dtype, bytes written and read, the weights it reads and their layer (a
    step that reads none: the number its name ends with, ``attn.3``)."""
    nodes, node = graph.nodes, members[-1]
    inside = {m.id for m in members}
    read, layers, weights = 0, set(), []
    for m in members:
        for s in m.srcs:
            if s in inside:
                continue
            src = nodes[s]
            read += src.nbytes
            while src.op in VIEW_OPS:
                src = nodes[src.srcs[0]]
            if src.op is Op.WEIGHT:
                weights.append(src.name)
                if src.layer is not None:
                    layers.add(src.layer)
    layer: int | None = max(layers) if layers else None
    named = [m.name for m in members if "." in m.name]
    if layer is None and named and named[-1].rsplit(".", 1)[1].isdigit():
        layer = int(named[-1].rsplit(".", 1)[1])
    args: dict[str, Any] = {
        "node": f"%{node.id}",
        "op": node.op.name,
        "shape": list(node.shape),
        "dtype": node.dtype.name,
        "bytes_out": sum(m.nbytes for m in members),
        "bytes_in": read,
    }
    if layer is not None:
        args["layer"] = layer
    if weights:
        args["weights"] = weights
    if pattern is not None:
        args["pattern"] = pattern
        args["members"] = [m.name or f"%{m.id} {m.op.name}" for m in members]
        return pattern, args
    return node.name or node.op.name, args
