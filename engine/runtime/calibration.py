"""Measured costs for the offload pass: link bandwidth, device and host speed, launch cost.

    costs = engine.runtime.calibration.calibrate(backend)     # measured once per device, then
    cached

``engine.passes.offload.place(..., costs=)`` times placements with these numbers. The first call on
a device measures (well under a second on a GPU: a few 64 MiB copies and matrix-vector products)
and writes ``calibration.json`` in the cache directory (``$STREAMGRAPH_CACHE``, else
``~/.cache/streamgraph``), keyed by the backend's description; later calls read it back.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from backends import Backend, get_backend
from engine.model.packaged import cache_dir
from engine.passes.offload import Costs
from engine.runtime.executor import Executor
from graph import GraphBuilder, f32

__all__ = ["calibrate", "measure"]

PROBE_BYTES = 64 << 20


def _median_s(fn, sync, reps: int = 5) -> float:  # noqa: ANN001
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(backend: str | Backend) -> Costs:
    """Measure a device's ``Costs`` now (no cache)."""
    be = get_backend(backend)
    main = be.main_stream()
    # link: pinned host memory into device memory
    host = be.pinned(np.zeros(PROBE_BYTES // 4, np.float32))
    dst = be.view(be.alloc(PROBE_BYTES), 0, (PROBE_BYTES // 4,), f32, (1,))
    copy = be.copy_launch(dst, host, main)
    link = PROBE_BYTES / _median_s(copy, be.synchronize)
    # a copy's fixed cost: eight 1 MiB copies against the same bytes at link speed
    small = [be.copy_launch(dst[: 2**18], host[: 2**18], main) for _ in range(8)]

    def eight() -> None:
        for c in small:
            c()

    overhead = max(0.0, (_median_s(eight, be.synchronize) - 8 * 2**20 / link) / 8)
    # device: one matrix-vector product over 64 MiB of f32 weights; launch: a 1-element add
    d = 4096
    g = GraphBuilder()
    x = g.input("x", (1, d), f32)
    y = g.mul_mat(g.weight("w", (d, d), f32, layer=0), x)
    w = np.random.default_rng(0).standard_normal((d, d)).astype(np.float32)
    ex = Executor(g.build([y]), {"w": w}, be)
    ex.run({"x": np.zeros((1, d), np.float32)})
    matvec = _median_s(ex.launch, be.synchronize)
    g2 = GraphBuilder()
    a = g2.input("a", (1,), f32)
    tiny = Executor(g2.build([g2.scale(a, 2.0)]), {}, be)
    tiny.run({"a": np.zeros(1, np.float32)})
    launch = _median_s(tiny.launch, be.synchronize)
    device = (d * d * 4) / max(matvec - launch, 1e-9)
    # host: the same product in NumPy
    xv = np.ones(d, np.float32)
    host_s = _median_s(lambda: w @ xv, lambda: None)
    return Costs(
        link_bytes_per_s=link,
        device_bytes_per_s=device,
        host_bytes_per_s=(d * d * 4) / host_s,
        launch_s=launch,
        copy_overhead_s=overhead,
    )


def calibrate(
    backend: str | Backend, refresh: bool = False, directory: Path | None = None
) -> Costs:
    """The device's ``Costs``, measured on first use and cached (``refresh`` re-measures)."""
    be = get_backend(backend)
    path = (directory or cache_dir()) / "calibration.json"
    key = be.describe()
    table: dict[str, dict[str, float]] = {}
    if path.exists():
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
    if key in table and not refresh:
        return Costs(**table[key])
    costs = measure(be)
    table[key] = asdict(costs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    return costs
