"""Matrix-vector products as prepared CUDA launches, for up to ``GEMV_MAX_M`` input rows
(decode steps, short prompt chunks): ``k_matvec`` on 16-bit and f32 weights, the block decode
kernels (``MATVEC_Q_KERNELS``) on GGUF block weights read as stored. Each builds its input in
shared memory through a prologue (``PRE_*``: a norm, a residual add, a gated unit), so
``cuda_fused``'s groups are these launches too; every block of a launch is resident at once.
``cuda_matmul`` is the entry point of every product: it calls ``matvec`` first, and takes what
does not fit here (the older GEMV, cuBLAS, block weights decoded tile by tile).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from backends.base import BackendError, Quantized
from backends.cuda_launch import (
    CTYPE,
    QT_ID,
    CudaDevice,
    dtype_of_array,
    opt_in_smem,
    prepare_launch,
    ptr,
    resident_blocks,
)
from backends.cuda_source import macro_value
from graph.dtypes import DType, f32

GEMV_MAX_M = 8  # rows up to which the GEMV kernel beats cuBLAS (decode, short chunks)
PRE_NORM, PRE_NORM_RES, PRE_ADD, PRE_GEGLU, PRE_SWIGLU, PRE_COPY = range(6)  # k_matvec's PRE
# warps per block of the matrix-vector kernels (kernels.cu MV_WARPS's default). Every block
# builds the whole input in shared memory (a norm reads four K-float vectors from L2), so fewer,
# larger blocks read less of it: on an H100, 16 warps against 4 ran a 7B decode step Q4_K
# 309 -> 382 t/s, Q8_0 224 -> 260, F16 154 -> 176, and the 270M's 618 -> 658 (NOTES.md)
MATVEC_WARPS = 16
MATVEC_WARPS_CHOICES = (2, 4, 8, 16)  # 16 x 32 threads keep 128 registers a thread
MAX_INPUT_FLOATS = 11 * 1024  # the built input in shared memory: 44 KiB of a block's 48 KiB
MAX_INPUT_FLOATS_Q = 98 * 256  # the block decode kernels' shared memory: 98 KiB, opted in
# beyond the default 48 KiB per block (one row of 11008 takes 71 KiB in the int16 variant), and
# within what every GPU since sm_80 lets a block opt in to (99 KiB on sm_86/89); a product that
# does not fit decodes its weight into tiles instead


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
    may be issued before the previous kernel has finished. The launch: ``_bind_matvec``.
    """
    if isinstance(w, Quantized):
        return _matvec_q(be, w, out, pre, a, b, w1, w2, v_out, eps1, eps2, early)
    n_out, k = w.shape
    wt = dtype_of_array(w)
    m = a.size // k if k else 0
    if not 0 < m <= GEMV_MAX_M or n_out == 0 or wt.name not in CTYPE or m * k > MAX_INPUT_FLOATS:
        return None
    vec = 4 if wt == f32 else 8
    if k % vec or w.data.ptr % 16 or not w.flags.c_contiguous:
        return None
    if out.size != m * n_out or not _inputs_fit(out, a, b, w1, w2, v_out, k):
        return None
    need = -(-(k // vec) // 32)  # 16-byte pieces per lane per row
    choices = [r for r in (1, 2, 4) if r == 1 or r * need <= 16]
    head = f"k_matvec<{CTYPE[wt.name]}"
    inputs = (a, b, w1, w2, v_out, eps1, eps2)
    return _bind_matvec(be, head, choices, m * k * 4, ptr(w), (n_out, k), out, pre, inputs, early)


def _bind_matvec(
    be: CudaDevice,
    head: str,
    choices: Sequence[int],
    smem: int,
    w_ptr: np.uint64,
    shape: tuple[int, int],
    out: Any,
    pre: int,
    inputs: tuple[Any, Any, Any, Any, Any, float, float],
    early: bool,
) -> Callable[[], None]:
    """One launch of a matrix-vector kernel whose template starts ``head`` (``k_matvec<T``,
    ``k_matvec_q16<QT``; then rows per warp, ``pre``, rows of input): rows per warp (R) are
    the first of ``choices`` that makes every block resident at once (no second wave, whose
    latency a short product cannot hide), else the last, its grid then walking the matrix
    with resident blocks (the output head). ``shape``: the weight's (rows, K); ``inputs``:
    a, b, w1, w2, v_out, eps1, eps2."""
    n_out, k = shape
    m = inputs[0].size // k
    warps = _warps(be)
    for r in choices:
        f = be.fn(f"{head}, {r}, {pre}, {1 if m == 1 else GEMV_MAX_M}>")
        opt_in_smem(f, smem)
        resident = resident_blocks(be, f, 32 * warps, smem)
        blocks = -(-n_out // (warps * r))
        if blocks <= resident or r == choices[-1]:
            grid = min(blocks, resident)
            break
    args = _matvec_args(w_ptr, out, m, n_out, k, inputs, early)
    return prepare_launch(be, f, (grid,), (32 * warps,), args, smem)


def _matvec_args(
    w_ptr: np.uint64,
    out: Any,
    m: int,
    n_out: int,
    k: int,
    inputs: tuple[Any, Any, Any, Any, Any, float, float],
    early: bool,
) -> tuple[Any, ...]:
    """The arguments every matrix-vector kernel takes, in its order."""
    a, b, w1, w2, v_out, eps1, eps2 = inputs
    null = np.uint64(0)
    return (
        w_ptr,
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


def _warps(be: CudaDevice) -> int:
    """The backend's warps per matrix-vector block (``matvec_warps``), checked: the kernels
    are compiled with it (``MV_WARPS``) and launched with it, and must agree."""
    w = getattr(be, "matvec_warps", MATVEC_WARPS)
    if w not in MATVEC_WARPS_CHOICES:
        raise BackendError(
            f"matvec_warps {w!r}: the matrix-vector kernels take one of {MATVEC_WARPS_CHOICES}"
        )
    return w


def _inputs_fit(out: Any, a: Any, b: Any, w1: Any, w2: Any, v_out: Any, k: int) -> bool:
    """The f32 layouts ``k_matvec``'s prologues read and write."""
    if dtype_of_array(out) != f32 or not out.flags.c_contiguous:
        return False
    for arr in (a, b):
        if not _f32_rows(arr, k) or _row_stride(arr) < 0:
            return False
    for arr in (w1, w2):
        if arr is not None and (arr.shape != (k,) or dtype_of_array(arr) != f32):
            return False
    return v_out is None or (v_out.flags.c_contiguous and dtype_of_array(v_out) == f32)


MATVEC_Q_KERNELS = {"int16": "k_matvec_q16", "float": "k_matvec_q", "staged": "k_matvec_qs"}
"""The decode kernels on block weights (quant_kernels.cu), by the backend's ``matvec_q``:
the int16 input with integer dots, f32 throughout, and the int16 arithmetic with the weight
staged through a cp.async ring in shared memory (``staged``; where the ring and the input do
not fit the device's shared memory, ``int16`` runs instead)."""
MATVEC_Q_VARIANTS = tuple(MATVEC_Q_KERNELS)
MATVEC_Q_CHOICES = ("auto", *MATVEC_Q_VARIANTS)
"""``matvec_q`` settings: ``auto`` (the default) takes ``staged`` for one-row Q8_0 products
on Hopper (compute capability 9.0 and later) where the busiest warp has ``STAGED_MIN_ROUNDS``
rounds or more, else ``int16``. Measured on an H100 (benchmarks/NOTES.md): staged Q8_0
products of 11008 and 32000 rows and of K 11008 ran 5-13% faster than int16, the 4096x4096
ones (4 rounds a warp, the ring's fill not amortized) 16% slower; Q4_K, whose int16 kernel
is bound by instruction issue more than by memory latency, ran slower at every shape, Q6_K
at every shape but its 32000-row head. More input rows and other GPUs were not measured."""
STAGED_TYPES = frozenset({"q8_0"})
STAGED_MIN_ROUNDS = 8
MVQ_STAGES = 4  # quant_kernels.cu's defaults: rounds in a warp's ring of the staged kernel,
MVS_PIECES = 2  # and pieces a lane copies per round over its warp's rows


def q_smem(m: int, k: int, qtype: DType, variant: str = "int16") -> int:
    """Shared memory of the decode kernels: the input rows (f32); ``int16``: also the input
    as int16 and 16 bytes per piece; ``float``: the piece sums where the type subtracts a
    minimum (Q4_K, Q5_K)."""
    if variant in ("int16", "staged"):
        return m * k * 6 + m * (k // 32) * 16
    sums = m * (k // 32) if qtype.name in ("q4_k", "q5_k") else 0
    return (m * k + sums) * 4


def _matvec_q(
    be: CudaDevice,
    w: Quantized,
    out: Any,
    pre: int,
    a: Any,
    b: Any,
    w1: Any | None,
    w2: Any | None,
    v_out: Any | None,
    eps1: float,
    eps2: float,
    early: bool,
) -> Callable[[], None] | None:
    """``matvec`` on a weight in a GGUF block type: ``k_matvec_q16`` (int16 input, integer
    dot products), ``k_matvec_qs`` (the same, the weight staged through shared memory) or
    ``k_matvec_q`` (f32), as ``be.matvec_q`` says (``MATVEC_Q_CHOICES``; quant_kernels.cu)."""
    n_out, k = w.shape
    m = a.size // k if k else 0
    variant = getattr(be, "matvec_q", "auto")
    if variant not in MATVEC_Q_CHOICES:
        raise BackendError(f"matvec_q {variant!r}: the block decode kernels are {MATVEC_Q_CHOICES}")
    auto = variant == "auto"
    if auto:
        hopper = be.compute_capability >= 90
        staged = m == 1 and hopper and w.dtype.name in STAGED_TYPES
        variant = "staged" if staged else "int16"
    kernel = MATVEC_Q_KERNELS[variant]
    smem = q_smem(m, k, w.dtype, variant)
    if not 0 < m <= GEMV_MAX_M or n_out == 0 or smem > MAX_INPUT_FLOATS_Q * 4:
        return None
    if w.dtype.name not in QT_ID or out.size != m * n_out:
        return None
    if not _inputs_fit(out, a, b, w1, w2, v_out, k):
        return None
    inputs = (a, b, w1, w2, v_out, eps1, eps2)
    forced = getattr(be, "matvec_q_rows", None)
    if variant == "staged":
        min_rounds = STAGED_MIN_ROUNDS if auto else 0
        staged = _bind_staged(be, w, out, pre, inputs, early, forced, min_rounds)
        if staged is not None:
            return staged
        kernel = MATVEC_Q_KERNELS["int16"]
    head = f"{kernel}<{QT_ID[w.dtype.name]}"
    return _bind_matvec(
        be,
        head,
        (forced,) if forced else _q_rows_choices(w.dtype.name, n_out, m),
        smem,
        ptr(w.data),
        (n_out, k),
        out,
        pre,
        inputs,
        early,
    )


def staged_ring_bytes(qtype: DType, rows: int, warps: int, stages: int, pieces: int) -> int:
    """Shared memory of ``k_matvec_qs``'s rings (quant_kernels.cu ``QStage``): per warp,
    ``stages`` rounds of ``rows`` rows' 16-byte chunks, each row's round 32 x T pieces
    (T = ``pieces // rows``, at least one: a lane's pieces per row) in whole blocks, plus one
    chunk for an unaligned start."""
    per_lane = max(1, pieces // rows)
    blocks = 32 * per_lane * 32 // qtype.block_size
    chunks = (blocks * qtype.block_bytes + 30) // 16
    return warps * stages * rows * chunks * 16


def _bind_staged(
    be: CudaDevice,
    w: Quantized,
    out: Any,
    pre: int,
    inputs: tuple[Any, Any, Any, Any, Any, float, float],
    early: bool,
    forced: int | None,
    min_rounds: int = 0,
) -> Callable[[], None] | None:
    """``k_matvec_qs`` on a block weight, or None where its rings and input do not fit the
    device's shared memory at any rows per warp, or its busiest warp would copy fewer than
    ``min_rounds`` rounds. Rows per warp: of 4, 2 and 1, the one whose busiest warp has the
    fewest rows (row groups are dealt to all the grid's warps in turn), the larger on a tie
    (fewer reads of the input per weight byte)."""
    n_out, k = w.shape
    m = inputs[0].size // k
    warps = _warps(be)
    extra = getattr(be, "defines", ())  # experiments may resize the ring (kernels.cu macros)
    stages = macro_value(extra, "MVQ_STAGES", MVQ_STAGES)
    pieces = macro_value(extra, "MVS_PIECES", MVS_PIECES)
    limit = be.smem_optin - 1024  # the kernel's own 128 bytes, and slack (0: never staged)
    mm = 1 if m == 1 else GEMV_MAX_M
    best = None  # ((the busiest warp's rows, -r), f, smem, grid, that warp's rounds)
    for r in (forced,) if forced else (4, 2, 1):
        smem = staged_ring_bytes(w.dtype, r, warps, stages, pieces) + q_smem(m, k, w.dtype)
        if smem > limit:
            continue
        f = be.fn(f"k_matvec_qs<{QT_ID[w.dtype.name]}, {r}, {pre}, {mm}>")
        opt_in_smem(f, smem)
        groups = -(-n_out // r)
        grid = min(resident_blocks(be, f, 32 * warps, smem), groups)
        per_warp = -(-groups // (grid * warps))  # row groups of the busiest warp
        rounds = per_warp * -(-(k // 32) // (32 * max(1, pieces // r)))
        if best is None or (per_warp * r, -r) < best[0]:
            best = ((per_warp * r, -r), f, smem, grid, rounds)
    if best is None or best[4] < min_rounds:
        return None
    _, f, smem, grid, _ = best
    args = _matvec_args(ptr(w.data), out, m, n_out, k, inputs, early)
    return prepare_launch(be, f, (grid,), (32 * warps,), args, smem)


def _q_rows_choices(qtype: str, n_out: int, m: int) -> tuple[int, ...]:
    """Rows per warp to try for a block-type matvec (see ``_bind_matvec``). One row per warp,
    its grid walking the matrix with resident blocks, measured fastest for one input row on
    the 7B shape's Q8_0 matrices and on Q6_K's below the head (H200, block_kernels.py
    --sweep: Q8_0 11008x4096 18.3 against 23.3 us at the policy's 4 rows per warp, Q6_K
    4096x11008 23.6 against 26.8); the 32000-row Q6_K head and the other types gain from the
    policy's choice."""
    if m == 1 and (qtype == "q8_0" or (qtype == "q6_k" and n_out < 16384)):
        return (1,)
    return (1, 2, 4)
