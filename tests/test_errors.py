"""Every bad input is one clear error, found before expensive work: exit status 2 for what
the command line asks (a flag, a value, a file named that does not exist), 1 for work that
fails (a broken file, a machine without what the run needs); one line on stderr, never a
traceback, no half-written output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tools.cli import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit status and stderr of a command (argparse's own exits included)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err
    assert lines, "no message"
    return lines[-1]


@pytest.mark.parametrize(
    ("argv", "status", "says"),
    [
        (["generate", "-m", "x.gguf", "abc\udcff"], 2, "the prompt is not valid UTF-8 (byte 0xff"),
        (["generate", "-m", "x.gguf", "hi", "--temp", "-1"], 2, "--temp takes a number >= 0"),
        (["generate", "-m", "x.gguf", "hi", "-s", "-5"], 2, "--seed takes a whole number"),
        (["generate", "-m", "x.gguf", "hi", "--top-p", "2"], 2, "--top-p takes a number"),
        (["generate", "-m", "x.gguf", "hi", "-n", "-3"], 2, "-n takes a count >= 0"),
        (["generate", "-m", "x.gguf", "hi", "-c", "0"], 2, "expected a whole number >= 1"),
        (["generate", "-m", "x.gguf", "hi", "--vram", "-1"], 2, "positive, finite number of GiB"),
        (["generate", "-m", "x.gguf", "hi", "--streams", "999"], 2, "count from 1 to 8"),
        (["generate", "-m", "nowhere", "hi"], 2, "-m nowhere: no such file"),
        (["perplexity", "-m", "x.gguf", "-f", "t.txt", "--chunks", "0"], 2, "--chunks takes"),
        (["graph", "--offload", "*x+y"], 2, "unknown offload policy '*x+y'"),
        (["graph", "-m", "gemma3-tiny", "--offload", "*100+0"], 2, "the model has 3 blocks"),
        (["graph", "--offload", "auto"], 2, "auto picks a placement within a budget"),
        (["bench", "-m", "llama-tiny", "--offload", "*1+0", "-ngl", "2"], 2, "give one of them"),
        (["bench", "-m", "llama-tiny", "--plot", "nodir/x.png"], 2, "its folder does not exist"),
    ],
)
def test_usage_errors_are_one_line_with_status_2(
    argv: list[str], status: int, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(argv, capsys)
    assert code == status, err
    assert says in one_error_line(err)


def test_a_model_directory_and_a_bad_text_file_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(["info", "-m", str(tmp_path)], capsys)
    assert code == 2 and f"-m {tmp_path} is a directory" in one_error_line(err)
    bad = tmp_path / "text.txt"
    bad.write_bytes(b"fine so far \xff\xfe not utf-8")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    code, err = run(["perplexity", "-m", str(gguf), "-f", str(bad)], capsys)
    assert code == 1 and f"{bad} is not UTF-8 text (byte 0xff at offset 12)" in err


def test_a_context_no_machine_holds_fails_before_the_weights_are_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from engine.model.session import Session
    from engine.model.weights import random_weights
    from graph.models import preset

    cfg = preset("llama-tiny")
    with pytest.raises(Exception, match=r"of KV cache \(1000000000000 positions\) needs"):
        Session(cfg, random_weights(cfg), n_ctx=10**12, n_batch=4)


def test_one_repetition_prints_no_spread_and_json_says_null(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["bench", "-m", "llama-tiny", "-p", "4", "-n", "2", "-r", "1"]
    assert main(args) == 0
    table = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| random")]
    assert table and not any("±" in row for row in table)
    assert main([*args, "-o", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["ts_sd"] for r in rows] == [None, None]
    assert rows[0]["p50_ms"] is None and rows[1]["p50_ms"] > 0  # pp has no per-token latency
    assert all(r["vram_mib"] is None and r["predicted_ts"] is None for r in rows)  # a CPU run
    assert main([*args, "-o", "csv"]) == 0
    head, first = capsys.readouterr().out.splitlines()[:2]
    cells = dict(zip(head.split(","), first.split(","), strict=True))
    assert cells["ts_sd"] == "" and cells["vram"] == "" and cells["p50_ms"] == ""


def test_dump_on_a_machine_without_a_gpu_draws_the_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("numpy")
    from backends import best_backend

    if best_backend() != "numpy":
        pytest.skip("a GPU is here")
    out = tmp_path / "d.json"
    assert main(["dump", "-m", "gemma3-tiny", "-o", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert "gpu" not in summary["peak_bytes"] and "cpu" in summary["peak_bytes"]


TOKENS = st.sampled_from(
    [
        "-m", "random:llama-tiny", "llama-tiny", "nope", "x.gguf", "-p", "-n", "-r", "-c", "-b",
        "--streams", "--offload", "-ngl", "--vram", "--cache", "--graphs", "--dtype", "--backend",
        "--cache-type", "--temp", "--top-k", "--chunks", "-o", "-f", "--prompt-len", "--layers",
        "--ops", "--plot", "--trace", "auto", "all", "*1+0", "*x", "ngl=1", "on", "off", "f16",
        "q4_k", "numpy", "tpu", "0", "1", "2", "-1", "1e9", "inf", "nan", "3,2", "1-4*2", "",
        "\udcff", "\x1b[31m", "a" * 300, "out.json", "out.png", "nodir/out.svg", "0.0001",
        "--graph", "g.json", "t.txt", "x.gguf",
    ]
)  # fmt: skip
PAYLOADS = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda b: b"GGUF\x03\x00\x00\x00" + b),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
        max_leaves=20,
    ).map(lambda v: json.dumps(v).encode()),
)
COMMANDS = st.sampled_from(["bench", "graph", "dump", "generate", "info", "perplexity"])


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(command=COMMANDS, words=st.lists(TOKENS, max_size=6), payload=PAYLOADS)
def test_random_command_lines_end_in_one_line_or_success(
    command: str, words: list[str], payload: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Random flags and values, and random bytes or JSON in the files they name (a model, a
    text, a graph): each command either runs (fast: the values are tiny or refused) or stops
    with status 1 or 2 and one line on stderr, never a traceback, and leaves no partial
    output behind."""
    import contextlib
    import io
    import os

    work = tmp_path_factory.mktemp("fuzz")
    for name in ("x.gguf", "t.txt", "g.json"):
        (work / name).write_bytes(payload)
    here = Path.cwd()
    os.chdir(work)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(
                    [command, *words, "-r", "1"] if command == "bench" else [command, *words]
                )
            except SystemExit as e:
                code = int(e.code or 0)
    finally:
        os.chdir(here)
    text = err.getvalue()
    assert "Traceback" not in text
    assert code in (0, 1, 2), (command, words, text)
    if code == 1:
        lines = [x for x in text.splitlines() if x.startswith("streamgraph ")]
        assert len(lines) == 1 and ": error: " in lines[0], (command, words, text)
    leftovers = [p.name for p in work.iterdir() if p.name.endswith((".part", ".tmp"))]
    assert not leftovers, leftovers


def test_text_a_model_writes_cannot_drive_the_terminal() -> None:
    """A crafted vocabulary's pieces may hold escape sequences: generate writes control
    characters as visible escapes, newlines and tabs as they are."""
    from tools.model_commands import _CONTROLS

    assert "red\x1b[31m\x07\x9b\x00".translate(_CONTROLS) == "red\\x1b[31m\\x07\\x9b\\x00"
    assert "two\nlines\tand é ✓".translate(_CONTROLS) == "two\nlines\tand é ✓"


@pytest.mark.parametrize(
    "payload", [b"", b"GGUF", b"\x00" * 64, b"GGUF\x03\x00\x00\x00" + b"\xff" * 40]
)
def test_garbage_files_fail_in_one_line_and_leave_nothing(
    payload: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, text, graph = tmp_path / "m.gguf", tmp_path / "t.txt", tmp_path / "g.json"
    for f in (model, text, graph):
        f.write_bytes(payload)
    out = tmp_path / "o.json"
    for argv in (
        ["info", "-m", str(model)],
        ["generate", "-m", str(model), "hi"],
        ["perplexity", "-m", str(model), "-f", str(text)],
        ["dump", "--graph", str(graph), "-o", str(out)],
    ):
        code, err = run(argv, capsys)
        assert code == 1, (argv, err)
        assert one_error_line(err).startswith(f"streamgraph {argv[0]}: error: ")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "g.json",
        "m.gguf",
        "t.txt",
    ]
