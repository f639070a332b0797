"""The CUDA backend's device facts, readable without CUDA: a machine with no GPU plans for one.

    spec = nominal()                 # an H200: 132 SMs
    spec.scratch_bytes(node, srcs)   # what the CuPy kernels of ``node`` need in the arena

``backends.cupy_backend.CupyBackend.spec`` is the same with the device's own SM count and name.
Like the compiler modules, this one imports no CuPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from backends import cuda_attention, cuda_launch, cuda_matmul, cuda_matvec
from backends.cuda_fused import FUSED_COMPILERS
from backends.spec import DeviceSpec
from graph.ir import Node

__all__ = ["CudaSpec", "nominal", "COMPILED_OPS"]

COMPILED_OPS = frozenset(
    {*cuda_launch.COMPILERS, *cuda_matmul.COMPILERS, *cuda_attention.COMPILERS}
)
"""The ops the CuPy backend has launches for."""

H200_SMS = 132


@dataclass(frozen=True)
class CudaSpec(DeviceSpec):
    """The CuPy backend's facts: scratch is what its kernels need (strided inputs made dense,
    a f32 activation cast for cuBLAS, attention's key-split partials, sized by the SM count)."""

    def scratch_bytes(self, node: Node, srcs: Sequence[Node]) -> int:
        own = cuda_matmul.scratch_bytes(node, srcs)
        own += cuda_attention.scratch_bytes(node, srcs, self.sm_count)
        return sum(cuda_launch.dense_copy_bytes(node, srcs)) + own


def nominal(sm_count: int = H200_SMS, name: str = "NVIDIA H200 (nominal)") -> CudaSpec:
    """The spec of a CUDA device with ``sm_count`` SMs (an H200's by default)."""
    return CudaSpec(
        backend="cupy",
        device="gpu",
        ops=COMPILED_OPS,
        fused_patterns=frozenset(FUSED_COMPILERS),
        matvec_max_rows=cuda_matvec.GEMV_MAX_M,
        sm_count=sm_count,
        block_types=cuda_matmul.BLOCK_TYPES,
        keeps_block_types=True,
        cache_type="f16",
        prefix_attention=True,  # k_attn_decode and k_flash_attn stop at the query's row
        name=name,
    )
