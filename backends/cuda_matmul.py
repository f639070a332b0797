"""Matrix products as prepared CUDA launches: ``cuda_matvec``'s kernels for up to
``GEMV_MAX_M`` rows, the older GEMV where they do not fit, cuBLAS ``gemmEx`` beyond, whose
equal-type rule makes a f32 activation meeting a 16-bit weight be cast into planned scratch
first.

A weight in a GGUF block type (``Quantized``) is read as stored: ``cuda_matvec``'s decode
kernels read its blocks (in registers, or staged through shared memory) for the same rows and
prologues as ``k_matvec``; longer products decode it tile by tile (``BLOCK_TILE_BYTES`` of f16
in planned scratch) and multiply each tile with cuBLAS, so no whole dequantized copy is ever
kept. The tiles are f16 (cuBLAS
multiplies equal types, and f16 keeps 3 more bits than bf16); the f32 activation is split into
two f16 halves, hi + lo / 2048, each multiplied by the tile, the second product (alpha 1/2048)
accumulating into the first, so only the weight is rounded. Measured on the real Gemma 3 270M
against f32 (tests/test_real_model_blocks.py): bf16 tiles and activation left a prompt
position at logit cosine 0.9998 and perplexity 0.21% off; f16 both, 0.999998 and 0.21%; f16
tile with the split activation, 0.06%. An activation beyond f16's range (65504) makes the
product inf, visible in the logits, never a silently wrong finite value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from backends.base import BackendError, Quantized
from backends.cuda_launch import (
    CTYPE,
    QT_ID,
    Job,
    dtype_of_array,
    elementwise,
    need_contiguous,
    prepare_launch,
    ptr,
)
from backends.cuda_matvec import GEMV_MAX_M, MAX_INPUT_FLOATS_Q, PRE_COPY, matvec, q_smem
from backends.spec import ALIGN
from graph.dtypes import DType, f16, f32
from graph.ir import Node
from graph.ops import Op

BLOCK_TYPES = frozenset(QT_ID)
"""GGUF block types the matrix kernels read as stored (every type of Q4_K_M and Q5_K_M files
and of the real Gemma 3 270M file)."""
# a prompt product's dequantized tile (f16), in planned scratch: whole 7B matrices but the
# head and the stacked gate/up. Measured on an H100 at 512 rows (Q4_K, ms a product, 32 / 64 /
# 128 MiB): 4096x11008 0.471 / 0.258 / 0.227 (a K of 11008 made 1,524-row tiles: three tiles,
# six small cuBLAS products), 22016x4096 0.471 / 0.435 / 0.429, 12288x4096 0.261 / 0.251 / 0.248
BLOCK_TILE_BYTES = 128 << 20
CUDA_DTYPE = {"f32": 0, "f16": 2, "bf16": 14}  # cudaDataType: R_32F, R_16F, R_16BF
CUBLAS_COMPUTE_32F = 68
_LO_SCALE = np.array([1.0 / 2048], np.float32)  # k_split_f16's lo half is scaled by 2048


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _tile_rows(n_out: int, k: int) -> int:
    return max(1, min(n_out, BLOCK_TILE_BYTES // (2 * k)))


def _mul_mat_q(job: Job) -> Callable[[], None]:
    """A product with a block weight: ``cuda_matvec.matvec`` for decode rows; else the weight is
    decoded ``_tile_rows`` rows at a time into f16 scratch and each tile multiplied by
    cuBLAS (f16 inputs, f32 accumulation and output) with the activation's two f16 halves."""
    be, node, out, srcs, scratch, fixed = job
    need_contiguous(node, srcs, (1,))
    w, b = srcs
    n_out, k = w.shape
    m = b.size // k if k else 0
    if m == 0 or n_out == 0:
        return lambda: None
    if dtype_of_array(b) != f32:
        raise BackendError(
            f"MUL_MAT {node.label}: a {w.dtype.name} weight multiplies f32 activations, "
            f"not {dtype_of_array(b).name}"
        )
    if w.dtype.name not in QT_ID:
        raise BackendError(
            f"MUL_MAT {node.label}: no CUDA kernel reads {w.dtype.name} blocks; "
            "run with --dtype f16 to dequantize at load"
        )
    if _uses_gemv(m, dtype_of_array(b)):
        early = bool(fixed) and fixed[0]
        mv = matvec(be, w, out, PRE_COPY, b, b, None, None, None, 0.0, 0.0, early)
        if mv is not None:
            return mv
    need = _q_scratch(m, n_out, k)
    if scratch is None or scratch.nbytes < need:
        raise BackendError(
            f"MUL_MAT {node.label}: {w.dtype.name} product needs {need} bytes of scratch, "
            f"the plan gave {0 if scratch is None else scratch.nbytes}"
        )
    half = _aligned(m * k * 2)
    hi = be.view(scratch, 0, (m, k), f16, (k, 1))
    lo = be.view(scratch, half, (m, k), f16, (k, 1))
    split = prepare_launch(
        be,
        be.fn("k_split_f16"),
        (min(-(-m * k // 256), 65535),),
        (256,),
        (ptr(b), ptr(hi), ptr(lo), np.int64(m * k)),
    )
    tile_rows = _tile_rows(n_out, k)
    tile = be.view(scratch, 2 * half, (tile_rows, k), f16, (k, 1))
    row_bytes = w.data.shape[1]
    decode, products = [], []
    blas, h16, f32_id = be.blas, CUDA_DTYPE["f16"], CUDA_DTYPE["f32"]
    f = be.fn(f"k_dequant_f16<{QT_ID[w.dtype.name]}>")
    for n0 in range(0, n_out, tile_rows):
        rows = min(tile_rows, n_out - n0)
        pieces = rows * (k // 32)
        args = (np.uint64(w.data.data.ptr + n0 * row_bytes), ptr(tile), np.int64(rows), np.int32(k))
        decode.append(prepare_launch(be, f, (min(-(-pieces // 256), 65535),), (256,), args))
        for x, alpha, beta in ((hi, blas.one, blas.zero), (lo, _LO_SCALE, blas.one)):
            products.append(
                (
                    blas.handle,
                    blas.OP_T,
                    blas.OP_N,
                    rows,
                    m,
                    k,
                    alpha.ctypes.data,
                    tile.data.ptr,
                    h16,
                    k,
                    x.data.ptr,
                    h16,
                    k,
                    beta.ctypes.data,
                    out.data.ptr + 4 * n0,
                    f32_id,
                    n_out,
                    CUBLAS_COMPUTE_32F,
                    -1,
                )
            )
    gemm_ex, label = blas.gemm_ex, node.label

    def run() -> None:
        split()
        for i, dq in enumerate(decode):
            dq()
            for args in products[2 * i : 2 * i + 2]:
                status = gemm_ex(*args)
                if status != 0:
                    raise BackendError(
                        f"cublasGemmEx for MUL_MAT {label} failed with status {status}"
                    )

    return run


def _q_scratch(m: int, n_out: int, k: int) -> int:
    """Scratch of a block product beyond decode rows: the activation's two f16 halves, one
    f16 tile."""
    return 2 * _aligned(m * k * 2) + _tile_rows(n_out, k) * k * 2


def _uses_gemv(m: int, b_dtype: DType) -> bool:
    return m <= GEMV_MAX_M and b_dtype == f32


def _c_mul_mat(job: Job) -> Callable[[], None]:
    be, node, out, srcs, scratch, fixed = job
    if isinstance(srcs[0], Quantized):
        return _mul_mat_q(job)
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
    if a.dtype.is_quantized:
        k = b.shape[-1]
        decode = _uses_gemv(m, b.dtype) and q_smem(m, k, a.dtype) <= MAX_INPUT_FLOATS_Q * 4
        return 0 if decode else _q_scratch(m, a.shape[0], k)
    if not _uses_gemv(m, b.dtype) and a.dtype != b.dtype:
        return m * b.shape[-1] * a.dtype.itemsize
    return 0


COMPILERS = {Op.MUL_MAT: _c_mul_mat}
