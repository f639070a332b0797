"""``streamgraph bench``: prompt-processing and generation speed, in llama-bench's conventions.

    streamgraph bench                          # gemma3-270m shape, generated weights, best backend
    streamgraph bench -m llama-tiny -p 32,128 -n 16 -r 5 -o json
    streamgraph bench -m llama-tiny -p 32 -n 8 --streams 3 --trace out.json   # + out.png

Tests are named as llama-bench names them: ``pp<N>`` processes an N-token prompt in one pass
from an empty cache; ``tg<N>`` generates N tokens one at a time (greedy, after a one-token
prompt). Each test runs once to warm up (executors are built then), then ``-r`` timed
repetitions; the table shows tokens/s as mean ± sample standard deviation. Progress goes to
stderr, the table to stdout.

``--interleave`` builds every configuration's session first and then times the repetitions
round by round across all of them (see ``run_bench``): use it to compare configurations whose
difference is smaller than the machine's drift over minutes, where their sessions fit at once.

``--trace out.json`` records an execution timeline (``tools.timeline``): after a test's timed
repetitions, one more run of it, untimed, is traced, so the timings never include tracing's
cost. Each test's run is a section of its own in the trace, and a traced run launches kernel by
kernel (a CUDA graph cannot be timed per kernel), so ``graphs=on`` shows eager launches there.
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from backends import best_backend, get_backend
from engine.model.session import Session
from engine.model.weights import device_weights
from engine.runtime.calibration import calibrate
from engine.views.trace import Trace
from graph.dtypes import dtype_of
from graph.models import PRESETS, preset
from graph.ops import GraphError
from tools import timeline
from tools.bench_report import BenchResult, format_results, plot

__all__ = ["BenchResult", "run_bench", "add_arguments", "main"]


SEED_PRESETS: dict[str, tuple[str, dict[str, object]]] = {
    "seed-prefetch": (
        "ChatRWKV #152's *N+K table on a 7B Llama shape",
        {
            "model": "llama-7b",
            "dtype": "bf16",
            "n_prompt": [2048],
            "n_gen": [16],
            "strategy": ["all", "*10+0", "*15+0", "*10+10", "*15+5", "*20+0", "auto"],
            "vram": [6.0, 8.0, 10.0],
        },
    ),
    "seed-streams": (
        "llama.cpp #4719's 1 vs N streams, eager and in graphs, separate projections",
        {
            "model": "gemma3-270m",
            "dtype": "bf16",
            "n_prompt": [512],
            "n_gen": [128],
            "streams": ["1", "2", "4", "auto"],
            "graphs": ["on", "off"],
            "no_stack": True,
            "interleave": True,
        },
    ),
    "seed-head": (
        "rwkv.cpp #106's head on the GPU (ngl=19) or the CPU (ngl=18), Gemma 3 270M",
        {
            "model": "gemma3-270m",
            "dtype": "bf16",
            "n_prompt": [128],
            "n_gen": [32],
            "strategy": ["ngl=19", "ngl=18"],
        },
    ),
}
"""What ``--preset`` sets: the model and the sweep (``-r``, ``-o``, ``--backend``, ``--plot``
and ``--trace`` still apply)."""


def _ints(text: str) -> list[int]:
    """Comma-separated counts, each a value or a range as llama-bench writes them: ``a-b``
    (step 1), ``a-b+s`` (step s), ``a-b*m`` (times m): ``-p 128-1024*2`` is 128,256,512,1024."""
    vals: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?:([+*])(\d+))?)?", part)
        if m is None:
            raise argparse.ArgumentTypeError(
                f"expected counts or ranges (64, 64-256+64, 128-1024*2), got {part!r}"
            )
        first = int(m[1])
        if m[2] is None:
            vals.append(first)
            continue
        last, op, step = int(m[2]), m[3] or "+", int(m[4] or 1)
        if last < first or (op == "+" and step < 1) or (op == "*" and (step < 2 or first < 1)):
            raise argparse.ArgumentTypeError(f"range {part!r} never reaches its end")
        v = first
        while v <= last:
            vals.append(v)
            v = v + step if op == "+" else v * step
    return vals


def _pairs(text: str) -> list[tuple[int, int]]:
    """``-pg 512,128``: a prompt and a generation run as one test (several: 512,128;64,16)."""
    out = []
    for part in text.split(";"):
        nums = _ints(part)
        if len(nums) != 2 or nums[0] < 1 or nums[1] < 1:
            raise argparse.ArgumentTypeError(f"-pg takes PROMPT,GEN pairs (512,128), got {part!r}")
        out.append((nums[0], nums[1]))
    return out


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
        help=f"a built-in architecture run with generated weights ({', '.join(sorted(PRESETS))}; "
        "default gemma3-270m), or a GGUF file",
    )
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(SEED_PRESETS),
        help="redo a seed thread's table: "
        + "; ".join(f"{k}: {v[0]}" for k, v in sorted(SEED_PRESETS.items())),
    )
    p.add_argument(
        "-p", "--n-prompt", type=_ints, default=[64], help="prompt lengths, e.g. 64,512 (0: none)"
    )
    p.add_argument(
        "-n", "--n-gen", type=_ints, default=[16], help="tokens to generate, e.g. 16,128 (0: none)"
    )
    p.add_argument(
        "-pg",
        "--prompt-gen",
        type=_pairs,
        default=[],
        metavar="PP,TG",
        help="a prompt then a generation as one test, llama-bench's pp+tg (e.g. 512,128)",
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
        "--no-stack",
        action="store_true",
        help="separate Q/K/V and gate/up projections (what several streams can overlap)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="build every configuration's session first, then time the repetitions round by "
        "round across all of them, so the machine's drift falls on every row alike (holds "
        "every session's memory at once)",
    )
    p.add_argument("--plot", default=None, metavar="OUT.png", help="draw the sweep's t/s")
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
    pg: Sequence[tuple[int, int]] = (),
    stack: bool = True,
    interleave: bool = False,
) -> list[BenchResult]:
    """Every test of every configuration; ``trace``: record one extra, untimed run of each test
    into it (a section per test).

    By default each configuration's session is built, warmed up, timed and dropped before the
    next one's, so only one session holds memory at a time. ``interleave``: every session is
    built and warmed up first, then each repetition is a round that runs every test once, in
    turn (reversed every other round). A machine's speed drifts over minutes (an H200 ran the
    same captured 270M step at 816 and 904 µs a few minutes apart), which is more than one
    stream count gains over another; interleaved, the drift falls on every row alike."""
    if reps < 1:
        raise ValueError(f"repetitions must be at least 1, got {reps}")
    be = get_backend(backend or best_backend())
    pg = list(pg)
    if model in PRESETS:
        cfg = preset(model).replace(dtype=dtype_of(dtype))
        log(f"generating {cfg.n_params() / 1e6:.2f}M {dtype} weights for {model} on {be.name}")
        weights = device_weights(cfg, be, seed)
    else:  # a GGUF file (or a packaged model's name): its weights, dequantized to ``dtype``
        from engine.model.gguf import open_gguf
        from engine.model.packaged import ModelNotFound, resolve_model

        try:
            path = resolve_model(model)
        except ModelNotFound as e:
            raise ValueError(f"{e}; built-in architectures: {', '.join(sorted(PRESETS))}") from e
        log(f"loading {path.name} as {dtype} ...")
        gguf = open_gguf(path)
        cfg = gguf.config.replace(dtype=dtype_of(dtype))
        weights = gguf.weights(cfg.dtype)
        model = path.name
    unique = {id(w): w for w in weights.values()}
    size_mib = sum(w.nbytes for w in unique.values()) / 2**20
    n_ctx = max([*n_prompt, 0, *(a + b for a, b in pg)]) + max([*n_gen, 0]) + 1
    rng = np.random.default_rng(seed)
    results: list[BenchResult] = []
    skipped: list[GraphError] = []
    sweep = [
        (graph_mode, n_streams, strategy, budget)
        for graph_mode in graphs
        for n_streams in streams
        for strategy in strategies
        for budget in (vram if strategy != "all" else [None])
    ]

    def open_config(
        graph_mode: str, n_streams: str, strategy: str, budget: float | None
    ) -> _Config | None:
        """The configuration's session and what it places where; None if its budget cannot
        hold the placement (the other rows still run)."""
        before = getattr(be, "bytes_allocated", 0)
        try:
            sess = Session(
                cfg,
                weights,
                be,
                n_ctx=n_ctx,
                n_batch=max([*n_prompt, *(a for a, _ in pg), 1]),
                mode={"on": "graph", "off": "eager"}[graph_mode],
                streams=n_streams if n_streams == "auto" else int(n_streams),
                offload=None if strategy == "all" else strategy,
                vram=budget,
                fuse=stack,
            )
        except GraphError as e:
            if len(strategies) * len(vram) == 1:
                raise
            log(f"{strategy} at --vram {budget}: skipped, {e}")
            skipped.append(e)
            return None
        placement = sess.placement
        # weights the session uses where they are (no copy): the generated device arrays
        resident = size_mib * 2**20 if placement is None else placement.resident_bytes
        held = size_mib if placement is None else placement.device_bytes / 2**20
        if sess.ring is not None:
            held += sess.ring.cache.used / 2**20
        streamed = placement.streamed_bytes if placement is not None else 0
        return _Config(
            graph_mode,
            n_streams,
            strategy,
            budget,
            sess,
            before,
            resident,
            held,
            streamed,
            link=calibrate(be).link_bytes_per_s if streamed else 0.0,
            predicted=1 / placement.predicted_s if streamed else 0.0,
        )

    def jobs_of(c: _Config) -> list[_Job]:
        """The configuration's tests: pp, tg, then pp+tg."""
        sess, jobs = c.session, []
        for n in n_prompt:
            if n == 0:
                continue
            prompt = [int(t) for t in rng.integers(0, cfg.n_vocab, n)]

            def pp(prompt: list[int] = prompt) -> Sample:
                sess.reset()
                t0 = time.perf_counter()
                sess.prefill(prompt)  # the first token's logits come with the prompt pass
                took = time.perf_counter() - t0
                return Sample(took, took, [])

            ex = (n, sess.n_kv_for(n), "last")
            jobs.append(_Job(c, f"pp{n}", n, pp, 2, ex, -(-n // sess.n_batch)))
        for n in n_gen:
            if n == 0:
                continue

            def tg(n: int = n) -> Sample:
                sess.reset()
                return _generate(sess, [1], n)

            ex = (1, sess.n_kv_for(n + 1), "argmax")
            jobs.append(_Job(c, f"tg{n}", n, tg, 1, ex, n))  # graph mode captures on run 2
        for n_pp, n_tg in pg:
            prompt = [int(t) for t in rng.integers(0, cfg.n_vocab, n_pp)]

            def both(prompt: list[int] = prompt, n: int = n_tg) -> Sample:
                sess.reset()
                x = _generate(sess, prompt, n)
                return Sample(x.ttft + x.total, x.ttft, x.steps)  # prompt and generation

            ex = (1, sess.n_kv_for(n_pp + n_tg), "argmax")
            passes = -(-n_pp // sess.n_batch) + n_tg
            jobs.append(_Job(c, f"pp{n_pp}+tg{n_tg}", n_pp + n_tg, both, 2, ex, passes))
        return jobs

    def warm(job: _Job) -> None:
        """Warm-up runs (executors are built, then captured); then what the device holds."""
        log(f"{job.test} {job.config.label}: warm-up + {reps} repetitions")
        for _ in range(job.warm):
            job.once()
        job.launches = job.config.session.executor(*job.executor).n_launches
        allocated = getattr(be, "bytes_allocated", None)
        if allocated is not None:  # what the device holds for this configuration
            c = job.config
            job.vram_mib = (c.resident + allocated - c.allocated_before) / 2**20

    def record(job: _Job) -> None:
        c, n = job.config, job.n
        secs = [x.total for x in job.samples]
        rates = [n / s for s in secs]
        steps = sorted(t for x in job.samples for t in x.steps)
        # streamed bytes per forward pass x passes per second
        rate = c.streamed / 1e9 * job.passes / statistics.median(secs)
        sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
        results.append(
            BenchResult(
                model,
                round(size_mib, 2),
                round(cfg.n_params() / 1e6, 2),
                be.name,
                dtype,
                c.n_streams,
                c.strategy,
                c.graph_mode,
                job.test,
                n,
                reps,
                statistics.fmean(rates),
                sd,
                statistics.median(rates),
                job.launches,
                "" if c.budget is None else f"{c.budget:g}",
                round(c.held, 1),
                round(c.streamed / 1e6, 3),
                round(rate, 2),
                round(100 * rate * 1e9 / c.link, 1) if c.link else 0.0,
                round(c.predicted, 2) if job.test.startswith("tg") else 0.0,
                round(job.vram_mib, 1),
                round(statistics.median(x.ttft for x in job.samples) * 1e3, 3),
                round(_percentile(steps, 50) * 1e3, 3) if steps else 0.0,
                round(_percentile(steps, 90) * 1e3, 3) if steps else 0.0,
            )
        )
        log(f"  {job.test} {c.label}: {results[-1].ts_mean:.2f} ± {sd:.2f} t/s")

    def traced(job: _Job) -> None:
        """One more run of the test, recorded into ``trace`` (after the timed ones)."""
        if trace is None:
            return
        sess = job.config.session
        trace.section = f"{job.test} {be.name} {job.config.label}"
        sess.trace = trace
        try:
            job.once()
        finally:
            sess.trace = None
        log(f"  {job.test}: traced one more run")

    def timed(jobs: list[_Job], desc: str) -> None:
        """``reps`` rounds, each running every job once, in turn (reversed every other round,
        so a drift within a round falls on every job alike too)."""
        for r in tqdm(range(reps), desc=desc, file=sys.stderr, leave=False, disable=None):
            for job in jobs if r % 2 == 0 else jobs[::-1]:
                job.samples.append(job.once())

    def one_config(key: tuple[str, str, str, float | None]) -> None:
        """One configuration from its session's start to its end: each test warmed up, timed
        and recorded in turn. The session goes with this call's locals."""
        config = open_config(*key)
        for job in jobs_of(config) if config is not None else []:
            warm(job)
            timed([job], f"  {job.test}")
            record(job)
            traced(job)

    if interleave:  # every session at once, the repetitions round by round across all of them
        jobs = []
        for key in sweep:
            config = open_config(*key)
            for job in jobs_of(config) if config is not None else []:
                warm(job)
                jobs.append(job)
        timed(jobs, "  rounds")
        for job in jobs:
            record(job)
            traced(job)
    else:
        for key in sweep:
            one_config(key)
            gc.collect()  # the session's pinned host copies go before the next one's
    if skipped and not results:
        raise skipped[0]
    return results


@dataclass(slots=True)
class _Config:
    """One configuration of the sweep, its session, and what its placement puts where."""

    graph_mode: str
    n_streams: str
    strategy: str
    budget: float | None
    session: Session
    allocated_before: int  # the backend's bytes before the session existed
    resident: float  # weight bytes on the device
    held: float  # MiB of weights the device holds: resident layers, the ring, the cache
    streamed: int  # bytes copied to the device per forward pass
    link: float = 0.0  # the calibrated host-to-device bytes/s (streamed configurations)
    predicted: float = (
        0.0  # tokens/s engine.passes.offload.predict expects of decode (streamed ones)
    )

    @property
    def label(self) -> str:
        where = "" if self.budget is None else f" vram={self.budget:g}"
        return f"streams={self.n_streams} graphs={self.graph_mode} {self.strategy}{where}"


@dataclass(slots=True)
class _Job:
    """One test of one configuration: how to run it once, and its samples."""

    config: _Config
    test: str
    n: int  # tokens a run counts
    once: Callable[[], Sample]
    warm: int  # untimed runs first
    executor: tuple[int, dict[str, int], str]  # the key of the executor whose launches count
    passes: int  # forward passes a run makes (streamed bytes are per pass)
    launches: int = 0
    vram_mib: float = 0.0
    samples: list[Sample] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Sample:
    """One timed repetition: the seconds its tokens/s divide by, the time to the first token,
    and each generated token's latency."""

    total: float
    ttft: float
    steps: list[float]


def _generate(sess: Session, prompt: list[int], n: int) -> Sample:
    """The prompt pass (its time is the time to first token), then ``n`` greedy tokens as
    ``generate()`` makes them (argmax on the device), each one timed."""
    t0 = time.perf_counter()
    tok = int(np.argmax(sess.prefill(prompt)))
    ttft = time.perf_counter() - t0
    steps = []
    for _ in range(n):
        t = time.perf_counter()
        tok = sess.decode_greedy(tok)
        steps.append(time.perf_counter() - t)
    return Sample(sum(steps), ttft, steps)


def _percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile by linear interpolation (NumPy's default)."""
    return float(np.percentile(sorted_values, q))


def main(args: argparse.Namespace) -> int:
    if args.preset:
        for key, value in SEED_PRESETS[args.preset][1].items():
            setattr(args, key, value)
    if args.plot and not str(args.plot).lower().endswith(".png"):
        raise ValueError(f"--plot writes a PNG: name it .png, not {args.plot}")
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
        pg=args.prompt_gen,
        stack=not args.no_stack,
        interleave=args.interleave,
    )
    print(format_results(results, args.output))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: wrote {args.plot}", file=sys.stderr)
    if results and args.output == "md":
        print(f"\nbackend: {get_backend(results[0].backend).describe()}")
    if trace is not None:
        timeline.save(trace, args.trace)
    return 0
