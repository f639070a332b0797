"""The passes an executor runs before it allocates anything, in one place: fusion, the stream
schedule and the memory plan for one graph on one backend.

    d = engine.passes.decide(graph, "cupy", streams=3)
    d.fusions, d.schedule, d.plan          # what an Executor built from the same arguments runs

``engine.runtime.executor.Executor`` calls ``decide``; ``engine.views.annotate`` and
``tools.graph_dump`` call it to draw the same decisions without allocating or running anything.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from backends import Backend, get_backend
from engine.passes import fusion as fusion_pass
from engine.passes import memory, scheduler
from graph.ir import Graph
from graph.ops import GraphError, Op

__all__ = ["Decisions", "decide", "host_gathers"]


@dataclass(frozen=True)
class Decisions:
    """What the passes decided for one graph on one backend, before anything is allocated:
    the fused groups, each node's launching step, the streams and events, the memory plan.
    ``Executor`` runs exactly these; ``engine.views.annotate`` and ``tools.graph_dump`` draw
    them."""

    fusions: list[fusion_pass.Fusion]
    steps: list[int]  # node id -> the step (anchor node) that computes it
    schedule: scheduler.Schedule | None  # None: one stream, no events
    plan: memory.MemoryPlan
    scratch: dict[int, int]  # node id -> bytes of kernel scratch on this backend


def decide(
    graph: Graph,
    backend: str | Backend = "numpy",
    fusion: bool = True,
    streams: int | str = 1,
    mode: str = "eager",
    reuse: bool = True,
    host_tables: Collection[str] = (),
    plan: memory.MemoryPlan | None = None,
) -> Decisions:
    """The fusion, stream and memory passes for ``graph`` on ``backend`` (see ``Executor``)."""
    be = get_backend(backend)
    scratch = {}
    for n in graph.nodes:
        if n.op in be.kernels:
            nbytes = be.scratch_bytes(n, [graph.nodes[s] for s in n.srcs])
            if nbytes:
                scratch[n.id] = nbytes
    # a caller's own plan knows nothing of fused groups, so it runs without them
    fusions = fusion_pass.find(graph) if fusion and plan is None else []
    steps = fusion_pass.step_of(graph, fusions)
    # streams: the scheduler's assignment; a plan of one stream runs without events
    sched = None
    if streams != 1 and plan is None:
        sched = scheduler.schedule(graph, streams, steps, mode)
        if sched.n_streams <= 1:
            sched = None
    if plan is None:
        early = {g for g, _, _ in host_gathers(graph, set(host_tables))}
        plan = memory.plan(graph, scratch, reuse=reuse, steps=steps, schedule=sched, early=early)
    return Decisions(fusions, steps, sched, plan, scratch)


def host_gathers(graph: Graph, tables: set[str]) -> list[tuple[int, int, int]]:
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
