"""The CUDA backend, through CuPy: the only module of streamgraph that imports cupy.

Built around plans that are captured once and replayed, not around calling CuPy per node:

* Kernels are our own (``kernels.cu``, compiled by NVRTC on first use of each type combination
  and cached by CuPy on disk); ``compile`` binds a node's pointers, grid and arguments once,
  so a run is a list of prepared launches, and a CUDA-graph replay of that list.
* Matrix products with few rows (decode) use a vectorised GEMV kernel reading 16-byte chunks of
  the weight; larger ones call cuBLAS ``gemmEx`` through a handle bound to our stream before
  any capture (``cupy.matmul`` refuses to run under capture; batch is folded into M). A f32
  activation meeting a 16-bit weight is cast into planned scratch first.
* Memory is ours: every arena, weight and cache is one ``cudaMalloc`` (``cupy.cuda.Memory``),
  arrays are views at planned offsets; nothing is taken from CuPy's pool during a forward pass,
  whose reuse of freed blocks is unsafe under graph replay.
* Inputs go through pinned staging buffers and ``memcpyAsync`` on the compute stream; outputs
  come back the same way.

Non-contiguous inputs are handled by the elementwise kernels (any strides and broadcasting);
the other kernels want contiguous inputs and say so at compile time.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cupy as cp  # ImportError here: the registry turns it into a one-line BackendError
import numpy as np

from backends.base import Backend, BackendError
from graph.dtypes import DType, dtype_of, f32
from graph.ir import Node
from graph.ir import contiguous_strides as _contiguous
from graph.ops import AttentionParams, Op, RmsNormParams, RopeMode, RopeParams, ScaleParams

__all__ = ["CupyBackend"]


class _Cublas:
    """cuBLAS through ctypes, on a handle bound to our stream with a workspace of our own.

    CuPy's cuBLAS wrappers rebind the handle to the current stream and refuse to run while a
    stream is capturing; calling the library directly is what lets matrix products be part of
    a captured decode step (cuBLAS supports capture once stream and workspace are fixed).
    """

    OP_N, OP_T = 0, 1

    def __init__(self, stream_ptr: int, workspace_bytes: int = 32 << 20) -> None:
        self.lib = None
        for name in ("libcublas.so.13", "libcublas.so.12", "libcublas.so"):
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if self.lib is None:
            raise BackendError("cannot load libcublas (looked for libcublas.so.13/.12)")
        self.handle = ctypes.c_void_p()
        self._check(self.lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self._check(
            self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream_ptr)), "cublasSetStream"
        )
        self.workspace = cp.cuda.Memory(workspace_bytes)
        self._check(
            self.lib.cublasSetWorkspace_v2(
                self.handle, ctypes.c_void_p(self.workspace.ptr), ctypes.c_size_t(workspace_bytes)
            ),
            "cublasSetWorkspace",
        )
        gemm = self.lib.cublasGemmEx
        gemm.restype = ctypes.c_int
        i, p = ctypes.c_int, ctypes.c_void_p
        gemm.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i]
        self.gemm_ex = gemm

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise BackendError(f"{what} failed with cuBLAS status {status}")


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
_H2D, _D2H = 1, 2


def _ptr(a: Any) -> np.uint64:
    return np.uint64(a.data.ptr)


def _blocks(n: int, threads: int = THREADS) -> int:
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


class CupyBackend(Backend):
    name = "cupy"

    def __init__(self) -> None:
        try:
            n_dev = cp.cuda.runtime.getDeviceCount()
        except Exception as e:  # CUDA driver missing or broken
            raise BackendError(f"CuPy is installed but CUDA is not usable: {e}") from None
        if n_dev < 1:
            raise BackendError("CuPy is installed but there is no CUDA device")
        self.device = cp.cuda.Device(0)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.stream.use()  # kernels launch on the current stream: make it ours
        self.blas = _Cublas(self.stream.ptr)
        self._one = np.ones(1, np.float32)
        self._zero = np.zeros(1, np.float32)
        self._source = (Path(__file__).with_name("kernels.cu")).read_text()
        self._functions: dict[str, Any] = {}
        self._keep: list[Any] = []  # device metadata arrays bound into launches
        self.kernels = {op: self._unsupported for op in _COMPILERS}

    def _unsupported(self, *args: Any) -> None:  # pragma: no cover - compile() is the entry
        raise BackendError("the CuPy backend runs nodes through compile(), not kernels[op]")

    def describe(self) -> str:
        props = cp.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        total = cp.cuda.runtime.memGetInfo()[1]
        cuda = cp.cuda.runtime.runtimeGetVersion()
        return f"cupy {cp.__version__}, {name} ({total / 2**30:.0f} GiB), CUDA runtime {cuda}"

    # -- kernels -------------------------------------------------------------------------------
    def fn(self, expr: str) -> Any:
        """The compiled kernel of a template instance: ``k_binary<float, bf16_t, float, 0>``."""
        f = self._functions.get(expr)
        if f is None:
            mod = cp.RawModule(code=self._source, options=("-std=c++17",), name_expressions=[expr])
            f = mod.get_function(expr)
            self._functions[expr] = f
        return f

    # -- memory --------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> Any:
        """One cudaMalloc of ``nbytes``, zeroed (caches and arenas start clean)."""
        n = max(int(nbytes), 1)
        mem = cp.cuda.Memory(n)
        cp.cuda.runtime.memsetAsync(mem.ptr, 0, n, self.stream.ptr)
        return cp.ndarray((n,), cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))

    def view(
        self,
        buf: Any,
        byte_offset: int,
        shape: tuple[int, ...],
        dtype: DType,
        strides: tuple[int, ...],
    ) -> Any:
        nd = dtype.numpy
        return cp.ndarray(
            shape,
            nd,
            memptr=buf.data + int(byte_offset),
            strides=tuple(s * nd.itemsize for s in strides),
        )

    def concat_rows(self, arrays: Sequence[Any]) -> Any:
        shape = (sum(a.shape[0] for a in arrays), *arrays[0].shape[1:])
        dt = _dt(arrays[0])
        out = self.view(self.alloc(dt.nbytes(shape)), 0, shape, dt, _contiguous(shape))
        offset = 0
        for a in arrays:
            src = a if a.flags.c_contiguous else cp.ascontiguousarray(a)
            cp.cuda.runtime.memcpyAsync(
                out.data.ptr + offset, src.data.ptr, src.nbytes, 3, self.stream.ptr
            )
            offset += src.nbytes
        self.stream.synchronize()
        return out

    def byte_buffer(self, arr: Any) -> Any:
        return cp.ndarray((arr.nbytes,), cp.uint8, memptr=arr.data)

    def from_host(self, host: np.ndarray) -> Any:
        host = np.ascontiguousarray(host)
        buf = self.alloc(host.nbytes)
        dst = cp.ndarray(host.shape, host.dtype, memptr=buf.data)
        if host.nbytes:
            cp.cuda.runtime.memcpyAsync(
                dst.data.ptr, host.ctypes.data, host.nbytes, _H2D, self.stream.ptr
            )
            self.stream.synchronize()
        return dst

    def to_host(self, arr: Any) -> np.ndarray:
        out = np.empty(arr.shape, arr.dtype)
        src = arr if arr.flags.c_contiguous else cp.ascontiguousarray(arr)
        if out.nbytes:
            cp.cuda.runtime.memcpyAsync(
                out.ctypes.data, src.data.ptr, out.nbytes, _D2H, self.stream.ptr
            )
            self.stream.synchronize()
        return out

    def copy_from_host(self, dst: Any, host: np.ndarray) -> None:
        self.input_writer(dst)(host)

    def input_writer(self, dst: Any) -> Callable[[np.ndarray], None]:
        nbytes = dst.nbytes
        pinned = cp.cuda.alloc_pinned_memory(max(nbytes, 1))
        stage = np.frombuffer(pinned, dst.dtype, dst.size).reshape(dst.shape)
        ptr, stream = dst.data.ptr, self.stream.ptr
        memcpy = cp.cuda.runtime.memcpyAsync

        def write(host: np.ndarray) -> None:
            stage[...] = host
            if nbytes:
                memcpy(ptr, stage.ctypes.data, nbytes, _H2D, stream)

        write.keep = pinned  # type: ignore[attr-defined]
        return write

    def output_reader(self, src: Any) -> Callable[[bool], np.ndarray]:
        if not src.flags.c_contiguous:  # a strided view as output: gather it the slow way
            return lambda copy=True: self.to_host(src)
        nbytes = src.nbytes
        pinned = cp.cuda.alloc_pinned_memory(max(nbytes, 1))
        stage = np.frombuffer(pinned, src.dtype, src.size).reshape(src.shape)
        ptr, stream = src.data.ptr, self.stream

        def read(copy: bool = True) -> np.ndarray:
            if nbytes:
                cp.cuda.runtime.memcpyAsync(stage.ctypes.data, ptr, nbytes, _D2H, stream.ptr)
            stream.synchronize()
            return stage.copy() if copy else stage

        read.keep = pinned  # type: ignore[attr-defined]
        return read

    def check_fits(self, nbytes: int, what: str) -> None:
        free, total = cp.cuda.runtime.memGetInfo()
        if nbytes > free:
            raise BackendError(
                f"{what} needs {nbytes / 2**30:.2f} GiB of GPU memory; {free / 2**30:.2f} GiB of "
                f"{total / 2**30:.2f} GiB are free"
            )

    # -- execution -----------------------------------------------------------------------------
    def stream(self) -> Any:  # type: ignore[override]
        return cp.cuda.Stream(non_blocking=True)

    def event(self) -> Any:
        return cp.cuda.Event(disable_timing=True)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def capture(self, launch: Callable[[], None]) -> Callable[[], None]:
        s = self.stream
        s.begin_capture()
        try:
            launch()
        finally:
            graph = s.end_capture()
        return lambda: graph.launch(s)

    def fill_normal(self, arr: Any, seed: int, mean: float, std: float) -> None:
        """Fill a contiguous f32/f16/bf16 array with N(mean, std) draws, deterministically."""
        f = self.fn(f"k_fill_normal<{CTYPE[_dt(arr).name]}>")
        n = arr.size
        f(
            (_blocks(n),),
            (THREADS,),
            (_ptr(arr), np.int64(n), np.uint64(seed), np.float32(mean), np.float32(std)),
        )

    # -- planning ------------------------------------------------------------------------------
    def scratch_bytes(self, node: Node, srcs: Sequence[Node]) -> int:
        return sum(_dense_copy_bytes(node, srcs)) + _own_scratch_bytes(node, srcs)

    def compile(
        self, node: Node, out: Any, srcs: Sequence[Any], scratch: Any | None
    ) -> Callable[[], None]:
        """Bind one node; inputs its kernel needs dense are first copied into planned scratch."""
        srcs = list(srcs)
        copies: list[Callable[[], None]] = []
        offset = 0
        if node.op not in _STRIDED_OPS:
            for i, s in enumerate(srcs):
                if s.flags.c_contiguous:
                    continue
                dense = cp.ndarray(s.shape, s.dtype, memptr=scratch.data + offset)
                offset += _aligned(s.nbytes)
                copies.append(_elementwise(self, s.shape, _dt(s), dense, [s], 0))
                srcs[i] = dense
        own = scratch[offset:] if scratch is not None and offset < scratch.size else None
        launch = _COMPILERS[node.op](self, node, out, srcs, own)
        if not copies:
            return launch
        steps = [*copies, launch]

        def with_copies() -> None:
            for step in steps:
                step()

        return with_copies

    def meta(self, values: Sequence[int]) -> Any:
        arr = cp.asarray(np.asarray(values, np.int64))
        self._keep.append(arr)
        return arr


_STRIDED_OPS = frozenset({Op.CONT, Op.CAST, Op.SCALE, Op.ADD, Op.MUL, Op.GEGLU, Op.SWIGLU})
"""Ops whose kernel walks any strides (and broadcasts); the others read dense rows."""


def _aligned(n: int) -> int:
    return (n + 255) // 256 * 256


def _dense_copy_bytes(node: Node, srcs: Sequence[Node]) -> list[int]:
    if node.op in _STRIDED_OPS:
        return []
    return [_aligned(s.nbytes) for s in srcs if not s.contiguous]


def _own_scratch_bytes(node: Node, srcs: Sequence[Node]) -> int:
    if node.op is Op.MUL_MAT:
        a, b = srcs
        m = math.prod(b.shape[:-1])
        if not _uses_gemv(m, b.dtype) and a.dtype != b.dtype:
            return m * b.shape[-1] * a.dtype.itemsize
    if node.op is Op.ATTENTION:
        n, h, dv = node.shape
        splits = _attn_splits(_attn_rows(n, h, srcs[1].shape[1]), srcs[1].shape[0])
        if splits > 1:
            return n * h * splits * (dv + 2) * 4
    return 0


def _dt(arr: Any) -> DType:
    return dtype_of(arr.dtype)


def _need_contiguous(node: Node, srcs: Sequence[Any], which: Sequence[int]) -> None:
    for i in which:
        if not srcs[i].flags.c_contiguous:
            raise BackendError(
                f"{node.op.name} {node.label}: input {i} is not contiguous; the CuPy kernel "
                "for this op reads dense rows, insert cont() before it"
            )


def _launch(
    f: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple
) -> Callable[[], None]:
    def go() -> None:
        f(grid, block, args)

    return go


def _elementwise(
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
    types = [CTYPE[_dt(s).name] for s in srcs] + [CTYPE[out_dtype.name]]
    if len(srcs) == 1:
        f = be.fn(f"k_unary<{types[0]}, {types[1]}, {op_code}>")
        args = (_ptr(srcs[0]), _ptr(out), np.int64(n), _ptr(meta), np.float32(scale))
    else:
        f = be.fn(f"k_binary<{types[0]}, {types[1]}, {types[2]}, {op_code}>")
        args = (_ptr(srcs[0]), _ptr(srcs[1]), _ptr(out), np.int64(n), _ptr(meta))
    return _launch(f, (_blocks(n),), (THREADS,), args)


def _c_copy(
    be: CupyBackend, node: Node, out: Any, srcs: list[Any], scratch: Any
) -> Callable[[], None]:
    return _elementwise(be, node.shape, node.dtype, out, srcs, 0)


def _c_scale(
    be: CupyBackend, node: Node, out: Any, srcs: list[Any], scratch: Any
) -> Callable[[], None]:
    p: ScaleParams = node.params  # type: ignore[assignment]
    return _elementwise(be, node.shape, node.dtype, out, srcs, 1, p.scale)


def _binary(code: int) -> Callable[..., Callable[[], None]]:
    def c(
        be: CupyBackend, node: Node, out: Any, srcs: list[Any], scratch: Any
    ) -> Callable[[], None]:
        return _elementwise(be, node.shape, node.dtype, out, srcs, code)

    return c


def _c_get_rows(
    be: CupyBackend, node: Node, out: Any, srcs: list[Any], scratch: Any
) -> Callable[[], None]:
    _need_contiguous(node, srcs, (0, 1))
    table, idx = srcs
    row = math.prod(table.shape[1:])
    n = idx.shape[0]
    f = be.fn(f"k_get_rows<{CTYPE[_dt(table).name]}>")
    return _launch(
        f,
        (_blocks(n * row),),
        (THREADS,),
        (_ptr(table), _ptr(idx), _ptr(out), np.int64(n), np.int64(row), np.int64(table.shape[0])),
    )


def _c_set_rows(
    be: CupyBackend, node: Node, out: Any, srcs: list[Any], scratch: Any
) -> Callable[[], None]:
    _need_contiguous(node, srcs, (1, 2))
    _, src, idx = srcs
    row = math.prod(src.shape[1:])
    n = idx.shape[0]
    f = be.fn(f"k_set_rows<{CTYPE[_dt(src).name]}, {CTYPE[node.dtype.name]}>")
    return _launch(
        f,
        (_blocks(n * row),),
        (THREADS,),
        (_ptr(src), _ptr(idx), _ptr(out), np.int64(n), np.int64(row), np.int64(out.shape[0])),
    )


def _c_rms_norm(
    be: CupyBackend, node: Node, out: Any, srcs: list[Any], scratch: Any
) -> Callable[[], None]:
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
    types = ", ".join(CTYPE[t.name] for t in (_dt(x), _dt(w), _dt(r), node.dtype))
    f = be.fn(f"k_rms_norm<{types}>")
    args = (
        _ptr(x),
        _ptr(w),
        _ptr(r),
        _ptr(out),
        np.int32(d),
        np.float32(p.eps),
        np.int32(len(srcs) >= 2),
        np.int32(len(srcs) == 3),
    )
    return _launch(f, (rows,), (threads,), args)


def _c_rope(
    be: CupyBackend, node: Node, out: Any, srcs: list[Any], scratch: Any
) -> Callable[[], None]:
    _need_contiguous(node, srcs, (0, 1))
    p: RopeParams = node.params  # type: ignore[assignment]
    x, pos = srcs
    n, h, d = node.shape
    total = n * h * d
    if total == 0:
        return lambda: None
    f = be.fn(f"k_rope<{CTYPE[_dt(x).name]}, {CTYPE[node.dtype.name]}>")
    args = (
        _ptr(x),
        _ptr(pos),
        _ptr(out),
        np.int64(total),
        np.int32(h),
        np.int32(d),
        np.int32(p.n_dims),
        np.int32(p.mode is RopeMode.NEOX),
        np.float64(p.base),
        np.float64(p.freq_scale),
    )
    return _launch(f, (_blocks(total),), (THREADS,), args)


def _attn_rows(n: int, h: int, hk: int) -> int:
    """Blocks along the first grid axis: one per query token, kv head and group of query heads."""
    return n * hk * -(-(h // hk) // ATTN_GB)


def _attn_splits(rows: int, m: int) -> int:
    """Key splits so that few query rows (decode) still fill the GPU: about 8 blocks per SM."""
    want = max(1, -(-1056 // max(rows, 1)))
    return max(1, min(want, -(-m // ATTN_KEYS), 1024))  # kernels.cu MAX_SPLITS


def _c_attention(
    be: CupyBackend, node: Node, out: Any, srcs: list[Any], scratch: Any
) -> Callable[[], None]:
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
    splits = _attn_splits(rows, m)
    chunk = -(-m // splits) if m else 1
    f = be.fn(f"k_attention<{CTYPE[_dt(q).name]}, {CTYPE[_dt(k).name]}, {CTYPE[_dt(v).name]}>")
    part = _ptr(scratch) if splits > 1 else np.uint64(0)
    args = (
        _ptr(q),
        _ptr(k),
        _ptr(v),
        _ptr(qpos),
        _ptr(kpos),
        _ptr(out),
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
    main = _launch(f, (rows, splits), (32 * ATTN_WARPS,), args)
    if splits == 1:
        return main
    comb = _launch(
        be.fn("k_attn_combine"), (n * h,), (128,), (part, _ptr(out), np.int32(splits), np.int32(dv))
    )

    def both() -> None:
        main()
        comb()

    return both


def _uses_gemv(m: int, b_dtype: DType) -> bool:
    return m <= GEMV_MAX_M and b_dtype == f32


def _c_mul_mat(
    be: CupyBackend, node: Node, out: Any, srcs: list[Any], scratch: Any
) -> Callable[[], None]:
    _need_contiguous(node, srcs, (0, 1))
    a, b = srcs
    n_out, k = a.shape
    m = b.size // k if k else 0
    if m == 0 or n_out == 0:
        return lambda: None
    wt = _dt(a)
    if _uses_gemv(m, _dt(b)):
        vec = 4 if wt == f32 else 8
        vec_ok = int(k % vec == 0 and a.data.ptr % 16 == 0 and b.data.ptr % 16 == 0)
        wpr = 1  # warps per output row: split K when rows alone cannot fill the GPU
        while wpr < 8 and n_out * wpr < 64 * 132 and wpr * 32 * vec <= k:
            wpr *= 2
        f = be.fn(f"k_gemv<{CTYPE[wt.name]}, {wpr}>")
        args = (
            _ptr(a),
            _ptr(b),
            _ptr(out),
            np.int32(m),
            np.int32(n_out),
            np.int32(k),
            np.int32(vec_ok),
        )
        return _launch(f, (-(-n_out // (8 // wpr)),), (256,), args)
    if wt.name not in CUDA_DTYPE:
        raise BackendError(f"MUL_MAT {node.label}: weight type {wt} has no cuBLAS path")
    cast = None
    bb = b
    if _dt(b) != wt:  # cuBLAS multiplies equal types: cast the activation into scratch
        bb = cp.ndarray((m, k), wt.numpy, memptr=scratch.data)
        cast = _elementwise(be, (m, k), wt, bb, [b.reshape(m, k)], 0)
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


_COMPILERS: dict[Op, Callable[..., Callable[[], None]]] = {
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
}
