"""The CUDA backend's kernel source as one text, the way NVRTC compiles it.

Kept apart from ``cupy_backend`` so that a machine without CuPy or a GPU can read it (the
NVRTC compile check in tests/test_nvrtc_compile.py). Order matters: each file uses what the
ones before it define.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

KERNEL_FILES = ("kernels.cu", "quant_blocks.cuh", "quant_kernels.cu", "flash_attention.cu")
"""kernels.cu (every op, the storage types, PDL), the GGUF block decoders, the kernels that read
blocks, the tensor-core prompt attention."""


def kernel_source() -> str:
    here = Path(__file__).parent
    return "\n".join((here / f).read_text() for f in KERNEL_FILES)


def macro_value(defines: Sequence[str], name: str, default: int) -> int:
    """``name``'s value among ``NAME=value`` macros as the compiler takes it (the last that
    sets one), else ``default``."""
    values = [v for k, _, v in (d.partition("=") for d in defines) if k == name and v]
    return int(values[-1]) if values else default


def kernel_defines(
    warps: int, pdl_at_start: bool, pdl_late: bool | None, extra: Sequence[str] = ()
) -> tuple[str, ...]:
    """The macros every kernel is compiled with: ``MV_WARPS`` (the matrix-vector kernels'
    warps a block), ``PDL_TRIGGER_AT_START``, ``PDL_TRIGGER_LATE`` (None: on at 16 warps, the
    setting where it measured faster, as compiled: an experiment's ``MV_WARPS`` counts) and
    ``extra`` (experiments), whose value wins where it names one of the others."""
    warps = macro_value(extra, "MV_WARPS", warps)
    named = {d.partition("=")[0] for d in extra}
    late = warps == 16 if pdl_late is None else pdl_late
    own = {
        "PDL_TRIGGER_AT_START": int(pdl_at_start),
        "PDL_TRIGGER_LATE": int(late),
        "MV_WARPS": warps,
    }
    return (*(f"{k}={v}" for k, v in own.items() if k not in named), *extra)
