"""Bad graphs and bad calls fail early and clearly: a GraphError (or, for a kernel that fails at
run time, a RuntimeError) whose message names the op, the tensors and their shapes; never a bare
KeyError/IndexError from deep inside NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest

import engine
from graph import GraphBuilder, GraphError, f16, f32, i32

# -- building: each case is (build(g) that must raise, fragments the message must contain) ----


def _add(g):
    g.add(g.input("left", (4, 64), f32), g.input("right", (4, 128), f32))


def _mul(g):
    g.mul(g.input("a", (3, 5), f16), g.input("b", (4, 5), f32))


def _add_int(g):
    g.add(g.input("x", (3,), f32), g.input("ids", (3,), i32))


def _geglu(g):
    g.geglu(g.input("gate", (3, 8), f32), g.input("up", (3, 9), f32))


def _mul_mat_inner(g):
    g.mul_mat(g.weight("w", (11, 37), f32, layer=0), g.input("x", (5, 36), f32))


def _mul_mat_3d(g):
    g.mul_mat(g.input("a3", (2, 3, 4), f32), g.input("x", (5, 4), f32))


def _rope(n_dims, n_pos=5, pos_dt=i32):
    def build(g):
        x, pos = g.input("x", (5, 3, 10), f32), g.input("pos", (n_pos,), pos_dt)
        g.rope(x, pos, base=10000.0, n_dims=n_dims)

    return build


def _attention(q_shape, k_shape, v_shape, window=0):
    def build(g):
        q, k, v = (g.input(n, s, f32) for n, s in (("q", q_shape), ("k", k_shape), ("v", v_shape)))
        qp, kp = g.input("q_pos", (q_shape[0],), i32), g.input("kv_pos", (k_shape[0],), i32)
        g.attention(q, k, v, qp, kp, scale=0.5, window=window)

    return build


def _set_rows_input(g):
    src, idx = g.input("src", (2, 4), f32), g.input("idx", (2,), i32)
    g.set_rows(g.input("cache", (8, 4), f32), src, idx)


def _set_rows_rows(g):
    src, idx = g.input("src", (2, 5), f32), g.input("idx", (2,), i32)
    g.set_rows(g.state("cache", (8, 4), f32), src, idx)


def _reshape_permuted(g):
    g.reshape(g.permute(g.input("x", (3, 5), f32), (1, 0), name="xt"), (15,))


def _reshape_count(g):
    g.reshape(g.input("x", (3, 5), f32), (4, 4))


def _view_past_end(g):
    g.view(g.input("x", (3, 5), f32), (3, 5), (5, 1), offset=1)


def _view_permuted(g):
    g.view(g.transpose(g.input("x", (3, 5), f32), name="xt"), (5,), (1,))


def _rows_range(g):
    g.rows(g.input("x", (6, 5), f32), 4, 7)


def _rms_norm_weight(g):
    g.rms_norm(g.input("x", (3, 9), f32), g.weight("norm", (8,), f32, layer=0))


def _get_rows_float_idx(g):
    g.get_rows(g.weight("emb", (7, 5), f32, layer=-1), g.input("idx", (3,), f32))


def _cast_int(g):
    g.cast(g.input("x", (3,), f32), i32)


def _permute_axes(g):
    g.permute(g.input("x", (3, 5), f32), (0, 2))


def _transpose_1d(g):
    g.transpose(g.input("vec", (5,), f32))


def _duplicate_leaf(g):
    g.input("x", (3,), f32)
    g.input("x", (4,), f32)


def _foreign(g):
    g.add(g.input("x", (3,), f32), GraphBuilder().input("y", (3,), f32))


BUILD_ERRORS = {
    "add_shapes": (_add, ["ADD", "left", "right", "(4, 64)", "(4, 128)", "broadcast"]),
    "mul_shapes": (_mul, ["MUL", "a (3, 5) f16", "b (4, 5) f32"]),
    "add_int": (_add_int, ["ADD", "ids", "(3,)", "i32", "f32/f16/bf16"]),
    "geglu_shapes": (_geglu, ["GEGLU", "gate", "(3, 8)", "up", "(3, 9)"]),
    "mul_mat_inner": (_mul_mat_inner, ["MUL_MAT", "w", "(11, 37)", "x", "(5, 36)", "37", "36"]),
    "mul_mat_3d": (_mul_mat_3d, ["MUL_MAT", "a3", "(2, 3, 4)", "2-D"]),
    "rope_odd": (_rope(5), ["ROPE", "x", "(5, 3, 10)", "pos", "n_dims=5", "even"]),
    "rope_too_many": (_rope(12), ["ROPE", "n_dims=12", "head_dim 10"]),
    "rope_pos_len": (_rope(10, n_pos=4), ["ROPE", "pos", "(4,)", "4 entries, expected 5"]),
    "rope_pos_dtype": (_rope(10, pos_dt=f32), ["ROPE", "pos", "1-D i32 index"]),
    "attn_heads": (
        _attention((3, 5, 8), (4, 2, 8), (4, 2, 8)),
        ["ATTENTION", "q (3, 5, 8)", "k (4, 2, 8)", "5 query heads", "2 kv heads"],
    ),
    "attn_head_dim": (_attention((3, 4, 8), (4, 2, 6), (4, 2, 6)), ["ATTENTION", "head_dim"]),
    "attn_kv_len": (_attention((3, 4, 8), (4, 2, 8), (5, 2, 8)), ["ATTENTION", "v (5, 2, 8)"]),
    "attn_window": (_attention((3, 4, 8), (4, 2, 8), (4, 2, 8), window=-1), ["window", "-1"]),
    "set_rows_input": (_set_rows_input, ["SET_ROWS", "cache", "(8, 4)", "state"]),
    "set_rows_rows": (_set_rows_rows, ["SET_ROWS", "src", "(2, 5)", "(8, 4)", "do not fit"]),
    "reshape_permuted": (_reshape_permuted, ["RESHAPE", "xt", "(5, 3)", "contiguous", "cont()"]),
    "reshape_count": (_reshape_count, ["RESHAPE", "x", "15 elements", "(4, 4)"]),
    "view_past_end": (_view_past_end, ["VIEW", "x", "(3, 5)", "offset 1", "past the source"]),
    "view_permuted": (_view_permuted, ["VIEW", "xt", "cont()"]),
    "rows_range": (_rows_range, ["VIEW", "x", "(6, 5)", "4:7"]),
    "rms_norm_weight": (_rms_norm_weight, ["RMS_NORM", "x", "(3, 9)", "norm", "(8,)", "(9,)"]),
    "get_rows_idx": (_get_rows_float_idx, ["GET_ROWS", "emb", "idx", "(3,)", "1-D i32 index"]),
    "cast_int": (_cast_int, ["CAST", "x", "i32"]),
    "permute_axes": (_permute_axes, ["PERMUTE", "x", "(3, 5)", "(0, 2)"]),
    "transpose_1d": (_transpose_1d, ["PERMUTE", "vec", "(5,)"]),
    "duplicate_leaf": (_duplicate_leaf, ["'x'", "already exists"]),
    "foreign_tensor": (_foreign, ["ADD", "not a tensor of this builder"]),
}


@pytest.mark.parametrize("case", list(BUILD_ERRORS))
def test_build_error_names_op_inputs_and_shapes(case):
    build, fragments = BUILD_ERRORS[case]
    with pytest.raises(GraphError) as err:
        build(GraphBuilder())
    msg = str(err.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} missing from {msg!r}"


# -- running ------------------------------------------------------------------------------------
def _mul_mat_graph():
    g = GraphBuilder()
    w, x = g.weight("w", (3, 4), f32, layer=0), g.input("x", (5, 4), f32)
    return g.build([g.mul_mat(w, x, name="proj")])


W = np.ones((3, 4), np.float32)
X = np.ones((5, 4), np.float32)

RUN_ERRORS = {
    "missing_weight": ({"x": X}, {}, ["missing 1 weight(s): w"]),
    "misshaped_weight": (
        {"x": X},
        {"w": W.T},
        ["weight w has shape (4, 3), the graph expects (3, 4)"],
    ),
    "missing_input": ({}, {"w": W}, ["missing input x (5, 4) f32"]),
    "misshaped_input": (
        {"x": X.T},
        {"w": W},
        ["input x has shape (4, 5), the graph expects (5, 4)"],
    ),
    "unknown_input": ({"x": X, "y": X}, {"w": W}, ["unknown input(s) ['y']", "['x']"]),
}


@pytest.mark.parametrize("case", list(RUN_ERRORS))
def test_run_error_is_clear(case):
    inputs, weights, fragments = RUN_ERRORS[case]
    with pytest.raises(GraphError) as err:
        engine.run(_mul_mat_graph(), inputs=inputs, weights=weights, backend="numpy")
    for frag in fragments:
        assert frag in str(err.value), str(err.value)


def test_correct_call_runs():
    (out,) = engine.run(_mul_mat_graph(), inputs={"x": X}, weights={"w": W}, backend="numpy")
    assert np.array_equal(out, np.full((5, 3), 4.0, np.float32))


@pytest.mark.parametrize("debug", ["0", "2"])
@pytest.mark.parametrize("bad", [[0, 7, 2], [-1, 0, 0]], ids=["past_end", "negative"])
def test_get_rows_index_out_of_range(monkeypatch, capsys, debug, bad):
    monkeypatch.setenv("STREAMGRAPH_DEBUG", debug)
    g = GraphBuilder()
    t, idx = g.weight("emb", (7, 5), f32, layer=-1), g.input("idx", (3,), i32)
    graph = g.build([g.get_rows(t, idx, name="tok_rows")])
    with pytest.raises(RuntimeError) as err:
        engine.run(graph, {"idx": np.array(bad, np.int32)}, weights={"emb": np.zeros((7, 5))})
    assert not isinstance(err.value, KeyError | IndexError)
    for frag in ("GET_ROWS", "tok_rows", "(3, 5)", "out of range", "0..6"):
        assert frag in str(err.value), str(err.value)


def _cache_graph():
    g = GraphBuilder()
    cache = g.state("cache", (4, 3), f32)
    src, idx = g.input("src", (2, 3), f32), g.input("idx", (2,), i32)
    return g.build([g.set_rows(cache, src, idx, name="kv_write")])


def test_set_rows_index_out_of_range():
    ex = engine.Executor(_cache_graph(), weights={})
    with pytest.raises(RuntimeError) as err:
        ex.run({"src": np.ones((2, 3)), "idx": np.array([1, 4], np.int32)})
    for frag in ("SET_ROWS", "kv_write", "out of range"):
        assert frag in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "state,fragments",
    [
        (np.zeros((5, 3), np.float32), ["state cache", "(5, 3)", "expects (4, 3)"]),
        (np.zeros((4, 3), np.float16), ["state cache", "float16", "f32"]),
        (np.zeros((3, 4), np.float32).T, ["state cache", "contiguous"]),  # would write a copy
        (np.zeros((4, 6), np.float32)[:, ::2], ["state cache", "contiguous"]),
    ],
    ids=["shape", "dtype", "fortran_order", "strided"],
)
def test_bad_state_is_refused(state, fragments):
    with pytest.raises(GraphError) as err:
        engine.Executor(_cache_graph(), weights={}, states={"cache": state})
    for frag in fragments:
        assert frag in str(err.value), str(err.value)
