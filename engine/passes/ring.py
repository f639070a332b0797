"""The ring's plan: which streamed layer is fetched into which slot, and where each step of a
forward pass meets the ring (which fetch it waits for, which slot it frees).

    rp = ring_plan(graph, placement, cache_bytes=0)   # from the offload pass's Placement
    print(rp)                                         # one line per fetch: layer, slot, bytes
    at = ring_steps(rp, graph, members)               # per step: fetches ready, slots freed

``engine.runtime.streaming.WeightRing`` allocates what ``RingPlan`` describes and issues its
copies; the executor waits and frees where ``ring_steps`` says. Only matrices stream: a layer's
norm vectors (kilobytes) stay resident, so a fused step that reads the previous layer's norm
with its own matrices still uses one slot. A parameter cache (exllamav2 #456) keeps the first
streamed layers that fit ``cache_bytes`` in buffers of their own, copied once: decode reads the
layers in the same cycle every token, where LRU would evict each layer just before its next
use; a fixed set hits every pass, the best a cache can do for a cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from backends.spec import ALIGN
from engine.passes.offload import STREAMED, Placement
from graph.dtypes import DType
from graph.ir import Graph
from graph.ops import VIEW_OPS, GraphError

__all__ = ["RingWeight", "FetchPlan", "RingPlan", "RingSteps", "ring_plan", "ring_steps"]


@dataclass(frozen=True)
class RingWeight:
    """One streamed matrix: where it sits in its layer's slot (or cache buffer)."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    offset: int  # bytes into the slot

    @property
    def nbytes(self) -> int:
        return self.dtype.nbytes(self.shape)

    @property
    def strides(self) -> tuple[int, ...]:
        out, acc = [], 1
        for d in reversed(self.shape):
            out.append(acc)
            acc *= d
        return tuple(reversed(out))


@dataclass(frozen=True)
class FetchPlan:
    """One streamed layer of a pass: its slot and its matrices."""

    layer: int
    slot: int  # -1: kept by the parameter cache (never fetched after the first pass)
    label: str  # how a trace names it: blk.12, output
    weights: tuple[RingWeight, ...]

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights)

    @property
    def span(self) -> int:
        """Bytes its matrices take in a slot, aligned."""
        return max((w.offset + _aligned(w.nbytes) for w in self.weights), default=0)


@dataclass(frozen=True)
class RingPlan:
    """The ring of one session: ``slots`` buffers of ``slot_bytes``, the fetches of a pass in
    order (fetch j into slot j mod slots), and the layers the parameter cache keeps."""

    slots: int
    slot_bytes: int
    fetches: tuple[FetchPlan, ...]
    cached: tuple[FetchPlan, ...]
    cache_capacity: int

    @property
    def resident(self) -> bool:
        """Every streamed layer has a slot of its own: after the first pass nothing moves."""
        return len(self.fetches) <= self.slots

    @property
    def streamed_bytes(self) -> int:
        """Bytes a pass copies (cached layers excluded)."""
        return sum(f.nbytes for f in self.fetches)

    @property
    def device_bytes(self) -> int:
        """Device memory of the slots and the cache buffers."""
        return self.slots * self.slot_bytes + self.cache_bytes

    @property
    def cache_bytes(self) -> int:
        return sum(f.span for f in self.cached)

    def to_dict(self) -> dict[str, object]:
        def fetch(f: FetchPlan) -> dict[str, object]:
            return {"layer": f.layer, "slot": f.slot, "label": f.label, "bytes": f.nbytes}

        return {
            "slots": self.slots,
            "slot_bytes": self.slot_bytes,
            "fetches": [fetch(f) for f in self.fetches],
            "cached": [fetch(f) for f in self.cached],
            "cache_capacity": self.cache_capacity,
        }

    def __str__(self) -> str:
        lines = [
            f"Ring: {self.slots} slot(s) of {self.slot_bytes:,} B, {len(self.fetches)} fetches "
            f"({self.streamed_bytes:,} B) per pass, {len(self.cached)} layer(s) cached "
            f"({self.cache_bytes:,} of {self.cache_capacity:,} B)"
        ]
        lines += [f"  fetch {j:<3} {f.label:<10} slot {f.slot}" for j, f in enumerate(self.fetches)]
        lines += [f"  cached    {f.label}" for f in self.cached]
        return "\n".join(lines)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _label(weight: str, layer: int) -> str:
    """``blk.12`` for a block's weights, the weight's first word (``output``) for the head."""
    parts = weight.split(".")
    return ".".join(parts[:2]) if parts[0] == "blk" and len(parts) > 2 else parts[0] or str(layer)


def ring_plan(graph: Graph, placement: Placement, cache_bytes: int = 0) -> RingPlan | None:
    """The ring ``placement`` streams ``graph``'s layers through (None if nothing streams):
    the first streamed layers that fit ``cache_bytes`` go to the cache, the others to ``slots``
    buffers, each as large as the largest layer."""
    if not placement.streamed_bytes:
        return None
    streamed = {p.layer for p in placement.layers if p.where == STREAMED}
    by_layer: dict[int, list[RingWeight]] = {}
    offset: dict[int, int] = {}
    names: dict[int, str] = {}
    for n in graph.weights:
        if n.layer in streamed and len(n.shape) >= 2:  # norm vectors stay resident
            off = offset.get(n.layer, 0)
            by_layer.setdefault(n.layer, []).append(RingWeight(n.name, n.shape, n.dtype, off))
            offset[n.layer] = off + _aligned(n.nbytes)
            names.setdefault(n.layer, n.name)
    layers = [FetchPlan(k, -1, _label(names[k], k), tuple(by_layer[k])) for k in sorted(by_layer)]
    cached: list[FetchPlan] = []
    used = 0
    for f in layers:
        if used + f.span > cache_bytes:
            break
        cached.append(f)
        used += f.span
    rest = layers[len(cached) :]
    slots = min(placement.slots, len(rest))
    need = max((f.span for f in rest), default=0)
    if need > placement.slot_bytes + ALIGN * 16:
        raise GraphError(
            f"a streamed layer needs {need:,} bytes, the placement's slots hold "
            f"{placement.slot_bytes:,}"
        )
    fetches = tuple(FetchPlan(f.layer, j % slots, f.label, f.weights) for j, f in enumerate(rest))
    return RingPlan(slots, max(need, 1) if slots else 0, fetches, tuple(cached), cache_bytes)


@dataclass(frozen=True)
class RingSteps:
    """Where one graph's steps meet the ring, by step index: the fetches a step waits for
    before it runs (``ready``), the fetches whose slot is free after it (``free``), and fetches
    among the first ones this graph never reads (``free_first``: free at the start)."""

    ready: tuple[tuple[int, ...], ...]
    free: tuple[tuple[int, ...], ...]
    free_first: tuple[int, ...]


def ring_steps(rp: RingPlan, graph: Graph, members: Sequence[Sequence[int]]) -> RingSteps:
    """``members``: the nodes each step computes, in launch order. A layer this graph does not
    read (the head of a prefill chunk that skips logits) frees its slot where the layer before
    it did and is never waited for."""
    nodes = graph.nodes
    fetch_of = {f.layer: j for j, f in enumerate(rp.fetches)}
    names = {w.name for f in rp.fetches for w in f.weights}
    streamed = {n.id: fetch_of[n.layer] for n in graph.weights if n.name in names}

    def layers_read(i: int) -> set[int]:
        out = set()
        for s in nodes[i].srcs:
            while nodes[s].op in VIEW_OPS:
                s = nodes[s].srcs[0]
            if s in streamed:
                out.add(streamed[s])
        return out

    n = len(rp.fetches)
    first, last = [-1] * n, [-1] * n
    for i, step in enumerate(members):
        for m in step:
            for j in layers_read(m):
                if first[j] < 0:
                    first[j] = i
                last[j] = i
    ready: list[list[int]] = [[] for _ in members]
    free: list[list[int]] = [[] for _ in members]
    free_first: list[int] = []
    slots = rp.slots
    for j in range(n):
        if first[j] < 0:  # unread here: free where the previous fetch was freed
            if j == 0 or last[j - 1] < 0:
                free_first.append(j)
            else:
                free[last[j - 1]].append(j)
                last[j] = last[j - 1]
            continue
        if j >= slots and last[j - slots] >= first[j]:
            raise GraphError(
                f"streamed layer {rp.fetches[j].layer} is read before layer "
                f"{rp.fetches[j - slots].layer} is done with its slot; use more slots"
            )
        ready[first[j]].append(j)
        free[last[j]].append(j)
    return RingSteps(
        tuple(tuple(r) for r in ready), tuple(tuple(f) for f in free), tuple(free_first)
    )
