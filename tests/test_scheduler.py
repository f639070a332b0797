"""The stream pass (``engine.passes.scheduler``), the stream-aware memory plan, and multi-stream
runs on the NumPy backend, whose streams are worker threads and whose events really synchronise.

Multi-stream results must equal the single-stream run bitwise (the kernels are the same; only
the order changes), and a stress mode (random delays before every task on a worker stream) must
turn a removed wait into a wrong result.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.numpy_backend import NumpyBackend
from engine.model.session import Session
from engine.model.weights import random_weights
from engine.options import Options
from engine.passes import fusion, memory, scheduler
from engine.passes.plans import plan_graph
from engine.runtime.executor import Executor
from graph import GraphBuilder, f32
from graph.models import build, kv_slots, preset
from tests.strategies import Case, graph_cases


def fan_out(branches: int = 8, d: int = 32) -> tuple:
    """One input read by ``branches`` independent matrix products (the seed's Q/K/V shape)."""
    g = GraphBuilder()
    x = g.input("x", (1, d), f32)
    outs = [g.mul_mat(g.weight(f"w{i}", (d, d), f32, layer=0), x) for i in range(branches)]
    rng = np.random.default_rng(branches)
    weights = {f"w{i}": rng.standard_normal((d, d), np.float32) for i in range(branches)}
    return g.build(outs), weights


def test_every_reader_after_the_first_starts_a_new_stream() -> None:
    graph, _ = fan_out(8)
    sched = scheduler.schedule(graph, 8)
    streams = [sched.stream[s] for s in sched.steps]
    assert streams == list(range(8))  # weights never count: x's branch counter alone decides
    assert sched.n_waits == 0  # x is an input: the fork at the start orders it for every stream
    sched.validate(graph)


def test_streams_wrap_at_the_limit_and_one_stream_has_no_events() -> None:
    graph, _ = fan_out(8)
    assert [scheduler.schedule(graph, 3).stream[s] for s in graph.outputs] == [
        0,
        1,
        2,
        0,
        1,
        2,
        0,
        1,
    ]
    one = scheduler.schedule(graph, 1)
    assert one.n_streams == 1 and not one.records and one.n_waits == 0


def test_waits_only_where_no_earlier_wait_implies_them() -> None:
    """b and c read a on other streams; d reads b and c; e reads a and d: e's wait for d
    already covers a (d waited on b, which waited on a), so e waits once."""
    g = GraphBuilder()
    x = g.input("x", (4, 4), f32)
    a = g.scale(x, 2.0, name="a")
    b = g.scale(a, 3.0, name="b")  # a's first reader: a's stream
    c = g.scale(a, 5.0, name="c")  # second reader: a new stream
    d = g.add(c, b, name="d")  # on c's stream; waits for b
    e = g.add(d, a, name="e")
    graph = g.build([e])
    sched = scheduler.schedule(graph, 4)
    sched.validate(graph)
    ids = {n.name: n.id for n in graph.nodes if n.name}
    assert sched.stream[ids["b"]] == sched.stream[ids["a"]] != sched.stream[ids["c"]]
    assert sched.waits[ids["c"]] == (ids["a"],)
    assert sched.waits[ids["d"]] == (ids["b"],)
    assert ids["e"] not in sched.waits  # same stream as d, which already knows a and b
    assert sched.records == {ids["a"], ids["b"]}


def test_validate_catches_a_removed_wait() -> None:
    g = GraphBuilder()
    x = g.input("x", (4, 4), f32)
    a = g.scale(x, 2.0)
    graph = g.build([g.add(g.scale(a, 3.0), g.scale(a, 5.0))])
    sched = scheduler.schedule(graph, 2)
    sched.validate(graph)
    step = next(s for s in sched.steps if s in sched.waits)
    broken = dataclasses.replace(sched, waits={k: v for k, v in sched.waits.items() if k != step})
    # the clocks still claim the order; rebuild them from the waits that remain
    with pytest.raises(AssertionError, match="a wait is missing"):
        _reclocked(broken, graph).validate(graph)


def _reclocked(sched: scheduler.Schedule, graph) -> scheduler.Schedule:  # noqa: ANN001
    """The schedule's clocks recomputed from its waits alone (what a run would really know)."""
    n = sched.max_streams
    cur = [[0] * n for _ in range(n)]
    after: dict[int, list[int]] = {}
    clock = {}
    for s in sched.steps:
        k = sched.stream[s]
        known = list(cur[k])
        known[k] = sched.position[s]
        for w in sched.waits.get(s, ()):
            known = [max(a, b) for a, b in zip(known, after[w], strict=True)]
        clock[s] = tuple(known)
        done = list(known)
        done[k] = sched.position[s] + 1
        after[s] = cur[k] = done
    return dataclasses.replace(sched, clock=clock)


def test_auto_forks_eagerly_only_for_big_steps_and_in_graphs_for_any() -> None:
    small, _ = fan_out(8, d=32)
    assert scheduler.schedule(small, "auto", mode="eager").n_streams == 1
    assert scheduler.schedule(small, "auto", mode="graph").n_streams == 8
    big, _ = fan_out(4, d=4096)  # 4096 x 4096 f32 products: ~22 us each at 3 TB/s
    assert scheduler.step_cost(big, [big.outputs[0]]) > scheduler.MIN_FORK_US["eager"]
    assert scheduler.schedule(big, "auto", mode="eager").n_streams == 4
    with pytest.raises(ValueError, match="max_streams"):
        scheduler.schedule(small, 0)
    with pytest.raises(ValueError, match="mode"):
        scheduler.schedule(small, "auto", mode="fast")


def test_schedule_prints_and_serialises() -> None:
    graph, _ = fan_out(3)
    sched = scheduler.schedule(graph, 2)
    text = str(sched)
    assert text.startswith("Schedule: 3 steps on 2 stream(s)") and "stream 1" in text
    d = sched.to_dict()
    assert d["n_streams"] == 2 and [s["stream"] for s in d["steps"]] == [0, 1, 0]


@pytest.mark.parametrize("name", ["llama-tiny", "gemma3-tiny", "gemma3-270m"])
@pytest.mark.parametrize("stack", [False, True])
def test_model_schedules_validate_and_plans_respect_streams(name: str, stack: bool) -> None:
    """Separate Q/K/V products branch; the single-stream plan would hand bytes to a writer
    that another stream may still be reading, the stream-aware plan does not, at equal size."""
    cfg = preset(name)
    graph = build(cfg, 4, kv_slots(cfg, 64, 4), logits="last", stack=stack)
    steps = fusion.step_of(graph, fusion.find(graph))
    for n in (2, 4, 8):
        sched = scheduler.schedule(graph, n, steps)
        sched.validate(graph, dict(enumerate(steps)))
        plan = memory.plan(graph, steps=steps, schedule=sched)
        plan.validate(graph, sched)
        single = memory.plan(graph, steps=steps)
        assert plan.arena_bytes <= 1.10 * single.arena_bytes
    if not stack:
        assert sched.n_streams >= 3  # q, k and v
        unsafe = memory.plan(graph, schedule=None)
        sched_plain = scheduler.schedule(graph, 4)
        with pytest.raises(AssertionError, match="another stream"):
            unsafe.validate(graph, sched_plain)


@pytest.mark.parametrize("streams", [2, 4, 8, "auto"])
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_fan_out_on_worker_streams_equals_one_stream(streams, mode: str) -> None:  # noqa: ANN001
    graph, weights = fan_out(8)
    rng = np.random.default_rng(0)
    ref = Executor(graph, weights, options=Options(mode=mode))
    ex = Executor(
        graph, weights, NumpyBackend(stress=0.002), options=Options(mode=mode, streams=streams)
    )
    for _ in range(3):
        x = {"x": rng.standard_normal((1, 32), np.float32)}
        for a, b in zip(ex.run(x), ref.run(x), strict=True):
            np.testing.assert_array_equal(a, b)


def test_stress_mode_turns_a_removed_wait_into_a_wrong_result() -> None:
    """a on stream 0, c = 5a on stream 1, e = 2c read by a third stream: with e's wait for c
    removed and c delayed, e reads c's bytes before they are written."""
    g = GraphBuilder()
    x = g.input("x", (64, 64), f32)
    a = g.scale(x, 2.0, name="a")
    b = g.scale(a, 3.0, name="b")
    c = g.scale(a, 5.0, name="c")
    d = g.scale(c, 7.0, name="d")
    e = g.scale(c, 11.0, name="e")
    graph = g.build([b, d, e])
    ref = Executor(graph, {})
    stressed = NumpyBackend(stress=0.01)
    plan = plan_graph(graph, stressed.spec, Options(streams=4))
    ex = Executor(plan, {}, stressed)
    assert ex.schedule is not None and ex.schedule.waits
    rng = np.random.default_rng(1)

    def differs(runs: int) -> int:
        bad = 0
        for _ in range(runs):
            x = {"x": rng.standard_normal((64, 64), np.float32)}
            want, got = ref.run(x), ex.run(x)
            bad += any(not np.array_equal(p, q) for p, q in zip(got, want, strict=True))
        return bad

    assert differs(6) == 0  # with every wait in place, stress changes nothing
    unsafe = dataclasses.replace(
        plan, steps=tuple(dataclasses.replace(s, waits=()) for s in plan.steps)
    )
    ex = Executor(unsafe, {}, stressed)  # the same plan with every wait between streams dropped
    assert differs(12) > 0


@pytest.mark.parametrize("name", ["llama-tiny", "gemma3-tiny"])
def test_sessions_on_many_streams_equal_one_stream(name: str) -> None:
    cfg = preset(name)
    w = random_weights(cfg, seed=4)
    one = Session(cfg, w, n_ctx=48, n_batch=8, stack=False)
    many = Session(cfg, w, n_ctx=48, n_batch=8, stack=False, streams=4)
    ids = list(range(3, 14))
    np.testing.assert_array_equal(many.prefill(ids, "all"), one.prefill(ids, "all"))
    tok = 5
    for _ in range(6):
        np.testing.assert_array_equal(many.decode(tok), one.decode(tok))
        tok = (tok * 7 + 3) % cfg.n_vocab
    ex = many.executor(many.step_key(1, many.n_past + 1))
    assert ex.schedule is not None and ex.schedule.n_streams >= 3


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=graph_cases(), streams=st.integers(1, 8), mode=st.sampled_from(["eager", "graph"]))
def test_random_graphs_on_many_streams_equal_one_stream(
    case: Case, streams: int, mode: str
) -> None:
    steps = fusion.step_of(case.graph, fusion.find(case.graph))
    sched = scheduler.schedule(case.graph, streams, steps)
    sched.validate(case.graph, dict(enumerate(steps)))
    memory.plan(case.graph, steps=steps, schedule=sched).validate(case.graph, sched)
    s1, sn = case.fresh_states(), case.fresh_states()
    one = Executor(case.graph, case.weights, states=s1, options=Options(mode=mode))
    opts = Options(mode=mode, streams=streams)
    many = Executor(case.graph, case.weights, NumpyBackend(stress=1e-4), sn, options=opts)
    for inputs in case.inputs:
        feed = {k: v for k, v in inputs.items() if k in one.input_names}
        for a, b in zip(many.run(feed), one.run(feed), strict=True):
            np.testing.assert_array_equal(a, b)
    for k in s1:
        np.testing.assert_array_equal(sn[k], s1[k])
