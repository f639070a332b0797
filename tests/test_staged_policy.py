"""Where the staged block decode kernel (``k_matvec_qs``) runs, checked without a GPU.

``cuda_matvec._bind_staged`` chooses rows per warp, grid and shared memory from the compiled
kernel's registers and the device's facts; a stub device stands in for the CUDA backend
(compiled functions with fixed register counts, an H100's 132 SMs and 227 KiB of opt-in
shared memory, launches recorded instead of prepared). The kernel's arithmetic is checked on
the GPU (tests/test_quantized_gpu.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from backends.base import BackendError, Quantized
from backends.cuda_matvec import (
    MATVEC_Q_CHOICES,
    MVQ_STAGES,
    MVS_PIECES,
    PRE_COPY,
    STAGED_MIN_ROUNDS,
    _bind_staged,
    _matvec_q,
    q_smem,
    staged_ring_bytes,
)
from graph.dtypes import DTYPES

H100_OPTIN = 227 * 1024


class _Array:
    """What the binder reads of a device array: shape, size, strides, dtype, a pointer."""

    def __init__(self, shape: tuple[int, ...], dtype: str = "float32") -> None:
        self.shape, self.ndim = shape, len(shape)
        self.size = int(np.prod(shape))
        self.dtype = np.dtype(dtype)
        item = self.dtype.itemsize
        self.strides = tuple(int(np.prod(shape[i + 1 :])) * item for i in range(len(shape)))
        self.data = SimpleNamespace(ptr=1 << 20)
        self.flags = SimpleNamespace(c_contiguous=True)


class _Device:
    """A stub CUDA backend: every kernel takes ``regs`` registers a thread."""

    def __init__(self, regs: int = 64, optin: int = H100_OPTIN, matvec_q: str = "auto") -> None:
        self.sm_count, self.smem_optin, self.matvec_warps = 132, optin, 16
        self.compute_capability = 90
        self.defines: tuple[str, ...] = ()
        self.matvec_q, self.matvec_q_rows = matvec_q, None
        self.regs, self.compiled = regs, []
        self.regs_of: dict[str, int] = {}  # kernel name -> registers, where not ``regs``

    def fn(self, expr: str) -> SimpleNamespace:
        self.compiled.append(expr)
        regs = self.regs_of.get(expr.split("<")[0], self.regs)
        return SimpleNamespace(
            name=expr, num_regs=regs, shared_size_bytes=128, max_dynamic_shared_size_bytes=0
        )

    def prepare(self, f, grid, block, args, smem):  # noqa: ANN001, ANN201
        return SimpleNamespace(kernel=f.name, grid=grid, block=block, smem=smem)


def _bind(dev: _Device, qtype: str, n_out: int, k: int, m: int = 1, min_rounds: int = 0):  # noqa: ANN202
    dt = DTYPES[qtype]
    w = Quantized(_Array((n_out, dt.nbytes((k,))), "uint8"), dt, (n_out, k))
    x, out = _Array((m, k)), _Array((m, n_out))
    return _bind_staged(dev, w, out, PRE_COPY, (x, x, None, None, None, 0.0, 0.0), False, None,
                        min_rounds)  # fmt: skip


def test_the_launch_holds_the_ring_and_the_input() -> None:
    """Q8_0 11008x4096 (the 7B's gate): two rows a warp (six rows for the busiest warp at
    one, two or three row groups of two: the tie goes to the larger), one block an SM (the
    ring and input take 168 KB), its shared memory the rings plus k_matvec_q16's input."""
    dev = _Device()
    launch = _bind(dev, "q8_0", 11008, 4096)
    assert launch.kernel == f"k_matvec_qs<8, 2, {PRE_COPY}, 1>"
    assert launch.grid == (132,) and launch.block == (512,)
    ring = staged_ring_bytes(DTYPES["q8_0"], 2, 16, MVQ_STAGES, MVS_PIECES)
    assert launch.smem == ring + q_smem(1, 4096, DTYPES["q8_0"])


def test_ring_bytes_follow_the_block_layout() -> None:
    """A round of 32 pieces a lane at one row: Q4_K 8 blocks of 144 bytes (1,152, 72 chunks,
    one more for an unaligned start), Q8_0 64 blocks of 34 (2,176: 136 + 1)."""
    q4k, q8 = DTYPES["q4_k"], DTYPES["q8_0"]
    assert staged_ring_bytes(q4k, 1, 1, 1, 2) == 73 * 16
    assert staged_ring_bytes(q8, 1, 1, 1, 2) == 137 * 16
    assert staged_ring_bytes(q8, 4, 16, 4, 2) == 16 * 4 * 4 * ((32 * 34 + 30) // 16) * 16


def test_few_rounds_a_warp_leave_the_int16_kernel() -> None:
    """4096x4096 gives the busiest warp 4 rounds: below STAGED_MIN_ROUNDS "auto" declines it,
    an explicit "staged" (min_rounds 0) takes it."""
    assert _bind(_Device(), "q8_0", 4096, 4096, min_rounds=STAGED_MIN_ROUNDS) is None
    assert _bind(_Device(), "q8_0", 4096, 4096, min_rounds=0) is not None
    assert _bind(_Device(), "q8_0", 11008, 4096, min_rounds=STAGED_MIN_ROUNDS) is not None


def test_a_ring_beyond_shared_memory_is_declined() -> None:
    """Eight input rows of 4096 take 208 KiB before any ring; a device with 99 KiB of opt-in
    shared memory (sm_86) fits no ring beside a 7B row of 11008."""
    assert _bind(_Device(), "q8_0", 11008, 4096, m=8) is None
    assert _bind(_Device(optin=99 * 1024), "q4_k", 4096, 11008) is None


def test_two_blocks_an_sm_where_registers_and_memory_allow() -> None:
    """At 64 registers and a ring of ~75 KB (Q4_K, one row a warp) two blocks share an SM,
    so the grid doubles; at 119 registers one block fills the register file."""
    assert _bind(_Device(regs=64), "q4_k", 11008, 4096).grid == (264,)
    assert _bind(_Device(regs=119), "q4_k", 11008, 4096).grid == (132,)


def test_an_unknown_matvec_q_names_the_choices() -> None:
    dev = _Device(matvec_q="fastest")
    dt = DTYPES["q8_0"]
    w = Quantized(_Array((8, dt.nbytes((256,))), "uint8"), dt, (8, 256))
    x, out = _Array((1, 256)), _Array((1, 8))
    with pytest.raises(BackendError, match=r"matvec_q 'fastest'.*'auto'"):
        _matvec_q(dev, w, out, PRE_COPY, x, x, None, None, None, 0.0, 0.0, False)
    assert "staged" in MATVEC_Q_CHOICES


@pytest.mark.parametrize(
    ("matvec_q", "qtype", "n_out", "kernel"),
    [
        ("auto", "q8_0", 11008, "k_matvec_qs<8, 2"),  # 12 rounds for the busiest warp
        ("auto", "q8_0", 4096, "k_matvec_q16<8, 1"),  # 4 rounds: int16, one row a warp
        ("auto", "q4_k", 11008, "k_matvec_q16<12, 4"),  # not a staged type
        ("staged", "q8_0", 4096, "k_matvec_qs<8, 2"),  # asked for: taken at any length
        ("staged", "q4_k", 11008, "k_matvec_qs<12, 1"),
        ("int16", "q8_0", 11008, "k_matvec_q16<8, 1"),
    ],
)
def test_the_decode_kernel_each_setting_launches(
    matvec_q: str, qtype: str, n_out: int, kernel: str
) -> None:
    """``matvec_q`` through ``_matvec_q``, as a fused group or a product binds it: "auto"
    stages Q8_0 products long enough to fill the ring and leaves the rest to int16."""
    dev = _Device(matvec_q=matvec_q)
    dev.regs_of = {"k_matvec_q16": 119}  # ptxas's counts: 107-119 (int16), 64 (staged Q4_K R=1)
    dt = DTYPES[qtype]
    w = Quantized(_Array((n_out, dt.nbytes((4096,))), "uint8"), dt, (n_out, 4096))
    x, out = _Array((1, 4096)), _Array((1, n_out))
    launch = _matvec_q(dev, w, out, PRE_COPY, x, x, None, None, None, 0.0, 0.0, False)
    assert launch.kernel.startswith(kernel), (launch.kernel, dev.compiled)


@pytest.mark.parametrize(("rows", "capability"), [(2, 90), (1, 80)])
def test_auto_stays_where_it_was_measured(rows: int, capability: int) -> None:
    """ "auto" stages one-row products on Hopper only (what was timed): two input rows, or an
    Ampere device, keep the int16 kernel."""
    dev = _Device()
    dev.compute_capability = capability
    dt = DTYPES["q8_0"]
    w = Quantized(_Array((11008, dt.nbytes((4096,))), "uint8"), dt, (11008, 4096))
    x, out = _Array((rows, 4096)), _Array((rows, 11008))
    launch = _matvec_q(dev, w, out, PRE_COPY, x, x, None, None, None, 0.0, 0.0, False)
    assert launch.kernel.startswith("k_matvec_q16<8,"), launch.kernel
