"""How each compute op becomes one prepared CUDA launch (or a few) on the CuPy backend.

``COMPILERS[op](Job(backend, node, out, srcs, scratch, fixed))`` returns a closure that
launches the node's kernel(s) from ``kernels.cu`` with every pointer, size and grid bound in
advance, so running a node costs one Python call and one driver launch, and a CUDA graph can
capture it. This module does not import cupy: it reaches memory and kernels through the backend
(``backends.cupy_backend``), the only module that does.

Here: what every compiler shares (``Job``, ``prepare_launch``, the strided ``elementwise``
launch) and the compilers of the elementwise, row, norm, rope and argmax ops; elementwise ops
walk any strides and broadcast (dims merged where all operands are contiguous across them), RMS
norm is one block per row, rope one thread per element with double-precision angles. Matrix
products are ``backends.cuda_matmul`` (most of its launches for up to 8 rows in ``cuda_matvec``),
attention ``backends.cuda_attention``; the backend joins the three ``COMPILERS`` tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from backends.base import BackendError, Quantized
from backends.spec import ALIGN
from graph.dtypes import DType, dtype_of
from graph.ir import Node
from graph.ops import Op, RmsNormParams, RopeMode, RopeParams, ScaleParams

CTYPE = {"f32": "float", "f16": "half_t", "bf16": "bf16_t"}
QT_ID = {"q4_0": 2, "q5_0": 6, "q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14}
"""GGUF block types the CUDA kernels read as stored, by their ``enum ggml_type`` ids (the
template argument of the quant_kernels.cu kernels)."""
MAXD = 6
THREADS = 256


DEFAULT_SMEM = 48 * 1024 - 1024  # dynamic shared memory a block gets without opting in


def opt_in_smem(f: Any, smem: int) -> None:
    """Let kernel ``f`` launch with ``smem`` bytes of dynamic shared memory: beyond the default
    48 KiB a block must opt in (once per kernel)."""
    if smem > DEFAULT_SMEM and f.max_dynamic_shared_size_bytes < smem:
        f.max_dynamic_shared_size_bytes = smem


def resident_blocks(be: Any, f: Any, threads: int, smem: int = 0) -> int:
    """Blocks of ``f`` (``threads`` each, ``smem`` bytes of dynamic shared memory) that fit on
    the GPU at once: per SM by registers, shared memory, threads and the 32-block limit."""
    by_regs = 65536 // max(1, f.num_regs * threads)
    by_smem = (227 * 1024) // (smem + f.shared_size_bytes + 1024)
    return max(1, min(by_regs, by_smem, 2048 // threads, 32)) * be.sm_count


class CudaDevice(Protocol):
    """What the compilers use of the device (``backends.cupy_backend.CupyBackend`` is one):
    kernels by template name, prepared launches on the stream being compiled for, views into
    its memory, cuBLAS, small device arrays that live as long as it, and its facts. Written as
    a protocol so that these modules never import the backend (nor, through it, CuPy)."""

    sm_count: int
    compute_capability: int  # 10 x major + minor: 90 on Hopper
    smem_optin: int  # the most dynamic shared memory a block may opt in to
    attn_merge: str

    def fn(self, expr: str) -> Any: ...
    def prepare(
        self, f: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, smem: int = 0
    ) -> Callable[[], None]: ...
    def view(
        self, buf: Any, byte_offset: int, shape: tuple[int, ...], dtype: DType, strides: Any
    ) -> Any: ...
    def counters(self, n: int) -> Any: ...
    def meta(self, values: Sequence[int]) -> Any: ...
    @property
    def blas(self) -> Any: ...


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
    return -(-n // ALIGN) * ALIGN


def dense_copy_bytes(node: Node, srcs: Sequence[Node]) -> list[int]:
    if node.op in STRIDED_OPS:
        return []
    return [aligned(s.nbytes) for s in srcs if not s.contiguous]


def dtype_of_array(arr: Any) -> DType:
    return dtype_of(arr.dtype)


def need_contiguous(node: Node, srcs: Sequence[Any], which: Sequence[int]) -> None:
    for i in which:
        if not srcs[i].flags.c_contiguous:
            raise BackendError(
                f"{node.op.name} {node.label}: input {i} is not contiguous; the CuPy kernel "
                "for this op reads dense rows, insert cont() before it"
            )


class Job(NamedTuple):
    """What a compiler binds for one node: the backend, the node, its output and source arrays,
    its planned scratch (or None), and which sources no kernel writes (weights, constants)."""

    be: CudaDevice
    node: Node
    out: Any
    srcs: list[Any]
    scratch: Any
    fixed: Sequence[bool] = ()


def prepare_launch(
    be: CudaDevice,
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
    be: CudaDevice,
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
    return prepare_launch(be, f, (blocks(n),), (THREADS,), args)


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
    table, idx = srcs
    n = idx.shape[0]
    if isinstance(table, Quantized):  # rows decoded as the CPU reference decodes them
        need_contiguous(node, srcs, (1,))
        n_table, k = table.shape
        qt = QT_ID.get(table.dtype.name)
        if qt is None:
            raise BackendError(
                f"GET_ROWS {node.label}: no CUDA kernel reads {table.dtype.name} blocks; "
                "run with --dtype f16 to dequantize at load"
            )
        f = be.fn(f"k_get_rows_q<{qt}>")
        args = (ptr(table.data), ptr(idx), ptr(out), np.int64(n), np.int32(k), np.int64(n_table))
        return prepare_launch(be, f, (blocks(n * (k // 32)),), (THREADS,), args)
    need_contiguous(node, srcs, (0, 1))
    row = math.prod(table.shape[1:])
    f = be.fn(f"k_get_rows<{CTYPE[dtype_of_array(table).name]}>")
    return prepare_launch(
        be,
        f,
        (blocks(n * row),),
        (THREADS,),
        (ptr(table), ptr(idx), ptr(out), np.int64(n), np.int64(row), np.int64(table.shape[0])),
    )


def _c_set_rows(job: Job) -> Callable[[], None]:
    be, node, out, srcs, scratch, fixed = job
    need_contiguous(node, srcs, (1, 2))
    _, src, idx = srcs
    row = math.prod(src.shape[1:])
    n = idx.shape[0]
    f = be.fn(f"k_set_rows<{CTYPE[dtype_of_array(src).name]}, {CTYPE[node.dtype.name]}>")
    return prepare_launch(
        be,
        f,
        (blocks(n * row),),
        (THREADS,),
        (ptr(src), ptr(idx), ptr(out), np.int64(n), np.int64(row), np.int64(out.shape[0])),
    )


def _c_rms_norm(job: Job) -> Callable[[], None]:
    be, node, out, srcs, scratch, fixed = job
    need_contiguous(node, srcs, range(len(srcs)))
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
    return prepare_launch(be, f, (rows,), (threads,), args)


def _c_rope(job: Job) -> Callable[[], None]:
    be, node, out, srcs, scratch, fixed = job
    need_contiguous(node, srcs, (0, 1))
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
    return prepare_launch(be, f, (blocks(total),), (THREADS,), args)


def _c_argmax(job: Job) -> Callable[[], None]:
    be, node, out, srcs, scratch, fixed = job
    need_contiguous(node, srcs, (0,))
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
    return prepare_launch(be, f, (rows, parts), (THREADS,), args)


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
    Op.ARGMAX: _c_argmax,
}
