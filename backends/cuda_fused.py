"""Fused groups (``engine.passes.fusion``) as single CUDA launches on the CuPy backend.

``FUSED_COMPILERS[pattern](backend, graph, fusion, arrays)`` returns one prepared launch for the
whole group, or None when this group's layout or types are outside what the kernel handles; the
executor then runs the members one by one, with the same results. Like ``cuda_launch`` this
module reaches CuPy only through the backend.

- ``norm_matvec`` / ``glu_matvec``: ``k_matvec`` (``cuda_matvec.matvec``) builds the product's
  input vector in shared memory in every block (RMS norm, optionally after another norm with a
  residual or an add; or GeGLU / SwiGLU of two strided halves), then the GEMV from it. Weight
  loads of the first rows go out before that prologue so its reductions hide behind them.
- ``rope_store``: ``k_rope_store``, one block per token and head: the per-head norm, rope, and
  the K and V cache writes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from backends.base import FusedGroup
from backends.cuda_launch import CTYPE, CudaDevice, dtype_of_array, ptr
from backends.cuda_matvec import PRE_ADD, PRE_GEGLU, PRE_NORM, PRE_NORM_RES, PRE_SWIGLU, matvec
from graph.dtypes import f32
from graph.ir import Graph
from graph.ops import Op, RmsNormParams, RopeMode, RopeParams

Launch = Callable[[], None]


def _norm_matvec(
    be: CudaDevice, graph: Graph, fu: FusedGroup, arrays: Sequence[Any], scratch: Mapping[int, Any]
) -> Launch | None:
    nodes = graph.nodes
    mm, norm = nodes[fu.roles["matmul"]], nodes[fu.roles["norm"]]
    w, out = arrays[mm.srcs[0]], arrays[mm.id]
    early = _fixed(graph, mm.srcs[0])
    w2 = arrays[norm.srcs[1]]
    eps2 = _eps(norm.params)
    pre_id = fu.roles.get("pre")
    if pre_id is None:
        a = arrays[norm.srcs[0]]
        return matvec(be, w, out, PRE_NORM, a, a, None, w2, None, 0.0, eps2, early)
    pre = nodes[pre_id]
    v_out = arrays[pre.id] if pre.id in fu.outputs else None
    if pre.op is Op.RMS_NORM:
        a, w1, res = (arrays[s] for s in pre.srcs)
        if res.shape != a.shape:
            return None
        return matvec(
            be, w, out, PRE_NORM_RES, a, res, w1, w2, v_out, _eps(pre.params), eps2, early
        )
    a, b = (arrays[s] for s in pre.srcs)
    return matvec(be, w, out, PRE_ADD, a, b, None, w2, v_out, 0.0, eps2, early)


def _glu_matvec(
    be: CudaDevice, graph: Graph, fu: FusedGroup, arrays: Sequence[Any], scratch: Mapping[int, Any]
) -> Launch | None:
    nodes = graph.nodes
    mm, glu = nodes[fu.roles["matmul"]], nodes[fu.roles["glu"]]
    gate, up = (arrays[s] for s in glu.srcs)
    if gate.shape != up.shape:
        return None
    pre = PRE_GEGLU if glu.op is Op.GEGLU else PRE_SWIGLU
    w, early = arrays[mm.srcs[0]], _fixed(graph, mm.srcs[0])
    return matvec(be, w, arrays[mm.id], pre, gate, up, None, None, None, 0.0, 0.0, early)


def _fixed(graph: Graph, i: int) -> bool:
    """Nothing writes node ``i`` while the graph runs (a weight or constant)."""
    return graph.nodes[i].op in (Op.WEIGHT, Op.CONSTANT)


def _eps(params: object) -> float:
    assert isinstance(params, RmsNormParams)
    return params.eps


def _heads(arr: Any) -> tuple[int, int] | None:
    """(token stride, head stride) in elements of an f32 (n, heads, D) view with dense D."""
    if arr.ndim != 3 or dtype_of_array(arr) != f32 or arr.strides[2] != 4:
        return None
    return arr.strides[0] // 4, arr.strides[1] // 4


def _rope_store(
    be: CudaDevice, graph: Graph, fu: FusedGroup, arrays: Sequence[Any], scratch: Mapping[int, Any]
) -> Launch | None:
    nodes, r = graph.nodes, fu.roles
    qr, kr = nodes[r["q_rope"]], nodes[r["k_rope"]]
    kw_node, vw_node = nodes[r["k_write"]], nodes[r["v_write"]]
    qn, kn = (
        nodes[r["q_norm"]] if "q_norm" in r else None,
        nodes[r["k_norm"]] if "k_norm" in r else None,
    )
    q = arrays[qn.srcs[0] if qn else qr.srcs[0]]
    k = arrays[kn.srcs[0] if kn else kr.srcs[0]]
    v = arrays[vw_node.srcs[1]]
    q_out, k_cache, v_cache = arrays[qr.id], arrays[kw_node.id], arrays[vw_node.id]
    pos, idx = arrays[qr.srcs[1]], arrays[kw_node.srcs[2]]
    strides = [_heads(x) for x in (q, k, v)]
    if (
        any(s is None for s in strides)
        or not q_out.flags.c_contiguous
        or dtype_of_array(q_out) != f32
    ):
        return None
    n, hq, d = q.shape
    _, hk, _ = k.shape
    dv = v.shape[2]
    ct = dtype_of_array(k_cache)
    if dtype_of_array(v_cache) != ct or ct.name not in CTYPE or v.shape[1] != hk:
        return None
    if (
        k_cache.shape[1:] != (hk, d)
        or v_cache.shape[1:] != (hk, dv)
        or k_cache.shape[0] != v_cache.shape[0]
    ):
        return None
    if not (k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
        return None
    weights = []
    for norm in (qn, kn):
        if norm is None:
            weights.append((np.uint64(0), 0.0))
            continue
        wt = arrays[norm.srcs[1]]
        if wt.shape != (d,) or dtype_of_array(wt) != f32:
            return None
        weights.append((ptr(wt), _eps(norm.params)))
    p = qr.params
    assert isinstance(p, RopeParams)
    (q_ts, q_hs), (k_ts, k_hs), (v_ts, v_hs) = strides  # type: ignore[misc]
    f = be.fn(f"k_rope_store<{CTYPE[ct.name]}>")
    args = (
        ptr(q),
        ptr(k),
        ptr(v),
        np.int64(q_ts),
        np.int64(q_hs),
        np.int64(k_ts),
        np.int64(k_hs),
        np.int64(v_ts),
        np.int64(v_hs),
        weights[0][0],
        weights[1][0],
        np.float32(weights[0][1]),
        np.float32(weights[1][1]),
        ptr(pos),
        ptr(idx),
        ptr(q_out),
        ptr(k_cache),
        ptr(v_cache),
        np.int32(hq),
        np.int32(hk),
        np.int32(d),
        np.int32(dv),
        np.int64(k_cache.shape[0]),
        np.int32(p.n_dims),
        np.int32(p.mode is RopeMode.NEOX),
        np.float64(p.base),
        np.float64(p.freq_scale),
    )
    return be.prepare(f, (n, hq + 2 * hk), (128,), args, d * 4)


FUSED_COMPILERS: dict[str, Callable[..., Launch | None]] = {
    "norm_matvec": _norm_matvec,
    "glu_matvec": _glu_matvec,
    "rope_store": _rope_store,
}
