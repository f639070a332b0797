"""The 7B shape's matrix products alone, against the GPU's measured limits.

    python benchmarks/shapes_7b.py [--tokens 512,2048]

Prints, for each weight matrix of a Llama-2-7B layer and the head: cuBLAS ``gemmEx`` at each
prompt length in TFLOP/s (16-bit inputs, f32 or 16-bit output, as the engine calls it), and the
matrix-vector kernel at one token in GB/s of weight bytes, as a share of what a kernel that only
reads sustains (the measured HBM bound of a product that reads its weights once), and a large
square bf16 product (the measured tensor-core peak). Each figure is the median of CUDA-graph
replays timed with events; a matrix-vector figure is per launch in a chain of 20.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from backends import get_backend
from backends.cuda_matmul import CUBLAS_COMPUTE_32F, CUDA_DTYPE
from backends.cuda_matvec import PRE_COPY, matvec

SHAPES = {  # (rows, K) of y = x @ W.T
    "wqkv": (12288, 4096),
    "wo": (4096, 4096),
    "w_gate_up": (22016, 4096),
    "w_down": (4096, 11008),
    "head": (32000, 4096),
}


def timed(be, fn, reps: int = 20) -> float:
    """Median milliseconds of ``fn`` captured into a graph and replayed."""
    import cupy as cp

    replay = be.capture(fn)
    replay()
    a, b = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps):
        a.record(be.compute_stream)
        replay()
        b.record(be.compute_stream)
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return statistics.median(times)


def copy_rate(be) -> tuple[float, float]:
    """A 1 GiB device-to-device copy (the runtime's): its milliseconds, and GB/s of HBM
    traffic (read + write)."""
    import cupy as cp

    src = cp.zeros(1 << 30, cp.uint8)
    dst = cp.empty_like(src)

    def copy() -> None:
        dst.data.copy_from_device_async(src.data, src.nbytes, be.compute_stream)

    ms = timed(be, copy, 10)
    return ms, 2 * src.nbytes / ms / 1e6


_READ = r"""
extern "C" __global__ void k_read(const uint4* p, long long n, unsigned* out) {
    unsigned acc = 0;
    const long long step = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * step < n; i += 4 * step) {  // four 16-byte loads in flight per thread
        const uint4 a = p[i], b = p[i + step], c = p[i + 2 * step], d = p[i + 3 * step];
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
        acc ^= c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n; i += step) acc ^= p[i].x ^ p[i].y ^ p[i].z ^ p[i].w;
    if (acc == 0x9e3779b9u) out[0] = acc;  // keeps the loads; practically never taken
}
"""


def read_rate(be) -> float:
    """GB/s at which a kernel that only reads (16-byte loads, coalesced, four in flight per
    thread) streams 1 GiB from HBM: the bound of a matrix-vector product, which reads its
    weights once and writes almost nothing."""
    import cupy as cp

    src = cp.zeros(1 << 30, cp.uint8)
    out = cp.zeros(1, cp.uint32)
    k = cp.RawKernel(_READ, "k_read")
    n = src.nbytes // 16
    grid = be.sm_count * 8

    def read() -> None:
        with be.compute_stream:
            k((grid,), (256,), (src, np.int64(n), out))

    return src.nbytes / timed(be, read, 10) / 1e6


def per_launch(be, fn, chain: int = 20, reps: int = 20) -> float:
    """Milliseconds per launch of ``fn`` inside a replay of ``chain`` launches one after
    another (as a decode step's graph holds its products): one launch alone per replay would
    add the replay's own fixed cost (~3 us) to every figure."""
    return timed(be, lambda: [fn() for _ in range(chain)], reps) / chain


def gemm(be, w, x, out, n_out: int, m: int, k: int, out_type: str):
    blas = be.blas
    dt = CUDA_DTYPE["bf16"]
    args = (
        blas.handle,
        blas.OP_T,
        blas.OP_N,
        n_out,
        m,
        k,
        blas.one.ctypes.data,
        w.data.ptr,
        dt,
        k,
        x.data.ptr,
        dt,
        k,
        blas.zero.ctypes.data,
        out.data.ptr,
        CUDA_DTYPE[out_type],
        n_out,
        CUBLAS_COMPUTE_32F,
        -1,
    )
    return lambda: blas.gemm_ex(*args)


def main() -> None:
    import cupy as cp
    import ml_dtypes

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="512,2048")
    args = ap.parse_args()
    be = get_backend("cupy")
    print(be.describe())
    ms, copy = copy_rate(be)
    hbm = read_rate(be)
    print(f"device copy 1 GiB: {ms:.3f} ms, {copy:.0f} GB/s (read + write)")
    print(f"a kernel that only reads 1 GiB: {hbm:.0f} GB/s")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    big = cp.asarray(np.random.default_rng(0).standard_normal((8192, 8192)).astype(bf16))
    out = cp.empty((8192, 8192), np.float32)
    ms = timed(be, gemm(be, big, big, out, 8192, 8192, 8192, "f32"), 5)
    peak = 2 * 8192**3 / ms / 1e9
    print(f"bf16 gemm 8192^3 f32 out: {ms:.3f} ms, {peak:.0f} TFLOP/s")
    print("| matrix | tokens | out | ms | TFLOP/s | share of peak |")
    print("|---|---:|---|---:|---:|---:|")
    for name, (n_out, k) in SHAPES.items():
        w = cp.asarray(np.random.default_rng(1).standard_normal((n_out, k)).astype(bf16) * 0.02)
        for m in [int(t) for t in args.tokens.split(",")]:
            x = cp.asarray(np.random.default_rng(2).standard_normal((m, k)).astype(bf16))
            for ot in ("f32", "bf16"):
                y = cp.empty((m, n_out), np.float32 if ot == "f32" else bf16)
                ms = timed(be, gemm(be, w, x, y, n_out, m, k, ot))
                tf = 2 * m * n_out * k / ms / 1e9
                print(f"| {name} | {m} | {ot} | {ms:.3f} | {tf:.0f} | {tf / peak:.0%} |")
    print("| matrix | matvec µs | GB/s | share of reads |")
    print("|---|---:|---:|---:|")
    for name, (n_out, k) in SHAPES.items():
        w = cp.asarray(np.random.default_rng(1).standard_normal((n_out, k)).astype(bf16))
        x = cp.asarray(np.random.default_rng(2).standard_normal((1, k)).astype(np.float32))
        y = cp.empty((1, n_out), np.float32)
        fn = matvec(be, w, y, PRE_COPY, x, x, early=True)
        ms = per_launch(be, fn)
        gbs = w.nbytes / ms / 1e6
        print(f"| {name} | {ms * 1e3:.1f} | {gbs:.0f} | {gbs / hbm:.0%} |")


if __name__ == "__main__":
    main()
