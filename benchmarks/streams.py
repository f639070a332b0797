"""One stream against several: the seed's table (llama.cpp #4719), redone on our engine.

    python benchmarks/streams.py [--reps 200]

(a) 8 independent matrix-vector branches reading one input, d = 1024 and 4096 (bf16 weights),
summed on the device by a tree of adds (one output);
(b) a decode step and (c) a 512-token prefill of the Gemma 3 270M shape (bf16, generated
weights), with stacked projections (the default: a chain, nothing to overlap) and with separate
Q/K/V and gate/up products (branches per layer). Each row: streams (1, 2, 4, 8, auto), eager
launches or a captured graph, the median time, the speed-up over one stream in the same mode,
and the GPU memory the run holds: weights plus every byte the backend took for it (arenas,
caches, each stream's cuBLAS workspace; ``CupyBackend.bytes_allocated``), and its growth over one
stream.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from backends import get_backend
from engine.model.session import Session
from engine.model.weights import device_weights
from engine.options import Options
from engine.runtime.executor import Executor
from graph import GraphBuilder, f32
from graph.dtypes import bf16
from graph.models import preset

STREAMS: tuple[Any, ...] = (1, 2, 4, 8, "auto")


def used_bytes(be: Any) -> int:
    return int(be.bytes_allocated)


def timed(fn: Any, sync: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def fan_out(be: Any, cp: Any, d: int, reps: int) -> list[tuple]:
    g = GraphBuilder()
    x = g.input("x", (1, d), f32)
    outs = [g.mul_mat(g.weight(f"w{i}", (d, d), bf16, layer=0), x) for i in range(8)]
    while len(outs) > 1:  # the branches meet on the device: a tree of sums, one output
        outs = [g.add(outs[i], outs[i + 1]) for i in range(0, len(outs), 2)]
    graph = g.build(outs)
    weights = {}
    for i in range(8):
        w = be.view(be.alloc(d * d * 2), 0, (d, d), bf16, (d, 1))
        be.fill_normal(w, i, 0.0, 0.02)
        weights[f"w{i}"] = w
    inputs = {"x": np.random.default_rng(0).standard_normal((1, d), np.float32)}
    rows, base = [], {}
    wbytes = 8 * d * d * 2
    for mode in ("eager", "graph"):
        for streams in STREAMS:
            before = used_bytes(be)
            ex = Executor(graph, weights, be, options=Options(mode=mode, streams=streams))
            for _ in range(3):
                ex.run(inputs)
            run = ex._replay if ex._replay is not None else ex.launch
            us = timed(run, be.synchronize, reps)
            n = ex.schedule.n_streams if ex.schedule is not None else 1
            base.setdefault(mode, us)
            rows.append(
                (
                    f"8 x GEMV d={d}",
                    mode,
                    streams,
                    n,
                    us,
                    base[mode] / us,
                    wbytes + used_bytes(be) - before,
                )
            )
            del ex
    return rows


def model(be: Any, cp: Any, reps: int) -> list[tuple]:
    cfg = preset("gemma3-270m").replace(dtype=bf16)
    w = device_weights(cfg, be, seed=0)
    wbytes = sum(a.nbytes for a in {id(a): a for a in w.values()}.values())
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, cfg.n_vocab, 512)]
    rows = []
    for stack in (True, False):
        label = "stacked" if stack else "separate Q/K/V, gate/up"
        for mode in ("graph", "eager"):
            base: dict[str, float] = {}
            for streams in (1, 4, "auto"):
                before = used_bytes(be)
                s = Session(
                    cfg, w, be, n_ctx=1024, n_batch=512, mode=mode, stack=stack, streams=streams
                )
                pp = []
                for _ in range(9):
                    s.reset()
                    t0 = time.perf_counter()
                    s.prefill(prompt, "none")
                    pp.append(time.perf_counter() - t0)
                tok = 5
                for _ in range(5):
                    tok = s.decode_greedy(tok)
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    tok = s.decode_greedy(tok)
                    times.append(time.perf_counter() - t0)
                mem = wbytes + used_bytes(be) - before
                ex = s.executor(s.step_key(1, s.n_past + 1, "argmax"))
                n = ex.schedule.n_streams if ex.schedule is not None else 1
                for test, us in (
                    ("decode", statistics.median(times) * 1e6),
                    ("prefill 512", statistics.median(pp[1:]) * 1e6),
                ):
                    base.setdefault(test, us)
                    rows.append(
                        (f"270M {test}, {label}", mode, streams, n, us, base[test] / us, mem)
                    )
                del s, ex
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    import cupy as cp

    be = get_backend("cupy")
    print(be.describe())
    print("| case | mode | --streams | streams used | µs (median) | vs 1 stream | GPU MiB | +MiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for rows in (
        fan_out(be, cp, 1024, args.reps),
        fan_out(be, cp, 4096, args.reps),
        model(be, cp, 100),
    ):
        one: dict[tuple[str, str], int] = {}
        for case, mode, streams, n, us, speed, mem in rows:
            one.setdefault((case, mode), mem)
            extra = (mem - one[(case, mode)]) / 2**20
            print(
                f"| {case} | {mode} | {streams} | {n} | {us:.1f} | {speed:.2f}x "
                f"| {mem / 2**20:.1f} | {extra:+.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
