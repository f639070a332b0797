"""The offload pass: which weights live on the GPU, which stream through a ring of slots, and
which stay on the host, each with its cause.

    placement = engine.passes.offload.place(graph, policy="*15+5", budget=8 * 2**30)
    print(placement)          # one line per layer: where, slot, cause; totals; predicted time

Layers are the builders' layer tags (``graph.ops.WeightParams.layer``): blocks 0..n_layer-1, the
output head counted as layer ``n_layer`` (rwkv.cpp's rule, so ``n_gpu_layers = n_layer + 1``
includes the head), the token embedding -1. The embedding always stays in host memory: a step
needs only the rows of its tokens, which move, never the table.

Policies:

``all``           every layer resident.
``ngl=N``         ``n_gpu_layers``: layers 0..N-1 resident (N > n_layer: the head too); the
                  others are computed on the host, activations crossing once per boundary.
``*N+K``          ChatRWKV's strategy grammar (``*15+5``; ``*15+`` is ``*15+0``): layers
                  0..N-1 resident, every later one streamed from pinned host memory into a ring
                  of K+1 slots, the layer K ahead fetched while one computes; the head streams
                  too unless the budget holds it (``*N+K`` says nothing of it; we keep it
                  resident when it fits, since it is read every token).
``auto``          the cheapest placement that fits ``budget``: residency (the first layers,
                  the last ones, or spread among the streamed ones, whichever hides the link
                  best), head placement, K and the slot count, each candidate timed by
                  ``predict``; where nothing streamed fits, the later layers and the head
                  computed on the host (``ngl=N``).

``predict`` simulates one steady-state token: a copy stream fetching streamed layers in order
(each into the slot its layer K+1 earlier freed, the fetch of the next token's first layers
wrapping around), a compute stream running layers in order, each waiting for its fetch. Link
bandwidth and per-layer compute come from a calibration or the device spec's nominal
``backends.spec.Costs``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from backends.spec import Costs
from engine.passes.layer_sizes import layer_bytes, layer_copies, layer_host_bytes, layer_type_bytes
from graph.ir import Graph
from graph.ops import GraphError

__all__ = [
    "PolicyError",
    "LayerPlacement",
    "Placement",
    "place",
    "predict",
    "parse_policy",
    "check_policy_syntax",
    "layer_bytes",  # the layer tallies (engine.passes.layer_sizes), as the offload pass counts
    "layer_type_bytes",
    "layer_host_bytes",
    "layer_copies",
]

GPU, STREAMED, HOST = "gpu", "streamed", "host"
EMBEDDING = -1
ARRANGEMENTS = ("first", "last", "spread")  # where auto puts its resident blocks (``_pick``)
_STRATEGY = re.compile(r"^\*(\d+)\+(\d*)$")


class PolicyError(GraphError):
    """An offload policy a model cannot take (its grammar, or a layer count beyond the
    model's): a usage error, found before any weight is read."""


@dataclass(frozen=True)
class LayerPlacement:
    layer: int
    nbytes: int
    where: str  # gpu | streamed | host
    cause: str
    slot: int | None = None  # ring slot of a streamed layer (layer order mod slots)


@dataclass(frozen=True)
class Placement:
    policy: str
    budget: int | None
    layers: tuple[LayerPlacement, ...]  # embedding first, then blocks, then the head
    ahead: int  # K: how many streamed layers ahead the copy stream runs
    slots: int  # ring slots (K + 1 when anything streams, else 0)
    slot_bytes: int  # each slot holds the largest streamed layer
    predicted_s: float  # one decode token, steady state
    notes: tuple[str, ...] = field(default=())

    @property
    def resident_bytes(self) -> int:
        return sum(p.nbytes for p in self.layers if p.where == GPU)

    @property
    def device_bytes(self) -> int:
        """Weights' device memory: resident layers plus the ring."""
        return self.resident_bytes + self.slots * self.slot_bytes

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied to the device per token."""
        return sum(p.nbytes for p in self.layers if p.where == STREAMED)

    def where(self, layer: int) -> str:
        return next(p.where for p in self.layers if p.layer == layer)

    def to_dict(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "budget": self.budget,
            "ahead": self.ahead,
            "slots": self.slots,
            "slot_bytes": self.slot_bytes,
            "device_bytes": self.device_bytes,
            "streamed_bytes": self.streamed_bytes,
            "predicted_s": self.predicted_s,
            "layers": [
                {
                    "layer": p.layer,
                    "bytes": p.nbytes,
                    "where": p.where,
                    "slot": p.slot,
                    "cause": p.cause,
                }
                for p in self.layers
            ],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        gib = 2**30
        head = (
            f"Placement {self.policy}: {self.device_bytes / gib:.2f} GiB on the device "
            f"({self.resident_bytes / gib:.2f} resident + {self.slots} slot(s) of "
            f"{self.slot_bytes / gib:.3f}), {self.streamed_bytes / gib:.2f} GiB streamed per "
            f"token, predicted {self.predicted_s * 1e3:.1f} ms/token"
        )
        if self.budget is not None:
            head += f", budget {self.budget / gib:.2f} GiB"
        lines = [head]
        for p in self.layers:
            name = "embedding" if p.layer == EMBEDDING else f"layer {p.layer}"
            slot = f" slot {p.slot}" if p.slot is not None else ""
            lines.append(f"  {name:<10} {p.nbytes / 2**20:9.1f} MiB  {p.where}{slot}: {p.cause}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def check_policy_syntax(policy: str) -> None:
    """Refuse a policy string that no model could take (before any model is loaded)."""
    parse_policy(policy, 0, check_range=False)


def parse_policy(policy: str, n_layer: int, check_range: bool = True) -> tuple[str, int, int]:
    """``(kind, n, k)`` from a policy string; kind in all, ngl, stream, auto."""
    p = policy.strip()
    if p in ("all", "auto"):
        return p, n_layer + 1, 0
    if p.startswith("ngl="):
        try:
            n = int(p[4:])
        except ValueError:
            n = -1
        if n < 0:
            raise PolicyError(f"offload policy {policy!r}: ngl= takes a layer count >= 0")
        return "ngl", n, 0
    m = _STRATEGY.match(p)
    if m:
        n, k = int(m.group(1)), int(m.group(2) or 0)
        if check_range and n > n_layer:
            raise PolicyError(
                f"offload policy {policy!r}: the model has {n_layer} blocks, so *N+K keeps at "
                f"most N={n_layer} resident (the head stays resident when the budget holds it); "
                "for everything on the device use all"
            )
        return "stream", n, k
    head = f"; {n_layer + 1} includes the head" if check_range else ""
    raise PolicyError(
        f"unknown offload policy {policy!r}: use all, auto, ngl=N (n_gpu_layers{head}) or "
        "*N+K (N layers resident, the rest streamed K ahead)"
    )


def predict(
    sizes: Mapping[int, int],
    where: Mapping[int, str],
    ahead: int,
    costs: Costs,
    tokens: int = 3,
    copies: Mapping[int, int] | None = None,
    host: Mapping[int, int] | None = None,
    compute: Mapping[int, float] | None = None,
) -> float:
    """Seconds per decode token in steady state (the last of ``tokens`` simulated ones);
    ``copies``: weight matrices per layer (one copy each), 1 where not given; ``host``: a
    layer's bytes as the CPU backend computes it (``layer_host_bytes``), ``sizes`` where not
    given; ``compute``: a layer's seconds on the device (``Costs.layer_s`` of its bytes by
    type), else ``Costs.device_s`` of its bytes.

    The simulation follows ``engine.runtime.streaming`` step for step: one copy stream runs the
    fetches in the order they are queued (fetch j into slot j mod slots once the fetch
    ``slots`` earlier has been computed; after a slot's last user in a token, the next
    token's fetch into that slot); the compute stream runs the layers in order, a streamed
    one once its fetch is in. A token ends when both streams are done (its CUDA graph joins
    them), so a copy the compute does not need until the next token still counts, and
    resident layers at the start of a token run with the copy stream idle (its slots are all
    full): put first, they cost their compute; put last, they hide the next token's first
    fetches."""
    order = sorted(k for k in sizes if k != EMBEDDING)
    streamed = [k for k in order if where[k] == STREAMED]
    fetch_of = {k: j for j, k in enumerate(streamed)}
    n = len(streamed)
    slots = min(ahead + 1, n)

    def copy_s(k: int) -> float:
        return costs.copy_s(sizes[k], copies.get(k, 1) if copies else 1)

    moving = n > slots  # else every streamed layer keeps its slot after the first token
    ready = [0.0] * n  # when fetch j of this token is in its slot
    start, copy_free = 0.0, 0.0
    starts = []
    for t in range(tokens):
        starts.append(start)
        if t == 0 or moving:
            ready[:slots] = [start] * slots  # primed by the token before (or by prepare())
        copy_free = max(copy_free, start)
        done = [0.0] * n  # when streamed layer j's compute finished
        queued = slots  # fetches of this token queued on the copy stream so far
        now = start
        for k in order:
            if where[k] == STREAMED:
                j = fetch_of[k]
                while moving and queued <= j:  # fetches wait for the compute `slots` earlier
                    copy_free = max(copy_free, done[queued - slots]) + copy_s(streamed[queued])
                    ready[queued] = copy_free
                    queued += 1
                now = max(now, ready[j])
            if where[k] == HOST:
                now += costs.host_s(host.get(k, sizes[k]) if host else sizes[k])
            else:
                now += compute[k] if compute and k in compute else costs.device_s(sizes[k])
            if where[k] == STREAMED:
                done[fetch_of[k]] = now
        if moving:  # the next token's first fetches, each queued as its slot's last user
            for i in range(n - slots, n):  # in this token is done
                copy_free = max(copy_free, done[i]) + copy_s(streamed[i % slots])
        start = max(now, copy_free)
    starts.append(start)
    return starts[-1] - starts[-2]


def place(
    graph: Graph,
    policy: str = "all",
    budget: int | None = None,
    costs: Costs | None = None,
    reserve: int = 0,
) -> Placement:
    """The placement of ``graph``'s weights under ``policy`` (see the module doc).

    ``budget``: device bytes for weights and their ring (``reserve`` of it is kept for
    activations and caches). A placement that does not fit is an error naming the bytes.
    """
    costs = costs or Costs()
    sizes = layer_bytes(graph)
    copies = layer_copies(graph)
    host = layer_host_bytes(graph)
    compute = {k: costs.layer_s(t) for k, t in layer_type_bytes(graph).items()}
    blocks = sorted(k for k in sizes if k >= 0)
    n_layer = max(blocks) if blocks else 0  # the head's tag
    has_head = n_layer in sizes and n_layer > 0
    if not has_head:
        n_layer += 1
    kind, n, k = parse_policy(policy, n_layer)
    room = None if budget is None else budget - reserve
    if kind == "auto":
        if room is None:
            raise PolicyError("offload policy 'auto' needs a budget (--vram)")
        return _auto(sizes, n_layer, room, costs, budget, copies, host, compute)
    where: dict[int, str] = {}
    cause: dict[int, str] = {}
    for layer in sizes:
        if layer == EMBEDDING:
            where[layer], cause[layer] = HOST, "embedding: only the rows of a step's tokens move"
        elif kind == "all":
            where[layer], cause[layer] = GPU, "all layers resident"
        elif kind == "ngl":
            if layer < n:
                where[layer], cause[layer] = GPU, f"ngl={n}: among the first {n} layers"
            else:
                why = "the head is layer n_layer" if layer == n_layer else f"beyond ngl={n}"
                where[layer], cause[layer] = HOST, f"computed on the host: {why}"
        else:
            if layer < n and layer != n_layer:
                where[layer], cause[layer] = GPU, f"*{n}+{k}: among the first {n} resident"
            else:
                where[layer], cause[layer] = STREAMED, f"*{n}+{k}: streamed, fetched {k} ahead"
    if kind == "stream" and n_layer in sizes:  # the head: resident if the budget holds it
        trial = _finish(policy, budget, sizes, dict(where), cause, k, costs, copies, host, compute)
        head_fits = room is None or trial.device_bytes + sizes[n_layer] <= room
        if head_fits:
            where[n_layer] = GPU
            cause[n_layer] = "head: resident (read every token, the budget holds it)"
    out = _finish(policy, budget, sizes, where, cause, k, costs, copies, host, compute)
    if room is not None and out.device_bytes > room:
        raise PolicyError(_too_small(out, room, reserve))
    return out


def _finish(
    policy: str,
    budget: int | None,
    sizes: Mapping[int, int],
    where: Mapping[int, str],
    cause: Mapping[int, str],
    ahead: int,
    costs: Costs,
    copies: Mapping[int, int] | None = None,
    host: Mapping[int, int] | None = None,
    compute: Mapping[int, float] | None = None,
    notes: Sequence[str] = (),
) -> Placement:
    streamed = [k for k in sorted(sizes) if where[k] == STREAMED]
    slots = min(ahead + 1, len(streamed)) if streamed else 0
    ahead = max(0, slots - 1) if streamed else 0
    slot_bytes = max((sizes[k] for k in streamed), default=0)
    slot_of = {k: i % slots for i, k in enumerate(streamed)} if slots else {}
    layers = tuple(
        LayerPlacement(k, sizes[k], where[k], cause[k], slot_of.get(k)) for k in sorted(sizes)
    )
    t = predict(sizes, where, ahead, costs, copies=copies, host=host, compute=compute)
    return Placement(policy, budget, layers, ahead, slots, slot_bytes, t, tuple(notes))


def human(n: float) -> str:
    """Bytes as GiB (two decimals) from 1 GiB up, else MiB or KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size or unit == "KiB":
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _too_small(p: Placement, room: int, reserve: int) -> str:
    return (
        f"budget {human(room)} (after {human(reserve)} reserved for activations) cannot hold "
        f"placement {p.policy}: {human(p.resident_bytes)} of resident layers plus {p.slots} "
        f"slot(s) of {human(p.slot_bytes)} = {human(p.device_bytes)}; raise --vram, keep fewer "
        "layers resident, or stream with fewer slots"
    )


def _auto(
    sizes: Mapping[int, int],
    n_layer: int,
    room: int,
    costs: Costs,
    budget: int | None,
    copies: Mapping[int, int] | None = None,
    host: Mapping[int, int] | None = None,
    compute: Mapping[int, float] | None = None,
) -> Placement:
    """Every candidate that fits, timed; the fastest wins (ties: fewer device bytes)."""
    blocks = [k for k in sorted(sizes) if 0 <= k < n_layer]
    head = n_layer if n_layer in sizes else None
    biggest = max((sizes[k] for k in blocks), default=0)
    best: Placement | None = None
    arranged = "-"  # how the best candidate arranged its resident blocks (``ARRANGEMENTS``)
    tried = 0
    for head_where in [GPU, STREAMED] if head is not None else [None]:
        for n_res in range(len(blocks), -1, -1):
            for arrange in ARRANGEMENTS if 0 < n_res < len(blocks) else ("first",):
                resident = _pick(blocks, n_res, arrange)
                n_streamed = len(blocks) - n_res + (head_where == STREAMED)
                for ahead in range(0, max(1, n_streamed)):
                    if n_streamed == 0 and ahead:
                        break
                    where = {EMBEDDING: HOST} if EMBEDDING in sizes else {}
                    cause = {EMBEDDING: "embedding: only the rows of a step's tokens move"}
                    for b in blocks:
                        where[b] = GPU if b in resident else STREAMED
                        cause[b] = (
                            f"resident ({arrange} {n_res} blocks)"
                            if b in resident
                            else f"streamed {ahead} ahead"
                        )
                    if head is not None:
                        where[head] = head_where or GPU
                        cause[head] = f"head: {where[head]}"
                    slot_max = max(biggest, sizes.get(head, 0) if head_where == STREAMED else 0)
                    need = sum(sizes[b] for b in resident) + (
                        sizes[head] if head is not None and head_where == GPU else 0
                    )
                    if n_streamed:
                        need += min(ahead + 1, n_streamed) * slot_max
                    if need > room:
                        continue
                    tried += 1
                    cand = _finish(
                        "auto", budget, sizes, where, cause, ahead, costs, copies, host, compute
                    )
                    key = (round(cand.predicted_s, 9), cand.device_bytes)
                    if best is None or key < (round(best.predicted_s, 9), best.device_bytes):
                        best, arranged = cand, arrange if 0 < n_res else "-"
    # the later layers and the head on the host (ngl=N), only where nothing streamed fits (a
    # head too large to keep or to stream): streaming keeps prompts at the device's speed
    # (7B shape at 6 GiB on an H200: pp512 2,365 t/s streamed, 84 t/s with 17 layers on the
    # host, while decode was within 2% either way)
    for n_dev in range(len(blocks), -1, -1) if best is None else ():
        need = sum(sizes[b] for b in blocks[:n_dev])
        if need > room:
            continue
        where = {EMBEDDING: HOST} if EMBEDDING in sizes else {}
        cause = {EMBEDDING: "embedding: only the rows of a step's tokens move"}
        for b in blocks:
            on = b < (blocks[n_dev] if n_dev < len(blocks) else n_layer)
            where[b] = GPU if on else HOST
            cause[b] = f"resident (first {n_dev} blocks)" if on else "computed on the host"
        if head is not None:
            where[head], cause[head] = HOST, "head: computed on the host"
        tried += 1
        cand = _finish("auto", budget, sizes, where, cause, 0, costs, copies, host, compute)
        key = (round(cand.predicted_s, 9), cand.device_bytes)
        if best is None or key < (round(best.predicted_s, 9), best.device_bytes):
            best, arranged = cand, "first" if n_dev else "-"
    assert best is not None  # (everything on the host fits any budget)
    n_res = sum(1 for p in best.layers if p.where == GPU and 0 <= p.layer < n_layer)
    head_at = best.where(head) if head is not None else "-"
    on_host = sum(1 for p in best.layers if p.where == HOST and 0 <= p.layer < n_layer)
    notes = (
        f"chose {n_res} resident block(s) ({arranged}), {on_host} on the host, head {head_at}, "
        f"K={best.ahead}, {best.slots} slot(s) among {tried} placements that fit "
        f"{room / 2**30:.2f} GiB",
        f"streamed {best.streamed_bytes / 2**30:.2f} GiB/token at "
        f"{costs.link_bytes_per_s / 1e9:.0f} GB/s is "
        f"{costs.copy_s(best.streamed_bytes) * 1e3:.1f} ms of link time per token",
    )
    return _finish(
        "auto",
        budget,
        sizes,
        {p.layer: p.where for p in best.layers},
        {p.layer: p.cause for p in best.layers},
        best.ahead,
        costs,
        copies,
        host,
        compute,
        notes,
    )


def _pick(blocks: Sequence[int], n: int, arrange: str) -> set[int]:
    """``n`` resident blocks: the first ``n`` (ChatRWKV's ``*N+K``), the last ``n`` (their
    compute at the end of a token hides the next token's first fetches, see ``predict``), or
    spread evenly so that streamed layers sit between resident ones whose compute hides their
    fetch."""
    if arrange == "first":
        return set(blocks[:n])
    if arrange == "last":
        return set(blocks[len(blocks) - n :])
    step = len(blocks) / n
    return {blocks[min(len(blocks) - 1, int(i * step))] for i in range(n)}
