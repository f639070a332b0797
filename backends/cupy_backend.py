"""The CUDA backend, through CuPy: with its cuBLAS handle (``cuda_blas``), the only module of
streamgraph that imports cupy.

Built around plans that are captured once and replayed, not around calling CuPy per node:

* Kernels are our own (``kernels.cu``, compiled by NVRTC on first use of each type combination
  and cached by CuPy on disk); ``compile`` binds a node's pointers, grid and arguments once,
  so a run is a list of prepared launches, and a CUDA-graph replay of that list.
* Matrix products with few rows (decode) use a matrix-vector kernel that keeps every row of
  the matrix in flight at once (16-byte loads, all blocks resident); larger ones call cuBLAS
  ``gemmEx`` through a handle bound to our stream before any capture (``cupy.matmul`` refuses
  to run under capture; batch is folded into M). A f32 activation meeting a 16-bit weight is
  cast into planned scratch first.
* Memory is ours: every arena, weight and cache is one ``cudaMalloc`` (``cupy.cuda.Memory``),
  arrays are views at planned offsets; nothing is taken from CuPy's pool during a forward pass,
  whose reuse of freed blocks is unsafe under graph replay.
* Inputs go through pinned staging buffers and ``memcpyAsync`` on the compute stream; outputs
  come back the same way.

* Launches go through the driver's ``cuLaunchKernelEx`` with arguments packed once and, on
  Hopper, programmatic dependent launch: a kernel starts (and loads its weights) while the one
  before it finishes (``backends.cuda_driver``).
* Groups found by the fusion pass (``engine.passes.fusion``) run as one kernel each
  (``backends.cuda_fused``): decode is launch-bound, so fewer launches is the main lever.

How each op becomes a launch is ``backends.cuda_launch``, ``cuda_matvec``, ``cuda_matmul`` and
``cuda_attention``; this module owns the device: memory, streams, capture, the NVRTC module
cache, cuBLAS. Inputs that a row kernel needs dense but that arrive strided are copied into
planned scratch first (the elementwise kernels take any strides).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import cupy as cp  # ImportError here: the registry turns it into a one-line BackendError
import numpy as np

from backends import cuda_attention, cuda_launch, cuda_matmul, cuda_matvec, cuda_spec
from backends.base import Backend, BackendError, FusedGroup, Quantized
from backends.cuda_blas import Cublas
from backends.cuda_driver import DriverLauncher, load_driver
from backends.cuda_fused import FUSED_COMPILERS
from backends.cuda_launch import (
    CTYPE,
    STRIDED_OPS,
    THREADS,
    Job,
    aligned,
    blocks,
    dtype_of_array,
    elementwise,
    ptr,
)
from backends.cuda_source import kernel_defines, kernel_source
from backends.cuda_spec import CudaSpec
from graph.dtypes import DType
from graph.ir import Node
from graph.ir import contiguous_strides as _contiguous

__all__ = ["CupyBackend"]

COMPILERS = {**cuda_launch.COMPILERS, **cuda_matmul.COMPILERS, **cuda_attention.COMPILERS}
"""How each compute op becomes prepared launches (see the three modules)."""

H2D, D2H = 1, 2  # cudaMemcpyKind


class _CudaEvent:
    """A CUDA event with the interface's ``wait(stream)``; recorded and waited on inside a
    capture it becomes an edge of the graph."""

    def __init__(self) -> None:
        self.event = cp.cuda.Event(disable_timing=True)

    def record(self, stream: Any) -> None:
        self.event.record(stream)

    def wait(self, stream: Any) -> None:
        stream.wait_event(self.event)

    def synchronize(self) -> None:
        self.event.synchronize()


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
        # every launch, copy and capture of this backend goes to one stream; stream() makes others
        self.compute_stream = cp.cuda.Stream(non_blocking=True)
        self.compute_stream.use()  # kernels launch on the current stream: make it ours
        self._bound = self.compute_stream  # the stream launches are being prepared for
        self._blas = {self.compute_stream.ptr: Cublas(self.compute_stream.ptr)}
        # every byte this backend took from the device: arenas, caches, weights, workspaces
        self.bytes_allocated = 32 << 20
        self._source = kernel_source()  # one text: backends.cuda_source
        self._functions: dict[str, Any] = {}
        self._keep: list[Any] = []  # device metadata arrays bound into launches
        self.kernels = {op: self._unsupported for op in COMPILERS}
        props = cp.cuda.runtime.getDeviceProperties(0)
        self.sm_count = int(props["multiProcessorCount"])
        self.compute_capability = 10 * int(props["major"]) + int(props["minor"])
        # the most dynamic shared memory a block may opt in to (227 KiB on Hopper)
        self.smem_optin = int(
            props.get("sharedMemPerBlockOptin")
            or cp.cuda.Device().attributes.get("MaxSharedMemoryPerBlockOptin", 0)
        )
        self._spec: CudaSpec | None = None
        lib = load_driver()
        self._driver = DriverLauncher(lib, self.compute_stream.ptr) if lib is not None else None
        # programmatic dependent launch: Hopper (compute capability 9.0) and later
        self.pdl = self._driver is not None and int(props["major"]) >= 9
        # decode attention: its key splits merged by a second launch ("kernel"), or by the last
        # block to finish ("last_block": a fence and an atomic, measured 1.7 us slower per layer)
        self.attn_merge = "kernel"
        # dependents launched at a kernel's start crowd the GPU with waiting blocks (measured:
        # a decode step 19% slower); at its blocks' exit they gain a little
        self.pdl_trigger_at_start = False
        # matrix-vector kernels trigger dependents after their last weight loads (PDL_TRIGGER_LATE)
        # None: at 16 warps a block only (H100 7B steps: Q4_K +4.8%, Q8_0 +7.3%, the 270M +3%;
        # at 4 or 8 warps up to 30% slower: benchmarks/NOTES.md)
        self.pdl_trigger_late: bool | None = None
        self.defines: tuple[str, ...] = ()  # extra kernels.cu macros (experiments, profiling)
        # decode products on block weights: "int16", "float", "staged", or "auto" (staged where
        # it measured faster, else int16): cuda_matvec.MATVEC_Q_CHOICES, quant_kernels.cu
        self.matvec_q = "auto"
        self.matvec_q_rows: int | None = None  # their rows per warp; None: the launch policy
        # warps per block of every matrix-vector kernel (16-bit and block types): each block
        # builds the product's whole input (norms, GeGLU, the int16 quantization) in shared
        # memory, so fewer, larger blocks build it fewer times (cuda_matvec.MATVEC_WARPS_CHOICES)
        self.matvec_warps = cuda_matvec.MATVEC_WARPS
        # prompt attention over a 16-bit cache: "flash" (tensor cores, flash_attention.cu) or
        # "simple" (k_attention, f32 arithmetic, the kernel f32 caches always use)
        self.prompt_attention = "flash"
        self.pdl_kernels: tuple[str, ...] | None = None  # names launched with PDL; None: all

    def _unsupported(self, *args: Any) -> None:  # pragma: no cover - compile() is the entry
        raise BackendError("the CuPy backend runs nodes through compile(), not kernels[op]")

    @property
    def spec(self) -> CudaSpec:
        """The device's facts for planning: the nominal CUDA spec with this GPU's SM count."""
        if self._spec is None:
            self._spec = cuda_spec.nominal(self.sm_count, self.describe())
        return self._spec

    def memory_in_use(self) -> int:
        """The device's used memory as the driver reports it (every process and context on
        it), after CuPy's pools hand back their cached blocks."""
        cp.get_default_memory_pool().free_all_blocks()
        free, total = cp.cuda.runtime.memGetInfo()
        return int(total - free)

    def describe(self) -> str:
        props = cp.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        total = cp.cuda.runtime.memGetInfo()[1]
        cuda = cp.cuda.runtime.runtimeGetVersion()
        return f"cupy {cp.__version__}, {name} ({total / 2**30:.0f} GiB), CUDA runtime {cuda}"

    # -- kernels -------------------------------------------------------------------------------
    def fn(self, expr: str) -> Any:
        """The compiled kernel of a template instance: ``k_binary<float, bf16_t, float, 0>``."""
        defines = kernel_defines(
            self.matvec_warps, self.pdl_trigger_at_start, self.pdl_trigger_late, self.defines
        )
        key = f"{expr} {' '.join(defines)}"
        f = self._functions.get(key)
        if f is None:
            options = ("-std=c++17", *(f"-D{d}" for d in defines))
            mod = cp.RawModule(code=self._source, options=options, name_expressions=[expr])
            f = mod.get_function(expr)
            self._functions[key] = f
        return f

    # -- memory --------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> Any:
        """One cudaMalloc of ``nbytes``, zeroed (caches and arenas start clean)."""
        n = max(int(nbytes), 1)
        mem = cp.cuda.Memory(n)
        self.bytes_allocated += n
        cp.cuda.runtime.memsetAsync(mem.ptr, 0, n, self.compute_stream.ptr)
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
        dt = dtype_of_array(arrays[0])
        out = self.view(self.alloc(dt.nbytes(shape)), 0, shape, dt, _contiguous(shape))
        offset = 0
        for a in arrays:
            src = a if a.flags.c_contiguous else cp.ascontiguousarray(a)
            cp.cuda.runtime.memcpyAsync(
                out.data.ptr + offset, src.data.ptr, src.nbytes, 3, self.compute_stream.ptr
            )
            offset += src.nbytes
        self.compute_stream.synchronize()
        return out

    def byte_buffer(self, arr: Any) -> Any:
        return cp.ndarray((arr.nbytes,), cp.uint8, memptr=arr.data)

    def from_host(self, host: np.ndarray) -> Any:
        host = np.ascontiguousarray(host)
        buf = self.alloc(host.nbytes)
        dst = cp.ndarray(host.shape, host.dtype, memptr=buf.data)
        if host.nbytes:
            cp.cuda.runtime.memcpyAsync(
                dst.data.ptr, host.ctypes.data, host.nbytes, H2D, self.compute_stream.ptr
            )
            self.compute_stream.synchronize()
        return dst

    def to_host(self, arr: Any) -> np.ndarray:
        out = np.empty(arr.shape, arr.dtype)
        src = arr if arr.flags.c_contiguous else cp.ascontiguousarray(arr)
        if out.nbytes:
            cp.cuda.runtime.memcpyAsync(
                out.ctypes.data, src.data.ptr, out.nbytes, D2H, self.compute_stream.ptr
            )
            self.compute_stream.synchronize()
        return out

    def copy_from_host(self, dst: Any, host: np.ndarray) -> None:
        stage, copy = self.input_stage(dst)
        stage[...] = host
        copy()

    def pinned(self, host: np.ndarray) -> np.ndarray:
        """A page-locked copy of ``host``, checked to be page-locked: pageable memory copies
        ~8x slower (6.5 against 55 GB/s on an H200), so streaming refuses it. The array holds
        the page-locked memory, and gives it back when the last reference to it goes."""
        mem = cp.cuda.alloc_pinned_memory(max(host.nbytes, 1))
        out = np.frombuffer(mem, host.dtype, host.size).reshape(host.shape)
        out[...] = host
        attrs = cp.cuda.runtime.pointerGetAttributes(out.ctypes.data)
        if int(getattr(attrs, "type", 1)) != 1:  # cudaMemoryTypeHost
            raise BackendError("host memory for streamed weights is not page-locked")
        return out

    def copy_launch(
        self, dst: Any, host: np.ndarray, stream: Any | None = None
    ) -> Callable[[], None]:
        nbytes, ptr, src = dst.nbytes, dst.data.ptr, host.ctypes.data
        on = (stream if stream is not None else self.compute_stream).ptr
        memcpy = cp.cuda.runtime.memcpyAsync

        def copy() -> None:
            memcpy(ptr, src, nbytes, H2D, on)

        return copy

    def input_stage(self, dst: Any) -> tuple[np.ndarray, Callable[[], None]]:
        """A pinned host buffer and a ``memcpyAsync`` from it on the compute stream (captured
        with the kernels in graph mode)."""
        nbytes = dst.nbytes
        pinned = cp.cuda.alloc_pinned_memory(max(nbytes, 1))
        stage = np.frombuffer(pinned, dst.dtype, dst.size).reshape(dst.shape)
        ptr, host, stream = dst.data.ptr, stage.ctypes.data, self.compute_stream.ptr
        memcpy = cp.cuda.runtime.memcpyAsync

        def copy_in(_keep: Any = pinned) -> None:
            if nbytes:
                memcpy(ptr, host, nbytes, H2D, stream)

        return stage, copy_in

    def output_stage(
        self, src: Any, stream: Any | None = None
    ) -> tuple[np.ndarray, Callable[[], None]]:
        """A pinned host buffer and a ``memcpyAsync`` into it on ``stream`` (the compute stream
        by default); a strided output is first made dense on the device by a copy kernel, so the
        whole stays capturable."""
        on = stream if stream is not None else self.compute_stream
        gather: Callable[[], None] | None = None
        if not src.flags.c_contiguous:
            dense = self.view(
                self.alloc(src.nbytes), 0, src.shape, dtype_of_array(src), _contiguous(src.shape)
            )
            with self._binding(on):
                gather = elementwise(self, src.shape, dtype_of_array(src), dense, [src], 0)
            src = dense
        nbytes = src.nbytes
        pinned = cp.cuda.alloc_pinned_memory(max(nbytes, 1))
        stage = np.frombuffer(pinned, src.dtype, src.size).reshape(src.shape)
        ptr, host, stream = src.data.ptr, stage.ctypes.data, on.ptr
        memcpy = cp.cuda.runtime.memcpyAsync

        def copy_out(_keep: Any = (pinned, src)) -> None:
            if gather is not None:
                gather()
            if nbytes:
                memcpy(host, ptr, nbytes, D2H, stream)

        return stage, copy_out

    def check_fits(self, nbytes: int, what: str) -> None:
        free, total = cp.cuda.runtime.memGetInfo()
        if nbytes > free:
            raise BackendError(
                f"{what} needs {nbytes / 2**30:.2f} GiB of GPU memory; {free / 2**30:.2f} GiB of "
                f"{total / 2**30:.2f} GiB are free"
            )

    # -- execution -----------------------------------------------------------------------------
    def stream(self) -> Any:
        return cp.cuda.Stream(non_blocking=True)

    def main_stream(self) -> Any:
        return self.compute_stream

    def event(self) -> _CudaEvent:
        return _CudaEvent()

    def synchronize(self) -> None:
        self.compute_stream.synchronize()

    def mark(self, stream: Any | None = None) -> Any:
        """A timing CUDA event recorded on ``stream`` (the compute stream by default): the GPU
        stamps it when the stream's earlier work is complete. The schedule's own events are
        made with ``disable_timing`` (cheaper to record and wait on); these are not. A mark
        between two kernels also ends a programmatic dependent launch's overlap of them, so a
        traced run is slightly slower than an untraced eager one."""
        ev = cp.cuda.Event()  # block=False, disable_timing=False
        ev.record(stream if stream is not None else self.compute_stream)
        return ev

    def mark_seconds(self, mark: Any, origin: Any) -> float:
        """``cudaEventElapsedTime`` (milliseconds, ~0.5 us resolution) in seconds; both events
        must be complete, so call it after the streams are synchronized."""
        try:
            return float(cp.cuda.get_elapsed_time(origin, mark)) / 1e3
        except cp.cuda.runtime.CUDARuntimeError as e:
            raise BackendError(
                f"a timing mark is not complete (synchronize its stream first): {e}"
            ) from None

    def capture(self, launch: Callable[[], None]) -> Callable[[], None]:
        s = self.compute_stream
        s.begin_capture()
        try:
            launch()
        finally:
            graph = s.end_capture()
        return lambda: graph.launch(s)

    def fill_normal(self, arr: Any, seed: int, mean: float, std: float) -> None:
        """Fill a contiguous f32/f16/bf16 array with N(mean, std) draws, deterministically."""
        f = self.fn(f"k_fill_normal<{CTYPE[dtype_of_array(arr).name]}>")
        n = arr.size
        f(
            (blocks(n),),
            (THREADS,),
            (ptr(arr), np.int64(n), np.uint64(seed), np.float32(mean), np.float32(std)),
        )

    # -- planning ------------------------------------------------------------------------------
    def compile(
        self,
        node: Node,
        out: Any,
        srcs: Sequence[Any],
        scratch: Any | None,
        fixed: Sequence[bool] = (),
        stream: Any | None = None,
    ) -> Callable[[], None]:
        """Bind one node; inputs its kernel needs dense are first copied into planned scratch.
        Its launches go to ``stream`` (the compute stream by default)."""
        with self._binding(stream):
            return self._compile(node, out, srcs, scratch, fixed)

    def _compile(
        self,
        node: Node,
        out: Any,
        srcs: Sequence[Any],
        scratch: Any | None,
        fixed: Sequence[bool],
    ) -> Callable[[], None]:
        srcs = list(srcs)
        fixed = list(fixed) + [False] * (len(srcs) - len(fixed))
        copies: list[Callable[[], None]] = []
        offset = 0
        if node.op not in STRIDED_OPS:
            for i, s in enumerate(srcs):
                if isinstance(s, Quantized) or s.flags.c_contiguous:
                    continue  # block weights are whole rows of the file, dense by construction
                dense = cp.ndarray(s.shape, s.dtype, memptr=scratch.data + offset)
                fixed[i] = False  # the copy is written by a kernel of this run
                offset += aligned(s.nbytes)
                copies.append(elementwise(self, s.shape, dtype_of_array(s), dense, [s], 0))
                srcs[i] = dense
        own = scratch[offset:] if scratch is not None and offset < scratch.size else None
        launch = COMPILERS[node.op](Job(self, node, out, srcs, own, fixed))
        if not copies:
            return launch
        steps = [*copies, launch]

        def with_copies() -> None:
            for step in steps:
                step()

        return with_copies

    def prepare(
        self,
        f: Any,
        grid: tuple[int, ...],
        block: tuple[int, ...],
        args: tuple,
        smem: int = 0,
    ) -> Callable[[], None]:
        """One launch of kernel ``f`` with everything bound, on the compute stream: through the
        driver with programmatic dependent launch where the GPU has it (``self.pdl``; see
        ``backends.cuda_driver``), else through CuPy."""
        if self._driver is not None:
            handle = getattr(f, "kernel", f).ptr  # RawKernel -> its CUfunction
            pdl = self.pdl and (
                self.pdl_kernels is None or str(f.name).startswith(self.pdl_kernels)
            )
            return self._driver.prepare(
                int(handle), grid, block, args, smem, pdl, stream_ptr=self._bound.ptr
            )

        stream = self._bound

        def go() -> None:
            with stream:
                f(grid, block, args, shared_mem=smem)

        return go

    def compile_fused(
        self,
        fusion: FusedGroup,
        graph: Any,
        arrays: Sequence[Any],
        scratch: Mapping[int, Any] | None = None,
        stream: Any | None = None,
    ) -> Callable[[], None] | None:
        with self._binding(stream):
            return FUSED_COMPILERS[fusion.pattern](self, graph, fusion, arrays, scratch or {})

    @contextlib.contextmanager
    def _binding(self, stream: Any | None) -> Iterator[None]:
        """Launches prepared inside go to ``stream`` (and cuBLAS to a handle of its own)."""
        saved = self._bound
        self._bound = stream if stream is not None else self.compute_stream
        try:
            yield
        finally:
            self._bound = saved

    @property
    def blas(self) -> Cublas:
        """The cuBLAS handle of the stream being compiled for: one per stream, each with its
        own workspace (two streams must not share one)."""
        key = self._bound.ptr
        handle = self._blas.get(key)
        if handle is None:  # a side stream: a smaller workspace keeps streams' VRAM cost low
            handle = self._blas[key] = Cublas(key, workspace_bytes=8 << 20)
            self.bytes_allocated += 8 << 20
        return handle

    def counters(self, n: int) -> Any:
        """``n`` zeroed int32 counters that live as long as the backend (kernels' tickets)."""
        arr = cp.zeros(max(n, 1), np.int32)
        self._keep.append(arr)
        return arr

    def meta(self, values: Sequence[int]) -> Any:
        arr = cp.asarray(np.asarray(values, np.int64))
        self._keep.append(arr)
        return arr
