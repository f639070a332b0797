"""Matrix products as prepared CUDA launches: ``k_matvec`` for up to ``GEMV_MAX_M`` rows (its
input built in shared memory, every block resident at once; ``cuda_fused``'s groups use it
too), the older GEMV where that does not fit, cuBLAS ``gemmEx`` beyond, whose equal-type rule
makes a f32 activation meeting a 16-bit weight be cast into planned scratch first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from backends.base import BackendError
from backends.cuda_launch import (
    CTYPE,
    CudaDevice,
    Job,
    dtype_of_array,
    elementwise,
    need_contiguous,
    prepare_launch,
    ptr,
)
from graph.dtypes import DType, f32
from graph.ir import Node
from graph.ops import Op

CUDA_DTYPE = {"f32": 0, "f16": 2, "bf16": 14}  # cudaDataType: R_32F, R_16F, R_16BF
CUBLAS_COMPUTE_32F = 68
GEMV_MAX_M = 8  # rows up to which the GEMV kernel beats cuBLAS (decode, short chunks)
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


def _resident_blocks(be: CudaDevice, f: Any, smem: int) -> int:
    """Blocks of ``MATVEC_WARPS`` warps that fit on the GPU at once (registers, shared memory)."""
    threads = 32 * MATVEC_WARPS
    by_regs = 65536 // max(1, f.num_regs * threads)
    by_smem = (227 * 1024) // (smem + f.shared_size_bytes + 1024)
    return max(1, min(by_regs, by_smem, 2048 // threads, 32)) * be.sm_count


def matvec(
    be: CudaDevice,
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
    return prepare_launch(be, f, (grid,), (32 * MATVEC_WARPS,), args, smem)


def _uses_gemv(m: int, b_dtype: DType) -> bool:
    return m <= GEMV_MAX_M and b_dtype == f32


def _c_mul_mat(job: Job) -> Callable[[], None]:
    be, node, out, srcs, scratch, fixed = job
    need_contiguous(node, srcs, (0, 1))
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
        while wpr < 8 and n_out * wpr < 64 * be.sm_count and wpr * 32 * vec <= k:
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
        return prepare_launch(be, f, (-(-n_out // (8 // wpr)),), (256,), args)
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
        blas.one.ctypes.data,
        a.data.ptr,
        dt,
        k,
        bb.data.ptr,
        dt,
        k,
        blas.zero.ctypes.data,
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


def scratch_bytes(node: Node, srcs: Sequence[Node]) -> int:
    """The activation cast to the weight's type, when cuBLAS multiplies."""
    if node.op is not Op.MUL_MAT:
        return 0
    a, b = srcs
    m = math.prod(b.shape[:-1])
    if not _uses_gemv(m, b.dtype) and a.dtype != b.dtype:
        return m * b.shape[-1] * a.dtype.itemsize
    return 0


COMPILERS = {Op.MUL_MAT: _c_mul_mat}
