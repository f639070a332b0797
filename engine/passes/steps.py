"""The step plan: one forward pass of one graph on one device, as a flat list of steps.

    sp = plan_graph(graph, spec, options)    # fusion, streams, memory, then the steps
    print(sp)                                # one line per step: stream, waits, ring, scratch
    ex = Executor(sp, weights, backend)      # binds it and runs it in one loop

``plan_graph`` runs the passes in the order a run takes them (fusion, then the stream
schedule, then the memory plan), and lays out the steps an ``Executor`` binds: each launching
node or fused group with its stream, the events it waits on and records, the ring fetches it
waits for and the slots it frees, and its kernel scratch in the arena. A pure function of the
graph, the device spec, the options and the costs: a machine without the device makes the same
plan as one with it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from backends import COMPUTE_OPS
from backends.spec import Costs, DeviceSpec
from engine.options import Options
from engine.passes import fusion as fusion_pass
from engine.passes import memory, scheduler
from engine.passes.offload import human
from engine.passes.ring import RingPlan, ring_steps
from graph.ir import Graph
from graph.ops import GraphError, Op

__all__ = ["Decisions", "Step", "StepPlan", "plan_graph", "host_gathers"]


@dataclass(frozen=True)
class Decisions:
    """What the passes decided for one graph on one device, before anything is allocated:
    the fused groups, each node's launching step, the streams and events, the memory plan."""

    fusions: list[fusion_pass.Fusion]
    steps: list[int]  # node id -> the step (anchor node) that computes it
    schedule: scheduler.Schedule | None  # None: one stream, no events
    plan: memory.MemoryPlan
    scratch: dict[int, int]  # node id -> bytes of kernel scratch on this device


@dataclass(frozen=True)
class Step:
    """One launching step: a node, or a fused group at its anchor, with everything around it.

    ``waits`` (steps whose events it waits on) and ``ready`` (ring fetches) come before it;
    ``record`` (its own event) and ``free`` (ring slots its layer is done with) after it."""

    node: int  # the anchor: the step runs at this node's position
    members: tuple[int, ...]  # the nodes it computes, in order
    pattern: str | None  # the fused group's pattern, if a group
    fused: bool  # the device runs the group as one launch (else member by member)
    stream: int
    waits: tuple[int, ...] = ()
    record: bool = False
    ready: tuple[int, ...] = ()
    free: tuple[int, ...] = ()
    scratch: tuple[tuple[int, int, int], ...] = ()  # (member, arena offset, bytes)

    @property
    def launches(self) -> int:
        return 1 if self.fused else len(self.members)

    def to_dict(self) -> dict[str, object]:
        return {
            "node": self.node,
            "members": list(self.members),
            "pattern": self.pattern,
            "fused": self.fused,
            "stream": self.stream,
            "waits": list(self.waits),
            "record": self.record,
            "ready": list(self.ready),
            "free": list(self.free),
            "scratch": [list(s) for s in self.scratch],
        }


@dataclass(frozen=True)
class StepPlan:
    """One forward pass of one graph on one device, as the flat list of steps an ``Executor``
    binds and runs: before them the inputs (and rows gathered from host tables) are copied in
    on stream 0 and every other stream forks from it; after them each output is copied out on
    its producer's stream and stream 0 joins the others. ``ring``: the weight ring the steps
    wait on and free (``free_first``: fetches this graph never reads, free at the start)."""

    graph: Graph
    spec: DeviceSpec
    mode: str
    decisions: Decisions = field(repr=False)
    steps: tuple[Step, ...]
    inputs: tuple[int, ...]  # input nodes, copied in before the steps
    gathers: tuple[tuple[int, int, int], ...]  # (GET_ROWS node, host table, index input)
    outputs: tuple[tuple[int, int], ...]  # (output node, stream it is copied out on)
    side_streams: tuple[int, ...]  # streams other than 0 that run steps
    ring: RingPlan | None = None
    free_first: tuple[int, ...] = ()

    @property
    def arena_bytes(self) -> int:
        return self.decisions.plan.arena_bytes

    @property
    def n_launches(self) -> int:
        """Kernel launches per run where every fused group's kernel applies."""
        return sum(s.launches for s in self.steps)

    @property
    def n_events(self) -> int:
        return sum(s.record for s in self.steps)

    def to_dict(self) -> dict[str, object]:
        return {
            "backend": self.spec.backend,
            "mode": self.mode,
            "arena_bytes": self.arena_bytes,
            "launches": self.n_launches,
            "streams": 1 + len(self.side_streams),
            "inputs": [self.graph.nodes[i].name for i in self.inputs],
            "gathers": [list(g) for g in self.gathers],
            "outputs": [list(o) for o in self.outputs],
            "free_first": list(self.free_first),
            "steps": [s.to_dict() for s in self.steps],
        }

    def _fetch(self, j: int) -> str:
        """How a printout names ring fetch ``j``: its layer's label and slot."""
        f = self.ring.fetches[j] if self.ring is not None else None
        return f"{f.label}@{f.slot}" if f is not None else f"f{j}"

    def __str__(self) -> str:
        nodes = self.graph.nodes
        lines = [
            f"StepPlan: {len(self.steps)} steps ({self.n_launches} launches) on "
            f"{self.spec.backend}, {self.mode} mode, {1 + len(self.side_streams)} stream(s), "
            f"{self.n_events} events, arena {human(self.arena_bytes)}"
            + (f", ring of {self.ring.slots} slot(s)" if self.ring is not None else "")
        ]
        copied = ", ".join(nodes[i].name for i in self.inputs)
        lines.append(f"  in     copy {copied or '-'} (stream 0)")
        for g, t, _ in self.gathers:
            lines.append(f"  in     gather %{g} from host table {nodes[t].name}")
        if self.free_first:
            lines.append(f"  start  free {' '.join(self._fetch(j) for j in self.free_first)}")
        for i, s in enumerate(self.steps):
            what = (
                f"{s.pattern}{'' if s.fused else ' (member by member)'} "
                f"[{' '.join(f'%{m}' for m in s.members)}]"
                if s.pattern
                else f"{nodes[s.node].op.name} {nodes[s.node].label}"
            )
            extra = []
            if s.waits:
                extra.append("wait " + " ".join(f"%{w}" for w in s.waits))
            if s.ready:
                extra.append("ready " + " ".join(self._fetch(j) for j in s.ready))
            if s.record:
                extra.append("record")
            if s.free:
                extra.append("free " + " ".join(self._fetch(j) for j in s.free))
            if s.scratch:
                extra.append(f"scratch {sum(b for _, _, b in s.scratch):,} B")
            tail = ("  " + "; ".join(extra)) if extra else ""
            lines.append(f"  #{i:<5} %{s.node:<5} s{s.stream} {what}{tail}")
        for o, k in self.outputs:
            lines.append(f"  out    copy %{o} {nodes[o].label} (stream {k})")
        return "\n".join(lines)


def host_gathers(graph: Graph, tables: Collection[str]) -> list[tuple[int, int, int]]:
    """(GET_ROWS node, table weight, index input) for the gathers from host-kept tables."""
    out = []
    for n in graph.nodes:
        if n.op is Op.WEIGHT and n.name in tables:
            readers = [graph.nodes[u] for u in graph.consumers[n.id]]
            if any(r.op is not Op.GET_ROWS or r.srcs[0] != n.id for r in readers):
                raise GraphError(f"host table {n.name} is read by more than row gathers")
        if n.op is not Op.GET_ROWS:
            continue
        table, idx = (graph.nodes[s] for s in n.srcs)
        if table.op is Op.WEIGHT and table.name in tables:
            if idx.op is not Op.INPUT:
                raise GraphError(
                    f"{n.label} gathers from host table {table.name} with a computed index; "
                    "only rows picked by an input can be gathered on the host"
                )
            out.append((n.id, table.id, idx.id))
    return out


def _decide(
    graph: Graph,
    spec: DeviceSpec,
    options: Options,
    early: Collection[int],
    costs: Costs,
    reuse: bool,
) -> Decisions:
    """The fusion, stream and memory passes for ``graph`` on ``spec``'s device."""
    scratch = {}
    for n in graph.nodes:
        if n.op in spec.ops:
            nbytes = spec.scratch_bytes(n, [graph.nodes[s] for s in n.srcs])
            if nbytes:
                scratch[n.id] = nbytes
    fusions = fusion_pass.find(graph, max_rows=spec.matvec_max_rows) if options.fusion else []
    steps = fusion_pass.step_of(graph, fusions)
    sched = None
    if options.streams != 1:
        sched = scheduler.schedule(graph, options.streams, steps, options.mode, costs)
        if sched.n_streams <= 1:  # a plan of one stream runs without events
            sched = None
    plan = memory.plan(
        graph,
        scratch,
        reuse=reuse,
        steps=steps,
        schedule=sched,
        early=early,
        alignment=spec.alignment,
    )
    return Decisions(fusions, steps, sched, plan, scratch)


def plan_graph(
    graph: Graph,
    spec: DeviceSpec,
    options: Options | None = None,
    *,
    ring: RingPlan | None = None,
    host_tables: Collection[str] = (),
    costs: Costs | None = None,
    reuse: bool = True,
) -> StepPlan:
    """The step plan of ``graph`` on ``spec``'s device: fusion, streams and events, the memory
    plan, and the steps in launch order. ``options``: its ``mode``, ``fusion`` and ``streams``
    apply. ``ring``: the streamed layers' ring (``engine.passes.ring``); ``host_tables``:
    weights kept in host memory, whose rows are gathered on the host and copied in (the token
    embedding under an offload policy); ``reuse=False`` gives every value bytes of its own (every
    intermediate survives the run: for debugging and profiling)."""
    options = options or Options()
    graph.validate()
    missing = sorted(
        {n.op.name for n in graph.nodes if n.op in COMPUTE_OPS and n.op not in spec.ops}
    )
    if missing:
        raise GraphError(f"backend {spec.backend} has no kernel for {', '.join(missing)}")
    if ring is not None and options.streams != 1:
        raise GraphError("weight streaming runs the compute on one stream: use --streams 1")
    gathers = host_gathers(graph, set(host_tables))
    gathered = {g for g, _, _ in gathers}
    d = _decide(graph, spec, options, gathered, costs or spec.costs, reuse)
    sched = d.schedule
    group_at = {f.anchor: f for f in d.fusions}
    in_group = {i for f in d.fusions for i in f.nodes}
    scratch_at = d.plan.scratch_of()
    units: list[tuple[int, tuple[int, ...], fusion_pass.Fusion | None]] = []
    for n in graph.nodes:
        if n.op not in spec.ops or n.id in gathered or (n.id in in_group and n.id not in group_at):
            continue
        f = group_at.get(n.id)
        units.append((n.id, f.nodes if f is not None else (n.id,), f))
    at = ring_steps(ring, graph, [m for _, m, _ in units]) if ring is not None else None
    steps = []
    for i, (u, members, f) in enumerate(units):
        steps.append(
            Step(
                node=u,
                members=members,
                pattern=f.pattern if f is not None else None,
                fused=f is not None and f.pattern in spec.fused_patterns,
                stream=sched.stream[u] if sched is not None else 0,
                waits=tuple(sched.waits.get(u, ())) if sched is not None else (),
                record=sched is not None and u in sched.records,
                ready=at.ready[i] if at is not None else (),
                free=at.free[i] if at is not None else (),
                scratch=tuple((m, *scratch_at[m]) for m in members if m in scratch_at),
            )
        )
    side = sorted({sched.stream[u] for u in sched.steps} - {0}) if sched is not None else []
    outputs = []
    for o in graph.outputs:  # copied out on the producer's stream, before the join
        root = graph.nodes[graph.nodes[o].base]
        k = sched.stream[d.steps[root.id]] if sched is not None and not root.is_leaf else 0
        outputs.append((o, k if k in side else 0))
    return StepPlan(
        graph=graph,
        spec=spec,
        mode=options.mode,
        decisions=d,
        steps=tuple(steps),
        inputs=tuple(n.id for n in graph.inputs),
        gathers=tuple(gathers),
        outputs=tuple(outputs),
        side_streams=tuple(side),
        ring=ring,
        free_first=at.free_first if at is not None else (),
    )
