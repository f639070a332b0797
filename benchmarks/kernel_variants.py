"""Device time of single kernels in their decode shapes, under the launch choices we tune.

    python benchmarks/kernel_variants.py

Each case is a small graph run through an ``Executor``; its launches are captured 20 times
back to back in one CUDA graph and the replay timed with events (median of 15), so the
figure is the per-launch cost inside a graph, as in a decode step. It also prints the
registers and local (spilled) bytes of every kernel compiled along the way.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from backends import cuda_attention, cuda_matvec, get_backend
from engine.options import Options
from engine.runtime.executor import Executor
from graph import GraphBuilder, f32
from graph.dtypes import bf16

REPEAT = 20


def per_launch_us(ex: Executor, be: Any, cp: Any) -> float:
    steps = [op.fn for op in ex.ops if op.kind == "launch"]

    def launch() -> None:
        for _ in range(REPEAT):
            for s in steps:
                s()

    replay = be.capture(launch)
    replay()
    a, b = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(15):
        a.record(be.compute_stream)
        replay()
        b.record(be.compute_stream)
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b) * 1e3 / REPEAT)
    return statistics.median(times)


def matvec_graph(n_out: int, k: int, kind: str) -> tuple[Any, dict[str, np.ndarray], dict]:
    g = GraphBuilder()
    rng = np.random.default_rng(0)
    w = g.weight("w", (n_out, k), bf16, layer=0)
    weights: dict[str, np.ndarray] = {"w": rng.standard_normal((n_out, k), np.float32)}
    if kind == "glu":
        x = g.input("x", (1, 2 * k), f32)
        y = g.mul_mat(
            w, g.geglu(g.view(x, (1, k), (2 * k, 1), 0), g.view(x, (1, k), (2 * k, 1), k))
        )
        inputs = {"x": rng.standard_normal((1, 2 * k), np.float32)}
        return g.build([y]), inputs, weights
    a, res = g.input("a", (1, k), f32), g.input("res", (1, k), f32)
    w1, w2 = g.weight("w1", (k,), f32, layer=0), g.weight("w2", (k,), f32, layer=0)
    weights |= {"w1": np.ones(k, np.float32), "w2": np.ones(k, np.float32)}
    v = g.rms_norm(a, w1, 1e-6, residual=res)
    y = g.mul_mat(w, g.rms_norm(v, w2, 1e-6))
    inputs = {
        "a": rng.standard_normal((1, k), np.float32),
        "res": rng.standard_normal((1, k), np.float32),
    }
    return g.build([y, g.scale(v, 1.0)]), inputs, weights


def attention_graph(m: int, kv: str) -> tuple[Any, dict[str, np.ndarray]]:
    g = GraphBuilder()
    q = g.input("q", (1, 4, 256), f32)
    k, v = g.input("k", (m, 1, 256), kv), g.input("v", (m, 1, 256), kv)
    qp, kp = g.input("qpos", (1,), "i32"), g.input("kpos", (m,), "i32")
    rng = np.random.default_rng(1)
    inputs = {
        "q": rng.standard_normal((1, 4, 256), np.float32),
        "k": rng.standard_normal((m, 1, 256), np.float32),
        "v": rng.standard_normal((m, 1, 256), np.float32),
        "qpos": np.asarray([m - 1], np.int32),
        "kpos": np.arange(m, dtype=np.int32),
    }
    return g.build([g.attention(q, k, v, qp, kp, scale=1 / 16)]), inputs


def main() -> None:
    import argparse

    import cupy as cp

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["matvec", "attention"], default=None)
    only = ap.parse_args().only

    be = get_backend("cupy")
    print(be.describe())
    rows: list[tuple[str, float]] = []

    def case(label: str, graph: Any, weights: dict, inputs: dict, fusion: bool = True) -> None:
        ex = Executor(graph, weights, be, options=Options(fusion=fusion))
        ex.run(inputs)
        rows.append((label, per_launch_us(ex, be, cp)))
        print(f"{label:60s} {rows[-1][1]:8.2f} us  ({ex.n_launches} launches per case)", flush=True)

    matvec_cases = (
        []
        if only == "attention"
        else [
            (1536, 640, "norm"),
            (4096, 640, "norm"),
            (640, 2048, "glu"),
            (640, 1024, "norm"),
            (262144, 640, "norm"),
        ]
    )
    for n_out, k, kind in matvec_cases:
        graph, inputs, weights = matvec_graph(n_out, k, kind)
        for fusion, new in ((True, True), (False, True), (False, False)):
            cuda_matvec.MAX_INPUT_FLOATS = 11 * 1024 if new else 0  # 0: k_matvec declines

            what = "fused" if fusion else "unfused (norms + matvec)" if new else "norms + old gemv"
            case(f"{kind} matvec {n_out}x{k}: {what}", graph, weights, inputs, fusion)
    cuda_matvec.MAX_INPUT_FLOATS = 11 * 1024
    for defines in (
        []
        if only == "matvec"
        else (("DT_SKIP_MERGE",), ("DT_SKIP_PV",), ("DT_SKIP_MERGE", "DT_SKIP_PV"))
    ):
        be.defines = defines  # parts of the decode attention left out: where its time goes
        graph, ainputs = attention_graph(256, "f32")
        case(f"attention m=256 f32 without {' and '.join(defines)}", graph, {}, ainputs)
        graph, ainputs = attention_graph(64, "f32")
        case(f"attention m=64 f32 without {' and '.join(defines)}", graph, {}, ainputs)
    be.defines = ()
    for m in () if only == "matvec" else (64, 256, 1024, 4096):
        for kv in ("f32", "bf16"):
            graph, ainputs = attention_graph(m, kv)
            for kernel in ("last_block", "kernel", "old"):
                cuda_attention.DECODE_MAX_TOKENS = 0 if kernel == "old" else 8
                be.attn_merge = "kernel" if kernel == "old" else kernel
                what = {
                    "last_block": "decode kernel, splits merged by the last block",
                    "kernel": "decode kernel, splits merged by a second launch",
                    "old": "split kernel + merge launch",
                }[kernel]
                case(f"attention m={m} {kv} cache: {what}", graph, {}, ainputs)
    cuda_attention.DECODE_MAX_TOKENS = 8
    be.attn_merge = "kernel"
    print("\nkernel                                              regs  local B  shared B")
    for name, f in sorted(be._functions.items()):
        attrs = [getattr(f, a, -1) for a in ("num_regs", "local_size_bytes", "shared_size_bytes")]
        print(f"{name[:50]:50s} {attrs[0]:6} {attrs[1]:8} {attrs[2]:9}")


if __name__ == "__main__":
    main()
