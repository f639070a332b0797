"""The memory plan never hands out bytes that a later reader still needs.

Besides ``plan.validate``, every property here recomputes liveness independently from the graph
(following ``node.base`` to the storage root) and checks the plan against it.
"""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Executor
from engine.passes import fusion, memory
from graph import Graph, GraphBuilder, Op, f16, f32, i32
from tests.strategies import Case, graph_cases

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _root(g: Graph, i: int) -> int:
    while g.nodes[i].base != i:
        i = g.nodes[i].base
    return i


def _arena_ids(g: Graph) -> list[int]:
    """Values with bytes of their own in the arena: inputs and every computing node."""
    own = {Op.INPUT} | (
        set(Op) - {Op.WEIGHT, Op.CONSTANT, Op.STATE, Op.RESHAPE, Op.PERMUTE, Op.VIEW, Op.SET_ROWS}
    )
    return [n.id for n in g.nodes if n.op in own]


def live_intervals(g: Graph, steps: list[int] | None = None) -> dict[int, tuple[int, int]]:
    """[first, last] step of each arena value: written at its step (its id, or its fused
    group's anchor; inputs before the run, -1), last read by the latest step reading it or any
    alias of it, outputs read after the run."""
    at = steps if steps is not None else [n.id for n in g.nodes]
    aliases: dict[int, list[int]] = {}
    for n in g.nodes:
        aliases.setdefault(_root(g, n.id), []).append(n.id)
    out = {}
    for i in _arena_ids(g):
        first = -1 if g.nodes[i].op is Op.INPUT else at[i]
        last = at[i]
        for a in aliases[i]:
            for reader in g.consumers[a]:
                last = max(last, at[reader])
            if a in g.outputs:
                last = len(g)
        out[i] = (first, last)
    return out


def _aligned(n: int) -> int:
    return -(-n // memory.ALIGN) * memory.ALIGN


def check_plan(g: Graph, plan: memory.MemoryPlan) -> None:
    plan.validate(g)
    live = live_intervals(g)
    allocs = {a.node: a for a in plan.allocations}
    assert set(allocs) == set(live), "the plan must place exactly the arena values"
    for i, a in allocs.items():
        n = g.nodes[i]
        assert a.size >= n.nbytes and a.offset % memory.ALIGN == 0
        assert a.offset + n.nbytes <= plan.arena_bytes
        assert (a.first, a.last) == live[i], (n, a, live[i])
    # no two values whose bytes meet are ever live at the same step
    for i, j in itertools.combinations(sorted(allocs), 2):
        a, b = allocs[i], allocs[j]
        na, nb = g.nodes[i].nbytes, g.nodes[j].nbytes
        if na and nb and a.offset < b.offset + nb and b.offset < a.offset + na:
            (fa, la), (fb, lb) = live[i], live[j]
            assert la < fb or lb < fa, f"%{i} live {fa}..{la} and %{j} live {fb}..{lb} share bytes"
    # the peak: what is live at the busiest step <= the arena <= everything without reuse
    sizes = {i: _aligned(g.nodes[i].nbytes) for i in live}
    busiest = max(
        (
            sum(sizes[i] for i, (f, la) in live.items() if f <= t <= la)
            for t in range(-1, len(g) + 1)
        ),
        default=0,
    )
    total = sum(sizes.values())
    assert plan.max_live_bytes == busiest
    assert plan.total_bytes == total
    assert busiest <= plan.arena_bytes <= total


@PROPERTY
@given(graph_cases(), st.booleans())
def test_plan_never_shares_bytes_between_live_values(case: Case, dce: bool) -> None:
    g = case.graph.dce() if dce else case.graph
    check_plan(g, memory.plan(g))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph_cases())
def test_executor_arrays_of_live_values_do_not_overlap(case: Case) -> None:
    g = case.graph
    ex = Executor(g, case.weights, states=case.fresh_states())
    live = live_intervals(g, fusion.step_of(g, ex.fusions))  # fused members run at the anchor
    for i, j in itertools.combinations(sorted(live), 2):
        (fa, la), (fb, lb) = live[i], live[j]
        if fa <= lb and fb <= la:
            assert not np.may_share_memory(ex.array(i), ex.array(j)), (i, j)


# -- hand-made graphs --------------------------------------------------------------------------


def test_a_chain_reuses_bytes() -> None:
    b = GraphBuilder()
    x = b.input("x", (64, 64), f32)  # 16 KiB each
    for _ in range(6):
        x = b.scale(x, 0.5)
    g = b.build([x])
    plan = memory.plan(g)
    check_plan(g, plan)
    assert plan.arena_bytes == 2 * 64 * 64 * 4  # ping-pong between two buffers
    assert plan.total_bytes == 7 * 64 * 64 * 4


def test_a_view_keeps_its_base_alive() -> None:
    b = GraphBuilder()
    x = b.input("x", (8, 32), f32)
    t = b.scale(x, 2.0, name="t")
    head = b.rows(t, 0, 2, name="head")  # a view of t, read at the very end
    u = b.scale(b.scale(x, 3.0), 4.0, name="u")
    y = b.add(b.cont(head), b.rows(u, 0, 2))
    g = b.build([y])
    plan = memory.plan(g)
    check_plan(g, plan)
    live = live_intervals(g)
    assert live[t.id][1] > u.id  # t is still needed after u is written


def test_an_input_read_by_the_first_node_is_not_its_output() -> None:
    b = GraphBuilder()
    x = b.input("x", (4, 64), f16)
    y = b.scale(x, 2.0)
    g = b.build([y])
    plan = memory.plan(g)
    check_plan(g, plan)
    off = plan.offset_of()
    assert off[x.id] != off[y.id]


def test_outputs_and_state_writes_stay_out_of_reuse() -> None:
    b = GraphBuilder()
    x = b.input("x", (4, 16), f32)
    early = b.scale(x, 2.0, name="early")  # an output: must survive to the end
    cache = b.state("cache", (8, 16), f32)
    w = b.set_rows(cache, early, b.input("slots", (4,), i32))
    z = x
    for _ in range(4):
        z = b.rms_norm(z)
    g = b.build([early, z, b.rows(w, 0, 4)])
    plan = memory.plan(g)
    check_plan(g, plan)
    assert live_intervals(g)[early.id] == (early.id, len(g))
    assert w.id not in plan.offset_of() and cache.id not in plan.offset_of()
