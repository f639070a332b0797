"""Weight streaming: the layers a ``Placement`` streams live in host memory and are copied into a
fixed ring of device slots on a copy stream, K layers ahead of the compute.

    ring = WeightRing(backend, graph, placement, host_weights)
    ring.arrays            # weight name -> its view in the layer's slot (what kernels read)

Order of one forward pass (all of it queued on the device, none of it waiting on the host):
the copy stream fetches the streamed layers in order; fetch j goes into slot j mod (K+1) once
the layer that used the slot before it is finished ("slot free" event, recorded on the compute
stream after that layer's last step); the first step reading a streamed layer waits for its
fetch ("slot ready" event, recorded on the copy stream). The compute stream forks the copy
stream at the start and joins it at the end, so the same sequence captures into a CUDA graph.

Only matrices stream: a layer's norm vectors (kilobytes) stay resident, so a fused step that
reads the previous layer's norm together with its own matrices (``engine.passes.fusion``) still uses
one slot. Host copies are pinned (``Backend.pinned``): a pageable copy runs ~8x slower, so a
backend that cannot pin refuses instead of streaming slowly.

With a trace set (``WeightRing.trace``, ``engine.views.trace``), each fetch is a span on the ``copy
stream`` track ("fetch blk.12 (slot 1)"), the copy stream's wait for a free slot and the
compute stream's wait for a ready one are instants on their tracks.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends import Backend
from engine.passes.offload import STREAMED, Placement
from engine.views.trace import COPY, HOST, Recorder, Trace
from graph.ir import Graph
from graph.ops import VIEW_OPS, GraphError

__all__ = ["WeightRing", "Fetch", "ParamCache", "RingSteps"]

ALIGN = 256


@dataclass
class Fetch:
    """One streamed layer in a pass: its slot, its copies, its events."""

    layer: int
    slot: int
    copies: list[Callable[[], None]]
    ready: Any  # recorded on the copy stream after the copies
    label: str = ""  # how a trace names the layer: blk.12, output
    nbytes: int = 0


@dataclass
class ParamCache:
    """A byte-bounded device cache of streamed layers, with hit/miss statistics.

    Policy: decode reads the layers in the same cycle every token, and under a cycle longer
    than the cache LRU evicts each layer just before its next use, so every access misses. The
    cache instead keeps a fixed set, the first streamed layers that fit, and never evicts: each
    pass then hits on exactly those layers, the best any cache can do for a cycle. That is
    static residency by another name, so ``engine.passes.offload``'s ``auto`` gives spare memory to
    residency (which the timing model sees) and a cache is for when a placement is fixed.
    """

    capacity: int = 0
    used: int = 0
    layers: list[int] = field(default_factory=list)
    layer_bytes: dict[int, int] = field(default_factory=dict)
    buffers: list[Any] = field(default_factory=list)
    hits: int = 0
    misses: int = 0
    bytes_saved: int = 0

    def admit(self, layer: int, nbytes: int) -> bool:
        if self.used + nbytes > self.capacity:
            return False
        self.used += nbytes
        self.layers.append(layer)
        self.layer_bytes[layer] = nbytes
        return True

    def count_pass(self, misses: int) -> None:
        """One forward pass: every cached layer was a hit, ``misses`` layers were fetched."""
        self.hits += len(self.layers)
        self.misses += misses
        self.bytes_saved += sum(self.layer_bytes.values())

    def stats(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "used": self.used,
            "layers": len(self.layers),
            "hits": self.hits,
            "misses": self.misses,
            "bytes_saved": self.bytes_saved,
        }


class WeightRing:
    """The ring of slots, the pinned host copies, and the fetches of one forward pass. One ring
    serves every executor of a session (they stream the same layers in the same order), and a
    pass fetches the next pass's first K+1 layers (``primed``), each as soon as its slot's
    last user in this pass is done, so those copies overlap the end of this pass instead of
    delaying the start of the next. With no more streamed layers than slots, every layer
    stays in its slot after the first pass."""

    def __init__(
        self,
        be: Backend,
        graph: Graph,
        placement: Placement,
        weights: Mapping[str, Any],
        copy_stream: Any,
        cache_bytes: int = 0,
    ) -> None:
        self.placement = placement
        self.copy_stream = copy_stream
        self.backend = be
        # a dropped ring gives its pinned host copies back (to CuPy's pinned pool); a fetch
        # still in flight must not be reading them then
        weakref.finalize(self, copy_stream.synchronize)
        streamed = [p.layer for p in placement.layers if p.where == STREAMED]
        self.slots = placement.slots
        by_layer: dict[int, list[Any]] = {}
        for n in graph.weights:
            if n.layer in streamed and len(n.shape) >= 2:  # norm vectors stay resident
                by_layer.setdefault(n.layer, []).append(n)
        # the parameter cache: the first streamed layers that fit ``cache_bytes`` are copied
        # once into buffers of their own and never evicted (see ``ParamCache``)
        self.cache = ParamCache(cache_bytes)
        for layer in sorted(by_layer):
            nbytes = sum(_aligned(n.nbytes) for n in by_layer[layer])
            if not self.cache.admit(layer, nbytes):
                break
        cached = {layer: by_layer.pop(layer) for layer in self.cache.layers}
        self.slots = min(self.slots, len(by_layer))
        need = 0
        for nodes in by_layer.values():
            need = max(need, sum(_aligned(n.nbytes) for n in nodes))
        if need > placement.slot_bytes + ALIGN * 16:
            raise GraphError(
                f"a streamed layer needs {need:,} bytes, the placement's slots hold "
                f"{placement.slot_bytes:,}"
            )
        self.buffers = [be.alloc(max(need, 1)) for _ in range(self.slots)]
        self.device_bytes = need * self.slots
        self.arrays: dict[str, Any] = {}
        self.fetches: list[Fetch] = []
        self.free = [be.event() for _ in range(self.slots)]
        self._keep: list[Any] = []
        for j, layer in enumerate(sorted(by_layer)):
            slot = j % self.slots
            off = 0
            copies = []
            for n in by_layer[layer]:
                host = weights[n.name]
                host = host if isinstance(host, np.ndarray) else be.to_host(host)
                if host.shape != n.shape:
                    raise GraphError(
                        f"weight {n.name} has shape {host.shape}, the graph expects {n.shape}"
                    )
                pinned = be.pinned(np.ascontiguousarray(host.astype(n.dtype.numpy)))
                self._keep.append(pinned)
                view = be.view(self.buffers[slot], off, n.shape, n.dtype, n.strides)
                self.arrays[n.name] = view
                copies.append(be.copy_launch(view, pinned, copy_stream))
                off += _aligned(n.nbytes)
            label = _layer_label(by_layer[layer][0].name, layer)
            nbytes = sum(n.nbytes for n in by_layer[layer])
            self.fetches.append(Fetch(layer, slot, copies, be.event(), label, nbytes))
        self.streamed_bytes = sum(n.nbytes for nodes in by_layer.values() for n in nodes)
        for nodes in cached.values():
            buf = be.alloc(max(1, sum(_aligned(n.nbytes) for n in nodes)))
            off = 0
            for n in nodes:
                host = weights[n.name]
                host = host if isinstance(host, np.ndarray) else be.to_host(host)
                view = be.view(buf, off, n.shape, n.dtype, n.strides)
                be.copy_from_host(view, np.ascontiguousarray(host.astype(n.dtype.numpy)))
                self.arrays[n.name] = view
                off += _aligned(n.nbytes)
            self.cache.buffers.append(buf)
        be.synchronize()
        self.primed = False  # the first K+1 fetches of the next pass are issued already
        self.pending = False  # ... by ``Session.prepare``, and no stream has waited for them
        self.fetched = 0  # fetches issued in all (statistics)
        self._rec: Recorder | None = None

    @property
    def trace(self) -> Trace | None:
        """Where fetches are recorded (set by the session or executor that uses the ring)."""
        return self._rec.trace if self._rec is not None else None

    @trace.setter
    def trace(self, trace: Trace | None) -> None:
        tracks = {id(self.copy_stream): COPY}
        self._rec = Recorder(trace, self.backend, tracks) if trace is not None else None

    def fetch(self, j: int, after_free: bool = True) -> None:
        """Queue fetch ``j`` on the copy stream: wait for its slot, copy, mark it ready. The
        first fetches of a pass before any pass skip the wait: nothing holds the slots."""
        if self._rec is not None:
            return self._fetch_traced(j, after_free, self._rec)
        f = self.fetches[j]
        if after_free:
            self.free[f.slot].wait(self.copy_stream)
        for copy in f.copies:
            copy()
        f.ready.record(self.copy_stream)
        self.fetched += 1

    def _fetch_traced(self, j: int, after_free: bool, rec: Recorder) -> None:
        """``fetch`` with its copies bracketed by marks on the copy stream."""
        f, copy, be, trace = self.fetches[j], self.copy_stream, self.backend, rec.trace
        clock = trace.clock(be)
        if after_free:
            self.free[f.slot].wait(copy)
        start = be.mark(copy)
        t0 = time.perf_counter()
        for c in f.copies:
            c()
        t1 = time.perf_counter()
        end = be.mark(copy)
        f.ready.record(copy)
        self.fetched += 1
        name = f"fetch {f.label} (slot {f.slot})"
        args = {"layer": f.layer, "slot": f.slot, "bytes": f.nbytes, "copies": len(f.copies)}
        trace.span(clock, COPY, name, "fetch", start, end, args)
        trace.host_span(HOST, name, "issue", t0, t1, {"track": COPY})
        if after_free:
            trace.instant(clock, COPY, f"wait slot {f.slot} free", "wait", start)
        trace.instant(clock, COPY, f"record {f.label} ready", "record", end)

    def prime(self) -> None:
        """Queue the first pass's fetches ahead of it (``Session.prepare``)."""
        if self.primed:
            return
        for j in range(min(self.slots, len(self.fetches))):
            self.fetch(j, after_free=False)
        self.primed = self.pending = True

    def settle(self, main: Any) -> None:
        """Before a run: the main stream waits for fetches ``prime`` queued. Every other
        primed fetch was issued by an earlier run, which the host waited for, so a pass never
        waits for its primed fetches itself (a capture could not: an event recorded outside
        it, or inside another capture, is invalid there)."""
        if self.pending:
            for j in range(min(self.slots, len(self.fetches))):
                self.fetches[j].ready.wait(main)
            self.pending = False

    @property
    def resident(self) -> bool:
        """Every streamed layer fits a slot of its own: after the first pass nothing moves."""
        return len(self.fetches) <= self.slots


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _layer_label(weight: str, layer: int) -> str:
    """``blk.12`` for a block's weights, the weight's first word (``output``) for the head."""
    parts = weight.split(".")
    return ".".join(parts[:2]) if parts[0] == "blk" and len(parts) > 2 else parts[0] or str(layer)


class RingSteps:
    """Where one executor's steps meet the ring: before which step compute waits for a fetch,
    after which step a fetch's slot is free. A layer this graph does not read (the head of a
    prefill chunk that skips logits) frees its slot where the layer before it did and is never
    waited for."""

    def __init__(
        self, ring: WeightRing, graph: Graph, members: list[list[int]], be: Backend, main: Any
    ) -> None:
        self.ring, self.main = ring, main
        nodes = graph.nodes
        fetch_of = {f.layer: j for j, f in enumerate(ring.fetches)}
        streamed = {  # (cached layers are always in place: nothing to wait for)
            n.id: fetch_of[n.layer]
            for n in graph.weights
            if n.name in ring.arrays and n.layer in fetch_of
        }

        def layers_read(i: int) -> set[int]:
            out = set()
            for s in nodes[i].srcs:
                while nodes[s].op in VIEW_OPS:
                    s = nodes[s].srcs[0]
                if s in streamed:
                    out.add(streamed[s])
            return out

        n = len(ring.fetches)
        first, last = [-1] * n, [-1] * n
        for i, step in enumerate(members):
            for m in step:
                for j in layers_read(m):
                    if first[j] < 0:
                        first[j] = i
                    last[j] = i
        self.ready_at: dict[int, list[int]] = {}
        self.free_at: dict[int, list[int]] = {}
        self.free_first: list[int] = []  # unread fetches among the first: free at the start
        slots = ring.slots
        for j in range(n):
            if first[j] < 0:  # unread here: free where the previous fetch was freed
                if j == 0 or last[j - 1] < 0:
                    self.free_first.append(j)
                else:
                    self.free_at.setdefault(last[j - 1], []).append(j)
                    last[j] = last[j - 1]
                continue
            if j >= slots and last[j - slots] >= first[j]:
                raise GraphError(
                    f"streamed layer {ring.fetches[j].layer} is read before layer "
                    f"{ring.fetches[j - slots].layer} is done with its slot; use more slots"
                )
            self.ready_at.setdefault(first[j], []).append(j)
            self.free_at.setdefault(last[j], []).append(j)
        self.fork, self.join = be.event(), be.event()

    def launch(
        self,
        steps: list[tuple[Callable[[], None], Any]],
        copies_out: list[Callable[[], None]],
        failed: Callable[[Any, Exception], Exception],
        rec: Recorder | None = None,
    ) -> None:
        """Compute on the main stream, fetches on the copy stream. When fetch j's slot is free
        the copy stream is given the fetch that uses the slot next: j + slots in this pass, or
        for the last user of a slot the next pass's fetch into it (see ``WeightRing``). So the
        next pass's first fetches start as their slots free, not after the whole pass: only
        the slot freed last is copied after the last layer. ``rec``: a traced run (its steps
        are wrapped already); the compute stream's waits and records are shown too."""
        ring, main = self.ring, self.main
        copy = ring.copy_stream
        self.fork.record(main)
        self.fork.wait(copy)
        if rec is not None:
            rec.note(copy, "wait fork (run start)", "wait")
        n, slots = len(ring.fetches), ring.slots
        primed = ring.primed
        moving = not ring.resident
        if not primed:
            for j in range(min(slots, n)):
                ring.fetch(j, after_free=False)
        # primed fetches are complete or waited for already (``WeightRing.settle``)
        skip = set(range(min(slots, n))) if primed else set()

        def freed(j: int) -> None:
            if rec is not None:  # (marked just before the record: never after the waiter goes)
                rec.note(main, f"record slot {ring.fetches[j].slot} free", "record")
            ring.free[ring.fetches[j].slot].record(main)
            if j + slots < n:
                ring.fetch(j + slots)
            elif moving:
                ring.fetch(j % slots)  # the next pass's fetch into this slot

        for j in self.free_first:
            freed(j)
        ready_at, free_at = self.ready_at, self.free_at
        i = 0
        try:
            for i, (step, _) in enumerate(steps):
                for j in ready_at.get(i, ()):
                    if j not in skip:
                        ring.fetches[j].ready.wait(main)
                        if rec is not None:
                            rec.note(main, f"wait {ring.fetches[j].label} ready", "wait")
                step()
                for j in free_at.get(i, ()):
                    freed(j)
        except Exception as e:
            raise failed(steps[i][1], e) from e
        ring.primed = True
        ring.cache.count_pass(0 if primed and ring.resident else n)  # this pass's layers
        self.join.record(copy)
        self.join.wait(main)
        if rec is not None:
            rec.note(main, "wait join (copy stream)", "wait")
        for c in copies_out:
            c()
