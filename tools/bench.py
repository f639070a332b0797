"""``streamgraph bench``: prompt-processing and generation speed, in llama-bench's conventions.

    streamgraph bench                          # gemma3-270m shape, generated weights, best backend
    streamgraph bench -m llama-tiny -p 32,128 -n 16 -r 5 -o json
    streamgraph bench -m llama-tiny -p 32 -n 8 --streams 3 --trace out.json   # + out.png

Tests are named as llama-bench names them: ``pp<N>`` processes an N-token prompt in one pass
from an empty cache; ``tg<N>`` generates N tokens one at a time (greedy, after a one-token
prompt). Each test runs once to warm up (executors are built then), then ``-r`` timed
repetitions; the table shows tokens/s as mean ± sample standard deviation. Progress goes to
stderr, the table to stdout.

``--trace out.json`` records an execution timeline (``tools.timeline``): after a test's timed
repetitions, one more run of it, untimed, is traced, so the timings never include tracing's
cost. Each test's run is a section of its own in the trace, and a traced run launches kernel by
kernel (a CUDA graph cannot be timed per kernel), so ``graphs=on`` shows eager launches there.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from backends import best_backend, get_backend
from engine.calibration import calibrate
from engine.session import Session
from engine.trace import Trace
from engine.weights import device_weights
from graph.dtypes import dtype_of
from graph.models import PRESETS, preset
from graph.ops import GraphError
from tools import timeline

__all__ = ["BenchResult", "run_bench", "add_arguments", "main"]


@dataclass(frozen=True, slots=True)
class BenchResult:
    model: str
    size_mib: float
    params_m: float
    backend: str
    dtype: str
    streams: str  # --streams as asked: a count or "auto"
    strategy: str  # weight placement (engine.offload): all, auto, *N+K
    graphs: str  # "on": CUDA-graph replay of each forward pass; "off": eager launches
    test: str
    n_tokens: int
    reps: int
    ts_mean: float  # tokens/s
    ts_sd: float
    ts_median: float
    launches: int  # kernel launches per forward pass of this test's graph
    vram: str = ""  # --vram as asked (GiB), "" without a budget
    weights_mib: float = 0.0  # weight bytes on the device: resident layers, the ring, the cache
    streamed_mb: float = 0.0  # weight megabytes copied to the device per forward pass
    stream_gbs: float = 0.0  # achieved host-to-device rate while streaming
    link_pct: float = 0.0  # ... as a share of the measured pinned link
    predicted_ts: float = 0.0  # what engine.offload.predict said of a streamed tg test (t/s)


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"token counts must be >= 0, got {text!r}")
    return vals


def _streams(text: str) -> list[str]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if part != "auto" and not (part.isdigit() and int(part) >= 1):
            raise argparse.ArgumentTypeError(f"streams must be counts >= 1 or auto, not {part!r}")
        out.append(part)
    return out


def _on_off(text: str) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals or any(v not in ("on", "off") for v in vals):
        raise argparse.ArgumentTypeError(f"expected on, off or on,off; got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m",
        "--model",
        default="gemma3-270m",
        choices=sorted(PRESETS),
        help="built-in architecture, run with generated weights (default: gemma3-270m)",
    )
    p.add_argument(
        "-p", "--n-prompt", type=_ints, default=[64], help="prompt lengths, e.g. 64,512 (0: none)"
    )
    p.add_argument(
        "-n", "--n-gen", type=_ints, default=[16], help="tokens to generate, e.g. 16,128 (0: none)"
    )
    p.add_argument(
        "-r", "--repetitions", type=int, default=3, help="timed repetitions per test (default 3)"
    )
    p.add_argument("--backend", default=None, help="numpy or cupy (default: the best one present)")
    p.add_argument(
        "--dtype",
        default="f32",
        choices=["f32", "f16", "bf16"],
        help="weight storage type (default f32)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated weights")
    p.add_argument(
        "--streams",
        type=_streams,
        default=["1"],
        help="streams per forward pass: counts or auto, e.g. 1,4,auto (default 1)",
    )
    p.add_argument(
        "--strategy",
        type=lambda t: [x.strip() for x in t.split(",")],
        default=["all"],
        help="weight placements: all, auto, *N+K, comma-separated (default all)",
    )
    p.add_argument(
        "--vram",
        type=lambda t: [float(x) for x in t.split(",")],
        default=[None],
        help="GPU budgets in GiB for the weights, e.g. 6,8,10 (with auto or *N+K)",
    )
    p.add_argument(
        "--graphs",
        type=_on_off,
        default=["on"],
        help="replay each forward pass as a captured graph: on, off or on,off (default on)",
    )
    p.add_argument(
        "-o", "--output", default="md", choices=["md", "json", "jsonl", "csv"], help="output format"
    )
    p.add_argument(
        "--trace",
        default=None,
        metavar="OUT.json",
        help="write an execution timeline of one extra, untimed run of each test (Chrome trace "
        "JSON for Perfetto; a PNG beside it with matplotlib)",
    )


def run_bench(
    model: str,
    n_prompt: Sequence[int],
    n_gen: Sequence[int],
    reps: int,
    backend: str | None = None,
    dtype: str = "f32",
    seed: int = 0,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
    graphs: Sequence[str] = ("on",),
    streams: Sequence[str] = ("1",),
    strategies: Sequence[str] = ("all",),
    vram: Sequence[float | None] = (None,),
    trace: Trace | None = None,
) -> list[BenchResult]:
    """Every test of every configuration; ``trace``: record one extra, untimed run of each test
    into it (a section per test)."""
    if reps < 1:
        raise ValueError(f"repetitions must be at least 1, got {reps}")
    be = get_backend(backend or best_backend())
    cfg = preset(model).replace(dtype=dtype_of(dtype))
    log(f"generating {cfg.n_params() / 1e6:.2f}M {dtype} weights for {model} on {be.name} ...")
    weights = device_weights(cfg, be, seed)
    unique = {id(w): w for w in weights.values()}
    size_mib = sum(w.nbytes for w in unique.values()) / 2**20
    n_ctx = max([*n_prompt, 0]) + max([*n_gen, 0]) + 1
    rng = np.random.default_rng(seed)
    results: list[BenchResult] = []
    skipped: list[GraphError] = []

    def make_session(mode: str, n_streams: str, strategy: str, budget: float | None) -> Session:
        return Session(
            cfg,
            weights,
            be,
            n_ctx=n_ctx,
            n_batch=max([*n_prompt, 1]),
            mode=mode,
            streams=n_streams if n_streams == "auto" else int(n_streams),
            offload=None if strategy == "all" else strategy,
            vram=budget,
        )

    def bench_mode(graph_mode: str, n_streams: str, strategy: str, budget: float | None) -> None:
        mode = {"on": "graph", "off": "eager"}[graph_mode]
        try:
            sess = make_session(mode, n_streams, strategy, budget)
        except GraphError as e:  # a placement the budget cannot hold: the other rows still run
            if len(strategies) * len(vram) == 1:
                raise
            log(f"{strategy} at --vram {budget}: skipped, {e}")
            skipped.append(e)
            return
        placement = sess.placement
        held = size_mib if placement is None else placement.device_bytes / 2**20
        if sess.ring is not None:
            held += sess.ring.cache.used / 2**20
        streamed = placement.streamed_bytes if placement is not None else 0
        link = calibrate(be).link_bytes_per_s if streamed else 0.0

        def record(test: str, n: int, secs: list[float], launches: int, passes: int) -> None:
            rates = [n / s for s in secs]
            # streamed bytes per forward pass x passes per second
            rate = streamed / 1e9 * passes / statistics.median(secs)
            sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
            params = round(cfg.n_params() / 1e6, 2)
            results.append(
                BenchResult(
                    model,
                    round(size_mib, 2),
                    params,
                    be.name,
                    dtype,
                    n_streams,
                    strategy,
                    graph_mode,
                    test,
                    n,
                    reps,
                    statistics.fmean(rates),
                    sd,
                    statistics.median(rates),
                    launches,
                    "" if budget is None else f"{budget:g}",
                    round(held, 1),
                    round(streamed / 1e6, 3),
                    round(rate, 2),
                    round(100 * rate * 1e9 / link, 1) if link else 0.0,
                    round(1 / placement.predicted_s, 2) if streamed and test[:2] == "tg" else 0.0,
                )
            )
            log(f"  {test}: {results[-1].ts_mean:.2f} ± {sd:.2f} t/s")

        def traced(test: str, once: Callable[[], float]) -> None:
            """One more run of ``test``, recorded into ``trace`` (after the timed ones)."""
            if trace is None:
                return
            where = "" if budget is None else f" vram={budget:g}"
            trace.section = (
                f"{test} {be.name} streams={n_streams} graphs={graph_mode} {strategy}{where}"
            )
            sess.trace = trace
            try:
                once()
            finally:
                sess.trace = None
            log(f"  {test}: traced one more run")

        for n in n_prompt:
            if n == 0:
                continue
            prompt = [int(t) for t in rng.integers(0, cfg.n_vocab, n)]

            def pp(prompt: list[int] = prompt) -> float:
                sess.reset()
                t0 = time.perf_counter()
                sess.prefill(prompt)
                return time.perf_counter() - t0

            log(f"pp{n} graphs={graph_mode}: warm-up + {reps} repetitions")
            pp()
            pp()  # a second warm-up: graph mode captures on its second run
            launches = sess.executor(n, sess.n_kv_for(n)).n_launches
            chunks = -(-n // sess.n_batch)
            record(f"pp{n}", n, [pp() for _ in range(reps)], launches, chunks)
            traced(f"pp{n}", pp)
        for n in n_gen:
            if n == 0:
                continue

            def tg(n: int = n) -> float:
                sess.reset()
                tok = int(np.argmax(sess.prefill([1])))
                t0 = time.perf_counter()
                for _ in range(n):
                    tok = sess.decode_greedy(tok)  # greedy, as generate(): argmax on the device
                return time.perf_counter() - t0

            log(f"tg{n} graphs={graph_mode}: warm-up + {reps} repetitions")
            tg()
            launches = sess.executor(1, sess.n_kv_for(n + 1), "argmax").n_launches
            record(f"tg{n}", n, [tg() for _ in range(reps)], launches, n)
            traced(f"tg{n}", tg)

    for graph_mode in graphs:
        for n_streams in streams:
            for strategy in strategies:
                for budget in vram if strategy != "all" else [None]:
                    bench_mode(graph_mode, n_streams, strategy, budget)
                    gc.collect()  # the session's pinned host copies go before the next one's
    if skipped and not results:
        raise skipped[0]
    return results


def format_results(results: list[BenchResult], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([asdict(r) for r in results], indent=2)
    if fmt == "jsonl":
        return "\n".join(json.dumps(asdict(r)) for r in results)
    cols = [
        "model",
        "size",
        "params",
        "backend",
        "dtype",
        "streams",
        "strategy",
        "graphs",
        "test",
        "t/s",
        "launches",
    ]
    streaming = any(r.streamed_mb for r in results)
    if streaming:
        cols += ["vram", "weights", "streamed", "GB/s", "link", "predicted"]
    rows = [
        [
            r.model,
            f"{r.size_mib:.2f} MiB",
            f"{r.params_m:.2f} M",
            r.backend,
            r.dtype,
            r.streams,
            r.strategy,
            r.graphs,
            r.test,
            f"{r.ts_mean:.2f} ± {r.ts_sd:.2f}",
            str(r.launches),
        ]
        + (
            [
                r.vram or "-",
                f"{r.weights_mib:.1f} MiB",
                f"{r.streamed_mb:.1f} MB",
                f"{r.stream_gbs:.1f}",
                f"{r.link_pct:.0f}%",
                f"{r.predicted_ts:.2f}" if r.predicted_ts else "-",
            ]
            if streaming
            else []
        )
        for r in results
    ]
    if fmt == "csv":
        head = ",".join(f.name for f in fields(BenchResult))
        lines = [head] + [
            ",".join(str(getattr(r, f.name)) for f in fields(BenchResult)) for r in results
        ]
        return "\n".join(lines)
    widths = [
        max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)
    ]
    right = {
        "size",
        "params",
        "t/s",
        "launches",
        "weights",
        "streamed",
        "GB/s",
        "link",
        "predicted",
    }

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if cols[i] in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    sep = (
        "| "
        + " | ".join(
            ("-" * (w - 1) + ":") if c in right else "-" * w
            for c, w in zip(cols, widths, strict=True)
        )
        + " |"
    )
    return "\n".join([line(cols), sep, *(line(r) for r in rows)])


def main(args: argparse.Namespace) -> int:
    trace = None
    if args.trace:
        timeline.check_path(args.trace)  # before the run, not after it
        trace = Trace()
    results = run_bench(
        args.model,
        args.n_prompt,
        args.n_gen,
        args.repetitions,
        args.backend,
        args.dtype,
        args.seed,
        graphs=args.graphs,
        streams=args.streams,
        strategies=args.strategy,
        vram=args.vram,
        trace=trace,
    )
    print(format_results(results, args.output))
    if results and args.output == "md":
        print(f"\nbackend: {get_backend(results[0].backend).describe()}")
    if trace is not None:
        timeline.save(trace, args.trace)
    return 0
