"""Every op against an independently written float64 NumPy formula, through the real path.

Each test builds a tiny graph with ``GraphBuilder``, runs it with ``engine.run`` (or an
``engine.Executor``) on the numpy backend, and compares with a formula evaluated in float64 on
the very values the graph saw: inputs are drawn, rounded to their storage dtype, and the
reference reads the rounded values. Shapes are odd on purpose (no power-of-two luck).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import engine
from backends import COMPUTE_OPS
from backends.numpy_backend import NumpyBackend
from graph import GraphBuilder, Op, RopeMode, bf16, f16, f32, i32
from graph.ops import INFER, LEAF_OPS, PARAMS, SRC_COUNT, VIEW_OPS

# Tolerances keyed by the dtype of the op's *output*. Kernels compute in f32, so an f32 output
# is held tight: 1e-5 relative, plus 1e-5 absolute for entries that cancel to ~0. An f16/bf16
# output is rounded to storage (half an ulp, eps/2 relative) after an f32 computation, so it
# gets one epsilon of its dtype, relative and absolute: f16 eps = 2^-10, bf16 eps = 2^-7.
_EPS16 = float(np.finfo(np.float16).eps)
_EPSBF = float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps)
TOL = {
    f32: dict(rtol=1e-5, atol=1e-5),
    f16: dict(rtol=_EPS16, atol=_EPS16),
    bf16: dict(rtol=_EPSBF, atol=_EPSBF),
}
FLOATS = [f32, f16, bf16]
SEED = 20240607


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


def rand(rng: np.random.Generator, shape, dtype, scale: float = 1.0) -> np.ndarray:
    """Normal values rounded to ``dtype``'s storage type."""
    return (rng.standard_normal(shape) * scale).astype(dtype.numpy)


def f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def check(got: np.ndarray, want: np.ndarray, dtype) -> None:
    assert got.dtype == dtype.numpy, (got.dtype, dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(f64(got), want, **TOL[dtype])


def evaluate(g: GraphBuilder, outputs, inputs=None, weights=None) -> list[np.ndarray]:
    graph = g.build(outputs=outputs)
    return engine.run(graph, inputs=inputs or {}, weights=weights or {}, backend="numpy")


def one_input(dtype, x: np.ndarray, fn):
    """Run ``fn(g, x_tensor)`` on one input ``x``; returns the single output."""
    g = GraphBuilder()
    t = g.input("x", x.shape, dtype)
    (out,) = evaluate(g, [fn(g, t)], inputs={"x": x})
    return out


# -- completeness -------------------------------------------------------------------------------
def test_every_op_has_a_kernel_or_is_a_leaf_or_view():
    assert set(NumpyBackend.kernels) == COMPUTE_OPS
    for op in Op:
        kinds = [op in LEAF_OPS, op in VIEW_OPS, op in COMPUTE_OPS]
        assert sum(kinds) == 1, (op, kinds)


@pytest.mark.parametrize("table", [SRC_COUNT, PARAMS, INFER], ids=["SRC_COUNT", "PARAMS", "INFER"])
def test_op_tables_are_complete(table):
    assert set(table) == set(Op) and len(table) == len(Op)


# -- copies and views ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 5)])
def test_cont(rng, dtype, shape):
    x = rand(rng, shape, dtype)
    out = one_input(dtype, x, lambda g, t: g.cont(t))
    assert out.dtype == dtype.numpy and np.array_equal(out, x)


@pytest.mark.parametrize("src", FLOATS, ids=str)
@pytest.mark.parametrize("dst", FLOATS, ids=str)
def test_cast(rng, src, dst):
    special = [0.0, -0.0, 1.0, -2.5, 1 / 3, 1e-3, 3e-6, 255.875, -1000.1]
    vals = np.concatenate([rng.standard_normal(26) * 4, special]).reshape(5, 7)
    x = vals.astype(src.numpy)
    out = one_input(src, x, lambda g, t: g.cast(t, dst))
    want = f64(x).astype(dst.numpy)  # one correct rounding from the exact source value
    assert out.dtype == dst.numpy
    assert np.array_equal(out, want) and np.array_equal(np.signbit(out), np.signbit(want))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("axes", [(0, 1, 2), (2, 0, 1), (1, 2, 0), (2, 1, 0), (0, 2, 1)])
def test_permute(rng, dtype, axes):
    x = rand(rng, (2, 3, 5), dtype)
    out = one_input(dtype, x, lambda g, t: g.cont(g.permute(t, axes)))
    want = np.empty([x.shape[a] for a in axes], x.dtype)
    for idx in np.ndindex(*x.shape):
        want[tuple(idx[a] for a in axes)] = x[idx]
    assert np.array_equal(out, want)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(5, 6), (2, -1, 3), (30,), (1, 30, 1)])
def test_reshape(rng, dtype, shape):
    x = rand(rng, (3, 10), dtype)
    out = one_input(dtype, x, lambda g, t: g.cont(g.reshape(t, shape)))
    flat = [x[i, j] for i in range(3) for j in range(10)]  # row-major element order
    assert out.size == 30 and list(out.reshape(-1)) == flat
    assert out.shape == tuple(30 // 6 if d == -1 else d for d in shape)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(
    "shape,strides,offset",
    [((3, 4), (9, 2), 1), ((4, 3), (1, 9), 5), ((2, 2, 3), (18, 1, 5), 2), ((36,), (1,), 0)],
)
def test_view(rng, dtype, shape, strides, offset):
    x = rand(rng, (4, 9), dtype)
    out = one_input(dtype, x, lambda g, t: g.cont(g.view(t, shape, strides, offset)))
    flat = x.reshape(-1)
    want = np.empty(shape, x.dtype)
    for idx in np.ndindex(*shape):
        want[idx] = flat[offset + sum(i * s for i, s in zip(idx, strides, strict=True))]
    assert np.array_equal(out, want)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_transpose_helper(rng, dtype):
    x = rand(rng, (3, 5, 7), dtype)
    g = GraphBuilder()
    t = g.input("x", x.shape, dtype)
    last, outer = g.cont(g.transpose(t)), g.cont(g.transpose(t, 0, 2))
    got_last, got_outer = evaluate(g, [last, outer], inputs={"x": x})
    assert got_last.shape == (3, 7, 5) and got_outer.shape == (7, 5, 3)
    for i, j, k in np.ndindex(3, 5, 7):
        assert got_last[i, k, j] == x[i, j, k] and got_outer[k, j, i] == x[i, j, k]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("start,stop", [(2, 5), (0, 1), (5, 6), (0, 6), (3, 3)])
def test_rows_helper(rng, dtype, start, stop):
    x = rand(rng, (6, 5), dtype)
    g = GraphBuilder()
    t = g.input("x", x.shape, dtype)
    r = g.rows(t, start, stop)
    assert r.node.op is Op.VIEW and r.node.offset == start * 5 and r.shape == (stop - start, 5)
    (out,) = evaluate(g, [g.cont(r)], inputs={"x": x})
    want = np.array([[x[i, j] for j in range(5)] for i in range(start, stop)], x.dtype)
    assert out.shape == (stop - start, 5) and np.array_equal(out, want.reshape(-1, 5))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_views_of_weights_and_results(rng, dtype):
    """rows -> reshape -> permute of a weight, and a permuted view of a computed result."""
    w, x = rand(rng, (7, 6), dtype), rand(rng, (3, 5), dtype)
    g = GraphBuilder()
    tw, tx = g.weight("w", w.shape, dtype, layer=0), g.input("x", x.shape, dtype)
    a = g.cont(g.permute(g.reshape(g.rows(tw, 2, 6), (4, 2, 3)), (2, 0, 1)))
    b = g.cont(g.transpose(g.scale(tx, 2.0)))
    got_a, got_b = evaluate(g, [a, b], inputs={"x": x}, weights={"w": w})
    assert np.array_equal(got_a, w[2:6].reshape(4, 2, 3).transpose(2, 0, 1))
    check(got_b, 2.0 * f64(x).T, dtype)


# -- compute ops --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("table_shape", [(7, 5), (7, 2, 3)])
def test_get_rows(rng, dtype, table_shape):
    table = rand(rng, table_shape, dtype)
    idx = np.array([3, 0, 3, 6, 1, 1, 5], np.int32)  # repeated and out of order
    g = GraphBuilder()
    t, i = g.weight("emb", table.shape, dtype, layer=-1), g.input("idx", idx.shape, i32)
    (out,) = evaluate(g, [g.get_rows(t, i)], inputs={"idx": idx}, weights={"emb": table})
    assert out.dtype == np.float32 and out.shape == (7, *table_shape[1:])
    for r, j in enumerate(idx):
        assert np.array_equal(out[r], table[j].astype(np.float32))


BROADCAST = [
    ((3, 5), (3, 5)),
    ((3, 5), (5,)),
    ((3, 5), (1,)),
    ((5, 1, 7), (3, 7)),
    ((1,), (4, 3)),
    ((2, 1, 3), (1, 4, 1)),
]


@pytest.mark.parametrize("op", ["add", "mul"])
@pytest.mark.parametrize("a_shape,b_shape", BROADCAST)
@pytest.mark.parametrize("a_dt", FLOATS, ids=str)
@pytest.mark.parametrize("b_dt", FLOATS, ids=str)
def test_add_mul_broadcast(rng, op, a_shape, b_shape, a_dt, b_dt):
    a, b = rand(rng, a_shape, a_dt), rand(rng, b_shape, b_dt)
    g = GraphBuilder()
    ta, tb = g.input("a", a_shape, a_dt), g.input("b", b_shape, b_dt)
    (out,) = evaluate(g, [getattr(g, op)(ta, tb)], inputs={"a": a, "b": b})
    A, B = f64(a), f64(b)
    want = A + B if op == "add" else A * B
    check(out, want, a_dt)  # the result takes a's dtype


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("s", [0.5, -3.0, 1e-3, 0.0])
def test_scale(rng, dtype, s):
    x = rand(rng, (3, 7, 5), dtype)
    check(one_input(dtype, x, lambda g, t: g.scale(t, s)), f64(x) * s, dtype)


def rms_norm_ref(x, w, eps):
    y = x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + eps)
    return y if w is None else y * w


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("x_scale,eps", [(1.0, 1e-6), (1e-3, 1e-5)])
def test_rms_norm(rng, dtype, with_weight, x_scale, eps):
    x, w = rand(rng, (3, 2, 9), dtype, x_scale), rand(rng, (9,), dtype)
    g = GraphBuilder()
    tx = g.input("x", x.shape, dtype)
    tw = g.weight("w", w.shape, dtype, layer=0) if with_weight else None
    weights = {"w": w} if with_weight else {}
    (out,) = evaluate(g, [g.rms_norm(tx, tw, eps=eps)], inputs={"x": x}, weights=weights)
    want = rms_norm_ref(f64(x), f64(w) if with_weight else None, eps)
    check(out, want, dtype)
    if x_scale < 1:  # mean(x^2) ~ 1e-6 next to eps 1e-5: eps must visibly shrink the result
        no_eps = rms_norm_ref(f64(x), f64(w) if with_weight else None, 0.0)
        assert np.abs(f64(out) - no_eps).max() > 0.1


@pytest.mark.parametrize("w_dt", FLOATS, ids=str)
@pytest.mark.parametrize("b_dt", [f32, bf16], ids=str)
@pytest.mark.parametrize("b_shape", [(37,), (5, 37), (2, 3, 37)])
def test_mul_mat(rng, w_dt, b_dt, b_shape):
    N, K = 11, 37
    a, b = rand(rng, (N, K), w_dt), rand(rng, b_shape, b_dt)
    g = GraphBuilder()
    ta, tb = g.weight("w", (N, K), w_dt, layer=0), g.input("b", b_shape, b_dt)
    (out,) = evaluate(g, [g.mul_mat(ta, tb)], inputs={"b": b}, weights={"w": a})
    A, B = f64(a), f64(b)
    want = np.zeros((*b_shape[:-1], N))
    for idx in np.ndindex(*b_shape[:-1]):
        for n in range(N):
            want[idx + (n,)] = sum(B[idx + (k,)] * A[n, k] for k in range(K))
    check(out, want, f32)


def rope_ref(x, pos, mode, n_dims, base, freq_scale):
    """Rotate pairs as complex numbers: z_i * exp(1j * pos * freq_scale * base^(-2i/n_dims))."""
    out = x.copy()
    half = n_dims // 2
    i = np.arange(half)
    theta = pos[:, None, None] * freq_scale * base ** (-2.0 * i / n_dims)  # (n, 1, half)
    lo, hi = (2 * i, 2 * i + 1) if mode is RopeMode.NORMAL else (i, i + half)
    z = (x[..., lo] + 1j * x[..., hi]) * np.exp(1j * theta)
    out[..., lo], out[..., hi] = z.real, z.imag
    return out


@pytest.mark.parametrize("mode", list(RopeMode), ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("base", [10000.0, 1e6])
@pytest.mark.parametrize("freq_scale", [1.0, 0.25])
@pytest.mark.parametrize("n_dims", [6, 10])
def test_rope(rng, mode, dtype, base, freq_scale, n_dims):
    x = rand(rng, (5, 3, 10), dtype)
    pos = np.array([0, 1, 7, 130, 4097], np.int32)
    g = GraphBuilder()
    tx, tp = g.input("x", x.shape, dtype), g.input("pos", pos.shape, i32)
    y = g.rope(tx, tp, base=base, mode=mode, n_dims=n_dims, freq_scale=freq_scale)
    (out,) = evaluate(g, [y], inputs={"x": x, "pos": pos})
    check(out, rope_ref(f64(x), f64(pos), mode, n_dims, base, freq_scale), dtype)
    assert np.array_equal(out[..., n_dims:], x[..., n_dims:])  # partial rotation: rest untouched
    assert np.array_equal(out[0], x[0])  # position 0 is the identity


def attention_ref(q, k, v, q_pos, kv_pos, scale, window):
    n, H, _ = q.shape
    m, Hk, Dv = v.shape
    out = np.zeros((n, H, Dv))
    for i in range(n):
        seen = [
            j
            for j in range(m)
            if 0 <= kv_pos[j] <= q_pos[i] and (window == 0 or q_pos[i] - kv_pos[j] < window)
        ]
        for h in range(H if seen else 0):
            kh = h // (H // Hk)
            s = np.array([scale * np.dot(q[i, h], k[j, kh]) for j in seen])
            p = np.exp(s - s.max())
            p /= p.sum()
            out[i, h] = sum(pj * v[j, kh] for pj, j in zip(p, seen, strict=True))
    return out


ATTN_CASES = {
    # prefill: kv slots hold positions 0..4 in order, queries at the same positions
    "prefill": (np.arange(5), np.arange(5)),
    # ring buffer of 9 slots holding positions 3..10 (slot = pos % 9) and one empty slot;
    # the query at position 1 sees no key at all
    "ring": (np.array([8, 9, 10, 1]), np.array([9, 10, -1, 3, 4, 5, 6, 7, 8])),
}


@pytest.mark.parametrize("case", list(ATTN_CASES))
@pytest.mark.parametrize("heads", [(6, 2), (3, 3)], ids=["gqa6x2", "mha3"])
@pytest.mark.parametrize("Dv", [7, 3])
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_attention(rng, case, heads, Dv, window, dtype):
    (H, Hk), D = heads, 7
    q_pos, kv_pos = (p.astype(np.int32) for p in ATTN_CASES[case])
    n, m = len(q_pos), len(kv_pos)
    q, k = rand(rng, (n, H, D), dtype), rand(rng, (m, Hk, D), dtype)
    v = rand(rng, (m, Hk, Dv), dtype)
    scale = 1 / math.sqrt(D)
    g = GraphBuilder()
    tq, tk, tv = (g.input(nm, a.shape, dtype) for nm, a in (("q", q), ("k", k), ("v", v)))
    tqp, tkp = g.input("q_pos", (n,), i32), g.input("kv_pos", (m,), i32)
    y = g.attention(tq, tk, tv, tqp, tkp, scale=scale, window=window)
    feed = {"q": q, "k": k, "v": v, "q_pos": q_pos, "kv_pos": kv_pos}
    (out,) = evaluate(g, [y], inputs=feed)
    check(out, attention_ref(f64(q), f64(k), f64(v), q_pos, kv_pos, scale, window), f32)
    if case == "ring":
        assert np.all(out[3] == 0.0)  # the blind query is exactly zero, not NaN
    assert np.isfinite(out).all()


GATE = [-1000.0, -100.0, -30.0, -10.0, -3.0, 3.0, 10.0, 30.0, 100.0, 1000.0]


def gelu_tanh_ref(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def silu_ref(x):
    e = np.exp(-np.abs(x))  # never overflows
    return x * np.where(x >= 0, 1 / (1 + e), e / (1 + e))


@pytest.mark.parametrize("op", ["geglu", "swiglu"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_glu(rng, op, dtype):
    gate = np.concatenate([rng.standard_normal(25) * 3, GATE]).reshape(5, 7).astype(dtype.numpy)
    up = rng.uniform(-1, 1, (5, 7)).astype(dtype.numpy)
    g = GraphBuilder()
    tg, tu = g.input("gate", gate.shape, dtype), g.input("up", up.shape, dtype)
    with np.errstate(over="raise", invalid="raise"):  # large |x| must not overflow or NaN
        (out,) = evaluate(g, [getattr(g, op)(tg, tu)], inputs={"gate": gate, "up": up})
    act = gelu_tanh_ref if op == "geglu" else silu_ref
    assert np.isfinite(f64(out)).all()
    check(out, act(f64(gate)) * f64(up), dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("src_f32", [True, False], ids=["src_f32", "src_same"])
def test_set_rows(rng, dtype, src_f32):
    R, shape = 7, (2, 3)
    src_dt = f32 if src_f32 else dtype
    state = rand(rng, (R, *shape), dtype)
    before = state.copy()
    g = GraphBuilder()
    cache = g.state("cache", state.shape, dtype)
    src, idx = g.input("src", (3, *shape), src_dt), g.input("idx", (3,), i32)
    ridx = g.input("ridx", (4,), i32)
    written = g.set_rows(cache, src, idx, name="write")
    read = g.get_rows(written, ridx, name="read")  # a reader ordered after the write
    ex = engine.Executor(g.build([written, read]), weights={}, states={"cache": state})
    assert np.shares_memory(ex.array("write"), state)  # the result aliases the state

    want = f64(before)
    for step, (rows, r_read) in enumerate([([5, 0, 3], [5, 1, 0, 3]), ([1, 6, 0], [0, 5, 6, 2])]):
        s = rand(rng, (3, *shape), src_dt)
        rows_a = np.array(rows, np.int32)
        got_state, got_read = ex.run({"src": s, "idx": rows_a, "ridx": np.array(r_read, np.int32)})
        for r, row in enumerate(rows):
            want[row] = f64(s[r].astype(dtype.numpy))  # stored in the state's dtype
        assert np.array_equal(f64(state), want), f"state not written in place (run {step})"
        assert np.array_equal(f64(got_state), want)
        assert np.array_equal(f64(got_read), want[r_read])
    untouched = [r for r in range(R) if r not in (5, 0, 3, 1, 6)]
    assert np.array_equal(state[untouched], before[untouched])


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 262)], ids=str)
def test_argmax(rng, dtype, shape):
    x = rand(rng, shape, dtype)
    flat = x.reshape(-1, shape[-1])
    flat[0, -1] = flat[0, 0] = 4.0  # a tie: the first index wins
    out = one_input(dtype, x, lambda g, t: g.argmax(t))
    assert out.dtype == np.int32 and out.shape == shape[:-1]
    assert np.array_equal(out, np.argmax(f64(x), axis=-1))
    assert out.reshape(-1)[0] == 0


def test_argmax_refuses_integers_and_empty_rows():
    g = GraphBuilder()
    with pytest.raises(Exception, match="f32/f16/bf16"):
        g.argmax(g.input("ids", (4,), i32))
    with pytest.raises(Exception, match="at least one element"):
        g.argmax(g.input("x", (3, 0), f32))
