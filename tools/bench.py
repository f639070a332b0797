"""``streamgraph bench``: prompt-processing and generation speed, in llama-bench's conventions.

    streamgraph bench                          # random:gemma3-270m on the best backend
    streamgraph bench -m llama-tiny -p 32,128 -n 16 -r 5 -o json
    streamgraph bench -m llama-tiny -p 32 -n 8 --streams 3 --trace out.json   # + out.png
    streamgraph bench -m llama-7b --dtype bf16 -p 0 -n 16 --offload '*15+5,auto' --vram 6,8

The run flags are every command's (``tools.args``); ``--graphs``, ``--streams``, ``--offload``
(``-ngl``) and ``--vram`` take comma-separated lists, and every combination runs. Each
configuration is planned as a session plans it (``plan_for``), its weights are made where the
plan keeps them (generated on the device only for what stays there), and the session runs
that plan: the VRAM column is what the device holds, measured, and ``--vram`` bounds it.

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
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from backends import get_backend
from engine.model.session import Session, plan_for
from engine.model.weights import device_weights
from engine.options import Options
from engine.passes.plans import StepKey
from engine.views.trace import Trace
from graph.ops import GraphError
from tools import timeline
from tools.args import ModelArg, UsageError, sweep_from
from tools.bench_args import DEFAULT_MODEL, SEED_PRESETS, add_arguments
from tools.bench_report import BenchResult, format_results, plot

__all__ = ["BenchResult", "run_bench", "add_arguments", "main"]


def run_bench(
    model: str,
    n_prompt: Sequence[int],
    n_gen: Sequence[int],
    reps: int,
    sweep: Sequence[Options] | None = None,
    *,
    seed: int = 0,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
    trace: Trace | None = None,
    pg: Sequence[tuple[int, int]] = (),
    interleave: bool = False,
    depths: Sequence[int] = (0,),
) -> list[BenchResult]:
    """Every test of every configuration in ``sweep`` (``Options``; default: one, on the
    best backend); ``trace``: record one extra, untimed run of each test into it.

    By default each configuration's session is built, warmed up, timed and dropped before the
    next one's, so only one session holds memory at a time. ``interleave``: every session is
    built and warmed up first, then each repetition is a round that runs every test once, in
    turn (reversed every other round). A machine's speed drifts over minutes (an H200 ran the
    same captured 270M step at 816 and 904 µs a few minutes apart), which is more than one
    stream count gains over another; interleaved, the drift falls on every row alike."""
    if reps < 1:
        raise ValueError(f"-r/--repetitions must be at least 1, got {reps}")
    tests = _Tests(tuple(n_prompt), tuple(n_gen), tuple(pg), tuple(depths) or (0,))
    sweep = [_sized(o, tests.n_ctx, tests.n_batch) for o in sweep or [Options(backend="auto")]]
    run = _Sweep(_Source(ModelArg.parse(model), seed, log), tests, reps, len(sweep), log, trace)
    if interleave:  # every session at once, the repetitions round by round across all of them
        jobs = [job for options in sweep for job in run.open(options)]
        run.time(jobs, "  rounds")
        for job in jobs:
            run.finish(job)
    else:
        for options in sweep:
            run.one(options)
            gc.collect()  # the session's pinned host copies go before the next one's
    if run.skipped and not run.results:
        raise run.skipped[0]
    return run.results


@dataclass(frozen=True)
class _Tests:
    """What each configuration runs: pp<N>, tg<N> and pp<N>+tg<M> tests, at each depth."""

    n_prompt: tuple[int, ...]
    n_gen: tuple[int, ...]
    pg: tuple[tuple[int, int], ...]
    depths: tuple[int, ...] = (0,)

    @property
    def n_ctx(self) -> int:
        """The context every test fits in, on top of the deepest fill."""
        longest = max([*self.n_prompt, 0, *(a + b for a, b in self.pg)]) + max([*self.n_gen, 0])
        return max(self.depths) + longest + 1

    @property
    def n_batch(self) -> int:
        """The longest prompt or depth fill, which runs in one pass where ``-b`` allows (a fill
        in passes of one token would make ``-p 0 -n 32 -d 16384`` take minutes: 16,384 decode
        steps instead of 32 passes of 512)."""
        return max([*self.n_prompt, *(a for a, _ in self.pg), *self.depths, 1])


class _Sweep:
    """One ``run_bench``: opens configurations, warms, times and records their tests."""

    def __init__(
        self,
        source: _Source,
        tests: _Tests,
        reps: int,
        n_configs: int,
        log: Callable[[str], None],
        trace: Trace | None,
    ) -> None:
        self.source, self.tests, self.reps, self.n_configs = source, tests, reps, n_configs
        self.log, self.trace = log, trace
        self.results: list[BenchResult] = []
        self.skipped: list[GraphError] = []
        self.prompts = np.random.default_rng(source.seed)

    def open(self, options: Options) -> list[_Job]:
        """The configuration's tests, warmed up (executors built, then captured), with what
        the device holds once they are; none if its budget cannot hold the placement (the
        other rows still run)."""
        try:
            c = self.source.open(options)
        except GraphError as e:
            if self.n_configs == 1:
                raise
            self.log(f"{options.offload} at --vram {options.vram}: skipped, {e}")
            self.skipped.append(e)
            return []
        t = self.tests
        jobs = _jobs(c, t, self.prompts)
        for job in jobs:
            self.log(f"{job.test} {c.label}: warm-up + {self.reps} repetitions")
            for _ in range(job.warm):
                job.once()
            job.launches = c.session.executor(job.key).n_launches
            used = c.backend.memory_in_use()
            if used is not None:
                job.vram_mib = (used - c.used_before) / 2**20
        return jobs

    def time(self, jobs: list[_Job], desc: str) -> None:
        """``reps`` rounds, each running every job once, in turn (reversed every other round,
        so a drift within a round falls on every job alike too)."""
        for r in tqdm(range(self.reps), desc=desc, file=sys.stderr, leave=False, disable=None):
            for job in jobs if r % 2 == 0 else jobs[::-1]:
                job.samples.append(job.once())

    def finish(self, job: _Job) -> None:
        """The job's row; with a trace, one more run of it, recorded (after the timed ones)."""
        self.results.append(_result(job, self.source, self.reps))
        self.log(f"  {job.test} {job.config.label}: {self.results[-1].ts_mean:.2f} t/s")
        if self.trace is None:
            return
        sess = job.config.session
        c = job.config  # the model last: one trace may hold several models' runs
        self.trace.section = f"{job.test} {c.backend.name} {c.label} {self.source.name}"
        sess.trace = self.trace
        try:
            job.once()
        finally:
            sess.trace = None
        self.log(f"  {job.test}: traced one more run")

    def one(self, options: Options) -> None:
        """One configuration from its session's start to its end; the session goes with this
        call's locals."""
        for job in self.open(options):
            self.time([job], f"  {job.test}")
            self.finish(job)


def _sized(options: Options, need: int, batch: int) -> Options:
    """``options`` with a context the tests fit in (``-c``, if given, must hold them)."""
    if options.n_ctx != Options().n_ctx and options.n_ctx < need:
        raise ValueError(f"-c {options.n_ctx} cannot hold the tests, which need {need} tokens")
    n_ctx = options.n_ctx if options.n_ctx != Options().n_ctx else need
    return options.replace(n_ctx=n_ctx, n_batch=max(1, min(batch, options.n_batch)))


class _Source:
    """Where a configuration's weights come from: a file's, dequantized to its ``--dtype``
    (read once per type), or generated - on the device where its plan keeps them and on the
    host where it does not, so ``--vram`` bounds what the device really holds."""

    def __init__(self, model: ModelArg, seed: int, log: Callable[[str], None]) -> None:
        self.model, self.seed, self.log = model, seed, log
        self.name = model.name
        self._file: Any = None
        self._loaded: dict[str, dict[str, Any]] = {}
        if model.arch is not None:
            self.cfg = model.config()
        else:
            from engine.model.gguf import open_gguf

            self._file = open_gguf(model.path)  # type: ignore[arg-type]
            self.cfg = self._file.config

    def config(self, options: Options) -> Any:
        """The model as a run with ``options`` stores it (a file in its own types on a GPU)."""
        if self._file is None:
            return self.cfg
        from engine.model.gguf import config_for

        return config_for(self._file, options)

    def open(self, options: Options) -> _Config:
        be = get_backend(options.backend)
        options = options.replace(backend=be.name)
        mp = plan_for(self.config(options), options, be)  # refused here if it cannot fit
        gc.collect()
        used_before = be.memory_in_use()
        weights = self._weights(mp, be)
        sess = Session(mp.config, weights, be, plan=mp)
        del weights
        if mp.placement is not None and mp.placement.notes:  # what auto chose, and why
            self.log(f"{options.offload} at --vram {options.vram}: {mp.placement.notes[0]}")
        return _Config(options, be, sess, used_before or 0)

    def _weights(self, mp: Any, be: Any) -> dict[str, Any]:
        cfg = mp.config
        if self._file is not None:  # a GGUF file's own weights, read once per storage
            storage = cfg.storage
            if storage not in self._loaded:
                self.log(f"loading {self.name} as {storage} ...")
                self._loaded = {storage: self._file.weights_as(cfg)}
            return self._loaded[storage]
        off = mp.streamed | mp.host_tables | mp.host_weights
        self.log(
            f"generating {cfg.n_params() / 1e6:.2f}M {cfg.dtype.name} weights for "
            f"{self.name} on {be.name}"
        )
        return device_weights(cfg, be, self.seed, stack=mp.options.stack, on_host=off)


@dataclass(slots=True)
class _Config:
    """One configuration of the sweep: its options, backend and session."""

    options: Options
    backend: Any
    session: Session
    used_before: int  # device bytes in use before its weights existed

    @property
    def label(self) -> str:
        o = self.options
        where = "" if o.vram is None else f" vram={o.vram:g}"
        graphs = "on" if o.mode == "graph" else "off"
        cache = f" kv={self.session.cache_dtype.name}"
        return f"streams={o.streams} graphs={graphs} {o.offload or 'all'}{where}{cache}"


@dataclass(slots=True)
class _Job:
    """One test of one configuration: how to run it once, and its samples."""

    config: _Config
    test: str
    n: int  # tokens a run counts
    once: Callable[[], Sample]
    warm: int  # untimed runs first
    key: StepKey  # the forward pass whose launches the table counts
    passes: int  # forward passes a run makes (streamed bytes are per pass)
    depth: int = 0  # tokens in the cache before the timed part (llama-bench's -d)
    launches: int = 0
    vram_mib: float | None = None  # what the device holds once warm (None: no device)
    samples: list[Sample] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Sample:
    """One timed repetition: the seconds its tokens/s divide by, the time to the first token,
    and each generated token's latency."""

    total: float
    ttft: float
    steps: list[float]


def _jobs(c: _Config, tests: _Tests, rng: np.random.Generator) -> list[_Job]:
    """The configuration's tests at each depth: pp, tg, then pp+tg. At depth d (llama-bench's
    ``-d``) every repetition first fills the cache with d tokens, untimed, then times the test
    on top of them."""
    sess, jobs = c.session, []
    vocab = sess.cfg.n_vocab
    for d in tests.depths:
        fill = [int(t) for t in rng.integers(0, vocab, d)]
        at = f" @ d{d}" if d else ""

        def filled(fill: list[int] = fill) -> None:
            sess.reset()
            if fill:
                sess.prefill(fill, "none")

        for n in tests.n_prompt:
            if n == 0:
                continue
            prompt = [int(t) for t in rng.integers(0, vocab, n)]

            def pp(prompt: list[int] = prompt, filled: Callable[[], None] = filled) -> Sample:
                filled()
                t0 = time.perf_counter()
                sess.prefill(prompt)  # the first token's logits come with the prompt pass
                took = time.perf_counter() - t0
                return Sample(took, took, [])

            key = sess.step_key(min(n, sess.n_batch), d + n, "last")
            passes = -(-n // sess.n_batch)
            jobs.append(_Job(c, f"pp{n}{at}", n, pp, 2, key, passes, d))
        for n in tests.n_gen:
            if n == 0:
                continue

            def tg(n: int = n, filled: Callable[[], None] = filled) -> Sample:
                filled()
                return _generate(sess, [1], n)

            key = sess.step_key(1, d + n + 1, "argmax")
            jobs.append(_Job(c, f"tg{n}{at}", n, tg, 1, key, n, d))  # graph mode: run 2 captures
        for n_pp, n_tg in tests.pg:
            prompt = [int(t) for t in rng.integers(0, vocab, n_pp)]

            def both(
                prompt: list[int] = prompt, n: int = n_tg, filled: Callable[[], None] = filled
            ) -> Sample:
                filled()
                x = _generate(sess, prompt, n)
                return Sample(x.ttft + x.total, x.ttft, x.steps)  # prompt and generation

            key = sess.step_key(1, d + n_pp + n_tg, "argmax")
            passes = -(-n_pp // sess.n_batch) + n_tg
            jobs.append(_Job(c, f"pp{n_pp}+tg{n_tg}{at}", n_pp + n_tg, both, 2, key, passes, d))
    return jobs


def _result(job: _Job, source: _Source, reps: int) -> BenchResult:
    """The table row of a timed job (None where a value does not apply: see BenchResult)."""
    c, n = job.config, job.n
    o, sess = c.options, c.session
    mp = sess.plan
    secs = [x.total for x in job.samples]
    rates = [n / s for s in secs]
    steps = sorted(t for x in job.samples for t in x.steps)
    placement = mp.placement
    streamed = placement.streamed_bytes if placement is not None else 0
    # streamed bytes per forward pass x passes per second
    rate = streamed / 1e9 * job.passes / statistics.median(secs) if streamed else None
    link = mp.costs.link_bytes_per_s
    tg = job.test.startswith("tg")
    predicted = 1 / placement.predicted_s if streamed and tg and placement else None
    cfg = sess.cfg
    return BenchResult(
        source.name,
        round(cfg.n_bytes(o.stack) / 2**20, 2),
        round(cfg.n_params() / 1e6, 2),
        c.backend.name,
        cfg.storage,
        mp.options.kv_type,
        str(o.streams),
        o.offload or "all",
        "on" if o.mode == "graph" else "off",
        job.test,
        n,
        job.depth,
        reps,
        statistics.fmean(rates),
        statistics.stdev(rates) if len(rates) > 1 else None,
        statistics.median(rates),
        job.launches,
        o.vram,
        round(mp.device_weight_bytes / 2**20, 1),
        round(streamed / 1e6, 3),
        None if rate is None else round(rate, 2),
        None if rate is None else round(100 * rate * 1e9 / link, 1),
        None if predicted is None else round(predicted, 2),
        None if job.vram_mib is None else round(job.vram_mib, 1),
        round(statistics.median(x.ttft for x in job.samples) * 1e3, 3),
        round(_percentile(steps, 50) * 1e3, 3) if steps else None,
        round(_percentile(steps, 90) * 1e3, 3) if steps else None,
    )


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


def models_of(given: str | list[str] | None) -> list[str]:
    """The models ``-m`` names, in order: each ``-m`` may list several, comma-separated (as
    llama-bench reads it); none given is the default model (a preset gives one string)."""
    if not given:
        return [DEFAULT_MODEL]
    if isinstance(given, str):
        given = [given]
    models = [m.strip() for value in given for m in value.split(",")]
    if any(not m for m in models):
        raise UsageError(f"-m {','.join(given)!r}: an empty model name between commas")
    for m in models:  # every name checked before the first model's minutes of timing
        ModelArg.parse(m)
    return models


def main(args: argparse.Namespace) -> int:
    if args.preset:
        for key, value in SEED_PRESETS[args.preset][1].items():
            setattr(args, key, value)
    if args.plot and not str(args.plot).lower().endswith(".png"):
        raise UsageError(f"--plot writes a PNG: name it .png, not {args.plot}")
    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        raise UsageError(f"--plot {args.plot}: its folder does not exist")
    if args.repetitions < 1:
        raise UsageError(f"-r/--repetitions must be at least 1, got {args.repetitions}")
    trace = None
    if args.trace:
        timeline.check_path(args.trace)  # before the run, not after it
        trace = Trace()
    sweep = sweep_from(args, n_ctx=args.ctx_size or Options().n_ctx)
    results = []
    for model in models_of(args.model):
        results += run_bench(
            model,
            args.n_prompt,
            args.n_gen,
            args.repetitions,
            sweep,
            seed=args.seed,
            trace=trace,
            pg=args.prompt_gen,
            interleave=args.interleave,
            depths=args.n_depth,
        )
    print(format_results(results, args.output))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: wrote {args.plot}", file=sys.stderr)
    if results and args.output == "md":
        print(f"\nbackend: {get_backend(results[0].backend).describe()}")
        costs = {_costs_line(o) for o in sweep if o.offload}
        for line in sorted(costs):
            print(line)
    if trace is not None:
        timeline.save(trace, args.trace)
    return 0


def _costs_line(options: Options) -> str:
    from engine.runtime.calibration import costs_for

    costs, source = costs_for(options, options.backend)
    return f"costs: {source}\n  {costs.describe([t for t, _ in costs.device_rates])}"
