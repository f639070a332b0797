"""How each compute op becomes one prepared CUDA launch (or a few) on the CuPy backend.

``COMPILERS[op](Job(backend, node, out, srcs, scratch, fixed))`` returns a closure that
launches the node's kernel(s) from ``kernels.cu`` with every pointer, size and grid bound in
advance, so running a node costs one Python call and one driver launch, and a CUDA graph can
capture it. This module does not import cupy: it reaches memory and kernels through the backend
(``backends.cupy_backend``), the only module that does.

Choices per op: elementwise ops walk any strides and broadcast (dims merged where all operands
are contiguous across them); RMS norm is one block per row; rope one thread per element with
double-precision angles; attention is a grouped-query online softmax over key batches with
splits merged by a second launch; matrix products with up to ``GEMV_MAX_M`` rows use the GEMV
kernel (several warps per output when outputs are few), more rows go to cuBLAS, whose equal-type
rule makes a f32 activation meeting a 16-bit weight be cast into planned scratch first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from backends.base import BackendError
from graph.dtypes import DType, dtype_of, f32
from graph.ir import Node
from graph.ops import AttentionParams, Op, RmsNormParams, RopeMode, RopeParams, ScaleParams

if TYPE_CHECKING:  # annotations only: importing the backend would import cupy
    from backends.cupy_backend import CupyBackend

CTYPE = {"f32": "float", "f16": "half_t", "bf16": "bf16_t"}
CUDA_DTYPE = {"f32": 0, "f16": 2, "bf16": 14}  # cudaDataType: R_32F, R_16F, R_16BF
CUBLAS_COMPUTE_32F = 68
GEMV_MAX_M = 8  # rows up to which the GEMV kernel beats cuBLAS (decode, short chunks)
MAXD = 6
ATTN_WARPS = 4
ATTN_DMAX = 256
ATTN_GB = 4  # query heads per block (kernels.cu GB)
ATTN_KEYS = 32  # keys a block takes per pass: ATTN_WARPS x KB
THREADS = 256


def ptr(a: Any) -> np.uint64:
    return np.uint64(a.data.ptr)


def blocks(n: int, threads: int = THREADS) -> int:
    return max(1, min((n + threads - 1) // threads, 65535 * 8))


def _collapse(
    shape: tuple[int, ...], strides: list[tuple[int, ...]]
) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent dims that every operand walks contiguously; drop size-1 dims."""
    dims = [(d, [s[i] for s in strides]) for i, d in enumerate(shape) if d != 1]
    if not dims:
        return [1], [[0] for _ in strides]
    out_shape, out_strides = [dims[0][0]], [[s] for s in dims[0][1]]
    for d, st in dims[1:]:
        if all(prev[-1] == s * d for prev, s in zip(out_strides, st, strict=True)):
            out_shape[-1] *= d
            for prev, s in zip(out_strides, st, strict=True):
                prev[-1] = s
        else:
            out_shape.append(d)
            for prev, s in zip(out_strides, st, strict=True):
                prev.append(s)
    return out_shape, out_strides


def _broadcast_strides(node_shape: tuple[int, ...], src: Any, itemsize: int) -> tuple[int, ...]:
    """Element strides of ``src`` viewed at ``node_shape`` (0 where broadcast)."""
    shape, strides = src.shape, [s // itemsize for s in src.strides]
    pad = len(node_shape) - len(shape)
    out = [0] * pad
    for d, (n, s) in enumerate(zip(shape, strides, strict=True)):
        out.append(0 if n == 1 and node_shape[pad + d] != 1 else s)
    return tuple(out)


STRIDED_OPS = frozenset({Op.CONT, Op.CAST, Op.SCALE, Op.ADD, Op.MUL, Op.GEGLU, Op.SWIGLU})
"""Ops whose kernel walks any strides (and broadcasts); the others read dense rows."""


def aligned(n: int) -> int:
    return (n + 255) // 256 * 256


def dense_copy_bytes(node: Node, srcs: Sequence[Node]) -> list[int]:
    if node.op in STRIDED_OPS:
        return []
    return [aligned(s.nbytes) for s in srcs if not s.contiguous]


def own_scratch_bytes(node: Node, srcs: Sequence[Node]) -> int:
    if node.op is Op.MUL_MAT:
        a, b = srcs
        m = math.prod(b.shape[:-1])
        if not _uses_gemv(m, b.dtype) and a.dtype != b.dtype:
            return m * b.shape[-1] * a.dtype.itemsize
    if node.op is Op.ATTENTION:
        n, h, dv = node.shape
        rows, m = _attn_rows(n, h, srcs[1].shape[1]), srcs[1].shape[0]
        splits = max(_attn_splits(rows, m), _decode_splits(rows, m)[0])
        if splits > 1:
            return n * h * splits * (dv + 2) * 4
    return 0


def dtype_of_array(arr: Any) -> DType:
    return dtype_of(arr.dtype)


def _need_contiguous(node: Node, srcs: Sequence[Any], which: Sequence[int]) -> None:
    for i in which:
        if not srcs[i].flags.c_contiguous:
            raise BackendError(
                f"{node.op.name} {node.label}: input {i} is not contiguous; the CuPy kernel "
                "for this op reads dense rows, insert cont() before it"
            )


class Job(NamedTuple):
    """What a compiler binds for one node: the backend, the node, its output and source arrays,
    its planned scratch (or None), and which sources no kernel writes (weights, constants)."""

    be: CupyBackend
    node: Node
    out: Any
    srcs: list[Any]
    scratch: Any
    fixed: Sequence[bool] = ()


def _launch(
    be: CupyBackend,
    f: Any,
    grid: tuple[int, ...],
    block: tuple[int, ...],
    args: tuple,
    smem: int = 0,
) -> Callable[[], None]:
    """One prepared launch on the backend's stream (programmatic dependent launch where the
    GPU has it: see ``CupyBackend.prepare``)."""
    return be.prepare(f, grid, block, args, smem)


def elementwise(
    be: CupyBackend,
    shape: tuple[int, ...],
    out_dtype: DType,
    out: Any,
    srcs: list[Any],
    op_code: int,
    scale: float = 1.0,
) -> Callable[[], None]:
    """One strided, broadcasting elementwise launch writing the contiguous ``out``."""
    n = out.size
    if n == 0:
        return lambda: None
    strides = [_broadcast_strides(shape, s, s.itemsize) for s in srcs]
    dims, st = _collapse(shape, strides)
    if len(dims) > MAXD:
        raise BackendError(f"elementwise op over {shape}: more than {MAXD} non-mergeable dims")
    pad = MAXD - len(dims)
    sb = st[1] if len(st) > 1 else [0] * len(dims)
    meta = be.meta([len(dims), *dims, *([1] * pad), *st[0], *([0] * pad), *sb, *([0] * pad)])
    types = [CTYPE[dtype_of_array(s).name] for s in srcs] + [CTYPE[out_dtype.name]]
    if len(srcs) == 1:
        f = be.fn(f"k_unary<{types[0]}, {types[1]}, {op_code}>")
        args = (ptr(srcs[0]), ptr(out), np.int64(n), ptr(meta), np.float32(scale))
    else:
        f = be.fn(f"k_binary<{types[0]}, {types[1]}, {types[2]}, {op_code}>")
        args = (ptr(srcs[0]), ptr(srcs[1]), ptr(out), np.int64(n), ptr(meta))
    return _launch(be, f, (blocks(n),), (THREADS,), args)


def _c_copy(job: Job) -> Callable[[], None]:
    be, node, out, srcs, scratch, fixed = job
    return elementwise(be, node.shape, node.dtype, out, srcs, 0)


def _c_scale(job: Job) -> Callable[[], None]:
    be, node, out, srcs, scratch, fixed = job
    p: ScaleParams = node.params  # type: ignore[assignment]
    return elementwise(be, node.shape, node.dtype, out, srcs, 1, p.scale)


def _binary(code: int) -> Callable[..., Callable[[], None]]:
    def c(job: Job) -> Callable[[], None]:
        be, node, out, srcs, scratch, fixed = job
        return elementwise(be, node.shape, node.dtype, out, srcs, code)

    return c


def _c_get_rows(job: Job) -> Callable[[], None]:
    be, node, out, srcs, scratch, fixed = job
    _need_contiguous(node, srcs, (0, 1))
    table, idx = srcs
    row = math.prod(table.shape[1:])
    n = idx.shape[0]
    f = be.fn(f"k_get_rows<{CTYPE[dtype_of_array(table).name]}>")
    return _launch(
        be,
        f,
        (blocks(n * row),),
        (THREADS,),
        (ptr(table), ptr(idx), ptr(out), np.int64(n), np.int64(row), np.int64(table.shape[0])),
    )


def _c_set_rows(job: Job) -> Callable[[], None]:
    be, node, out, srcs, scratch, fixed = job
    _need_contiguous(node, srcs, (1, 2))
    _, src, idx = srcs
    row = math.prod(src.shape[1:])
    n = idx.shape[0]
    f = be.fn(f"k_set_rows<{CTYPE[dtype_of_array(src).name]}, {CTYPE[node.dtype.name]}>")
    return _launch(
        be,
        f,
        (blocks(n * row),),
        (THREADS,),
        (ptr(src), ptr(idx), ptr(out), np.int64(n), np.int64(row), np.int64(out.shape[0])),
    )


def _c_rms_norm(job: Job) -> Callable[[], None]:
    be, node, out, srcs, scratch, fixed = job
    _need_contiguous(node, srcs, range(len(srcs)))
    p: RmsNormParams = node.params  # type: ignore[assignment]
    x = srcs[0]
    d = node.shape[-1]
    rows = x.size // d if d else 0
    if rows == 0:
        return lambda: None
    w = srcs[1] if len(srcs) >= 2 else x
    r = srcs[2] if len(srcs) == 3 else x
    threads = 256 if d >= 256 else max(32, 1 << (d - 1).bit_length())
    types = ", ".join(
        CTYPE[t.name] for t in (dtype_of_array(x), dtype_of_array(w), dtype_of_array(r), node.dtype)
    )
    f = be.fn(f"k_rms_norm<{types}>")
    args = (
        ptr(x),
        ptr(w),
        ptr(r),
        ptr(out),
        np.int32(d),
        np.float32(p.eps),
        np.int32(len(srcs) >= 2),
        np.int32(len(srcs) == 3),
    )
    return _launch(be, f, (rows,), (threads,), args)


def _c_rope(job: Job) -> Callable[[], None]:
    be, node, out, srcs, scratch, fixed = job
    _need_contiguous(node, srcs, (0, 1))
    p: RopeParams = node.params  # type: ignore[assignment]
    x, pos = srcs
    n, h, d = node.shape
    total = n * h * d
    if total == 0:
        return lambda: None
    f = be.fn(f"k_rope<{CTYPE[dtype_of_array(x).name]}, {CTYPE[node.dtype.name]}>")
    args = (
        ptr(x),
        ptr(pos),
        ptr(out),
        np.int64(total),
        np.int32(h),
        np.int32(d),
        np.int32(p.n_dims),
        np.int32(p.mode is RopeMode.NEOX),
        np.float64(p.base),
        np.float64(p.freq_scale),
    )
    return _launch(be, f, (blocks(total),), (THREADS,), args)


def _attn_rows(n: int, h: int, hk: int) -> int:
    """Blocks along the first grid axis: one per query token, kv head and group of query heads."""
    return n * hk * -(-(h // hk) // ATTN_GB)


def _attn_splits(rows: int, m: int) -> int:
    """Key splits so that few query rows (decode) still fill the GPU: about 8 blocks per SM."""
    want = max(1, -(-1056 // max(rows, 1)))
    return max(1, min(want, -(-m // ATTN_KEYS), 1024))  # kernels.cu MAX_SPLITS


DECODE_MAX_TOKENS = 8  # query tokens up to which attention uses the one-launch decode kernel
DECODE_TILE = 64  # kernels.cu DT_KEYS


def _decode_splits(rows: int, m: int) -> tuple[int, int]:
    """(splits, keys per split) for the decode kernel: about two blocks per SM in all, at most
    32 splits (the merge walks them), each a whole number of 64-key tiles."""
    tiles = -(-m // DECODE_TILE)
    splits = max(1, min(-(-264 // max(rows, 1)), tiles, 32))
    chunk = -(-tiles // splits) * DECODE_TILE
    return -(-m // chunk) if m else 1, chunk


def _decode_ok(q: Any, k: Any, v: Any) -> bool:
    n, _, d = q.shape
    dv = v.shape[2]
    dense = all(a.data.ptr % 16 == 0 for a in (k, v))
    return n <= DECODE_MAX_TOKENS and d % 8 == 0 and dv % 8 == 0 and dense


def decode_attention(
    be: CupyBackend, node: Node, out: Any, srcs: Sequence[Any], scratch: Any, merge: str
) -> tuple[Callable[[], None], int] | None:
    """``k_attn_decode`` for few query tokens, and its number of key splits; None if the
    shapes do not suit it. ``merge``: the splits' partials (in ``scratch``, one record of
    ``(max, sum, acc[Dv])`` per query head and split) merged by the last block to finish
    ("last_block") or by a second launch ("kernel")."""
    p: AttentionParams = node.params  # type: ignore[assignment]
    q, k, v, qpos, kpos = srcs
    if not _decode_ok(q, k, v):
        return None
    n, h, d = q.shape
    m, hk, _ = k.shape
    dv = v.shape[2]
    rows = _attn_rows(n, h, hk)
    splits, chunk = _decode_splits(rows, m)
    types = ", ".join(CTYPE[dtype_of_array(a).name] for a in (q, k, v))
    f = be.fn(f"k_attn_decode<{types}>")
    tickets = be.counters(rows)
    part = ptr(scratch) if splits > 1 else np.uint64(0)
    dargs = (
        *(ptr(a) for a in (q, k, v, qpos, kpos, out)),
        part,
        ptr(tickets),
        *(np.int32(x) for x in (h, hk, m, d, dv)),
        np.float32(p.scale),
        np.int32(p.window),
        np.int32(chunk),
        np.int32(merge == "last_block"),
    )
    main = _launch(be, f, (rows, splits), (256,), dargs)
    if splits == 1 or merge != "kernel":
        return main, splits
    return _then(main, _combine(be, n * h, splits, dv, part, out)), splits


def _c_attention(job: Job) -> Callable[[], None]:
    be, node, out, srcs, scratch, fixed = job
    _need_contiguous(node, srcs, range(5))
    p: AttentionParams = node.params  # type: ignore[assignment]
    q, k, v, qpos, kpos = srcs
    n, h, d = q.shape
    m, hk, _ = k.shape
    dv = v.shape[2]
    if max(d, dv) > ATTN_DMAX:
        raise BackendError(
            f"ATTENTION {node.label}: head dim {max(d, dv)} > {ATTN_DMAX} is not supported"
        )
    if n * h == 0:
        return lambda: None
    rows = _attn_rows(n, h, hk)
    types = ", ".join(CTYPE[dtype_of_array(a).name] for a in (q, k, v))
    decode = decode_attention(be, node, out, srcs, scratch, be.attn_merge)
    if decode is not None:
        return decode[0]
    splits = _attn_splits(rows, m)
    chunk = -(-m // splits) if m else 1
    f = be.fn(f"k_attention<{types}>")
    part = ptr(scratch) if splits > 1 else np.uint64(0)
    args = (
        ptr(q),
        ptr(k),
        ptr(v),
        ptr(qpos),
        ptr(kpos),
        ptr(out),
        part,
        np.int32(h),
        np.int32(hk),
        np.int32(m),
        np.int32(d),
        np.int32(dv),
        np.float32(p.scale),
        np.int32(p.window),
        np.int32(chunk),
    )
    main = _launch(be, f, (rows, splits), (32 * ATTN_WARPS,), args)
    if splits == 1:
        return main
    return _then(main, _combine(be, n * h, splits, dv, part, out))


def _combine(be: CupyBackend, heads: int, splits: int, dv: int, part: Any, out: Any) -> Any:
    """The launch that merges the key splits' partials of every query head."""
    args = (part, ptr(out), np.int32(splits), np.int32(dv))
    return _launch(be, be.fn("k_attn_combine"), (heads,), (128,), args)


def _then(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        first()
        second()

    return both


PRE_NORM, PRE_NORM_RES, PRE_ADD, PRE_GEGLU, PRE_SWIGLU, PRE_COPY = range(6)  # k_matvec's PRE
MATVEC_WARPS = 4  # kernels.cu MV_WARPS
MAX_INPUT_FLOATS = 11 * 1024  # the built input in shared memory: 44 KiB of a block's 48 KiB


def _f32_rows(arr: Any, k: int) -> bool:
    """An f32 array whose last axis is dense (rows of ``k`` at any row stride)."""
    return dtype_of_array(arr) == f32 and arr.shape[-1] == k and arr.strides[-1] == 4


def _row_stride(arr: Any) -> int:
    """Elements between consecutive rows of length ``shape[-1]``, leading axes folded into
    one; -1 if they do not fold."""
    if arr.ndim == 1 or arr.size == arr.shape[-1]:
        return arr.shape[-1]
    lead = [(d, s // 4) for d, s in zip(arr.shape[:-1], arr.strides[:-1], strict=True) if d != 1]
    for (d_out, s_out), (_, s_in) in zip(lead, lead[1:], strict=False):
        if s_out != s_in * d_out:
            return -1
    return lead[-1][1]


def _resident_blocks(be: CupyBackend, f: Any, smem: int) -> int:
    """Blocks of ``MATVEC_WARPS`` warps that fit on the GPU at once (registers, shared memory)."""
    threads = 32 * MATVEC_WARPS
    by_regs = 65536 // max(1, f.num_regs * threads)
    by_smem = (227 * 1024) // (smem + f.shared_size_bytes + 1024)
    return max(1, min(by_regs, by_smem, 2048 // threads, 32)) * be.sm_count


def matvec(
    be: CupyBackend,
    w: Any,
    out: Any,
    pre: int,
    a: Any,
    b: Any,
    w1: Any | None = None,
    w2: Any | None = None,
    v_out: Any | None = None,
    eps1: float = 0.0,
    eps2: float = 0.0,
    early: bool = False,
) -> Callable[[], None] | None:
    """``k_matvec``: out = build(a, b, ...) @ w.T for up to ``GEMV_MAX_M`` rows, the input
    built in shared memory (see kernels.cu for ``pre``); None if the layout does not suit it.
    ``early``: ``w`` is a weight (nothing writes it while the graph runs), so its first loads
    may be issued before the previous kernel has finished.

    Rows per warp (R) are the fewest that let every block be resident at once (no second
    wave, whose latency a short product cannot hide); a matrix too large for that (the output
    head) is walked by a grid of resident blocks.
    """
    n_out, k = w.shape
    wt = dtype_of_array(w)
    m = a.size // k if k else 0
    if not 0 < m <= GEMV_MAX_M or n_out == 0 or wt.name not in CTYPE or m * k > MAX_INPUT_FLOATS:
        return None
    vec = 4 if wt == f32 else 8
    if k % vec or w.data.ptr % 16 or not w.flags.c_contiguous:
        return None
    if dtype_of_array(out) != f32 or not out.flags.c_contiguous or out.size != m * n_out:
        return None
    for arr in (a, b):
        if not _f32_rows(arr, k) or _row_stride(arr) < 0:
            return None
    for arr in (w1, w2):
        if arr is not None and (arr.shape != (k,) or dtype_of_array(arr) != f32):
            return None
    if v_out is not None and (not v_out.flags.c_contiguous or dtype_of_array(v_out) != f32):
        return None
    smem = m * k * 4
    need = -(-(k // vec) // 32)  # 16-byte pieces per lane per row
    choices = [r for r in (1, 2, 4) if r == 1 or r * need <= 16]
    for r in choices:
        f = be.fn(f"k_matvec<{CTYPE[wt.name]}, {r}, {pre}, {1 if m == 1 else GEMV_MAX_M}>")
        resident = _resident_blocks(be, f, smem)
        blocks = -(-n_out // (MATVEC_WARPS * r))
        if blocks <= resident or r == choices[-1]:
            grid = min(blocks, resident)
            break
    null = np.uint64(0)
    args = (
        ptr(w),
        ptr(a),
        ptr(b),
        ptr(w1) if w1 is not None else null,
        ptr(w2) if w2 is not None else null,
        ptr(v_out) if v_out is not None else null,
        ptr(out),
        np.int32(m),
        np.int32(n_out),
        np.int32(k),
        np.int64(_row_stride(a)),
        np.int64(_row_stride(b)),
        np.float32(eps1),
        np.float32(eps2),
        np.int32(early),
    )
    return _launch(be, f, (grid,), (32 * MATVEC_WARPS,), args, smem)


def _uses_gemv(m: int, b_dtype: DType) -> bool:
    return m <= GEMV_MAX_M and b_dtype == f32


def _c_mul_mat(job: Job) -> Callable[[], None]:
    be, node, out, srcs, scratch, fixed = job
    _need_contiguous(node, srcs, (0, 1))
    a, b = srcs
    n_out, k = a.shape
    m = b.size // k if k else 0
    if m == 0 or n_out == 0:
        return lambda: None
    wt = dtype_of_array(a)
    if _uses_gemv(m, dtype_of_array(b)):
        mv = matvec(be, a, out, PRE_COPY, b, b, early=bool(fixed) and fixed[0])
        if mv is not None:
            return mv
        vec = 4 if wt == f32 else 8
        vec_ok = int(k % vec == 0 and a.data.ptr % 16 == 0 and b.data.ptr % 16 == 0)
        wpr = 1  # warps per output row: split K when rows alone cannot fill the GPU
        while wpr < 8 and n_out * wpr < 64 * 132 and wpr * 32 * vec <= k:
            wpr *= 2
        f = be.fn(f"k_gemv<{CTYPE[wt.name]}, {wpr}>")
        args = (
            ptr(a),
            ptr(b),
            ptr(out),
            np.int32(m),
            np.int32(n_out),
            np.int32(k),
            np.int32(vec_ok),
        )
        return _launch(be, f, (-(-n_out // (8 // wpr)),), (256,), args)
    if wt.name not in CUDA_DTYPE:
        raise BackendError(f"MUL_MAT {node.label}: weight type {wt} has no cuBLAS path")
    cast = None
    bb = b
    if dtype_of_array(b) != wt:  # cuBLAS multiplies equal types: cast the activation into scratch
        bb = be.view(scratch, 0, (m, k), wt, (k, 1))
        cast = elementwise(be, (m, k), wt, bb, [b.reshape(m, k)], 0)
    blas = be.blas
    dt = CUDA_DTYPE[wt.name]
    # column-major: C (N x M) = A^T (N x K) . B (K x M), i.e. out (M, N) = b @ a.T
    args = (
        blas.handle,
        blas.OP_T,
        blas.OP_N,
        n_out,
        m,
        k,
        be._one.ctypes.data,
        a.data.ptr,
        dt,
        k,
        bb.data.ptr,
        dt,
        k,
        be._zero.ctypes.data,
        out.data.ptr,
        CUDA_DTYPE["f32"],
        n_out,
        CUBLAS_COMPUTE_32F,
        -1,
    )
    gemm_ex, label = blas.gemm_ex, node.label

    def gemm() -> None:
        if cast is not None:
            cast()
        status = gemm_ex(*args)
        if status != 0:
            raise BackendError(f"cublasGemmEx for MUL_MAT {label} failed with status {status}")

    return gemm


def _c_argmax(job: Job) -> Callable[[], None]:
    be, node, out, srcs, scratch, fixed = job
    _need_contiguous(node, srcs, (0,))
    (x,) = srcs
    v = x.shape[-1]
    rows = x.size // v if v else 0
    if rows == 0:
        return lambda: None
    parts = max(1, min(-(-v // 4096), 128))  # ~16 elements per thread, one atomic per block
    chunk = -(-v // parts)
    best, tickets = be.counters(2 * rows), be.counters(rows)  # best: one u64 per row
    f = be.fn(f"k_argmax<{CTYPE[dtype_of_array(x).name]}>")
    args = (ptr(x), ptr(out), ptr(best), ptr(tickets), np.int64(v), np.int64(chunk))
    return _launch(be, f, (rows, parts), (THREADS,), args)


COMPILERS: dict[Op, Callable[..., Callable[[], None]]] = {
    Op.CONT: _c_copy,
    Op.CAST: _c_copy,
    Op.SCALE: _c_scale,
    Op.ADD: _binary(0),
    Op.MUL: _binary(1),
    Op.GEGLU: _binary(2),
    Op.SWIGLU: _binary(3),
    Op.GET_ROWS: _c_get_rows,
    Op.SET_ROWS: _c_set_rows,
    Op.RMS_NORM: _c_rms_norm,
    Op.ROPE: _c_rope,
    Op.ATTENTION: _c_attention,
    Op.MUL_MAT: _c_mul_mat,
    Op.ARGMAX: _c_argmax,
}
