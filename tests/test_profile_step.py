"""benchmarks/profile_step.py's reading of Nsight Compute's raw CSV (the profiling itself
needs a GPU and ncu; the table is what a developer reads from it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_step.py"
_spec = importlib.util.spec_from_file_location("profile_step", _PATH)
assert _spec is not None and _spec.loader is not None
profile_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_step)

HEADER = '"ID","Kernel Name","gpu__time_duration.sum","dram__bytes_read.sum"'
UNITS = '"","","ns","byte"'


def _csv(*rows: str) -> list[str]:
    # ncu's own log and the profiled program's output come before the header
    return ["==PROF== Connected to process 1", "loading model.gguf ...", HEADER, UNITS, *rows]


def test_summary_sums_each_kernel_instance_and_sorts_by_time() -> None:
    lines = _csv(
        '"0","void k_matvec<half_t, 1, 2, 1>(const T1 *, int)","10,000","30,000,000"',
        '"1","void k_rope_store<half_t>(const float *)","2,000","0"',
        '"2","void k_matvec<half_t, 1, 2, 1>(const T1 *, int)","14,000","42,000,000"',
        '"3","void k_argmax<float>(const T1 *)","1,000","4,000"',
    )
    table = profile_step.summarize(lines)
    names = [row.split("  ")[0] for row in table[1:]]
    assert names == [
        "void k_matvec<half_t, 1, 2, 1>",
        "void k_rope_store<half_t>",
        "void k_argmax<float>",
        "TOTAL",
    ]
    matvec = table[1].split()
    # 2 launches, 24 us, 72 MB, 72e6 B / 24e3 ns = 3000 GB/s, 24 of 27 us
    assert matvec[-5:] == ["2", "24.0", "72.0", "3000", "88.9"]
    assert table[-1].split()[1:] == ["4", "27.0", "72.0", "2667"]


def test_summary_without_a_header_is_an_error_that_says_so() -> None:
    with pytest.raises(ValueError, match="no ncu CSV header"):
        profile_step.summarize(["==PROF== Connected to process 1", "done"])


def test_the_command_names_what_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        profile_step.main([])
    assert e.value.code == 2
    assert "give -m MODEL.gguf" in capsys.readouterr().err
