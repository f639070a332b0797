"""The CUDA backend's kernel source as one text, the way NVRTC compiles it.

Kept apart from ``cupy_backend`` so that a machine without CuPy or a GPU can read it (the
NVRTC compile check in tests/test_nvrtc_compile.py). Order matters: each file uses what the
ones before it define.
"""

from __future__ import annotations

from pathlib import Path

KERNEL_FILES = ("kernels.cu", "quant_blocks.cuh", "quant_kernels.cu", "flash_attention.cu")
"""kernels.cu (every op, the storage types, PDL), the GGUF block decoders, the kernels that read
blocks, the tensor-core prompt attention."""


def kernel_source() -> str:
    here = Path(__file__).parent
    return "\n".join((here / f).read_text() for f in KERNEL_FILES)
