"""Streaming weights at the link's speed: a first measurement on the Gemma 3 270M shape.

    python benchmarks/offload.py [--tokens 20]

Measures the pinned host-to-device bandwidth (64 MiB copies), then decodes with the layers a
placement streams fetched from pinned host memory into a ring of slots: per policy, the device
bytes, ms per token (median), streamed GB per token, achieved GB/s and its share of the measured
link, and what ``engine.offload.predict`` said with that bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from backends import get_backend
from engine.offload import Costs, predict
from engine.session import Session
from engine.weights import device_weights
from graph.dtypes import bf16
from graph.models import preset


def link_bandwidth(be, cp) -> float:  # noqa: ANN001
    n = 64 << 20
    host = be.pinned(np.zeros(n, np.uint8))
    dev = cp.empty(n, cp.uint8)
    s = be.compute_stream
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        cp.cuda.runtime.memcpyAsync(dev.data.ptr, host.ctypes.data, n, 1, s.ptr)
        s.synchronize()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20)
    args = ap.parse_args()
    import cupy as cp

    be = get_backend("cupy")
    print(be.describe())
    link = link_bandwidth(be, cp)
    print(f"pinned host->device: {link / 1e9:.1f} GB/s (64 MiB copies)")
    cfg = preset("gemma3-270m").replace(dtype=bf16)
    w = {k: be.to_host(v) for k, v in device_weights(cfg, be, seed=0).items()}
    print("| policy | GPU weights MiB | ms/token | streamed MB | GB/s | % of link | predicted ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for policy in ("all", "*9+2", "*0+2", "*0+0"):
        s = Session(cfg, w, be, n_ctx=64, n_batch=1, offload=policy)
        tok = s.decode_greedy(3)
        for _ in range(3):
            tok = s.decode_greedy(tok)
        times = []
        for _ in range(args.tokens):
            t0 = time.perf_counter()
            tok = s.decode_greedy(tok)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        p = s.placement
        assert p is not None
        streamed = p.streamed_bytes
        gbs = streamed / t / 1e9
        pred = p.predicted_s
        if streamed:
            sizes = {q.layer: q.nbytes for q in p.layers}
            where = {q.layer: q.where for q in p.layers}
            pred = predict(sizes, where, p.ahead, Costs(link_bytes_per_s=link))
        print(
            f"| {policy} | {p.device_bytes / 2**20:.0f} | {t * 1e3:.2f} | {streamed / 1e6:.0f} "
            f"| {gbs:.1f} | {100 * streamed / t / link:.0f}% | {pred * 1e3:.2f} |",
            flush=True,
        )
        del s


if __name__ == "__main__":
    main()
