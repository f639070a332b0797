"""``streamgraph bench`` beyond the basics in test_cli.py: llama-bench's ranges and pp+tg
tests, the latency columns, every output format's shape, the seed presets, the plot, a GGUF
file, and the default run (the README's main job) finishing."""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import fields

import pytest

from engine.options import Options
from tools import bench, bench_args
from tools.cli import main

NUMPY = Options(backend="numpy")


def test_ranges_expand_as_llama_bench_writes_them() -> None:
    assert bench_args._ints("128-1024*2") == [128, 256, 512, 1024]
    assert bench_args._ints("0-16+8,3") == [0, 8, 16, 3]
    assert bench_args._ints("1-3") == [1, 2, 3]
    assert bench_args._pairs("512,128;64,16") == [(512, 128), (64, 16)]
    for bad in ("4-2", "1-8*1", "x", "0-8*2"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_args._ints(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="PROMPT,GEN"):
        bench_args._pairs("512")


def test_pp_tg_and_latency_columns() -> None:
    res = bench.run_bench("llama-tiny", [4], [3], 2, [NUMPY], pg=[(4, 3)], log=lambda s: None)
    by = {r.test: r for r in res}
    assert set(by) == {"pp4", "tg3", "pp4+tg3"}
    assert by["pp4+tg3"].n_tokens == 7
    for r in res:
        assert r.ts_mean > 0 and r.ttft_ms > 0
    assert by["pp4"].p50_ms is None  # a prompt pass has no per-token latencies
    for test in ("tg3", "pp4+tg3"):
        assert 0 < by[test].p50_ms <= by[test].p90_ms


def _rows(fmt: str, capsys: pytest.CaptureFixture[str]) -> str:
    argv = ["bench", "-m", "llama-tiny", "-p", "4", "-n", "2", "-r", "2", "--streams", "1,2"]
    assert main([*argv, "--no-stack", "-o", fmt]) == 0
    return capsys.readouterr().out


def test_every_output_format_has_its_shape(capsys: pytest.CaptureFixture[str]) -> None:
    names = [f.name for f in fields(bench.BenchResult)]
    rows = json.loads(_rows("json", capsys))
    assert len(rows) == 4 and all(list(r) == names for r in rows)  # 2 streams x (pp, tg)
    assert {r["streams"] for r in rows} == {"1", "2"}
    lines = _rows("jsonl", capsys).strip().splitlines()
    assert [list(json.loads(x)) for x in lines] == [names] * 4
    table = list(csv.reader(io.StringIO(_rows("csv", capsys))))
    assert table[0] == names and len(table) == 5 and all(len(r) == len(names) for r in table)
    md = [x for x in _rows("md", capsys).splitlines() if x.startswith("|")]
    assert len(md) == 2 + 4
    width = md[0].count("|")
    assert all(x.count("|") == width for x in md)
    assert "TTFT ms" in md[0] and "p90 ms" in md[0]


def test_presets_set_the_seed_sweeps(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake(model, n_prompt, n_gen, reps, sweep, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.update(model=model, n_prompt=n_prompt, n_gen=n_gen, sweep=sweep, **kw)
        return []

    monkeypatch.setattr(bench, "run_bench", fake)
    assert main(["bench", "--preset", "seed-prefetch"]) == 0
    sweep = seen["sweep"]
    assert seen["model"] == "random:llama-7b" and seen["n_prompt"] == [2048]
    assert {o.vram for o in sweep if o.offload is not None} == {6.0, 8.0, 10.0}
    assert "*15+5" in {o.offload for o in sweep} and {o.dtype for o in sweep} == {"bf16"}
    assert main(["bench", "--preset", "seed-streams"]) == 0
    sweep = seen["sweep"]
    assert [o.streams for o in sweep][:4] == [1, 2, 4, "auto"]
    assert {o.stack for o in sweep} == {False} and {o.mode for o in sweep} == {"graph", "eager"}
    assert seen["interleave"] is True  # its rows differ by less than the machine drifts
    assert main(["bench", "--preset", "seed-head"]) == 0
    assert [o.offload for o in seen["sweep"]] == ["ngl=19", "ngl=18"]


def test_the_seed_head_preset_runs_on_a_tiny_model(capsys: pytest.CaptureFixture[str]) -> None:
    """The head as layer n_layer: ngl=3 keeps it on the device, ngl=2 computes it on the host."""
    argv = ["bench", "-m", "llama-tiny", "-p", "4", "-n", "2", "-r", "1", "-o", "json"]
    assert main([*argv, "--strategy", "ngl=3,ngl=2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in rows] == ["ngl=3", "ngl=3", "ngl=2", "ngl=2"]


def test_plot_draws_the_sweep(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep.png"
    argv = ["bench", "-m", "llama-tiny", "-p", "4", "-n", "2", "-r", "2", "--streams", "1,2"]
    assert main([*argv, "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*argv, "--plot", str(tmp_path / "sweep.svg")]) == 2
    assert "name it .png" in capsys.readouterr().err
    from tools.bench_report import _config

    two = tmp_path / "models.png"  # bars named by model where several share a panel
    assert (
        main(
            [
                "bench",
                "-m",
                "llama-tiny,gemma3-tiny",
                "-p",
                "4",
                "-n",
                "0",
                "-r",
                "1",
                "-o",
                "json",
                "--plot",
                str(two),
            ]
        )
        == 0
    )
    rows = [bench.BenchResult(**r) for r in json.loads(capsys.readouterr().out)]
    assert [_config(r, ["model"]) for r in rows] == ["random:llama-tiny", "random:gemma3-tiny"]
    assert two.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_gguf_file_is_benchmarked(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    from tests.gguf_fixtures import LLAMA, LLAMA_TYPES, write_model

    path = tmp_path / "tiny.gguf"
    write_model(path, LLAMA, LLAMA_TYPES)
    assert main(["bench", "-m", str(path), "-p", "4", "-n", "2", "-r", "1", "-o", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["model"] for r in rows} == {"tiny.gguf"} and len(rows) == 2


def test_several_models_fill_one_table(
    tmp_path,  # noqa: ANN001
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``-m`` repeated or comma-separated, as llama-bench takes it: every model is timed, in
    the order given (one ``-m`` used to replace the others silently)."""
    from tests.gguf_fixtures import LLAMA, LLAMA_TYPES, write_model

    path = tmp_path / "tiny.gguf"
    write_model(path, LLAMA, LLAMA_TYPES)
    argv = ["bench", "-p", "4", "-n", "0", "-r", "1", "-o", "json"]
    assert main([*argv, "-m", "llama-tiny", "-m", f"{path},gemma3-tiny"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["random:llama-tiny", "tiny.gguf", "random:gemma3-tiny"]
    assert main([*argv, "-m", "llama-tiny,,gemma3-tiny"]) == 2
    assert "an empty model name between commas" in capsys.readouterr().err
    missing = tmp_path / "missing.gguf"
    assert main([*argv, "-m", f"llama-tiny,{missing}"]) == 2  # found before any timing
    out = capsys.readouterr()
    assert "no such file" in out.err and "warm-up" not in out.err and out.out == ""
    trace = tmp_path / "two.json"
    assert main([*argv, "-m", "llama-tiny,gemma3-tiny", "--trace", str(trace)]) == 0
    doc = json.loads(trace.read_text())
    names = {e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "process_name"}
    assert any("llama-tiny" in n for n in names) and any("gemma3-tiny" in n for n in names)


def test_the_default_run_finishes(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's main job: the 270M shape on the best backend (here the CPU)."""
    assert main(["bench", "-r", "1"]) == 0
    out = capsys.readouterr().out
    assert "| random:gemma3-270m |" in out and "pp64" in out and "tg16" in out


def test_interleave_times_every_configuration_round_by_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--interleave builds every session first, then each round runs every test once: the
    sessions take turns, so a drift of the machine falls on every row alike. Without it, one
    session runs all its repetitions before the next one exists."""
    built: list[object] = []
    order: list[int] = []  # which session (by the order they were built) each prompt pass ran on

    class Spy(bench.Session):
        def __init__(self, *a, **kw) -> None:  # noqa: ANN002, ANN003
            super().__init__(*a, **kw)
            built.append(self)

        def prefill(self, *a, **kw):  # noqa: ANN002, ANN003, ANN202
            order.append(next(i for i, s in enumerate(built) if s is self))
            return super().prefill(*a, **kw)

    monkeypatch.setattr(bench, "Session", Spy)
    kw = dict(log=lambda s: None)
    two = [NUMPY, NUMPY.replace(streams=2)]
    res = bench.run_bench("llama-tiny", [4], [2], 3, two, interleave=True, **kw)
    assert [(r.streams, r.test) for r in res] == [
        ("1", "pp4"),
        ("1", "tg2"),
        ("2", "pp4"),
        ("2", "tg2"),
    ]
    assert all(r.reps == 3 and r.ts_mean > 0 for r in res)
    # warm-ups: pp twice, tg once, per session; then 3 rounds of pp and tg on 0 and 1 in turn
    assert order == [0, 0, 0, 1, 1, 1] + [0, 0, 1, 1] + [1, 1, 0, 0] + [0, 0, 1, 1]
    built.clear()
    order.clear()
    bench.run_bench("llama-tiny", [4], [2], 3, two, **kw)
    assert order == [0] * 9 + [1] * 9  # (2 + 3 pp, 1 + 3 tg) each


def test_a_sweep_drops_each_session_before_building_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --interleave one session holds memory at a time: the previous configuration's
    session is gone before the next one is built (a 7B sweep cannot hold two)."""
    import weakref

    alive_at_build: list[int] = []
    built: list[weakref.ref] = []

    class Spy(bench.Session):
        def __init__(self, *a, **kw) -> None:  # noqa: ANN002, ANN003
            alive_at_build.append(sum(r() is not None for r in built))
            super().__init__(*a, **kw)
            built.append(weakref.ref(self))

    monkeypatch.setattr(bench, "Session", Spy)
    three = [NUMPY.replace(streams=k) for k in (1, 2, 3)]
    bench.run_bench("llama-tiny", [4], [2], 1, three, log=print)
    assert alive_at_build == [0, 0, 0]


def test_depth_fills_the_cache_before_each_timed_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """-d/--n-depth as llama-bench: every repetition fills the cache with d tokens, untimed,
    then times the test on top of them; rows are named "pp4 @ d16"."""
    calls: list[tuple[int, int]] = []  # (n_past when called, tokens) of each prefill

    class Spy(bench.Session):
        def prefill(self, tokens, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            calls.append((self.n_past, len(tokens)))
            return super().prefill(tokens, *a, **kw)

    monkeypatch.setattr(bench, "Session", Spy)
    rows = bench.run_bench("llama-tiny", [4], [2], 2, [NUMPY], depths=[0, 16], log=lambda s: None)
    assert [(r.test, r.n_depth) for r in rows] == [
        ("pp4", 0),
        ("tg2", 0),
        ("pp4 @ d16", 16),
        ("tg2 @ d16", 16),
    ]
    deep = calls[calls.index((0, 16)) :]  # from the first fill on
    assert deep[:2] == [(0, 16), (16, 4)]  # the fill, then the prompt at position 16
    assert (16, 1) in deep  # tg's one-token prompt after the fill


@pytest.mark.parametrize(("n_batch", "chunks"), [(512, [32]), (8, [8, 8, 8, 8])])
def test_depth_fill_runs_in_passes_of_n_batch(
    monkeypatch: pytest.MonkeyPatch, n_batch: int, chunks: list[int]
) -> None:
    """A generation-only run at depth (``-p 0 -n 2 -d 32``) fills the cache in passes of
    ``-b`` tokens, as llama-bench does, not token by token: the fill's batch is not bounded by
    the longest prompt (there is none)."""
    passes: list[tuple[int, int]] = []  # (n_past when called, tokens) of each forward pass

    class Spy(bench.Session):
        def forward(self, tokens, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            passes.append((self.n_past, len(tokens)))
            return super().forward(tokens, *a, **kw)

    monkeypatch.setattr(bench, "Session", Spy)
    options = [NUMPY.replace(n_batch=n_batch)]
    rows = bench.run_bench("llama-tiny", [0], [2], 1, options, depths=[32], log=lambda s: None)
    assert [(r.test, r.n_depth) for r in rows] == [("tg2 @ d32", 32)]
    starts = [i for i, (past, _) in enumerate(passes) if past == 0]
    assert len(starts) == 2  # the warm-up's fill and the timed repetition's
    for i in starts:
        assert [n for _, n in passes[i : i + len(chunks)]] == chunks
        assert passes[i + len(chunks)] == (32, 1)  # then tg's one-token prompt, at depth
