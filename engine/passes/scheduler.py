"""The stream pass: which stream every step runs on, and the events that order the streams.

    sched = engine.passes.scheduler.schedule(graph, max_streams=4)
    print(sched)              # per step: its stream, the events it waits on, whether it records
    sched.validate(graph)     # every dependency between streams is covered by a wait

A *step* is what launches: a computing node, or a fused group (``engine.passes.fusion``) at its
anchor. The assignment is llama.cpp's (PR #4719): walk the steps in order; a step runs on the stream
handed out by its first input that is not a weight or constant; every use of a value advances
that value's branch counter, so the second, third... reader of a value starts a new stream (Q, K,
V after one norm run side by side). Streams past ``max_streams`` wrap around. A reader on
another stream than its producer waits on an event recorded after the producer, unless an
earlier wait already implies it: each step carries a vector clock (per stream, how many of that
stream's steps are known complete when it starts), and a wait is added only where the clock
falls short. Inputs and states are written before the run on stream 0, which every other stream
waits for once at the start (the executor's fork); stream 0 waits for every other one at the end
(the join).

``auto`` keeps a step on its input's stream unless the step carries enough work to hide the cost
of the extra stream: the cost model (``step_cost``) counts a launch's latency, bytes moved and
floating-point work at device speeds, and asks for ``MIN_FORK_US`` of it (more eagerly, where
every event costs host time, than in a captured graph). ``max_streams=1`` is the reference: one
stream, no events.

The clocks are also what the memory plan needs (``engine.passes.memory.plan(..., schedule=...)``):
bytes freed by one value are reused by a later writer only when every reader of that value, on every
stream, is known complete when the writer starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from backends.spec import Costs
from graph.ir import Graph, Node
from graph.ops import LEAF_OPS, VIEW_OPS, Op

__all__ = ["Schedule", "schedule", "step_cost", "MIN_FORK_US", "AUTO"]

AUTO = "auto"
MIN_FORK_US = {"eager": 8.0, "graph": 1.5}
"""A step opens a new stream in ``auto`` only with at least this much estimated device time.
Eagerly, a fork costs an event record and a wait issued from the host (several us each) and
pays only for big steps (measured on an H200: 8 branches of 4096 x 4096 products gain 1.27x on
4 streams, of 1024 x 1024 lose 0.80x); inside a captured graph the same edges cost about a
microsecond of device time, and every branch we measured gained."""


@dataclass(frozen=True)
class Schedule:
    """Frozen result of the stream pass; see the module doc."""

    max_streams: int
    steps: tuple[int, ...]  # the launching steps (anchor node ids) in launch order
    stream: Mapping[int, int]  # step -> stream
    waits: Mapping[int, tuple[int, ...]]  # step -> steps whose recorded events it waits on first
    records: frozenset[int]  # steps after which an event is recorded
    clock: Mapping[int, tuple[int, ...]] = field(repr=False)  # step -> steps known done, per stream
    position: Mapping[int, int] = field(repr=False)  # step -> its index in its stream's order
    graph: Graph | None = field(default=None, repr=False, compare=False)  # what was scheduled

    @property
    def n_streams(self) -> int:
        """Streams that run at least one step."""
        return len({self.stream[s] for s in self.steps}) if self.steps else 1

    @property
    def n_waits(self) -> int:
        return sum(len(w) for w in self.waits.values())

    def order(self, stream: int) -> list[int]:
        return [s for s in self.steps if self.stream[s] == stream]

    def done_before(self, step: int, other: int) -> bool:
        """``other`` is known complete when ``step`` starts (same stream and earlier, or ordered
        through events)."""
        return self.clock[step][self.stream[other]] > self.position[other]

    def validate(self, graph: Graph, units: Mapping[int, int] | None = None) -> None:
        """Raise ``AssertionError`` unless every step's producers are done before it starts,
        no step waits on its own stream, and every wait names a recorded event."""
        unit = dict(units) if units is not None else {}
        producers = _producers(graph, unit)
        for s in self.steps:
            for w in self.waits.get(s, ()):
                assert w in self.records, f"step %{s} waits on %{w}, which records no event"
                assert self.stream[w] != self.stream[s], f"step %{s} waits on its own stream"
            for p in producers.get(s, ()):
                assert self.done_before(s, p), (
                    f"step %{s} (stream {self.stream[s]}) may start before its input's producer "
                    f"%{p} (stream {self.stream[p]}) is done: a wait is missing"
                )

    def to_dict(self) -> dict[str, object]:
        return {
            "max_streams": self.max_streams,
            "n_streams": self.n_streams,
            "steps": [
                {
                    "step": s,
                    "stream": self.stream[s],
                    "waits": list(self.waits.get(s, ())),
                    "records": s in self.records,
                }
                for s in self.steps
            ],
        }

    def _repr_svg_(self) -> str | None:
        """Jupyter shows a schedule as its graph with streams as border colours and event waits
        as dashed edges (Graphviz; None, and so the text, without it)."""
        if self.graph is None:
            return None
        from graph.drawing import document, svg_or_none

        doc = document(self.graph)
        for n in doc["nodes"]:
            n["device"] = "host" if n["kind"] == "input" else "gpu"
            if n["id"] in self.stream:
                n["step"], n["stream"] = n["id"], self.stream[n["id"]]
        self.draw_into(doc)
        return svg_or_none(doc)

    def draw_into(self, doc: dict[str, object]) -> None:
        """The event waits and stream counts in a dump document (``graph.drawing``)."""
        if self.n_streams > 1:
            doc["waits"] = [
                [w, s, self.stream[w], self.stream[s]]
                for s in self.steps
                for w in self.waits.get(s, ())
            ]
            doc["summary"].update(  # type: ignore[attr-defined]
                streams=self.n_streams, events=len(self.records), waits=self.n_waits
            )

    def __str__(self) -> str:
        lines = [
            f"Schedule: {len(self.steps)} steps on {self.n_streams} stream(s) "
            f"(max {self.max_streams}), {len(self.records)} events, {self.n_waits} waits"
        ]
        for s in self.steps:
            waits = " ".join(f"%{w}" for w in self.waits.get(s, ()))
            rec = " record" if s in self.records else ""
            lines.append(
                f"  %{s:<5} stream {self.stream[s]}" + (f"  wait {waits}" if waits else "") + rec
            )
        return "\n".join(lines)


def _launching(n: Node) -> bool:
    return n.op not in LEAF_OPS and n.op not in VIEW_OPS


def _producers(graph: Graph, unit: Mapping[int, int]) -> dict[int, list[int]]:
    """For each step, the steps whose results it reads (through views; leaves excluded)."""
    nodes = graph.nodes

    def source(i: int) -> int | None:
        while nodes[i].op in VIEW_OPS:
            i = nodes[i].srcs[0]
        if nodes[i].op in LEAF_OPS:
            return None
        return unit.get(i, i)

    out: dict[int, list[int]] = {}
    for n in nodes:
        if not _launching(n):
            continue
        u = unit.get(n.id, n.id)
        for s in n.srcs:
            p = source(s)
            if p is not None and p != u and p not in out.setdefault(u, []):
                out[u].append(p)
        out.setdefault(u, [])
    return out


def step_cost(graph: Graph, members: Sequence[int], costs: Costs | None = None) -> float:
    """Estimated device microseconds of a step (``Costs.kernel_s``: a launch's latency plus
    the larger of its bytes at memory speed and its matrix work at tensor-core speed)."""
    nbytes, flops = 0, 0
    for i in members:
        n = graph.nodes[i]
        nbytes += n.nbytes + sum(graph.nodes[s].nbytes for s in n.srcs)
        if n.op is Op.MUL_MAT:
            a = graph.nodes[n.srcs[0]]
            flops += 2 * n.numel * a.shape[-1]
        elif n.op is Op.ATTENTION:
            q, k = graph.nodes[n.srcs[0]], graph.nodes[n.srcs[1]]
            flops += 4 * math.prod(q.shape) * k.shape[0]
    return (costs or Costs()).kernel_s(nbytes, flops) * 1e6


# Long by design: two passes over the same steps (streams by branch counters, then events by
# vector clocks), each a short loop whose state the other reads.
def schedule(
    graph: Graph,
    max_streams: int | str = 1,
    steps: Sequence[int] | None = None,
    mode: str = "graph",
    costs: Costs | None = None,
) -> Schedule:
    """Assign every step a stream and place the events (see the module doc).

    ``max_streams``: an int >= 1, or ``"auto"`` (up to 8 streams, forking only for steps of at
    least ``MIN_FORK_US[mode]``; ``mode`` is the executor's, "eager" or "graph"). ``steps``: the
    step each node runs at (``engine.passes.fusion.step_of``); by default every node is its own
    step. ``costs``: the device's (``backends.spec.Costs``; nominal by default), for ``auto``.
    """
    auto = max_streams == AUTO
    limit = 8 if auto else int(max_streams)
    if limit < 1:
        raise ValueError(f"max_streams must be >= 1 or 'auto', not {max_streams!r}")
    if mode not in MIN_FORK_US:
        raise ValueError(f"mode must be one of {', '.join(MIN_FORK_US)}, not {mode!r}")
    nodes = graph.nodes
    at = list(steps) if steps is not None else [n.id for n in nodes]
    unit = {n.id: at[n.id] for n in nodes if _launching(n)}
    members: dict[int, list[int]] = {}
    for i, u in unit.items():
        members.setdefault(u, []).append(i)
    order = sorted(members)

    def root(i: int) -> int:
        """The value a source stands for: views resolve to their storage's producer."""
        while nodes[i].op in VIEW_OPS:
            i = nodes[i].srcs[0]
        return unit.get(i, i)

    stream: dict[int, int] = {}
    branch: dict[int, int] = {}  # value -> stream its next reader gets
    for u in order:
        ins = []
        for m in members[u]:
            for s in nodes[m].srcs:
                r = root(s)
                if r == u or nodes[r].op in (Op.WEIGHT, Op.CONSTANT):
                    continue
                ins.append(r)
        if not ins:
            stream[u] = 0
        else:
            first = ins[0]
            home = stream.get(first, 0)  # inputs and states live on stream 0
            want = branch.get(first, home)
            if auto and want != home and step_cost(graph, members[u], costs) < MIN_FORK_US[mode]:
                want = home
            stream[u] = want % limit
            for r in dict.fromkeys(ins):
                branch[r] = branch.get(r, stream.get(r, 0)) + 1
        branch.setdefault(u, stream[u])

    # events: vector clocks, a wait only where the clock does not already cover the producer
    producers = _producers(graph, unit)
    count = [0] * limit
    cur = [[0] * limit for _ in range(limit)]  # per stream: what its last step knew when done
    clock: dict[int, tuple[int, ...]] = {}
    after: dict[int, list[int]] = {}  # step -> knowledge once it is done
    position: dict[int, int] = {}
    waits: dict[int, tuple[int, ...]] = {}
    records: set[int] = set()
    for u in order:
        s = stream[u]
        known = list(cur[s])
        known[s] = count[s]
        chosen: list[int] = []
        for p in sorted(producers.get(u, ()), key=lambda p: -position[p]):
            sp = stream[p]
            if known[sp] > position[p]:
                continue  # already implied
            chosen.append(p)
            records.add(p)
            known = [max(a, b) for a, b in zip(known, after[p], strict=True)]
        position[u] = count[s]
        count[s] += 1
        clock[u] = tuple(known)
        done = list(known)
        done[s] = position[u] + 1
        after[u] = done
        cur[s] = done
        if chosen:
            waits[u] = tuple(sorted(chosen))
    return Schedule(
        max_streams=limit,
        steps=tuple(order),
        stream=stream,
        waits=waits,
        records=frozenset(records),
        clock=clock,
        position=position,
        graph=graph,
    )
