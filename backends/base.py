"""The backend interface: a device that owns memory, kernels for every compute op, streams, events.

ggml's backend is four small tables (device, stream, buffer type, buffer); ours is one class
per backend with the same parts. The executor (``engine.runtime.executor``) only ever talks to this
interface, found by name through ``backends.get_backend``.

Kernels share one calling convention: ``kernel(node, out, *srcs)``. ``out`` is the node's
pre-made array (a view into the arena, or into a KV cache for SET_ROWS); sources are arrays in
the node's source order. A kernel computes in f32 and stores into ``out``'s dtype. Views
(RESHAPE, PERMUTE, VIEW) have no kernel: their arrays are made once from the node's layout, so
running them costs nothing. Leaves have no kernel either: the executor binds them.
"""

from __future__ import annotations

import functools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from backends.spec import DeviceSpec
from graph.dtypes import DType
from graph.ir import Node
from graph.ops import LEAF_OPS, VIEW_OPS, Op

__all__ = [
    "Backend",
    "Kernel",
    "Stream",
    "Event",
    "FusedGroup",
    "BackendError",
    "COMPUTE_OPS",
    "Quantized",
    "dequantize",
    "on_host",
]

Array = Any  # a backend array: numpy.ndarray here, cupy.ndarray on the GPU
Kernel = Callable[..., None]

COMPUTE_OPS: frozenset[Op] = frozenset(Op) - LEAF_OPS - VIEW_OPS
"""The ops every backend must have a kernel for (asserted by the tests)."""


class BackendError(RuntimeError):
    """A backend that cannot be used here (missing library, no device) or cannot run an op."""


class Quantized:
    """A weight kept in a GGUF block type: ``data``, a backend's uint8 array of the file's
    bytes, shape (rows, row bytes), with the logical ``shape`` (rows, K) and block ``dtype``
    they encode. It goes wherever an array goes (weights, ring slots, pinned host memory);
    kernels read ``dtype`` to pick their block decoder, and the executor checks ``shape`` and
    ``dtype`` as it checks any weight's. A uint8 array alone could not say its type: Q5_0 and
    Q5_K both take 11 bits for every 16 elements."""

    __slots__ = ("data", "dtype", "shape")

    def __init__(self, data: Any, dtype: DType, shape: tuple[int, ...]) -> None:
        if not dtype.is_quantized:
            raise TypeError(f"Quantized holds a block type, not {dtype.name}")
        want = (*shape[:-1], dtype.nbytes((shape[-1],)))
        if tuple(data.shape) != want or str(data.dtype) != "uint8":
            raise ValueError(
                f"{dtype.name} {shape} is stored as uint8 {want}, "
                f"not {data.dtype} {tuple(data.shape)}"
            )
        self.data, self.dtype, self.shape = data, dtype, tuple(shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def with_data(self, data: Any) -> Quantized:
        """The same weight over other bytes (a copy on the device, a ring slot, pinned pages)."""
        return Quantized(data, self.dtype, self.shape)

    def __repr__(self) -> str:
        return f"Quantized({self.dtype.name}, {self.shape}, {type(self.data).__module__})"


def on_host(w: Any) -> bool:
    """Whether a weight's bytes are in host memory: a NumPy array, or blocks over one."""
    return isinstance(w.data if isinstance(w, Quantized) else w, np.ndarray)


def dequantize(w: Quantized, rows: Any = None) -> np.ndarray:
    """f32 values of a host ``Quantized`` (of ``rows`` only, where given): the ``gguf``
    package's dequantization, the reference every block kernel is checked against."""
    from gguf import GGMLQuantizationType, quants

    raw = np.asarray(w.data if rows is None else w.data[rows])
    kind = GGMLQuantizationType[w.dtype.name.upper()]
    return np.asarray(quants.dequantize(raw, kind), np.float32).reshape(*raw.shape[:-1], -1)


class Event(Protocol):
    def record(self, stream: Stream) -> None: ...
    def wait(self, stream: Stream) -> None: ...
    def synchronize(self) -> None: ...


class FusedGroup(Protocol):
    """What a backend sees of a fused group (``engine.passes.fusion.Fusion``)."""

    pattern: str
    nodes: tuple[int, ...]  # members in graph order; the last is the anchor
    outputs: tuple[int, ...]  # members read outside the group
    roles: Mapping[str, int]


class Stream(Protocol):
    def synchronize(self) -> None: ...


class _HostMark:
    """A host-clock timestamp (``Backend.mark``), None until its stream reaches it."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t: float | None = None

    def stamp(self) -> None:
        self.t = time.perf_counter()


class Backend(ABC):
    """One device kind. Holds no per-graph state: executors own their arenas and arrays.

    ``spec`` is what the planner knows of the device (``backends.spec.DeviceSpec``): the same
    facts ``backends.device_spec(name)`` gives without the hardware, with the hardware's own."""

    name: str
    kernels: Mapping[Op, Kernel]
    spec: DeviceSpec

    # -- memory --------------------------------------------------------------------------------
    @abstractmethod
    def alloc(self, nbytes: int) -> Array:
        """One flat byte buffer (an arena) of ``nbytes``."""

    @abstractmethod
    def view(
        self,
        buf: Array,
        byte_offset: int,
        shape: tuple[int, ...],
        dtype: DType,
        strides: tuple[int, ...],
    ) -> Array:
        """An array over ``buf`` at ``byte_offset`` with element ``strides``; no copy."""

    @abstractmethod
    def from_host(self, host: np.ndarray) -> Array:
        """A backend copy of a host array (weights, constants)."""

    @abstractmethod
    def to_host(self, arr: Array) -> np.ndarray:
        """A host copy of a backend array (outputs)."""

    def weight_from_host(self, w: Any) -> Any:
        """A weight in this backend's memory: a host array or ``Quantized`` copied (its bytes),
        one already there as it is."""
        if not on_host(w):
            return w
        if isinstance(w, Quantized):
            return w.with_data(self.from_host(np.ascontiguousarray(w.data)))
        return self.from_host(w)

    def weight_to_host(self, w: Any) -> Any:
        """A weight in host memory: a backend one copied (``Quantized`` stays ``Quantized``),
        one already there as it is."""
        if on_host(w):
            return w
        if isinstance(w, Quantized):
            return w.with_data(self.to_host(w.data))
        return self.to_host(w)

    @abstractmethod
    def copy_from_host(self, dst: Array, host: np.ndarray) -> None:
        """Write ``host`` into the existing backend array ``dst`` (inputs), casting if needed."""

    def concat_rows(self, arrays: Sequence[Array]) -> Array:
        """One new array of the arrays stacked along the first axis (done once, at load)."""
        return np.concatenate(arrays)

    def byte_buffer(self, arr: Array) -> Array:
        """The flat byte buffer behind a contiguous array, for making views of it."""
        return arr.reshape(-1).view(np.uint8)

    # -- execution -----------------------------------------------------------------------------
    @abstractmethod
    def stream(self) -> Stream:
        """A new stream (an in-order queue of work)."""

    @abstractmethod
    def main_stream(self) -> Stream:
        """The stream single-stream runs, and inputs' and outputs' copies, go to."""

    @abstractmethod
    def event(self) -> Event:
        """A new event (a point in a stream that other streams can wait on)."""

    @abstractmethod
    def synchronize(self) -> None:
        """Block the host until all queued work is done."""

    def describe(self) -> str:
        return self.name

    def memory_in_use(self) -> int | None:
        """Bytes of device memory in use now, measured (None where there is no device)."""
        return None

    # -- timing (engine.views.trace) ----------------------------------------------------------
    def mark(self, stream: Stream | None = None) -> Any:
        """A timestamp queued on ``stream`` (the main stream by default): taken when the stream
        reaches it, after everything queued there before it, so two marks around a launch time
        the launch on the device, not its issue on the host. Read with ``mark_seconds`` once
        the stream's work is done.

        This default is the host clock, stamped by a callable issued through ``on_stream``: on
        an inline stream that is now, on a worker-thread stream when the worker runs it."""
        mark = _HostMark()
        self.on_stream(mark.stamp, stream)()
        return mark

    def mark_seconds(self, mark: Any, origin: Any) -> float:
        """Seconds from ``origin`` to ``mark`` (two of this backend's marks, on any streams),
        once both are reached (after the streams are synchronized)."""
        if mark.t is None or origin.t is None:
            raise BackendError(
                "a timing mark was never reached: synchronize its stream before reading it "
                "(or a launch before it failed)"
            )
        return float(mark.t - origin.t)

    # -- binding (all called once, when an executor is built) ------------------------------------
    def compile(
        self,
        node: Node,
        out: Array,
        srcs: Sequence[Array],
        scratch: Array | None,
        fixed: Sequence[bool] = (),
        stream: Stream | None = None,
    ) -> Callable[[], None]:
        """One launch of ``node`` with everything bound: what the executor calls per run.
        ``fixed[i]``: source ``i`` is never written while the graph runs (a weight or constant),
        so a kernel may read it before earlier kernels finish. ``stream``: where it runs (the
        main stream by default)."""
        kernel = functools.partial(self.kernels[node.op], node, out, *srcs)
        return self.on_stream(kernel, stream)

    def on_stream(self, fn: Callable[[], None], stream: Stream | None) -> Callable[[], None]:
        """``fn`` issued to ``stream``: for backends whose streams take host callables."""
        if stream is None or stream is self.main_stream():
            return fn
        submit = stream.submit  # type: ignore[attr-defined]
        return functools.partial(submit, fn)

    def compile_fused(
        self,
        fusion: FusedGroup,
        graph: Any,
        arrays: Sequence[Array],
        scratch: Mapping[int, Array] | None = None,
        stream: Stream | None = None,
    ) -> Callable[[], None] | None:
        """The launches of a whole fused group (``engine.passes.fusion.Fusion``; ``arrays`` indexed
        by node id, ``scratch`` by member id), or None to have its members run one by one (the
        default)."""
        return None

    def check_fits(self, nbytes: int, what: str) -> None:  # noqa: B027 - optional hook
        """Refuse, before allocating, a plan that cannot fit in the device's free memory."""

    def capture(self, launch: Callable[[], None]) -> Callable[[], None]:
        """Record ``launch`` once and return a replay of it (a CUDA graph on a GPU).

        Backends with no launch overhead to remove return ``launch`` itself.
        """
        return launch

    def pinned(self, host: np.ndarray) -> np.ndarray:
        """``host``'s bytes in memory the device can copy from at full speed (page-locked on a
        GPU); a backend that cannot pin raises rather than copy slowly."""
        return host

    def copy_launch(
        self, dst: Array, host: np.ndarray, stream: Stream | None = None
    ) -> Callable[[], None]:
        """A launch that copies ``host`` (from ``pinned``) into ``dst`` on ``stream``."""
        return self.on_stream(functools.partial(self.copy_from_host, dst, host), stream)

    def input_stage(self, dst: Array) -> tuple[np.ndarray, Callable[[], None]]:
        """Where a run's input for ``dst`` is written on the host, and the launch that moves
        it into ``dst`` (made once per input). The move is queued with the kernels, so a
        captured run includes it: a replay is then the whole step, inputs to outputs."""
        host = np.empty(dst.shape, np.dtype(str(dst.dtype)))
        return host, functools.partial(self._copy_in, dst, host)

    def _copy_in(self, dst: Array, host: np.ndarray) -> None:
        self.copy_from_host(dst, host)

    def output_stage(
        self, src: Array, stream: Stream | None = None
    ) -> tuple[np.ndarray, Callable[[], None]]:
        """The host array that holds ``src`` once the queued work is done, and the launch that
        moves it there (made once per output, queued after the kernels; on ``stream``, the
        producer's, where the backend can)."""
        host = np.empty(src.shape, np.dtype(str(src.dtype)))

        def copy_out() -> None:
            host[...] = self.to_host(src)

        return host, copy_out
