"""The executor agrees with the naive recursive reference on random graphs, and reusing one
executor (its arena, its states) across calls gives what fresh executors give."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Executor
from graph import GraphBuilder, bf16, f16, f32, i32
from graph.dtypes import DType
from tests.reference import ref_eval, ref_eval_states
from tests.strategies import Case, f32_cases, graph_cases

PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Why not bitwise: every kernel computes in f32 and the reference in f64, each rounding to the
# node's storage type at the end. Single +, * and casts then agree exactly, but fused ops (rms
# norm, rope, attention, the GLUs, matmul sums) differ by a few f32 ulps, and a value that lands
# near a rounding boundary of a narrow type can round one ulp apart. So the tolerance is a few
# ulps of the coarsest storage type in the graph, relative to the output's scale.
TOL = {f32.name: 2e-5, f16.name: 8 * 2.0**-11, bf16.name: 8 * 2.0**-8}


def tolerance(dtypes: Iterable[DType]) -> float:
    return max((TOL[d.name] for d in dtypes if d.name in TOL), default=TOL[f32.name])


def assert_close(got: np.ndarray, want: np.ndarray, tol: float, what: str = "") -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.dtype, want.dtype)
    g, w = got.astype(np.float64), want.astype(np.float64)
    scale = max(1.0, float(np.abs(w).max(initial=0.0)))
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * scale, err_msg=what)


def _inputs(ex: Executor, inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k in ex.input_names}


def check_against_reference(case: Case, dce: bool) -> None:
    g = case.graph.dce() if dce else case.graph
    tol = tolerance(case.dtypes)
    states = case.fresh_states()
    ex = Executor(g, case.weights, states=states)
    got = ex.run(_inputs(ex, case.inputs[0]))
    want, want_states = ref_eval_states(g, case.inputs[0], case.weights, case.states)
    assert len(got) == len(g.outputs)
    for o, a, b in zip(g.outputs, got, want, strict=True):
        assert_close(a, b, tol, f"output %{o} ({g.nodes[o].op.name})")
    for name, value in want_states.items():  # the KV writes land in the caller's arrays
        assert_close(states[name], value, tol, f"state {name}")


@PROPERTY
@given(f32_cases(), st.booleans())
def test_f32_graphs_match_the_reference(case: Case, dce: bool) -> None:
    check_against_reference(case, dce)


@PROPERTY
@given(graph_cases(), st.booleans())
def test_mixed_dtype_graphs_match_the_reference(case: Case, dce: bool) -> None:
    check_against_reference(case, dce)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph_cases())
def test_one_executor_twice_equals_two_fresh_runs(case: Case) -> None:
    g = case.graph
    first, second = case.inputs

    reused_states = case.fresh_states()
    ex = Executor(g, case.weights, states=reused_states)
    a1 = ex.run(first)
    a2 = ex.run(second)

    fresh_states = case.fresh_states()  # each fresh executor starts from the previous call's
    b1 = Executor(g, case.weights, states=fresh_states).run(first)
    b2 = Executor(g, case.weights, states=fresh_states).run(second)

    for x, y in zip(a1 + a2, b1 + b2, strict=True):  # same kernels, same inputs: bitwise
        np.testing.assert_array_equal(x, y)
    for name in reused_states:
        np.testing.assert_array_equal(reused_states[name], fresh_states[name])

    # and both calls agree with the reference, the second reading the first call's KV writes
    tol = tolerance(case.dtypes)
    want1, states1 = ref_eval_states(g, first, case.weights, case.states)
    want2 = ref_eval(g, second, case.weights, states1)
    for x, y in zip(a1 + a2, want1 + want2, strict=True):
        assert_close(x, y, tol)


# -- hand-made checks of the reference itself against the op table's prose --------------------


def test_reference_kv_cache_two_calls() -> None:
    b = GraphBuilder()
    k_new = b.input("k", (1, 1, 2), f32)
    slot = b.input("slot", (1,), i32)
    cache = b.set_rows(b.state("kc", (3, 1, 2), f32), k_new, slot)
    q = b.input("q", (1, 1, 2), f32)
    y = b.attention(q, cache, cache, b.input("qp", (1,), i32), b.input("kvp", (3,), i32), scale=1.0)
    g = b.build([y])
    one = np.ones((1, 1, 2), np.float32)
    call1 = {
        "k": one,
        "slot": np.array([0], np.int32),
        "q": 0 * one,
        "qp": np.array([1], np.int32),
        "kvp": np.array([0, 1, -1], np.int32),
    }
    call2 = {**call1, "k": 3 * one, "slot": np.array([1], np.int32)}
    out1, st1 = ref_eval_states(g, call1, {})
    # q = 0: uniform weights over the visible keys 0 and 1 (rows 1 still zero) -> mean 0.5
    np.testing.assert_allclose(out1[0], 0.5 * one)
    out2 = ref_eval(g, call2, {}, st1)
    np.testing.assert_allclose(out2[0], 2.0 * one)  # mean of rows 1 and 3
    states = {"kc": np.zeros((3, 1, 2), np.float32)}
    ex = Executor(g, {}, states=states)
    np.testing.assert_allclose(ex.run(call1)[0], out1[0], rtol=1e-6)
    np.testing.assert_allclose(ex.run(call2)[0], out2[0], rtol=1e-6)


def test_reference_views() -> None:
    b = GraphBuilder()
    x = b.input("x", (2, 3, 4), f32)
    t = b.permute(x, (2, 0, 1))
    v = b.view(b.reshape(x, (24,)), (3, 2), (5, 1), offset=2)
    r = b.rows(x, 1, 2)
    g = b.build([t, v, r, b.cont(t)])
    xv = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    tv, vv, rv, cv = ref_eval(g, {"x": xv}, {})
    np.testing.assert_array_equal(tv, xv.transpose(2, 0, 1))
    np.testing.assert_array_equal(vv, [[2, 3], [7, 8], [12, 13]])
    np.testing.assert_array_equal(rv, xv[1:2])
    np.testing.assert_array_equal(cv, tv)
    for got, want in zip(Executor(g, {}).run({"x": xv}), (tv, vv, rv, cv), strict=True):
        np.testing.assert_array_equal(got, want)


def _edge_graphs():
    """Small graphs at the edges the random strategy avoids: scalars, empty tensors, zero
    strides, outputs that are inputs (twice), an i32 table, attention over zero keys."""
    rng = np.random.default_rng(0)
    f = np.float32

    b = GraphBuilder()
    s, x = b.input("s", (), f32), b.input("x", (3,), f32)
    yield (
        "scalars",
        b.build([b.add(x, s), b.reshape(s, (1,)), b.scale(s, 2.0)]),
        {"s": f(2.0), "x": rng.standard_normal(3).astype(f)},
    )

    b = GraphBuilder()
    x, w = b.input("x", (0, 4), f32), b.weight("w", (3, 4), f32, layer=0)
    r = b.rows(b.input("x2", (3, 4), f32), 1, 1)
    yield (
        "empty",
        b.build([b.mul_mat(w, x), b.cont(r), b.rms_norm(x)]),
        {"x": np.zeros((0, 4), f), "x2": np.ones((3, 4), f), "w": np.ones((3, 4), f)},
    )

    b = GraphBuilder()
    x = b.input("x", (4,), f32)
    v = b.view(x, (3, 4), (0, 1))  # every row is x
    yield "zero stride", b.build([v, b.add(v, x)]), {"x": np.arange(4, dtype=f)}

    b = GraphBuilder()
    x = b.input("x", (2,), f16)
    yield "output is input", b.build([x, x, b.cast(x, bf16)]), {"x": np.ones(2, np.float16)}

    b = GraphBuilder()
    t, i = b.input("t", (3, 2), i32), b.input("i", (2,), i32)
    yield (
        "i32 table",
        b.build([b.get_rows(t, i)]),
        {"t": np.arange(6, dtype=np.int32).reshape(3, 2), "i": np.array([2, 0], np.int32)},
    )

    b = GraphBuilder()
    q, k, v = (
        b.input("q", (2, 1, 2), f32),
        b.input("k", (0, 1, 2), f32),
        b.input("v", (0, 1, 3), f32),
    )
    y = b.attention(q, k, v, b.input("qp", (2,), i32), b.input("kp", (0,), i32), scale=1.0)
    yield (
        "no keys",
        b.build([y]),
        {
            "q": np.ones((2, 1, 2), f),
            "k": np.ones((0, 1, 2), f),
            "v": np.ones((0, 1, 3), f),
            "qp": np.array([0, 1], np.int32),
            "kp": np.zeros(0, np.int32),
        },
    )


@pytest.mark.parametrize(
    "name, graph, arrays", list(_edge_graphs()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_edge_graphs_match_the_reference(name, graph, arrays) -> None:
    weights = {n.name: arrays[n.name] for n in graph.weights}
    inputs = {n.name: arrays[n.name] for n in graph.inputs}
    got = Executor(graph, weights).run(inputs)
    want = ref_eval(graph, inputs, weights)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, TOL[f32.name], name)


def test_reference_covers_every_op() -> None:
    from graph.ops import Op
    from tests.reference import REF_OPS

    assert set(REF_OPS) == set(Op)
