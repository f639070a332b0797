"""The CPU reference backend: every op as a short NumPy formula, computed in f32.

This module is the living definition of the ops (see ``graph.ops`` for the prose): the GPU
backend is checked against it. Kernels write into the ``out`` array the executor made for the
node (a view into the arena), so the memory plan is exercised on the CPU exactly as on a GPU.
"""

from __future__ import annotations

import math
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from backends.base import Array, Backend, BackendError, Kernel, Quantized, dequantize
from backends.cuda_matvec import GEMV_MAX_M
from backends.spec import DeviceSpec
from graph.dtypes import DTYPES, DType
from graph.ir import Node
from graph.ops import AttentionParams, Op, RmsNormParams, RopeMode, RopeParams, ScaleParams

__all__ = ["NumpyBackend", "KERNELS"]

F32 = np.float32


def _f32(x: np.ndarray) -> np.ndarray:
    return x if x.dtype == F32 else x.astype(F32)


def _store(out: np.ndarray, value: np.ndarray) -> None:
    out[...] = value


def k_cont(node: Node, out: np.ndarray, x: np.ndarray) -> None:
    out[...] = x


def k_cast(node: Node, out: np.ndarray, x: np.ndarray) -> None:
    out[...] = _f32(x)


def k_get_rows(node: Node, out: np.ndarray, table: Any, idx: np.ndarray) -> None:
    n_rows = table.shape[0]
    if idx.size and (idx.min() < 0 or idx.max() >= n_rows):
        raise IndexError(
            f"row index out of range 0..{n_rows - 1}: {idx[(idx < 0) | (idx >= n_rows)][:8]}"
        )
    if isinstance(table, Quantized):  # only the rows asked for are decoded
        out[...] = dequantize(table, idx)
        return
    out[...] = _f32(table[idx])


def k_add(node: Node, out: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    _store(out, np.add(_f32(a), _f32(b)))


def k_mul(node: Node, out: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    _store(out, np.multiply(_f32(a), _f32(b)))


def k_scale(node: Node, out: np.ndarray, x: np.ndarray) -> None:
    p: ScaleParams = node.params  # type: ignore[assignment]
    _store(out, _f32(x) * F32(p.scale))


def k_rms_norm(
    node: Node,
    out: np.ndarray,
    x: np.ndarray,
    w: np.ndarray | None = None,
    residual: np.ndarray | None = None,
) -> None:
    p: RmsNormParams = node.params  # type: ignore[assignment]
    x32 = _f32(x)
    r = x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + F32(p.eps))
    if w is not None:
        r = r * _f32(w)
    if residual is not None:
        r = r + _f32(residual)
    _store(out, r)


def k_mul_mat(node: Node, out: np.ndarray, a: Any, b: np.ndarray) -> None:
    # a block-quantized weight is decoded whole for each product: the reference, not a fast path
    # (sessions on this backend dequantize once at load)
    w = dequantize(a) if isinstance(a, Quantized) else _f32(a)
    np.matmul(_f32(b), w.T, out=out)


def rope_angles(pos: np.ndarray, p: RopeParams) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of pos * freq_scale * base^(-2i/n_dims), i < n_dims/2, shape (n, n_dims/2)."""
    inv = p.base ** (-np.arange(0, p.n_dims, 2, dtype=np.float64) / p.n_dims)
    theta = pos.astype(np.float64)[:, None] * p.freq_scale * inv[None, :]
    return np.cos(theta).astype(F32), np.sin(theta).astype(F32)


def k_rope(node: Node, out: np.ndarray, x: np.ndarray, pos: np.ndarray) -> None:
    p: RopeParams = node.params  # type: ignore[assignment]
    x32 = _f32(x)
    cos, sin = rope_angles(pos, p)
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    half = p.n_dims // 2
    r = x32.copy()
    if p.mode is RopeMode.NORMAL:
        x0, x1 = x32[..., 0 : p.n_dims : 2], x32[..., 1 : p.n_dims : 2]
        r[..., 0 : p.n_dims : 2] = x0 * cos - x1 * sin
        r[..., 1 : p.n_dims : 2] = x0 * sin + x1 * cos
    else:
        x0, x1 = x32[..., :half], x32[..., half : p.n_dims]
        r[..., :half] = x0 * cos - x1 * sin
        r[..., half : p.n_dims] = x0 * sin + x1 * cos
    _store(out, r)


def attention_mask(q_pos: np.ndarray, kv_pos: np.ndarray, window: int) -> np.ndarray:
    """(n, m) bool: key j visible to query i (causal, non-empty, inside the sliding window)."""
    qp, kp = q_pos[:, None].astype(np.int64), kv_pos[None, :].astype(np.int64)
    visible = (kp >= 0) & (kp <= qp)
    if window:
        visible &= qp - kp < window
    return visible


def _check_prefix_rows(node: Node, visible: np.ndarray, q_pos: np.ndarray) -> None:
    """The promise of ``AttentionParams.prefix_rows`` (GPU kernels stop reading keys at the row
    of the query's position): no query sees a key in a row past its position."""
    past = np.arange(visible.shape[1])[None, :] > q_pos[:, None].astype(np.int64)
    if (visible & past).any():
        i, j = np.argwhere(visible & past)[0]
        raise BackendError(
            f"ATTENTION {node.label}: query {i} at position {q_pos[i]} sees the key in row {j}, "
            "past its position, but the node promises prefix_rows (rows filled in position "
            "order): the cache's row bookkeeping is wrong"
        )


def k_attention(
    node: Node,
    out: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q_pos: np.ndarray,
    kv_pos: np.ndarray,
) -> None:
    p: AttentionParams = node.params  # type: ignore[assignment]
    n_head, n_kv_head = q.shape[1], k.shape[1]
    group = n_head // n_kv_head
    qh = _f32(q).transpose(1, 0, 2)  # (H, n, D)
    kh = np.repeat(_f32(k), group, axis=1).transpose(1, 2, 0)  # (H, D, m)
    vh = np.repeat(_f32(v), group, axis=1).transpose(1, 0, 2)  # (H, m, Dv)
    visible = attention_mask(q_pos, kv_pos, p.window)[None]  # (1, n, m)
    if p.prefix_rows:
        _check_prefix_rows(node, visible[0], q_pos)
    scores = np.where(visible, (qh @ kh) * F32(p.scale), F32(-np.inf))
    top = np.max(scores, axis=-1, keepdims=True, initial=F32(-np.inf))  # m = 0 keys: all masked
    top = np.where(np.isfinite(top), top, F32(0))
    e = np.exp(scores - top)
    denom = e.sum(axis=-1, keepdims=True)
    probs = e / np.where(denom > 0, denom, F32(1))
    _store(out, (probs @ vh).transpose(1, 0, 2))


_GELU_C = F32(math.sqrt(2.0 / math.pi))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return F32(0.5) * x * (F32(1) + np.tanh(_GELU_C * (x + F32(0.044715) * x * x * x)))


def silu(x: np.ndarray) -> np.ndarray:
    # x * sigmoid(x) written with tanh: no overflow for large |x|.
    return F32(0.5) * x * (F32(1) + np.tanh(F32(0.5) * x))


def k_geglu(node: Node, out: np.ndarray, gate: np.ndarray, up: np.ndarray) -> None:
    _store(out, gelu_tanh(_f32(gate)) * _f32(up))


def k_swiglu(node: Node, out: np.ndarray, gate: np.ndarray, up: np.ndarray) -> None:
    _store(out, silu(_f32(gate)) * _f32(up))


def k_set_rows(
    node: Node, out: np.ndarray, dst: np.ndarray, src: np.ndarray, idx: np.ndarray
) -> None:
    n_rows = out.shape[0]
    if idx.size and (idx.min() < 0 or idx.max() >= n_rows):
        raise IndexError(
            f"cache row index out of range 0..{n_rows - 1}: {idx[(idx < 0) | (idx >= n_rows)][:8]}"
        )
    out[idx] = src  # out is dst itself (the node aliases its destination)


def k_argmax(node: Node, out: np.ndarray, x: np.ndarray) -> None:
    out[...] = np.argmax(x, axis=-1)


KERNELS: dict[Op, Kernel] = {
    Op.CONT: k_cont,
    Op.CAST: k_cast,
    Op.GET_ROWS: k_get_rows,
    Op.ADD: k_add,
    Op.MUL: k_mul,
    Op.SCALE: k_scale,
    Op.RMS_NORM: k_rms_norm,
    Op.MUL_MAT: k_mul_mat,
    Op.ROPE: k_rope,
    Op.ATTENTION: k_attention,
    Op.GEGLU: k_geglu,
    Op.SWIGLU: k_swiglu,
    Op.SET_ROWS: k_set_rows,
    Op.ARGMAX: k_argmax,
}


class _Stream:
    """An in-order queue of work. The main stream runs work as it is issued; any other stream
    is a worker thread, so a multi-stream plan really runs concurrently on the CPU (NumPy's
    kernels release the GIL). ``stress`` sleeps a random 0..stress seconds before each task:
    a missing wait between streams then shows up as a wrong result instead of a lucky one."""

    def __init__(self, inline: bool = True, stress: float = 0.0, seed: int | None = None) -> None:
        self.inline = inline
        self.stress = stress
        self._rng = random.Random(seed)
        self._cv = threading.Condition()
        self._pending = 0
        self._error: BaseException | None = None
        if not inline:
            self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
            threading.Thread(target=self._loop, daemon=True, name="numpy-stream").start()

    def submit(self, fn: Callable[[], None]) -> None:
        if self.inline:
            fn()
            return
        with self._cv:
            self._pending += 1
        self._queue.put(fn)

    def _loop(self) -> None:
        while True:
            fn = self._queue.get()
            try:
                if self.stress:
                    time.sleep(self._rng.uniform(0.0, self.stress))
                if self._error is None:  # after a failure the rest of the queue is skipped
                    fn()
            except BaseException as e:  # noqa: BLE001 - handed to the next synchronize()
                self._error = e
            finally:
                with self._cv:
                    self._pending -= 1
                    self._cv.notify_all()

    def synchronize(self) -> None:
        if not self.inline:
            with self._cv:
                self._cv.wait_for(lambda: self._pending == 0)
        if self._error is not None:
            e, self._error = self._error, None
            raise e


class _Graphs:
    """Which capture (CUDA graph) the host is recording or replaying now, if any: CUDA refuses
    to wait outside a capture on an event last recorded inside one (a replay does not record
    the event object), or inside a capture on one recorded outside it. The NumPy backend
    replays by running the launch again, so it tracks this to refuse the same waits."""

    def __init__(self) -> None:
        self.active: int | None = None  # the capture being recorded or replayed
        self.count = 0


class _Event:
    """CUDA's semantics: ``wait`` waits for the most recent ``record`` issued before it, and
    a record inside a capture is only visible to waits inside that capture."""

    def __init__(self, graphs: _Graphs) -> None:
        self._cv = threading.Condition()
        self._issued = 0
        self._done = 0
        self._graphs = graphs
        self._recorded_in: int | None = None  # the capture of the last record, None eager

    def record(self, stream: _Stream) -> None:
        self._recorded_in = self._graphs.active
        with self._cv:
            self._issued += 1
            target = self._issued

        def mark() -> None:
            with self._cv:
                self._done = max(self._done, target)
                self._cv.notify_all()

        stream.submit(mark)

    def wait(self, stream: _Stream) -> None:
        active = self._graphs.active
        if self._issued and self._recorded_in != active:
            where = "a capture" if self._recorded_in is not None else "no capture"
            now = "inside a capture" if active is not None else "outside any capture"
            raise RuntimeError(
                f"waiting {now} on an event last recorded in {where}: CUDA refuses this "
                "(cudaErrorInvalidValue or a capture isolation error)"
            )
        with self._cv:
            target = self._issued

        def block() -> None:
            with self._cv:
                self._cv.wait_for(lambda: self._done >= target)

        stream.submit(block)

    def synchronize(self) -> None:
        with self._cv:
            target = self._issued
            self._cv.wait_for(lambda: self._done >= target)


def _nothing() -> None:
    pass


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


SPEC = DeviceSpec(
    backend="numpy",
    device="cpu",
    ops=frozenset(KERNELS),
    fused_patterns=frozenset(),
    # the reference plans as the GPU does: the same fusion groups (run member by member) and
    # the same arena alignment, so the CPU tests exercise the GPU's plans
    matvec_max_rows=GEMV_MAX_M,
    sm_count=0,
    # every block type, by the gguf package's dequantization on each use: the reference the
    # GPU's block kernels are checked against (sessions here dequantize once at load instead)
    block_types=frozenset(d.name for d in DTYPES.values() if d.is_quantized),
    name="CPU (NumPy)",
)


class NumpyBackend(Backend):
    """The CPU reference. ``stress``: every worker-thread stream (``stream()``) sleeps a random
    0..stress seconds before each task, so a missing wait between streams shows up as a wrong
    result instead of a lucky one (``seed`` makes the delays repeatable). The registry's
    instance (``get_backend("numpy")``) has none; tests make their own."""

    name = "numpy"
    kernels = KERNELS
    spec = SPEC

    def __init__(self, stress: float = 0.0, seed: int = 0) -> None:
        self._main = _Stream(inline=True)
        self._graphs = _Graphs()
        self.stress, self._seed = stress, seed

    def alloc(self, nbytes: int) -> np.ndarray:
        return np.zeros(max(int(nbytes), 1), dtype=np.uint8)

    def view(
        self,
        buf: Array,
        byte_offset: int,
        shape: tuple[int, ...],
        dtype: DType,
        strides: tuple[int, ...],
    ) -> np.ndarray:
        nd = dtype.numpy
        return np.ndarray(
            shape,
            dtype=nd,
            buffer=buf,
            offset=byte_offset,
            strides=tuple(s * nd.itemsize for s in strides),
        )

    def from_host(self, host: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(host)

    def to_host(self, arr: Array) -> np.ndarray:
        return np.array(arr, copy=True)

    def input_stage(self, dst: Array) -> tuple[np.ndarray, Callable[[], None]]:
        return dst, _nothing  # inputs are written straight into the arena

    def output_stage(
        self, src: Array, stream: _Stream | None = None
    ) -> tuple[np.ndarray, Callable[[], None]]:
        return src, _nothing  # outputs are read straight from the arena

    def copy_from_host(self, dst: Array, host: np.ndarray) -> None:
        dst[...] = host

    def stream(self) -> _Stream:
        """A worker-thread stream (with this backend's ``stress``, see ``_Stream``)."""
        self._seed += 1
        return _Stream(inline=False, stress=self.stress, seed=self._seed)

    def main_stream(self) -> _Stream:
        return self._main

    def event(self) -> _Event:
        return _Event(self._graphs)

    def capture(self, launch: Callable[[], None]) -> Callable[[], None]:
        """A replay of ``launch``: running it again under one capture id (no launch overhead to
        save on a CPU), so that its events keep CUDA's rules. As in CUDA, capturing runs
        nothing; the first replay does."""
        graphs = self._graphs
        graphs.count += 1
        graph = graphs.count

        def run() -> None:
            outer, graphs.active = graphs.active, graph
            try:
                launch()
            finally:
                graphs.active = outer

        return run

    def synchronize(self) -> None:
        pass

    def check_fits(self, nbytes: int, what: str) -> None:
        """Refuse what the host's available memory cannot hold (NumPy would fail later, or
        the system would start swapping)."""
        free = _available_memory()
        if free is not None and nbytes > free:
            raise BackendError(
                f"{what} needs {nbytes / 2**30:.2f} GiB of memory; this machine has "
                f"{free / 2**30:.2f} GiB available"
            )

    def describe(self) -> str:
        return f"numpy {np.__version__} (CPU)"
