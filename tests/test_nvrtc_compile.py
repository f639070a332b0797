"""The CUDA kernels compile with NVRTC, checked where no GPU is: NVRTC needs none.

The CUDA backend compiles ``backends.cuda_source.kernel_source()`` with NVRTC on first use of
each template instance, on the GPU machine; a compile error would first show there as a failed
launch. Here the kernel families are instantiated (each storage type, each GGUF block type,
the decode products' rows per warp, input rows and prologues, each head dim of the tensor-core
attention) for Hopper, the experiment macros on the kernels they change, the tensor-core
attention for Ampere and for Turing (where its body compiles to nothing: it is never chosen
below compute capability 8.0). Needs the NVRTC library (``nvidia-cuda-nvrtc-cu12``, a test
extra); skipped without it.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from backends.cuda_launch import CTYPE, QT_ID
from backends.cuda_matvec import GEMV_MAX_M, MATVEC_Q_KERNELS, MATVEC_WARPS, PRE_COPY, PRE_NORM
from backends.cuda_source import kernel_defines, kernel_source

TYPES = list(CTYPE.values())  # float, half_t, bf16_t
QTS = sorted(QT_ID.values())
QKERNELS = tuple(MATVEC_Q_KERNELS.values())  # k_matvec_q16, k_matvec_q, k_matvec_qs


def _nvrtc() -> ctypes.CDLL:
    nvrtc = pytest.importorskip("nvidia.cuda_nvrtc", reason="pip install nvidia-cuda-nvrtc-cu12")
    roots = [Path(p) / "lib" for p in nvrtc.__path__]
    libs = sorted(p for root in roots for p in root.glob("libnvrtc.so*") if "alt" not in p.name)
    if not libs:
        pytest.skip("nvidia-cuda-nvrtc-cu12 has no libnvrtc for this platform")
    return ctypes.CDLL(str(libs[0]))


def _flash() -> list[str]:
    return [
        f"k_flash_attn<{q}, {kv}, {d}, {32 if d > 128 else 64}>"
        for q in ("float",)
        for kv in TYPES[1:]
        for d in (64, 128, 256)
    ]


def _blocks(variants: bool) -> list[str]:
    """The block-type kernels: every type at one launch shape, and (``variants``) the other
    rows per warp, input rows and prologues on one type."""
    out = []
    for qt in QTS:
        out += [f"k_dequant_f16<{qt}>", f"k_get_rows_q<{qt}>"]
        out += [f"{k}<{qt}, 1, {PRE_COPY}, 1>" for k in QKERNELS]
    if variants:
        q4k = QT_ID["q4_k"]
        for k in QKERNELS:
            out += [f"{k}<{q4k}, {r}, {PRE_COPY}, {GEMV_MAX_M}>" for r in (2, 4)]
            out += [f"{k}<{q4k}, 1, {pre}, 1>" for pre in range(PRE_NORM, PRE_COPY)]
    return out


def _matvecs() -> list[str]:
    """The matrix-vector kernels (all of which MV_WARPS sizes): each prologue on a 16-bit type
    and on the block types through both decode kernels."""
    out = [f"k_matvec<{t}, 1, {pre}, 1>" for t in TYPES for pre in range(PRE_NORM, PRE_COPY + 1)]
    out += [f"k_matvec<{TYPES[1]}, 4, {PRE_COPY}, {GEMV_MAX_M}>"]
    for qt in QTS:
        for k in QKERNELS:
            out += [f"{k}<{qt}, 1, {pre}, 1>" for pre in (PRE_NORM, PRE_COPY)]
    return out


def _everything() -> list[str]:
    out = _flash() + _blocks(variants=True) + ["k_attn_combine", "k_split_f16"]
    for t in TYPES:
        out += [f"k_attention<float, {t}, {t}>"]
        out += [
            f"k_attn_decode<float, {t}, {t}, {g}, {d}>" for g in (1, 2, 3, 4) for d in (128, 256)
        ]
        out += [f"k_matvec<{t}, {r}, {PRE_COPY}, {GEMV_MAX_M}>" for r in (1, 4)]
        out += [f"k_matvec<{t}, 1, {PRE_NORM}, 1>", f"k_gemv<{t}, 4>", f"k_get_rows<{t}>"]
        out += [f"k_argmax<{t}>", f"k_rope_store<{t}>", f"k_set_rows<float, {t}>"]
        out += [f"k_rope<{t}, {t}>", f"k_rms_norm<{t}, float, float, {t}>"]
    return out


def _compile(
    lib: ctypes.CDLL, arch: str, defines: tuple[str, ...], names: list[str]
) -> tuple[int, str]:
    prog = ctypes.c_void_p()
    src = kernel_source().encode()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"kernels.cu", 0, None, None) == 0
    try:
        for expr in names:
            assert lib.nvrtcAddNameExpression(prog, expr.encode()) == 0, expr
        opts = [b"-std=c++17", f"--gpu-architecture={arch}".encode()]
        opts += [f"-D{d}".encode() for d in kernel_defines(MATVEC_WARPS, False, None, defines)]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        return rc, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# (architecture, macros, instances): everything on Hopper; the experiment macros on the kernels
# they change; Ampere's tensor-core path; Turing, where the flash kernel's body is left out
CASES = {
    "sm_90": ("sm_90", (), _everything),
    "sm_90-variants": ("sm_90", ("QLOAD_SHORTS", "QV_PIECES=8"), lambda: _blocks(False)),
    "sm_90-staged-ring": ("sm_90", ("MVQ_STAGES=2", "MVS_PIECES=8"), lambda: _blocks(True)),
    "sm_90-q4k-classic": ("sm_90", ("Q4K_CLASSIC",), lambda: _blocks(False)),
    "sm_80-blocks": ("sm_80", (), lambda: _blocks(False)),
    "sm_75-blocks": ("sm_75", (), lambda: _blocks(False)),
    "sm_90-matvec-warps-4": ("sm_90", ("MV_WARPS=4",), lambda: _matvecs()),
    "sm_90-matvec-warps-2": ("sm_90", ("MV_WARPS=2",), lambda: _matvecs()),
    "sm_90-matvec-load-nc": ("sm_90", ("MV_LOAD_NC",), lambda: _matvecs()),
    "sm_80-matvec-load-nc": ("sm_80", ("MV_LOAD_NC",), lambda: _matvecs()),
    "sm_90-pdl-late-off": ("sm_90", ("PDL_TRIGGER_LATE=0",), lambda: _matvecs() + _blocks(True)),
    "sm_90-staged-trigger-warp0": ("sm_90", ("MVQS_TRIGGER_WARP0=1",), lambda: _blocks(True)),
    "sm_80-flash": ("sm_80", (), _flash),
    "sm_75-flash": ("sm_75", (), _flash),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_compile(case: str) -> None:
    arch, defines, names = CASES[case]
    rc, log = _compile(_nvrtc(), arch, defines, names())
    assert rc == 0, f"NVRTC for {arch} {' '.join(defines)} failed:\n{log[-4000:]}"


def test_kernel_defines_follow_the_backends_settings() -> None:
    """What ``CupyBackend.fn`` compiles with: the late trigger on at 16 warps a block (where
    it measured faster) unless set, and an experiment's macro in place of the backend's."""
    assert kernel_defines(16, False, None) == (
        "PDL_TRIGGER_AT_START=0",
        "PDL_TRIGGER_LATE=1",
        "MV_WARPS=16",
    )
    assert "PDL_TRIGGER_LATE=0" in kernel_defines(8, False, None)
    assert "PDL_TRIGGER_LATE=0" in kernel_defines(16, False, False)
    assert "PDL_TRIGGER_LATE=1" in kernel_defines(4, False, True)
    assert "PDL_TRIGGER_AT_START=1" in kernel_defines(16, True, None)
    got = kernel_defines(16, False, None, ("PDL_TRIGGER_LATE=0", "MV_WARPS=8", "Q4K_CLASSIC"))
    assert got == ("PDL_TRIGGER_AT_START=0", "PDL_TRIGGER_LATE=0", "MV_WARPS=8", "Q4K_CLASSIC")
    # the warps compiled in decide the default, an experiment's MV_WARPS included
    assert kernel_defines(16, False, None, ("MV_WARPS=8",)) == (
        "PDL_TRIGGER_AT_START=0",
        "PDL_TRIGGER_LATE=0",
        "MV_WARPS=8",
    )
