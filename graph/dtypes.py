"""Element and storage types.

Compute types (f32, f16, bf16, i32) map onto a NumPy dtype; bf16 comes from ``ml_dtypes``,
imported when a bf16 dtype is first needed (importing it takes ~0.75 s, most of a command's
start-up where no bf16 is involved).
GGUF block types (q8_0, q4_k, ...) are *storage* types only: a weight may be declared with one
so that placement and memory passes count its real bytes, but no kernel computes on it directly
(the loader dequantizes into a compute type).

    >>> from graph.dtypes import f16, q4_k
    >>> f16.nbytes((4, 64)), q4_k.nbytes((2, 256))
    (512, 288)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DType",
    "f32",
    "f16",
    "bf16",
    "i32",
    "u8",
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q8_0",
    "q2_k",
    "q3_k",
    "q4_k",
    "q5_k",
    "q6_k",
    "DTYPES",
    "dtype_of",
    "FLOAT_DTYPES",
]


@dataclass(frozen=True, slots=True)
class DType:
    """A tensor element type: ``block_size`` elements take ``block_bytes`` bytes."""

    name: str
    block_size: int
    block_bytes: int
    is_float: bool
    is_quantized: bool = False

    @property
    def numpy(self) -> np.dtype:
        """The NumPy dtype of a compute type; storage-only block types have none."""
        if self.is_quantized:
            raise TypeError(f"{self.name} is a block-quantized storage type with no NumPy dtype")
        return _numpy(self.name)

    @property
    def itemsize(self) -> int:
        if self.is_quantized:
            raise TypeError(f"{self.name} is block-quantized; use nbytes(shape)")
        return self.block_bytes

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes a contiguous tensor of ``shape`` occupies (rows of blocks for quantized types)."""
        n = math.prod(shape)
        if self.block_size == 1:
            return n * self.block_bytes
        row = shape[-1] if shape else 1
        if row % self.block_size:
            raise ValueError(
                f"{self.name} stores rows in blocks of {self.block_size}; "
                f"a row of {row} elements does not fit"
            )
        return n // self.block_size * self.block_bytes

    def __repr__(self) -> str:
        return self.name


f32 = DType("f32", 1, 4, True)
f16 = DType("f16", 1, 2, True)
bf16 = DType("bf16", 1, 2, True)
i32 = DType("i32", 1, 4, False)
u8 = DType("u8", 1, 1, False)  # raw bytes: the storage of a block-quantized weight's rows
# GGUF block types: (elements per block, bytes per block), as ggml defines them.
q4_0 = DType("q4_0", 32, 18, True, True)
q4_1 = DType("q4_1", 32, 20, True, True)
q5_0 = DType("q5_0", 32, 22, True, True)
q5_1 = DType("q5_1", 32, 24, True, True)
q8_0 = DType("q8_0", 32, 34, True, True)
q2_k = DType("q2_k", 256, 84, True, True)
q3_k = DType("q3_k", 256, 110, True, True)
q4_k = DType("q4_k", 256, 144, True, True)
q5_k = DType("q5_k", 256, 176, True, True)
q6_k = DType("q6_k", 256, 210, True, True)

_PLAIN: dict[str, np.dtype] = {
    "f32": np.dtype(np.float32),
    "f16": np.dtype(np.float16),
    "i32": np.dtype(np.int32),
    "u8": np.dtype(np.uint8),
}


@functools.cache
def _bfloat16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def _numpy(name: str) -> np.dtype:
    return _bfloat16() if name == "bf16" else _PLAIN[name]


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (f32, f16, bf16, i32, u8, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k)
}
FLOAT_DTYPES: tuple[DType, ...] = (f32, f16, bf16)


def dtype_of(x: str | np.dtype | DType | type) -> DType:
    """Our DType for a name (``"bf16"``), a NumPy dtype, or a DType itself."""
    if isinstance(x, DType):
        return x
    if isinstance(x, str) and x in DTYPES:
        return DTYPES[x]
    if isinstance(x, str) and x == "bfloat16":
        return bf16
    try:
        nd = np.dtype(x)
    except TypeError as e:
        raise TypeError(f"unknown dtype {x!r}; known: {', '.join(DTYPES)}") from e
    for name, npd in _PLAIN.items():
        if npd == nd:
            return DTYPES[name]
    if nd.name == "bfloat16" and nd == _bfloat16():
        return bf16
    raise TypeError(
        f"NumPy dtype {nd} has no streamgraph equivalent; use one of f32, f16, bf16, i32"
    )
