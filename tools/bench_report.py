"""What ``streamgraph bench`` reports: one row per test of a configuration (``BenchResult``),
the table in each output format, and the sweep drawn as bars."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

__all__ = ["BenchResult", "format_results", "plot"]


@dataclass(frozen=True, slots=True)
class BenchResult:
    """One row. A value that does not apply to the row (the spread of one repetition, a
    prediction for an unstreamed row, device memory on the CPU) is None: null in JSON, an
    empty cell in CSV, "-" in the table."""

    model: str
    size_mib: float
    params_m: float
    backend: str
    dtype: str
    type_kv: str  # the KV cache's storage (llama-bench's type_k and type_v)
    streams: str  # --streams as asked: a count or "auto"
    strategy: str  # weight placement (engine.passes.offload): all, auto, *N+K
    graphs: str  # "on": CUDA-graph replay of each forward pass; "off": eager launches
    test: str  # pp512, tg128, pp512+tg128; " @ d4096" at a depth, as llama-bench names them
    n_tokens: int
    n_depth: int  # tokens already in the cache when the timed part starts
    reps: int
    ts_mean: float  # tokens/s
    ts_sd: float | None  # sample standard deviation (None with one repetition)
    ts_median: float
    launches: int  # kernel launches per forward pass of this test's graph
    vram: float | None = None  # --vram as asked (GiB), None without a budget
    weights_mib: float = 0.0  # weight bytes on the device: resident layers, the ring, the cache
    streamed_mb: float = 0.0  # weight megabytes copied to the device per forward pass
    stream_gbs: float | None = None  # achieved host-to-device rate while streaming
    link_pct: float | None = None  # ... as a share of the measured pinned link
    predicted_ts: float | None = None  # what offload.predict said of a streamed tg test (t/s)
    vram_mib: float | None = None  # device memory the configuration holds (None: no device)
    ttft_ms: float = 0.0  # time to first token (median): the prompt pass that gives its logits
    p50_ms: float | None = None  # per-token latency of generation, median over every token
    p90_ms: float | None = None  # ... 90th percentile (None: a test that generates nothing)


def _num(value: float | None, spec: str, unit: str = "") -> str:
    """A table cell: the value formatted, or "-" where it does not apply."""
    return "-" if value is None else f"{value:{spec}}{unit}"


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
        "type_kv",
        "streams",
        "strategy",
        "graphs",
        "test",
        "t/s",
        "launches",
    ]
    streaming = any(r.streamed_mb for r in results)
    device = any(r.vram_mib is not None for r in results)
    cols += ["TTFT ms", "p50 ms", "p90 ms"] + (["VRAM"] if device else [])
    if streaming:
        cols += ["vram", "weights", "streamed", "GB/s", "link", "predicted"]
    rows = [
        [
            r.model,
            f"{r.size_mib:.2f} MiB",
            f"{r.params_m:.2f} M",
            r.backend,
            r.dtype,
            r.type_kv,
            r.streams,
            r.strategy,
            r.graphs,
            r.test,
            f"{r.ts_mean:.2f}" + (f" ± {r.ts_sd:.2f}" if r.ts_sd is not None else ""),
            str(r.launches),
            f"{r.ttft_ms:.2f}",
            _num(r.p50_ms, ".2f"),
            _num(r.p90_ms, ".2f"),
        ]
        + ([_num(r.vram_mib, ".0f", " MiB")] if device else [])
        + (
            [
                _num(r.vram, "g"),
                f"{r.weights_mib:.1f} MiB",
                f"{r.streamed_mb:.1f} MB",
                _num(r.stream_gbs, ".1f"),
                _num(r.link_pct, ".0f", "%"),
                _num(r.predicted_ts, ".2f"),
            ]
            if streaming
            else []
        )
        for r in results
    ]
    if fmt == "csv":
        head = ",".join(f.name for f in fields(BenchResult))
        lines = [head] + [
            ",".join(_cell(getattr(r, f.name)) for f in fields(BenchResult)) for r in results
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
        "TTFT ms",
        "p50 ms",
        "p90 ms",
        "VRAM",
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


def _cell(value: object) -> str:
    """A CSV cell: empty where the value does not apply."""
    return "" if value is None else str(value)


def plot(results: list[BenchResult], path: str) -> None:
    """The sweep as bars: tokens/s (mean, with the standard deviation, the value written on
    each bar) per configuration, one panel per test. Bars are labelled by what varies across
    the sweep; a panel whose rows differ more than 20-fold (all resident against streamed) is
    drawn on a log scale, so the slow rows stay readable."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'streamgraph[viz]'") from None
    tests = list(dict.fromkeys(r.test for r in results))
    varies = [
        k
        for k in ("model", "dtype", "streams", "graphs", "strategy", "vram")
        if len({getattr(r, k) for r in results}) > 1
    ]
    fig = Figure(figsize=(max(6.0, 1.0 + 0.6 * len(results) / len(tests)), 3.2 * len(tests)))
    for k, test in enumerate(tests):
        ax = fig.add_subplot(len(tests), 1, k + 1)
        rows = [r for r in results if r.test == test]
        means = [r.ts_mean for r in rows]
        bars = ax.bar(range(len(rows)), means, yerr=[r.ts_sd or 0.0 for r in rows])
        ax.bar_label(bars, [f"{m:,.3g}" if m < 1000 else f"{m:,.0f}" for m in means], fontsize=7)
        if min(means) > 0 and max(means) / min(means) > 20:
            ax.set_yscale("log")
        ax.set_xticks(
            range(len(rows)),
            [_config(r, varies) for r in rows],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        ax.set_ylabel("tokens/s")
        what = " ".join(getattr(rows[0], k) for k in ("model", "dtype") if k not in varies)
        ax.set_title(f"{what} {test} ({rows[0].backend})".lstrip(), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    from tools.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def _config(r: BenchResult, varies: Sequence[str]) -> str:
    """What distinguishes a row from the others of the sweep."""
    parts = [getattr(r, k) for k in ("model", "dtype") if k in varies]
    if "streams" in varies:
        parts.append(f"streams {r.streams}")
    if "graphs" in varies:
        parts.append(f"graphs {r.graphs}")
    if "strategy" in varies or "vram" in varies:
        parts.append(r.strategy + (f" @{r.vram:g} GiB" if r.vram is not None else ""))
    return " ".join(parts) or r.test
