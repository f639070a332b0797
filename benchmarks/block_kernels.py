"""The block-type kernels alone on the 7B shape's matrices, against the measured HBM bandwidth.

    python benchmarks/block_kernels.py [--types q4_k,q8_0] [--rows 1,4] [--prompt 512]

For each GGUF block type and each Llama-2-7B matrix (4096x4096, the 11008x4096 gate and up,
the 4096x11008 down projection, the 32000x4096 head): every decode kernel (``k_matvec_q16``,
int16 input; ``k_matvec_q``, f32; ``k_matvec_qs``, int16 with the weight staged through
shared memory) at 1..8 rows in µs and in GB/s of the blocks' bytes, as
a share of the rate at which a kernel that only reads streams HBM (the bound of a product); the
bf16 ``k_matvec`` on the same shape beside them; and the prompt path (tiles decoded to f16,
cuBLAS per tile) at ``--prompt`` rows in TFLOP/s, beside one bf16 cuBLAS product.
Each figure is the median of CUDA-graph replays timed with events; a replay holds ``--chain``
launches of the product (as a decode step's graph holds one after another, the next one's
weight loads issued while the last finishes), and the figure is per launch: one launch alone
per replay would add the replay's own fixed cost (~3 µs) to every product.

``--sweep`` times the int16 kernel's variants on one row: rows per warp (the launch policy's
choice, or forced), 32-element pieces a lane loads per row per pass (QV_PIECES), and how
2-byte aligned blocks are read (QLOAD_SHORTS: 2-byte loads instead of aligned words shifted
into place).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from shapes_7b import gemm, per_launch, read_rate, timed  # noqa: E402

from backends import get_backend  # noqa: E402
from backends.base import Quantized  # noqa: E402
from backends.cuda_launch import Job  # noqa: E402
from backends.cuda_matmul import _mul_mat_q, _q_scratch  # noqa: E402
from backends.cuda_matvec import MATVEC_Q_VARIANTS, PRE_COPY, matvec  # noqa: E402
from engine.model.dequant import BLOCK_SCALES  # noqa: E402
from graph.dtypes import DTYPES  # noqa: E402

SHAPES = {"wq": (4096, 4096), "gate": (11008, 4096), "down": (4096, 11008), "head": (32000, 4096)}


def blocks(name: str, n: int, k: int) -> np.ndarray:
    """Random blocks with small finite f16 scales: the bytes a kernel reads are all that
    matters for its speed."""
    dt = DTYPES[name]
    per = dt.block_bytes
    raw = np.random.default_rng(0).integers(0, 256, (n, dt.nbytes((k,))), dtype=np.uint8)
    view = raw.reshape(-1, per)
    for at in BLOCK_SCALES[name.upper()]:
        view[:, at : at + 2] = np.array([1e-3], np.float16).view(np.uint8)
    return raw


def sweep(be, types: list[str], hbm: float, time_launch) -> None:
    """One row through k_matvec_q16 in each variant: µs per launch and share of the HBM read
    rate, rows per warp (None: the launch policy) by the kernels' defines."""
    import cupy as cp

    shapes = (None, 1, 2, 4)
    variants = ((), ("QV_PIECES=8",), ("QLOAD_SHORTS",), ("QV_PIECES=8", "QLOAD_SHORTS"))
    head = " | ".join(f"R={r or 'policy'}" for r in shapes)
    print(f"| type | matrix | defines | {head} |")
    print("|---|---|---|" + "---:|" * len(shapes))
    be.matvec_q = "int16"
    for t in types:
        for name, (n, k) in SHAPES.items():
            w = Quantized(cp.asarray(blocks(t, n, k)), DTYPES[t], (n, k))
            x = cp.asarray(np.random.default_rng(2).standard_normal((1, k)).astype(np.float32))
            y = cp.empty((1, n), np.float32)
            for defines in variants:
                be.defines = defines
                cells = []
                for r in shapes:
                    be.matvec_q_rows = r
                    ms = time_launch(matvec(be, w, y, PRE_COPY, x, x, early=True), 20)
                    cells.append(f"{ms * 1e3:.1f} / {w.nbytes / ms / 1e6 / hbm:.0%}")
                label = " ".join(defines) or "-"
                print(f"| {t} | {name} | {label} | " + " | ".join(cells) + " |")
    be.defines, be.matvec_q_rows = (), None


class _Node:  # what _mul_mat_q reads of a node
    label = "bench"


def main() -> None:
    import cupy as cp
    import ml_dtypes

    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="q4_0,q5_0,q8_0,q4_k,q5_k,q6_k")
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--chain", type=int, default=20)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    be = get_backend("cupy")
    print(be.describe())
    hbm = read_rate(be)
    print(f"HBM reads: {hbm:.0f} GB/s (a kernel that only reads 1 GiB)\n")
    rows = [int(r) for r in args.rows.split(",")]

    def timed_launch(fn, reps: int) -> float:
        return per_launch(be, fn, args.chain, reps)

    if args.sweep:
        sweep(be, args.types.split(","), hbm, timed_launch)
        return
    bf16 = np.dtype(ml_dtypes.bfloat16)
    print("| type | matrix | rows | µs | GB/s | share of reads |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (n, k) in SHAPES.items():
        w = cp.asarray(np.random.default_rng(1).standard_normal((n, k)).astype(bf16))
        for m in rows:
            x = cp.asarray(np.random.default_rng(2).standard_normal((m, k)).astype(np.float32))
            y = cp.empty((m, n), np.float32)
            fn = matvec(be, w, y, PRE_COPY, x, x, early=True)
            if fn is None:
                continue
            ms = timed_launch(fn, 20)
            gbs = w.nbytes / ms / 1e6
            print(f"| bf16 | {name} | {m} | {ms * 1e3:.1f} | {gbs:.0f} | {gbs / hbm:.0%} |")
    saved = be.matvec_q
    for t in args.types.split(","):
        for name, (n, k) in SHAPES.items():
            w = Quantized(cp.asarray(blocks(t, n, k)), DTYPES[t], (n, k))
            for m in rows:
                x = cp.asarray(np.random.default_rng(2).standard_normal((m, k)).astype(np.float32))
                y = cp.empty((m, n), np.float32)
                for variant in MATVEC_Q_VARIANTS:
                    be.matvec_q = variant
                    label = f"| {t} {variant} | {name} | {m} |"
                    fn = matvec(be, w, y, PRE_COPY, x, x, early=True)
                    if fn is None:
                        print(f"{label} - | - | - |")
                        continue
                    ms = timed_launch(fn, 20)
                    gbs = w.nbytes / ms / 1e6
                    print(f"{label} {ms * 1e3:.1f} | {gbs:.0f} | {gbs / hbm:.0%} |")
    be.matvec_q = saved
    m = args.prompt
    print("\n| type | matrix | rows | ms | TFLOP/s | bf16 cuBLAS ms |")
    print("|---|---|---:|---:|---:|---:|")
    for t in args.types.split(","):
        for name, (n, k) in SHAPES.items():
            w = Quantized(cp.asarray(blocks(t, n, k)), DTYPES[t], (n, k))
            x = cp.asarray(np.random.default_rng(2).standard_normal((m, k)).astype(np.float32))
            y = cp.empty((m, n), np.float32)
            scratch = cp.empty(_q_scratch(m, n, k), cp.uint8)
            fn = _mul_mat_q(Job(be, _Node(), y, [w, x], scratch, [True, False]))
            ms = timed(be, fn, 10)
            wb = cp.asarray(np.random.default_rng(1).standard_normal((n, k)).astype(bf16))
            xb = x.astype(bf16)
            ref = timed(be, gemm(be, wb, xb, y, n, m, k, "f32"), 10)
            tf = 2 * m * n * k / ms / 1e9
            print(f"| {t} | {name} | {m} | {ms:.3f} | {tf:.0f} | {ref:.3f} |")


if __name__ == "__main__":
    main()
