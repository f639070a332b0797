"""Kernel launches through the CUDA driver's ``cuLaunchKernelEx``, with arguments packed once.

Two things CuPy's ``RawKernel.__call__`` cannot give a decode step:

- *Programmatic dependent launch* (Hopper and later): a kernel launched with the
  programmatic-stream-serialization attribute may start while the previous kernel on the stream
  is still running; it waits (``griddepcontrol.wait``, ``PDL_WAIT`` in kernels.cu) before it
  touches that kernel's results. Launch latency and the first weight loads of a matrix product
  then overlap the previous kernel's tail. Captured into a CUDA graph, the dependency becomes a
  programmatic edge, so replays keep the overlap.
- Arguments converted to C once, when the launch is prepared, instead of on every call.

Every kernel in kernels.cu begins with ``PDL_WAIT`` (or does only weight loads before it), which
is what makes launching all of them this way correct. No cupy import here: the backend hands in
the stream and function handles.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["DriverLauncher", "load_driver"]

PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID (cuda.h: CU_LAUNCH_ATTRIBUTE_...)


class _AttrValue(ctypes.Union):
    _fields_ = [("programmatic", ctypes.c_int), ("pad", ctypes.c_char * 64)]


class _Attr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttrValue)]


class _Config(ctypes.Structure):
    _fields_ = [
        ("grid_x", ctypes.c_uint),
        ("grid_y", ctypes.c_uint),
        ("grid_z", ctypes.c_uint),
        ("block_x", ctypes.c_uint),
        ("block_y", ctypes.c_uint),
        ("block_z", ctypes.c_uint),
        ("shared", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_Attr)),
        ("n_attrs", ctypes.c_uint),
    ]


_CTYPES = {
    np.dtype(np.uint64): ctypes.c_uint64,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.float32): ctypes.c_float,
    np.dtype(np.float64): ctypes.c_double,
}


def load_driver() -> Any | None:
    """libcuda with ``cuLaunchKernelEx`` (CUDA 12+), or None."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        fn = getattr(lib, "cuLaunchKernelEx", None)
        if fn is None:
            return None
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        return lib
    return None


class DriverLauncher:
    """Prepared launches on one stream."""

    def __init__(self, lib: Any, stream_ptr: int) -> None:
        self.launch_ex = lib.cuLaunchKernelEx
        self.stream_ptr = stream_ptr

    def prepare(
        self,
        function_ptr: int,
        grid: tuple[int, ...],
        block: tuple[int, ...],
        args: tuple,
        shared: int = 0,
        pdl: bool = True,
        stream_ptr: int | None = None,
    ) -> Callable[[], None]:
        """The launch as a closure; ``pdl``: with programmatic dependent launch; on
        ``stream_ptr`` (default: the launcher's stream)."""
        values = []
        for a in args:
            c = _CTYPES.get(np.asarray(a).dtype)
            if c is None:
                raise TypeError(f"kernel argument {a!r} has no C type here (use numpy scalars)")
            values.append(c(a.item() if hasattr(a, "item") else a))
        params = (ctypes.c_void_p * max(1, len(values)))(
            *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values]
        )
        g = (*grid, 1, 1)[:3]
        b = (*block, 1, 1)[:3]
        attrs = (_Attr * 1)()
        attrs[0].id = PROGRAMMATIC_STREAM_SERIALIZATION
        attrs[0].value.programmatic = 1
        stream = self.stream_ptr if stream_ptr is None else stream_ptr
        cfg = _Config(*g, *b, shared, ctypes.c_void_p(stream), None, 0)
        if pdl:
            cfg.attrs = ctypes.cast(attrs, ctypes.POINTER(_Attr))
            cfg.n_attrs = 1
        fn, launch_ex, cfg_ref = ctypes.c_void_p(function_ptr), self.launch_ex, ctypes.byref(cfg)
        keep = (values, params, attrs, cfg)  # the C structures must outlive the closure's calls

        def go(_keep: tuple = keep) -> None:
            status = launch_ex(cfg_ref, fn, params, None)
            if status != 0:
                raise RuntimeError(f"cuLaunchKernelEx failed with CUDA driver error {status}")

        return go
