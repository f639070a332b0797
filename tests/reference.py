"""A naive, recursive reference evaluator for streamgraph graphs.

``ref_eval(graph, inputs, weights, states)`` evaluates every output by recursion over node ids
with memoisation. Each op is an independent, straightforward NumPy formula written from the
prose semantics in ``graph.ops`` (nothing is imported from the backends): it computes in
float64 and rounds the node's result to the node's storage dtype, so results compare with the
executor's (which computes in f32 inside each kernel and stores in the node's dtype).

Views are evaluated as values: RESHAPE is ``np.reshape``, PERMUTE is ``np.transpose`` and VIEW
is ``as_strided`` over the flattened (contiguous) source. SET_ROWS is modelled functionally: its
value is a copy of the state with the rows replaced, and readers of the result read that copy.
``ref_eval_states`` also returns the states after the call (what a persistent cache holds).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
from numpy.lib.stride_tricks import as_strided

from graph.dtypes import DType
from graph.ir import Graph, Node
from graph.ops import Op, RopeMode

__all__ = ["ref_eval", "ref_eval_states", "round_to", "REF_OPS"]

F64 = np.float64
BF16 = np.dtype(ml_dtypes.bfloat16)


def round_to(x: np.ndarray, dtype: DType) -> np.ndarray:
    """``x`` rounded once (to nearest, ties to even) to ``dtype``'s NumPy type.

    NumPy rounds float64 -> float32/float16 correctly. ml_dtypes converts float64 -> bfloat16 via
    float32 (a double rounding), so bf16 is rounded here directly to its 8 significant bits.
    """
    nd = dtype.numpy
    x = np.asarray(x)
    if not dtype.is_float:
        return x.astype(nd)
    x = x.astype(F64)
    if nd == BF16:
        finite = np.isfinite(x) & (x != 0)
        safe = np.where(finite, x, 1.0)
        _, exp = np.frexp(safe)  # safe = m * 2**exp with 0.5 <= |m| < 1
        quantum = np.maximum(exp, -125) - 8  # 8 significant bits; bf16 subnormals below 2**-126
        rounded = np.ldexp(np.rint(np.ldexp(safe, -quantum)), quantum)
        x = np.where(finite, rounded, x)
    with np.errstate(over="ignore"):  # beyond the type's range is inf, as in a kernel's store
        return x.astype(nd)


def _f(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=F64)


# -- one function per op: (node, *source values) -> float64 or integer value ------------------


def _reshape(n: Node, x: np.ndarray) -> np.ndarray:
    return np.reshape(x, n.params.shape)  # type: ignore[union-attr]


def _permute(n: Node, x: np.ndarray) -> np.ndarray:
    return np.transpose(x, n.params.axes)  # type: ignore[union-attr]


def _view(n: Node, x: np.ndarray) -> np.ndarray:
    p = n.params
    flat = np.ascontiguousarray(x).reshape(-1)
    start = flat[p.offset :] if flat.size else flat  # type: ignore[union-attr]
    item = flat.itemsize
    return as_strided(start, shape=p.shape, strides=[s * item for s in p.strides]).copy()  # type: ignore[union-attr]


def _cont(n: Node, x: np.ndarray) -> np.ndarray:
    return np.array(x, copy=True)


def _cast(n: Node, x: np.ndarray) -> np.ndarray:
    return _f(x)


def _get_rows(n: Node, table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    rows = [int(i) for i in idx]
    if any(not 0 <= i < table.shape[0] for i in rows):
        raise IndexError(f"get_rows index {rows} out of range for {table.shape[0]} rows")
    out = np.empty((len(rows), *table.shape[1:]), dtype=F64)
    for k, i in enumerate(rows):
        out[k] = table[i]
    return out


def _add(n: Node, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _f(a) + _f(b)


def _mul(n: Node, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _f(a) * _f(b)


def _scale(n: Node, x: np.ndarray) -> np.ndarray:
    return _f(x) * n.params.scale  # type: ignore[union-attr]


def _rms_norm(
    n: Node, x: np.ndarray, w: np.ndarray | None = None, r: np.ndarray | None = None
) -> np.ndarray:
    x = _f(x)
    ms = (x**2).sum(axis=-1, keepdims=True) / x.shape[-1]
    y = x / np.sqrt(ms + n.params.eps)  # type: ignore[union-attr]
    y = y if w is None else y * _f(w)
    return y if r is None else y + _f(r)


def _mul_mat(n: Node, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # a (N, K) as GGUF stores weights; b (..., K) -> (..., N): out[..., i] = sum_k b[..., k] a[i, k]
    return np.einsum("...k,nk->...n", _f(b), _f(a))


def _rope(n: Node, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    p = n.params
    x = _f(x)
    half = p.n_dims // 2  # type: ignore[union-attr]
    i = np.arange(half, dtype=F64)
    theta = _f(pos)[:, None] * p.freq_scale * p.base ** (-2.0 * i / p.n_dims)  # type: ignore[union-attr]
    rot = np.exp(1j * theta)[:, None, :]  # (n, 1, half): one complex rotation per pair
    if p.mode is RopeMode.NORMAL:  # type: ignore[union-attr]
        lo, hi = np.arange(0, p.n_dims, 2), np.arange(1, p.n_dims, 2)  # type: ignore[union-attr]
    else:  # NEOX: pairs (i, i + n_dims/2)
        lo, hi = np.arange(half), np.arange(half, p.n_dims)  # type: ignore[union-attr]
    z = (x[..., lo] + 1j * x[..., hi]) * rot
    out = x.copy()
    out[..., lo] = z.real
    out[..., hi] = z.imag
    return out


def _attention(
    n: Node, q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, kv_pos: np.ndarray
) -> np.ndarray:
    p = n.params
    q, k, v = _f(q), _f(k), _f(v)
    n_q, n_head, _ = q.shape
    n_kv, n_kv_head, dv = v.shape
    group = n_head // n_kv_head
    out = np.zeros((n_q, n_head, dv), dtype=F64)
    for h in range(n_head):
        kh = h // group
        for i in range(n_q):
            qi = int(q_pos[i])
            seen = [
                j
                for j in range(n_kv)
                if 0 <= int(kv_pos[j]) <= qi and (p.window == 0 or qi - int(kv_pos[j]) < p.window)  # type: ignore[union-attr]
            ]
            if not seen:
                continue  # a query that sees no key gives 0
            s = np.array([p.scale * float(np.dot(q[i, h], k[j, kh])) for j in seen])  # type: ignore[union-attr]
            w = np.exp(s - s.max())
            w /= w.sum()
            out[i, h] = sum(wj * v[j, kh] for wj, j in zip(w, seen, strict=True))
    return out


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _geglu(n: Node, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return _gelu_tanh(_f(gate)) * _f(up)


def _swiglu(n: Node, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = _f(gate)
    with np.errstate(over="ignore"):
        return g / (1.0 + np.exp(-g)) * _f(up)


def _set_rows(n: Node, dst: np.ndarray, src: np.ndarray, idx: np.ndarray) -> np.ndarray:
    out = _f(dst).copy()
    rows = [int(i) for i in idx]
    if any(not 0 <= i < out.shape[0] for i in rows):
        raise IndexError(f"set_rows index {rows} out of range for {out.shape[0]} rows")
    for k, i in enumerate(rows):
        out[i] = _f(src[k])
    return out


def _argmax(n: Node, x: np.ndarray) -> np.ndarray:
    flat = _f(x).reshape(-1, x.shape[-1])
    out = np.empty(flat.shape[0], np.int32)
    for r, row in enumerate(flat):  # the first index of the largest value, by a plain scan
        best = 0
        for i in range(1, len(row)):
            if row[i] > row[best]:
                best = i
        out[r] = best
    return out.reshape(x.shape[:-1])


def _leaf(n: Node) -> np.ndarray:  # pragma: no cover - leaves are bound, never computed
    raise AssertionError(f"leaf {n.label} is bound, not computed")


REF_OPS: dict[Op, Callable[..., np.ndarray]] = {
    Op.INPUT: _leaf,
    Op.WEIGHT: _leaf,
    Op.CONSTANT: _leaf,
    Op.STATE: _leaf,
    Op.RESHAPE: _reshape,
    Op.PERMUTE: _permute,
    Op.VIEW: _view,
    Op.CONT: _cont,
    Op.CAST: _cast,
    Op.GET_ROWS: _get_rows,
    Op.ADD: _add,
    Op.MUL: _mul,
    Op.SCALE: _scale,
    Op.RMS_NORM: _rms_norm,
    Op.MUL_MAT: _mul_mat,
    Op.ROPE: _rope,
    Op.ATTENTION: _attention,
    Op.GEGLU: _geglu,
    Op.SWIGLU: _swiglu,
    Op.SET_ROWS: _set_rows,
    Op.ARGMAX: _argmax,
}
assert set(REF_OPS) == set(Op), f"reference misses {set(Op) - set(REF_OPS)}"

_VIEWS = {Op.RESHAPE, Op.PERMUTE, Op.VIEW}


def _bound(n: Node, value: Any, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != n.shape:
        raise ValueError(f"{what} {n.name} has shape {arr.shape}, the graph expects {n.shape}")
    if n.dtype.is_float:
        return round_to(arr, n.dtype) if arr.dtype != n.dtype.numpy else arr.copy()
    return arr.astype(n.dtype.numpy)


def ref_eval_states(
    graph: Graph,
    inputs: Mapping[str, Any],
    weights: Mapping[str, Any],
    states: Mapping[str, Any] | None = None,
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """The outputs, and every state's value after the call's writes."""
    states = states or {}
    memo: dict[int, np.ndarray] = {}

    def value(i: int) -> np.ndarray:
        if i in memo:
            return memo[i]
        n = graph.nodes[i]
        if n.op is Op.INPUT:
            r = _bound(n, inputs[n.name], "input")
        elif n.op is Op.WEIGHT:
            r = _bound(n, weights[n.name], "weight")
        elif n.op is Op.STATE:
            s = states.get(n.name)
            r = np.zeros(n.shape, n.dtype.numpy) if s is None else _bound(n, s, "state")
        elif n.op is Op.CONSTANT:
            raw = np.frombuffer(n.params.data, dtype=n.dtype.numpy.newbyteorder("<"))  # type: ignore[union-attr]
            r = raw.astype(n.dtype.numpy).reshape(n.shape)
        else:
            srcs = [value(s) for s in n.srcs]
            r = REF_OPS[n.op](n, *srcs)
            if n.op not in _VIEWS:  # views keep their source's (already rounded) values
                r = round_to(r, n.dtype)
            assert r.shape == n.shape, f"{n}: reference made shape {r.shape}"
        memo[i] = r
        return r

    outs = [np.array(value(o), copy=True) for o in graph.outputs]
    final: dict[str, np.ndarray] = {}
    for st in graph.states:
        writes = [c for c in graph.consumers[st.id] if graph.nodes[c].op is Op.SET_ROWS]
        final[st.name] = np.array(value(writes[0] if writes else st.id), copy=True)
    return outs, final


def ref_eval(
    graph: Graph,
    inputs: Mapping[str, Any],
    weights: Mapping[str, Any],
    states: Mapping[str, Any] | None = None,
) -> list[np.ndarray]:
    """The graph's outputs, in order, computed by the naive recursive reference."""
    return ref_eval_states(graph, inputs, weights, states)[0]
