"""Measured costs for the offload pass: link bandwidth, device and host speed, launch cost.

    costs = engine.runtime.calibration.calibrate(backend)     # measured once per device, cached
    costs, source = costs_for(options, "cupy")    # what a session with these options plans with

``engine.passes.offload.place(..., costs=)`` times placements with these numbers. The first call on
a device measures (a few 64 MiB copies and matrix-vector products, and a forward pass of decode
products in each storage type the device's kernels read as stored) and writes
``calibration.json`` in the cache directory (``$STREAMGRAPH_CACHE``, else
``~/.cache/streamgraph``), keyed by the backend's description; later calls read it back. An
entry written before the per-type rates existed is measured again.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from backends import Backend, BackendError, device_spec, get_backend
from backends.base import Quantized
from backends.spec import Costs
from engine.cache import cache_dir
from engine.options import Options
from engine.runtime.executor import Executor
from graph import GraphBuilder, f32
from graph.dtypes import DTYPES, DType

__all__ = [
    "calibrate",
    "remember",
    "measure",
    "measure_rate",
    "rate_types",
    "costs_for",
    "needs_timing",
]

PROBE_BYTES = 64 << 20
RATE_PROBE_BYTES = 128 << 20
"""Weight bytes in each storage type's chain of products: over an H100's or H200's 50-60 MiB L2,
so the replays read HBM as a model's layers do."""
RATE_PROBE_K = 4096


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
    # host: the same product in NumPy, over eight matrices in turn: one 64 MiB matrix stays in
    # a large server's caches and measured 181 GB/s on an H200 host whose layers ran at ~100
    ws = [w] + [np.random.default_rng(i).standard_normal((d, d), np.float32) for i in range(7)]
    xv = np.ones(d, np.float32)

    def all_eight() -> None:
        for m in ws:
            m @ xv

    host_s = _median_s(all_eight, lambda: None) / len(ws)
    return Costs(
        link_bytes_per_s=link,
        device_bytes_per_s=device,
        host_bytes_per_s=(d * d * 4) / host_s,
        launch_s=launch,
        copy_overhead_s=overhead,
        device_rates=tuple(_rates(be, launch)),
    )


def _rates(be: Backend, launch_s: float) -> list[tuple[str, float]]:
    """Each of ``rate_types``' rates; a type whose kernels fail here is left out (charged the
    f32 product's rate, as before there were rates), and said so on stderr."""
    out = []
    for t in rate_types(be):
        try:
            out.append((t, measure_rate(be, t, launch_s)))
        except BackendError as e:
            print(f"calibration: no rate for {t} weights ({e})", file=sys.stderr)
    return out


def rate_types(backend: str | Backend) -> tuple[str, ...]:
    """The storage types whose decode products ``measure`` times on ``backend``: the 16-bit
    types and every GGUF block type its kernels read as stored (none on a backend that
    dequantizes, the NumPy one: its products all run in f32)."""
    spec = device_spec(backend)
    if not spec.keeps_block_types:
        return ()
    return ("f16", "bf16", *sorted(spec.block_types))


def measure_rate(backend: str | Backend, dtype: str, launch_s: float) -> float:
    """Bytes per second a forward pass of decode products reads of ``dtype`` weights: 4096x4096
    matrices, ``RATE_PROBE_BYTES`` of them in all, each its own product of one shared input,
    launched one by one as the f32 probe is; ``launch_s``, the pass's fixed cost, is left out.
    What it charges a type is more than its kernels' time alone (each launch's host cost, the
    4096-row shape; an H100's Q4_K products read 1.8-2.4 TB/s chained in a replayed graph, this
    probe 1.08 on another H100), and that is what matched: on a 7B Q4_K file streamed under 0.9
    / 1.8 / 2.7 GiB on that H100, ``predict`` came within 0.3 / 2.2 / 1.8% of the measured
    tokens per second with these rates; an earlier run on another machine charged every type
    the f32 rate and came 3-7% high (``benchmarks/NOTES.md``).
    The weights are zero bytes: a kernel's speed does not depend on the values (a block of
    zeros is a finite block of zeros)."""
    be = get_backend(backend)
    dt = DTYPES[dtype]
    k = RATE_PROBE_K
    rows = 4096
    per = dt.nbytes((rows, k))
    count = max(2, -(-RATE_PROBE_BYTES // per))
    g = GraphBuilder()
    x = g.input("x", (1, k), f32)
    outs = [g.mul_mat(g.weight(f"w{i}", (rows, k), dt, layer=0), x) for i in range(count)]
    weights = {f"w{i}": _zeros(dt, rows, k) for i in range(count)}
    ex = Executor(g.build(outs), weights, be)
    ex.run({"x": np.zeros((1, k), np.float32)})
    t = _median_s(ex.launch, be.synchronize)
    return count * per / max(t - launch_s, 1e-9)


def _zeros(dt: DType, rows: int, k: int) -> object:
    """A (rows, k) weight of type ``dt``, all zero bytes."""
    if dt.is_quantized:
        return Quantized(np.zeros((rows, dt.nbytes((k,))), np.uint8), dt, (rows, k))
    return np.zeros((rows, k), dt.numpy)


def calibrate(
    backend: str | Backend, refresh: bool = False, directory: Path | None = None
) -> Costs:
    """The device's ``Costs``, measured on first use and cached (``refresh`` re-measures). An
    entry of the cache that is not a valid set of costs (an older or damaged file), or one
    without the per-type rates a device with block-type kernels has, is measured again and
    replaced."""
    be = get_backend(backend)
    path = (directory or cache_dir()) / "calibration.json"
    cached = _read(path).get(be.describe())
    costs = _costs(cached) if cached is not None and not refresh else None
    if costs is not None and "device_rates" not in cached and rate_types(be):
        costs = None  # written before the per-type rates: a Q4_K layer would be charged at f32's
    if costs is None:
        costs = measure(be)
        remember(be, costs, directory)
    return costs


def remember(backend: str | Backend, costs: Costs, directory: Path | None = None) -> None:
    """Store ``costs`` as the device's calibration (what ``calibrate`` returns from then on):
    to pin the costs a machine plans with, or to plan as another machine would."""
    be = get_backend(backend)
    path = (directory or cache_dir()) / "calibration.json"
    table = _read(path)
    table[be.describe()] = costs.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(path)  # whole or not at all: another process may be reading it


def _read(path: Path) -> dict[str, object]:
    """The cache file's table, or an empty one if it is missing or not a JSON object."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _costs(entry: object) -> Costs | None:
    """``Costs`` from a cache entry, or None unless every field is a positive finite number
    and ``device_rates`` an object of them by type (missing fields take their nominal values,
    an empty object means no rate per type; unknown fields make the entry invalid)."""
    names = {f.name for f in fields(Costs)}
    if not isinstance(entry, dict) or not set(entry) <= names:
        return None
    values: dict[str, object] = {}
    for k, v in entry.items():
        if k == "device_rates":
            if not isinstance(v, dict) or not all(
                isinstance(t, str) and _number(r) and r > 0 for t, r in v.items()
            ):
                return None
            values[k] = tuple(v.items())
            continue
        if not _number(v) or v < 0 or (v == 0 and k.endswith("per_s")):
            return None
        values[k] = float(v)
    return Costs(**values)  # type: ignore[arg-type]


def _number(v: object) -> bool:
    """A finite int or float (a bool is not a number here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def needs_timing(options: Options) -> bool:
    """Whether the placement ``options`` ask for is timed with the device's costs (``auto``
    picks by time; ``*N+K`` streams, and its predicted time is shown); other placements use
    the nominal costs, and nothing is measured for them."""
    policy = (options.offload or "").strip()
    return policy == "auto" or policy.startswith("*")


def costs_for(options: Options, backend: str | Backend) -> tuple[Costs, str]:
    """The costs a session with ``options`` on ``backend`` plans with, and where they came
    from: the device's calibration (measured on first use, then cached) where the placement
    is timed and the backend runs here; otherwise the nominal costs of its device spec."""
    spec = device_spec(backend)  # the backend's own where it loads here, else the nominal one
    if not needs_timing(options):
        return spec.costs, f"nominal for {spec.name or spec.backend} (the placement is not timed)"
    try:
        be = get_backend(backend)
    except BackendError:  # planning for a device this machine lacks
        return spec.costs, f"nominal for {spec.name} (no such device here to calibrate)"
    path = cache_dir() / "calibration.json"
    return calibrate(be), f"calibrated on {be.describe()} (cached in {path})"
