"""A decode step of the Gemma 3 270M shape under each launch strategy, side by side.

    python benchmarks/decode_variants.py [--dtype bf16] [--steps 200]

Variants: fusion off/on, and programmatic dependent launch (PDL) off, on for every kernel with
the dependents' launch triggered at kernel start or at exit, or on for the matrix-vector
kernels only. For each: the median ``Session.decode`` time (what ``streamgraph bench`` tg
measures, minus sampling) and the median CUDA-graph replay alone (device events).
"""

from __future__ import annotations

import argparse
import statistics
import time

from backends import get_backend
from engine.model.session import Session
from engine.model.weights import device_weights
from engine.runtime.executor import Executor
from graph.dtypes import dtype_of
from graph.models import preset

VARIANTS = {
    "no fusion, no PDL": dict(fusion=False, pdl=False),
    "fusion, no PDL": dict(fusion=True, pdl=False),
    "fusion, PDL, trigger at start": dict(fusion=True, pdl=True, start=True),
    "fusion, PDL, trigger at exit": dict(fusion=True, pdl=True, start=False),
    "fusion, PDL for matvec only, trigger at start": dict(
        fusion=True, pdl=True, start=True, only=("k_matvec",)
    ),
    "fusion, PDL for matvec only, trigger at exit": dict(
        fusion=True, pdl=True, start=False, only=("k_matvec",)
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--steps", type=int, default=200)  # stays within one 256-row KV pad
    ap.add_argument("--ctx", type=int, default=1024)
    args = ap.parse_args()
    import cupy as cp

    be = get_backend("cupy")
    cfg = preset("gemma3-270m").replace(dtype=dtype_of(args.dtype))
    w = device_weights(cfg, be, seed=0)
    print(be.describe())
    print("| variant | decode() ms | t/s | replay ms | launches |\n|---|---:|---:|---:|---:|")
    for label, v in VARIANTS.items():
        be.pdl = bool(v["pdl"]) and be._driver is not None
        be.pdl_trigger_at_start = bool(v.get("start", True))
        be.pdl_kernels = v.get("only")  # type: ignore[assignment]
        sess = Session(cfg, w, be, n_ctx=args.ctx, n_batch=16, fusion=bool(v["fusion"]))
        sess.prefill(list(range(2, 18)))
        tok = 3
        for _ in range(5):
            sess.decode(tok)
        ex = sess.executor(sess.step_key(1, sess.n_past + 1))
        fed: dict = {}
        real = ex.set_inputs

        def spy(inputs: dict, _real=real, _fed=fed) -> None:  # noqa: ANN001
            _fed.update(inputs)
            _real(inputs)

        ex.set_inputs = spy  # type: ignore[method-assign]
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            sess.decode(tok, copy=False)
            times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        a, b = cp.cuda.Event(), cp.cuda.Event()
        replays = []
        for _ in range(args.steps):
            Executor.set_inputs(ex, fed)
            a.record(be.compute_stream)
            ex._replay()
            b.record(be.compute_stream)
            b.synchronize()
            replays.append(cp.cuda.get_elapsed_time(a, b))
        print(
            f"| {label} | {step * 1e3:.3f} | {1 / step:.0f} | "
            f"{statistics.median(replays):.3f} | {ex.n_launches} |",
            flush=True,
        )
        del sess
    be.pdl, be.pdl_trigger_at_start, be.pdl_kernels = be._driver is not None, False, None


if __name__ == "__main__":
    main()
