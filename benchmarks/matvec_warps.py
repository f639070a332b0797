"""Decode steps of GGUF files under each size of the matrix-vector kernels' blocks.

    python benchmarks/matvec_warps.py -m 7b-f16.gguf -m 7b-q4k.gguf [--warps 2,4,8,16]
        [--defines ,MV_LOAD_NC] [--matvec-q int16,staged] [-n 32]

Every matrix-vector kernel (16-bit ``k_matvec``, the block types' ``k_matvec_q16``,
``k_matvec_qs`` and ``k_matvec_q``) builds its whole input in shared memory in every block:
the norm and residual before the attention and MLP products, GeGLU before the down
projection, the int16 quantization of the block kernels. At 4 warps a 7B product runs ~400
blocks, and each of them reads the input (16-44 KB, four vectors for the norm) from L2:
blocks of 8 or 16 warps read it 2-4 times less often, at the price of fewer, larger blocks
to balance.

For each file, one session; for each ``--warps`` (the backend's ``matvec_warps``, compiled in
as ``MV_WARPS``, 16 by default) and each set of ``--defines`` (kernels.cu experiment macros,
``+``-joined within a set, the empty set first: ``MV_LOAD_NC`` loads the 16-bit weights
through the read-only path without L1 allocation; ``PDL_TRIGGER_LATE=0`` or ``=1`` sets the
late trigger of dependents, on by default at 16 warps only; ``Q4K_CLASSIC`` decodes Q4_K
through the generic path) and each ``--matvec-q`` (the block types'
decode kernel: ``auto``, the default, ``int16`` (``k_matvec_q16``), ``staged`` (its
arithmetic with the weights through a cp.async ring); a 16-bit file runs the same kernels
under every one) its step executors are rebuilt, three
greedy steps run (compiled, captured, replayed), then ``-r`` rounds of ``-n`` timed steps; the
table gives tokens/s (median round), ms a step and the weights' bytes a step at that rate
(what an HBM-bound step is measured by), and the largest difference of one fixed step's
logits from the first variant's, relative to their largest magnitude (summation order differs
with the block size: ~1e-5 is rounding, a wrong kernel is ~1).
The variants alternate round by round, so a drift of the machine falls on all of them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


Variant = tuple[int, tuple[str, ...], str]  # warps, macros, the block types' decode kernel


def _steps(sess: Any, variant: Variant, n: int) -> tuple[float, Any]:
    """Tokens/s of ``n`` greedy steps with ``variant`` (warps per matrix-vector block, the
    kernels' extra macros and the block kernel), and the logits of the step after them: a
    variant that is faster because it computes something else shows here (compared with the
    first variant's)."""
    import cupy as cp

    be = sess.backend
    be.matvec_warps, be.defines, be.matvec_q = variant
    sess._executors.clear()  # noqa: SLF001 - rebound with this block size on first use
    sess.reset()
    sess.prefill([1], "none")
    tok = 1
    for _ in range(3):  # compiled, captured, replayed
        tok = sess.decode_greedy(tok)
    cp.cuda.runtime.deviceSynchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        tok = sess.decode_greedy(tok)
    tps = n / (time.perf_counter() - t0)
    sess.reset()  # the same state for every variant: one prompt token, then token 2
    sess.prefill([1], "none")
    return tps, sess.decode(2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-m", "--model", action="append", required=True, help="a GGUF file (repeat)")
    p.add_argument(
        "--warps", default="16,4,8", help="warps per block to compare (the first: the reference)"
    )
    p.add_argument("--defines", default="", help="macro sets to compare, e.g. ,MV_LOAD_NC")
    p.add_argument(
        "--matvec-q", default="auto", help="block decode kernels to compare, e.g. int16,auto"
    )
    p.add_argument("-n", "--n-gen", type=int, default=32, help="timed steps a round")
    p.add_argument("-r", "--rounds", type=int, default=3)
    args = p.parse_args()
    warps = [int(w) for w in args.warps.split(",")]
    macro_sets = [tuple(m for m in d.split("+") if m) for d in args.defines.split(",")]
    kernels = args.matvec_q.split(",")
    variants = [(w, m, q) for w in warps for m in macro_sets for q in kernels]

    from backends.cuda_matvec import MATVEC_Q_CHOICES, MATVEC_WARPS_CHOICES
    from engine.model.gguf import config_for, open_gguf
    from engine.model.session import Session
    from engine.options import Options

    bad = [w for w in warps if w not in MATVEC_WARPS_CHOICES]
    if bad:
        p.error(f"--warps {bad}: each must be one of {MATVEC_WARPS_CHOICES}")
    bad_q = [q for q in kernels if q not in MATVEC_Q_CHOICES]
    if bad_q:
        p.error(f"--matvec-q {bad_q}: each must be one of {MATVEC_Q_CHOICES}")
    print(
        "| file | warps | macros | block kernel | t/s | ms/step | weights GB/s | logits vs first |"
    )
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for path in args.model:
        options = Options(backend="cupy", n_ctx=args.n_gen * 4 + 64, n_batch=512)
        file = open_gguf(path)
        cfg = config_for(file, options)
        sess = Session(cfg, file.weights_as(cfg, stack=options.stack), options=options)
        weight_bytes = cfg.n_bytes(options.stack)
        rates: dict[Variant, list[float]] = {v: [] for v in variants}
        logits: dict[Variant, np.ndarray] = {}
        for r in range(args.rounds):
            for v in variants if r % 2 == 0 else variants[::-1]:
                tps, last = _steps(sess, v, args.n_gen)
                rates[v].append(tps)
                logits[v] = last
        first = logits[variants[0]]
        for v in variants:
            tps = statistics.median(rates[v])
            diff = float(np.abs(logits[v] - first).max() / max(np.abs(first).max(), 1e-30))
            print(
                f"| {Path(path).name} | {v[0]} | {'+'.join(v[1]) or '-'} | {v[2]} | {tps:.2f} | "
                f"{1e3 / tps:.3f} | {weight_bytes * tps / 1e9:.0f} | {diff:.1e} |",
                flush=True,
            )
        del sess
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
