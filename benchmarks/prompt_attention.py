"""Prompt attention alone: the tensor-core kernel (``k_flash_attn``) beside the f32 one
(``k_attention``) on the 7B and the Gemma 3 270M shapes, causal prompts from an empty cache.

    python benchmarks/prompt_attention.py [--tokens 512,2048]

Prints ms and TFLOP/s of the causal work (2 products of n x n/2 x d per query head, the half
of the score matrix a causal mask keeps), each the median of CUDA-graph replays timed with
events, beside the measured peak of a large bf16 cuBLAS product.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from shapes_7b import gemm, timed  # noqa: E402

from backends import get_backend  # noqa: E402
from engine.options import Options  # noqa: E402
from engine.runtime.executor import Executor  # noqa: E402
from graph import GraphBuilder, f32  # noqa: E402

SHAPES = {"7b": (32, 32, 128, 0), "270m": (4, 1, 256, 0), "270m-local": (4, 1, 256, 512)}


def main() -> None:
    import cupy as cp
    import ml_dtypes

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="512,2048")
    ap.add_argument("--kv", default="f16,bf16")
    args = ap.parse_args()
    be = get_backend("cupy")
    print(be.describe())
    n = 8192
    bf16 = np.dtype(ml_dtypes.bfloat16)
    a = cp.asarray(np.ones((n, n), bf16))
    y = cp.empty((n, n), np.float32)
    peak = 2 * n**3 / timed(be, gemm(be, a, a, y, n, n, n, "f32"), 5) / 1e9
    print(f"bf16 cuBLAS {n}^3: {peak:.0f} TFLOP/s\n")
    print("| shape | tokens | cache | kernel | ms | TFLOP/s | share of peak |")
    print("|---|---:|---|---|---:|---:|---:|")
    for name, (h, hk, d, window) in SHAPES.items():
        for t in (int(x) for x in args.tokens.split(",")):
            for kv in args.kv.split(","):
                g = GraphBuilder()
                q = g.input("q", (t, h, d), f32)
                k, v = g.input("k", (t, hk, d), kv), g.input("v", (t, hk, d), kv)
                qp, kp = g.input("qpos", (t,), "i32"), g.input("kpos", (t,), "i32")
                graph = g.build([g.attention(q, k, v, qp, kp, scale=d**-0.5, window=window)])
                rng = np.random.default_rng(0)
                inputs = {
                    "q": rng.standard_normal((t, h, d)).astype(np.float32),
                    "k": rng.standard_normal((t, hk, d)).astype(np.float32),
                    "v": rng.standard_normal((t, hk, d)).astype(np.float32),
                    "qpos": np.arange(t, dtype=np.int32),
                    "kpos": np.arange(t, dtype=np.int32),
                }
                seen = min(t, window) if window else t
                flop = 4 * h * d * t * (seen / 2 if not window else seen)
                for kernel in ("flash", "simple"):
                    be.prompt_attention = kernel
                    ex = Executor(graph, {}, be, options=Options(mode="eager"))
                    ex.run(inputs)  # inputs in place; the timed part is the launches alone
                    steps = [op.fn for op in ex.ops if op.kind == "launch"]
                    ms = timed(be, lambda steps=steps: [s() for s in steps], 10)
                    tf = flop / ms / 1e9
                    cells = f"{ms:.3f} | {tf:.1f} | {tf / peak:.0%}"
                    print(f"| {name} | {t} | {kv} | {kernel} | {cells} |")
    be.prompt_attention = "flash"


if __name__ == "__main__":
    main()
