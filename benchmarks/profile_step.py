"""Where one decode step's time goes, kernel by kernel, under Nsight Compute.

    ncu --profile-from-start off --graph-profiling node --clock-control none \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv --page raw \\
        --print-units base \\
        python benchmarks/profile_step.py -m 7b-f16.gguf -d 4096 > step.csv
    python benchmarks/profile_step.py --summarize step.csv

The first form loads a GGUF file on the GPU (its own types, the default f16 cache), fills the
cache with ``-d`` tokens in passes of 512, runs three greedy steps at the next position
(compiled, captured, replayed: the same position, so the same executor even where a
cache-length bucket begins) and then that step once more between ``cudaProfilerStart`` and
``cudaProfilerStop``: with
``--profile-from-start off`` that replayed step is all ncu profiles, and with
``--graph-profiling node`` it profiles each of the graph's kernels (one at a time, so the
overlap programmatic dependent launch gives a real step is not in these figures: their sum is
an upper bound of the step's time).

The second form reads ncu's raw CSV (its log lines and this script's output come first; they
are skipped; ``--print-units base`` makes its times ns and its sizes bytes) and prints, per
kernel instance, launches, microseconds, MB read from DRAM and GB/s, slowest first, then the
step's totals.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summarize(lines: list[str]) -> list[str]:
    """The table of ncu ``--csv --page raw`` output (``lines``): one row per kernel instance,
    the largest total time first, then TOTAL. Raises ValueError if there is no header."""
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError('no ncu CSV header (a line starting "ID") in the input')
    per: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    launches = 0
    for row in csv.DictReader(lines[start:]):
        ns = _number(row.get("gpu__time_duration.sum", ""))
        if not row.get("Kernel Name") or ns is None:
            continue  # the units row
        read = _number(row.get("dram__bytes_read.sum", "") or "0") or 0.0
        entry = per[row["Kernel Name"].split("(")[0]]
        entry[0] += 1
        entry[1] += ns
        entry[2] += read
        launches += 1
    total_ns = sum(e[1] for e in per.values())
    total_b = sum(e[2] for e in per.values())
    width = max([len(k) for k in per] + [6])
    out = [f"{'kernel':{width}s} {'n':>4s} {'us':>9s} {'MB':>9s} {'GB/s':>7s} {'%':>5s}"]
    for name, (n, ns, b) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        share = 100 * ns / total_ns if total_ns else 0.0
        rate = b / ns if ns else 0.0
        out.append(
            f"{name:{width}s} {n:4.0f} {ns / 1e3:9.1f} {b / 1e6:9.1f} {rate:7.0f} {share:5.1f}"
        )
    rate = total_b / total_ns if total_ns else 0.0
    out.append(
        f"{'TOTAL':{width}s} {launches:4d} {total_ns / 1e3:9.1f} {total_b / 1e6:9.1f} {rate:7.0f}"
    )
    return out


def profile(model: str, depth: int, dtype: str | None) -> None:
    """One replayed decode step at ``depth`` between cudaProfilerStart and Stop."""
    import cupy as cp
    import numpy as np

    from engine.model.gguf import config_for, open_gguf
    from engine.model.session import Session
    from engine.options import Options

    options = Options(backend="cupy", dtype=dtype, n_ctx=depth + 64, n_batch=512)
    file = open_gguf(model)
    cfg = config_for(file, options)
    sess = Session(cfg, file.weights_as(cfg, stack=options.stack), options=options)
    rng = np.random.default_rng(0)
    fill = [int(t) for t in rng.integers(0, cfg.n_vocab, max(depth, 1))]
    sess.prefill(fill, "none")
    at = sess.n_past
    for _ in range(3):  # compiled, captured, replayed: the profiled step replays
        sess.n_past = at  # one position (its cache row rewritten alike), so one executor
        sess.decode_greedy(1)
    cp.cuda.runtime.deviceSynchronize()
    sess.n_past = at
    cp.cuda.profiler.start()
    sess.decode_greedy(1)
    cp.cuda.runtime.deviceSynchronize()
    cp.cuda.profiler.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-m", "--model", help="a GGUF file")
    p.add_argument("-d", "--depth", type=int, default=0, help="tokens in the cache first")
    p.add_argument("--dtype", default=None, help="weights dequantized to this type (default: kept)")
    p.add_argument("--summarize", metavar="CSV", help="print the table of an ncu raw CSV")
    args = p.parse_args(argv)
    if args.summarize:
        try:
            print("\n".join(summarize(Path(args.summarize).read_text().splitlines())))
        except (OSError, ValueError) as e:
            p.error(f"--summarize {args.summarize}: {e}")
        return 0
    if not args.model:
        p.error("give -m MODEL.gguf to profile, or --summarize CSV")
    if args.depth < 0:
        p.error(f"-d must be 0 or more, got {args.depth}")
    profile(args.model, args.depth, args.dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
