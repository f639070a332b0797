"""Weight streaming: the layers a placement streams live in pinned host memory and are copied
into a fixed ring of device slots on a copy stream, K layers ahead of the compute.

    ring = WeightRing(backend, ring_plan, host_weights)     # engine.passes.ring.RingPlan
    ring.arrays            # weight name -> its view in the layer's slot (what kernels read)

Order of one forward pass (all of it queued on the device, none of it waiting on the host):
the copy stream fetches the streamed layers in order; fetch j goes into slot j mod (K+1) once
the layer that used the slot before it is finished ("slot free" event, recorded on the compute
stream after that layer's last step); the first step reading a streamed layer waits for its
fetch ("slot ready" event, recorded on the copy stream). The compute stream forks the copy
stream at the start and joins it at the end, so the same sequence captures into a CUDA graph.
Where each step waits and frees is the step plan's (``engine.passes.ring.ring_steps``); the
executor calls ``fork``, ``start``, ``wait_ready``, ``free`` and ``end`` at those points.

Host copies are pinned (``Backend.pinned``): a pageable copy runs ~8x slower, so a backend that
cannot pin refuses instead of streaming slowly.

With a trace set (``WeightRing.trace``, ``engine.views.trace``), each fetch is a span on the
``copy stream`` track ("fetch blk.12 (slot 1)"), and the copy stream's wait for a free slot is
an instant there.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends import Backend
from backends.base import Quantized
from engine.passes.ring import FetchPlan, RingPlan, RingWeight
from engine.views.trace import COPY, HOST, Recorder, Trace
from graph.dtypes import u8
from graph.ir import contiguous_strides
from graph.ops import GraphError

__all__ = ["WeightRing", "CacheStats"]


@dataclass
class CacheStats:
    """What the parameter cache (``RingPlan.cached``) saved: every cached layer is a hit in
    every pass, every fetched one a miss."""

    capacity: int = 0
    used: int = 0
    layers: int = 0
    hits: int = 0
    misses: int = 0
    bytes_saved: int = 0
    layer_bytes: int = field(default=0, repr=False)

    def count_pass(self, misses: int) -> None:
        self.hits += self.layers
        self.misses += misses
        self.bytes_saved += self.layer_bytes

    def stats(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "used": self.used,
            "layers": self.layers,
            "hits": self.hits,
            "misses": self.misses,
            "bytes_saved": self.bytes_saved,
        }


@dataclass
class _Fetch:
    """One fetch bound to memory: its copies and its ready event."""

    plan: FetchPlan
    copies: list[Callable[[], None]]
    ready: Any  # recorded on the copy stream after the copies


class WeightRing:
    """The slots, the pinned host copies and the fetches of a ``RingPlan``. One ring serves
    every executor of a session (they stream the same layers in the same order), and a pass
    fetches the next pass's first K+1 layers, each as soon as its slot's last user in this pass
    is done, so those copies overlap the end of this pass instead of delaying the start of the
    next. With no more streamed layers than slots, every layer stays in its slot after the
    first pass."""

    def __init__(self, be: Backend, plan: RingPlan, weights: Mapping[str, Any]) -> None:
        self.plan, self.backend = plan, be
        self.copy_stream = copy_stream = be.stream()
        # a dropped ring gives its pinned host copies back (to CuPy's pinned pool); a fetch
        # still in flight must not be reading them then
        weakref.finalize(self, copy_stream.synchronize)
        self.slots = plan.slots
        self.buffers = [be.alloc(plan.slot_bytes) for _ in range(plan.slots)]
        self.device_bytes = plan.slot_bytes * plan.slots
        self.arrays: dict[str, Any] = {}
        self.free_events = [be.event() for _ in range(plan.slots)]
        self._keep: list[Any] = []
        self.fetches: list[_Fetch] = []
        for f in plan.fetches:
            copies = []
            for w in f.weights:
                host = _host(be, weights, w.name, w.shape)
                pinned = be.pinned(_storage(host, w))
                self._keep.append(pinned)
                view = _slot_view(be, self.buffers[f.slot], w)
                self.arrays[w.name] = view
                copies.append(be.copy_launch(_bytes_of(view), pinned, copy_stream))
            self.fetches.append(_Fetch(f, copies, be.event()))
        self.streamed_bytes = plan.streamed_bytes
        self.cache = CacheStats(plan.cache_capacity, plan.cache_bytes, len(plan.cached))
        self.cache.layer_bytes = sum(f.span for f in plan.cached)
        self.cache_buffers = []
        for f in plan.cached:  # copied once, kept for good
            buf = be.alloc(max(1, f.span))
            for w in f.weights:
                view = _slot_view(be, buf, w)
                host = _host(be, weights, w.name, w.shape)
                be.copy_from_host(_bytes_of(view), _storage(host, w))
                self.arrays[w.name] = view
            self.cache_buffers.append(buf)
        be.synchronize()
        self.primed = False  # the first K+1 fetches of the next pass are issued already
        self.pending = False  # ... by ``Session.prepare``, and no stream has waited for them
        self.fetched = 0  # fetches issued in all (statistics)
        self._rec: Recorder | None = None
        self._skip: frozenset[int] = frozenset()  # primed fetches a pass does not wait for
        self._main: Any = None
        self._fork, self._join = be.event(), be.event()

    @property
    def trace(self) -> Trace | None:
        """Where fetches are recorded (set by the session or executor that uses the ring)."""
        return self._rec.trace if self._rec is not None else None

    @trace.setter
    def trace(self, trace: Trace | None) -> None:
        tracks = {id(self.copy_stream): COPY}
        self._rec = Recorder(trace, self.backend, tracks) if trace is not None else None

    @property
    def resident(self) -> bool:
        """Every streamed layer fits a slot of its own: after the first pass nothing moves."""
        return self.plan.resident

    # -- fetches ------------------------------------------------------------------------------
    def fetch(self, j: int, after_free: bool = True) -> None:
        """Queue fetch ``j`` on the copy stream: wait for its slot, copy, mark it ready. The
        first fetches of a pass before any pass skip the wait: nothing holds the slots."""
        f, copy = self.fetches[j], self.copy_stream
        if self._rec is not None:
            return self._fetch_traced(f, after_free, self._rec)
        if after_free:
            self.free_events[f.plan.slot].wait(copy)
        for c in f.copies:
            c()
        f.ready.record(copy)
        self.fetched += 1

    def _fetch_traced(self, f: _Fetch, after_free: bool, rec: Recorder) -> None:
        """``fetch`` with its copies bracketed by marks on the copy stream."""
        copy, be, trace = self.copy_stream, self.backend, rec.trace
        clock = trace.clock(be)
        if after_free:
            self.free_events[f.plan.slot].wait(copy)
        start = be.mark(copy)
        t0 = time.perf_counter()
        for c in f.copies:
            c()
        t1 = time.perf_counter()
        end = be.mark(copy)
        f.ready.record(copy)
        self.fetched += 1
        p = f.plan
        name = f"fetch {p.label} (slot {p.slot})"
        args = {"layer": p.layer, "slot": p.slot, "bytes": p.nbytes, "copies": len(f.copies)}
        trace.span(clock, COPY, name, "fetch", start, end, args)
        trace.host_span(HOST, name, "issue", t0, t1, {"track": COPY})
        if after_free:
            trace.instant(clock, COPY, f"wait slot {p.slot} free", "wait", start)
        trace.instant(clock, COPY, f"record {p.label} ready", "record", end)

    def prime(self) -> None:
        """Queue the first pass's fetches ahead of it (``Session.prepare``)."""
        if self.primed:
            return
        for j in range(min(self.slots, len(self.fetches))):
            self.fetch(j, after_free=False)
        self.primed = self.pending = True

    def settle(self, main: Any) -> bool:
        """Before a run: the main stream waits for fetches ``prime`` queued; True if there were
        any. Every other primed fetch was issued by an earlier run, which the host waited for,
        so a pass never waits for its primed fetches itself (a capture could not: an event
        recorded outside it, or inside another capture, is invalid there)."""
        if not self.pending:
            return False
        for j in range(min(self.slots, len(self.fetches))):
            self.fetches[j].ready.wait(main)
        self.pending = False
        return True

    # -- a pass, as the executor's steps meet the ring ----------------------------------------
    def fork(self, main: Any) -> None:
        """The start of a pass on ``main``: the copy stream forks from it."""
        self._main = main
        self._fork.record(main)
        self._fork.wait(self.copy_stream)

    def start(self, free_first: tuple[int, ...]) -> None:
        """Unless primed, the pass issues its own first fetches (and waits for them); fetches
        the graph never reads free their slots at once."""
        first = range(min(self.slots, len(self.fetches)))
        if self.primed:
            self._skip = frozenset(first)  # complete, or waited for by ``settle``
        else:
            self._skip = frozenset()
            for j in first:
                self.fetch(j, after_free=False)
        for j in free_first:
            self.free(j)

    def wait_ready(self, j: int) -> bool:
        """The compute stream waits for fetch ``j`` (False: it needs no wait this pass)."""
        if j in self._skip:
            return False
        self.fetches[j].ready.wait(self._main)
        return True

    def free(self, j: int) -> None:
        """Fetch ``j``'s slot is free: record it, and give the copy stream the fetch that uses
        the slot next (j + slots in this pass, or for its last user the next pass's fetch into
        it, so the next pass's first fetches start as their slots free, not after the pass)."""
        n, slots = len(self.fetches), self.slots
        self.free_events[self.fetches[j].plan.slot].record(self._main)
        if j + slots < n:
            self.fetch(j + slots)
        elif not self.resident:
            self.fetch(j % slots)

    def end(self) -> None:
        """The end of a pass: the main stream joins the copy stream."""
        self.primed = True
        primed_before = bool(self._skip)
        self.cache.count_pass(0 if primed_before and self.resident else len(self.fetches))
        self._join.record(self.copy_stream)
        self._join.wait(self._main)


def _slot_view(be: Backend, buf: Any, w: RingWeight) -> Any:
    """Weight ``w``'s place in a slot: an array, or a ``Quantized`` over its bytes."""
    if w.dtype.is_quantized:
        rows = (*w.shape[:-1], w.dtype.nbytes((w.shape[-1],)))
        data = be.view(buf, w.offset, rows, u8, contiguous_strides(rows))
        return Quantized(data, w.dtype, w.shape)
    return be.view(buf, w.offset, w.shape, w.dtype, w.strides)


def _bytes_of(view: Any) -> Any:
    return view.data if isinstance(view, Quantized) else view


def _storage(host: Any, w: RingWeight) -> np.ndarray:
    """The host bytes a fetch copies: a ``Quantized`` weight's blocks as they are, an array in
    the planned type."""
    if isinstance(host, Quantized):
        if host.dtype != w.dtype:
            raise GraphError(
                f"weight {w.name} is {host.dtype.name}, the plan expects {w.dtype.name}"
            )
        return np.ascontiguousarray(host.data)
    return np.ascontiguousarray(host.astype(w.dtype.numpy))


def _host(be: Backend, weights: Mapping[str, Any], name: str, shape: tuple[int, ...]) -> Any:
    """A streamed weight as a host value, checked against the plan's shape."""
    if name not in weights:
        raise GraphError(f"missing weight {name} (streamed)")
    host = be.weight_to_host(weights[name])
    if tuple(host.shape) != shape:
        raise GraphError(f"weight {name} has shape {tuple(host.shape)}, the plan expects {shape}")
    return host
