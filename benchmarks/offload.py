"""Streaming weights at the link's speed: a first measurement on the Gemma 3 270M shape.

    python benchmarks/offload.py [--tokens 20]

Measures the pinned host-to-device bandwidth (64 MiB copies), then decodes with the layers a
placement streams fetched from pinned host memory into a ring of slots: per policy, the device
bytes, ms per token (median), streamed GB per token, achieved GB/s and its share of the measured
link, and what ``engine.passes.offload.predict`` said with the device's calibrated costs. ``auto``
gets the budget ``*9+2`` takes, to show where it puts the same residency.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from backends import get_backend
from engine.model.session import Session
from engine.model.weights import device_weights
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
    # auto gets the budget *9+2 uses: it may keep other layers resident (the last ones)
    nine = Session(cfg, w, be, n_ctx=64, n_batch=1, offload="*9+2").placement
    assert nine is not None
    budget = nine.device_bytes / 2**30
    del nine
    for policy, vram in (
        ("all", None),
        ("*9+2", None),
        ("auto", budget),
        ("*0+2", None),
        ("*0+0", None),
    ):
        s = Session(cfg, w, be, n_ctx=64, n_batch=1, offload=policy, vram=vram)
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
        pred = p.predicted_s  # with the device's calibrated costs
        if p.notes:
            print("  " + p.notes[0])
        print(
            f"| {policy} | {p.device_bytes / 2**20:.0f} | {t * 1e3:.2f} | {streamed / 1e6:.0f} "
            f"| {gbs:.1f} | {100 * streamed / t / link:.0f}% | {pred * 1e3:.2f} |",
            flush=True,
        )
        del s


if __name__ == "__main__":
    main()
