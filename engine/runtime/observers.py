"""Observers of an executor's run loop: each wraps the prepared operations once, and the same
loop then runs the wrapped ones (eagerly: a captured graph cannot be watched op by op).

    ex.trace = Trace()           # TraceObserver: every operation timed on the device
    STREAMGRAPH_DEBUG=2 ...      # DebugObserver: one line per launch with its time

An observer sees each ``engine.runtime.executor.BoundOp`` (its kind, stream, step, node) when
it wraps it, and the run's phases (``start``, ``phase``, ``primed``, ``finish``, ``fail``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.views.trace import COPY, HOST, PASSES, Recorder, Trace, step_info

if TYPE_CHECKING:  # annotations only: the executor imports this module
    from engine.runtime.executor import BoundOp, Executor

__all__ = ["Observer", "TraceObserver", "DebugObserver"]


class Observer:
    """Watches every run of an executor; the defaults watch nothing."""

    def wrap(self, ex: Executor, op: BoundOp) -> Callable[[], None]:
        """What the run calls instead of ``op.fn`` (built once per executor)."""
        return op.fn

    def start(self, ex: Executor) -> None:
        """A run starts."""

    def phase(self, ex: Executor, what: str, t0: float, t1: float) -> None:
        """The host spent ``t0..t1`` on ``what`` (set inputs, synchronize)."""

    def primed(self, ex: Executor) -> None:
        """The run waited for fetches ``Session.prepare`` queued before it."""

    def finish(self, ex: Executor, t0: float, t1: float) -> None:
        """The run is complete (its streams synchronized)."""

    def fail(self, ex: Executor) -> None:
        """The run failed."""


class DebugObserver(Observer):
    """``STREAMGRAPH_DEBUG=2``: after each launch every stream is synchronized and one line
    printed, the launch's time and its node."""

    def wrap(self, ex: Executor, op: BoundOp) -> Callable[[], None]:
        if op.kind != "launch":
            return op.fn
        fn, node, be = op.fn, op.node, ex.backend
        streams = list(ex.streams.values())

        def timed() -> None:
            t0 = time.perf_counter()
            fn()
            for st in streams:
                st.synchronize()
            be.synchronize()
            print(f"{(time.perf_counter() - t0) * 1e6:9.1f} us  {node}", flush=True)

        return timed


class TraceObserver(Observer):
    """Records a run into a ``Trace`` (``engine.views.trace``): each launch a span between
    two marks on its stream (named by its node, a fused group by its pattern), input and output
    copies as spans, waits and records as instants, the host's issue time per launch, and one
    span per run on the ``forward passes`` track."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self._rec: Recorder | None = None

    def _recorder(self, ex: Executor) -> Recorder:
        if self._rec is None:
            tracks = {id(st): _track(ex, k) for k, st in ex.streams.items()}
            if ex.ring is not None:
                tracks[id(ex.ring.copy_stream)] = COPY
            self._rec = Recorder(self.trace, ex.backend, tracks)
        return self._rec

    def wrap(self, ex: Executor, op: BoundOp) -> Callable[[], None]:
        rec, fn, st = self._recorder(ex), op.fn, op.stream
        kind = op.kind
        if kind == "launch":
            members = (
                [op.node] if op.detail is None else [ex.graph.nodes[m] for m in op.detail.nodes]
            )
            pattern = op.detail.pattern if op.detail is not None else None
            name, args = step_info(ex.graph, members, pattern)
            return rec.wrap(fn, st, name, "fused" if pattern else "kernel", args)
        if kind in ("copy in", "copy out"):
            what = "copy inputs" if kind == "copy in" else "copy outputs"
            return rec.bracket([fn], st, what, "copy", {"bytes": op.detail})[0]
        if kind == "wait":
            return _then(fn, rec, st, f"wait {_event(ex, op.detail)}", "wait")
        if kind == "record":  # marked before the record: reached before any waiter goes on
            return _before(fn, rec, st, f"record {_event(ex, op.node.id)}", "record")
        if kind == "fork" and op.detail is not None:
            return _then(fn, rec, st, "wait fork (inputs in)", "wait")
        if kind == "ring fork":
            return _then(fn, rec, st, "wait fork (run start)", "wait")
        if kind == "join":
            return _then(fn, rec, ex.streams[0], f"wait join (stream {op.detail})", "wait")
        if kind == "ring end":
            return _then(fn, rec, st, "wait join (copy stream)", "wait")
        if kind == "ready":
            ring, j = ex.ring, op.detail
            assert ring is not None
            label = ring.fetches[j].plan.label

            def ready() -> None:
                if ring.wait_ready(j):
                    rec.note(st, f"wait {label} ready", "wait")

            return ready
        if kind == "free":
            slot = ex.ring.fetches[op.detail].plan.slot  # type: ignore[union-attr]
            return _before(fn, rec, st, f"record slot {slot} free", "record")
        return fn

    def start(self, ex: Executor) -> None:
        self.trace.start(ex.backend)

    def phase(self, ex: Executor, what: str, t0: float, t1: float) -> None:
        cat = "sync" if what == "synchronize" else "issue"
        self.trace.host_span(HOST, what, cat, t0, t1)

    def primed(self, ex: Executor) -> None:
        self._recorder(ex).note(ex.streams[0], "wait primed fetches", "wait")

    def finish(self, ex: Executor, t0: float, t1: float) -> None:
        n = ex.tokens_per_run
        name = "forward" if n is None else f"forward, {n} token(s)"
        if ex.trace_label is not None:
            name += f" on {ex.trace_label}"
        self.trace.host_span(PASSES, name, "run", t0, t1, {"launches": ex.n_launches})
        self.trace.resolve()

    def fail(self, ex: Executor) -> None:
        self.trace.discard()


def _track(ex: Executor, k: int) -> str:
    label = ex.trace_label
    if label is None:
        return f"stream {k}"
    return label if k == 0 else f"{label} stream {k}"


def _event(ex: Executor, node: int) -> str:
    """How a trace names the event recorded after step ``node``: its node and stream."""
    n = ex.graph.nodes[node]
    sched = ex.schedule
    return f"{n.name or f'{n.op.name} %{node}'} (stream {sched.stream[node] if sched else 0})"


def _then(
    fn: Callable[[], None], rec: Recorder, stream: Any, name: str, cat: str
) -> Callable[[], None]:
    """``fn``, then an instant on ``stream`` once the stream gets past it."""

    def noted() -> None:
        fn()
        rec.note(stream, name, cat)

    return noted


def _before(
    fn: Callable[[], None], rec: Recorder, stream: Any, name: str, cat: str
) -> Callable[[], None]:
    """An instant on ``stream`` where it reaches this point, then ``fn``."""

    def noted() -> None:
        rec.note(stream, name, cat)
        fn()

    return noted
