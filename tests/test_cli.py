"""The ``streamgraph`` command: flags, output formats, errors, on a tiny built-in model."""

from __future__ import annotations

import csv
import io
import json

import pytest

from engine.options import Options
from tests.test_streaming import pin_slow_host_costs
from tools import bench
from tools.cli import main


def test_bench_markdown_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "-m", "llama-tiny", "-p", "4,8", "-n", "3", "-r", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    table = [line for line in out if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "model"
    assert set(table[1].replace("|", "").replace(" ", "")) <= {"-", ":"}
    header = [c.strip() for c in table[0].split("|")]
    tests = [row.split("|")[header.index("test")].strip() for row in table[2:]]
    assert tests == ["pp4", "pp8", "tg3"]
    assert all("±" in row for row in table[2:])
    assert any(line.startswith("backend: numpy") for line in out)


def test_bench_json_and_csv(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "-m", "gemma3-tiny", "-p", "5", "-n", "2", "-r", "2", "-o", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["test"] for r in rows] == ["pp5", "tg2"]
    assert all(r["ts_mean"] > 0 and r["ts_sd"] >= 0 and r["reps"] == 2 for r in rows)
    assert all(r["backend"] == "numpy" and r["launches"] > 0 for r in rows)

    assert main(["bench", "-m", "gemma3-tiny", "-p", "5", "-n", "0", "-r", "1", "-o", "csv"]) == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(parsed) == 1 and parsed[0]["test"] == "pp5"

    assert main(["bench", "-m", "gemma3-tiny", "-p", "0", "-n", "2", "-r", "1", "-o", "jsonl"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(s)["test"] for s in lines] == ["tg2"]


def test_bench_runs_bf16_weights() -> None:
    res = sweep = [Options(backend="numpy", dtype="bf16")]
    res = bench.run_bench("llama-tiny", [4], [2], 1, sweep, log=lambda s: None)
    assert [r.dtype for r in res] == ["bf16", "bf16"]


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "-p", "x"],
        ["bench", "-p", "-3"],
        ["bench", "--dtype", "q4_k"],
    ],
)
def test_bench_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bench_bad_values_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "-m", "no-such-model"]) == 2  # neither built in nor a file
    assert "built-in architecture (gemma3-270m, gemma3-tiny" in capsys.readouterr().err
    assert main(["bench", "-m", "llama-tiny", "-r", "0"]) == 2
    assert "repetitions must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a usage error, refused by the flag parser
        main(["bench", "-m", "llama-tiny", "--backend", "tpu"])
    assert e.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err


def test_graph_command_prints_graph_plan_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "-m", "llama-tiny", "-t", "3", "-c", "16", "--plan"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Graph: ") and "MemoryPlan: arena" in out and "'logits'" in out
    assert main(["graph", "-m", "llama-tiny", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "streamgraph.graph" and doc["nodes"]


def test_missing_cupy_is_one_line_and_auto_falls_back_to_numpy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import importlib.util

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here: the missing-CuPy message cannot be shown")
    # (the machine lacks what the command needs: a failure of the run, exit 1)
    assert main(["bench", "-m", "llama-tiny", "--backend", "cupy", "-p", "4", "-n", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'streamgraph[cuda13]'" in err
    assert main(["bench", "-m", "llama-tiny", "--backend", "auto", "-p", "4", "-n", "0"]) == 0
    assert "| numpy " in capsys.readouterr().out


def test_bench_sweeps_stream_counts(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "-m", "llama-tiny", "-p", "4", "-n", "2", "-r", "1", "-o", "json"]
    assert main([*args, "--streams", "1,3,auto"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["streams"], r["test"]) for r in rows] == [
        ("1", "pp4"),
        ("1", "tg2"),
        ("3", "pp4"),
        ("3", "tg2"),
        ("auto", "pp4"),
        ("auto", "tg2"),
    ]
    with pytest.raises(SystemExit):
        main([*args, "--streams", "0"])


def test_bench_sweeps_placements(
    capsys: pytest.CaptureFixture[str],
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    monkeypatch.setenv("STREAMGRAPH_CACHE", str(tmp_path))  # the link's calibration lands here
    pin_slow_host_costs()  # auto streams (as on a GPU) rather than computing on the host
    args = ["bench", "-m", "llama-tiny", "-p", "4", "-n", "2", "-r", "1", "-o", "json"]
    assert main([*args, "--strategy", "all,*0+1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["strategy"], r["test"]) for r in rows] == [
        ("all", "pp4"),
        ("all", "tg2"),
        ("*0+1", "pp4"),
        ("*0+1", "tg2"),
    ]
    assert rows[0]["streamed_mb"] == 0 and rows[2]["streamed_mb"] > 0
    assert all(r["stream_gbs"] > 0 and r["link_pct"] > 0 for r in rows[2:])
    assert rows[2]["weights_mib"] < rows[0]["weights_mib"]
    assert main([*args[:-2], "--strategy", "auto", "--vram", "0.0004,0.01"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].split("|")]
    assert "vram" in header and "link" in header
    budgets = [row.split("|")[header.index("vram")].strip() for row in table[2:]]
    assert budgets == ["0.0004", "0.0004", "0.01", "0.01"]
    assert main([*args, "--strategy", "auto"]) == 2  # auto needs --vram: one line, exit 2
    assert "auto picks a placement within a budget: give vram (--vram)" in capsys.readouterr().err
