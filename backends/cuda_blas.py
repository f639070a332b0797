"""cuBLAS through ctypes: a handle bound to one stream, with a workspace of its own, whose
``gemmEx`` captures into a CUDA graph (``backends.cuda_matmul`` calls it).

CuPy's cuBLAS wrappers rebind the handle to the current stream and refuse to run while a stream
is capturing; calling the library directly is what lets matrix products be part of a captured
decode step (cuBLAS supports capture once stream and workspace are fixed).
"""

from __future__ import annotations

import ctypes

import cupy as cp  # only the backend imports this module, and it imports cupy anyway
import numpy as np

from backends.base import BackendError

__all__ = ["Cublas"]


class Cublas:
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
        self.one, self.zero = np.ones(1, np.float32), np.zeros(1, np.float32)  # alpha, beta
        gemm = self.lib.cublasGemmEx
        gemm.restype = ctypes.c_int
        i, p = ctypes.c_int, ctypes.c_void_p
        gemm.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i]
        self.gemm_ex = gemm

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise BackendError(f"{what} failed with cuBLAS status {status}")
