"""The calibration cache (``engine.runtime.calibration``): measured once per device, read back
after; an entry that is not a valid set of costs is measured again, never trusted or crashed
on; ``remember`` pins the costs a machine plans with; ``costs_for`` says which costs a plan
uses and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backends import get_backend
from backends.spec import Costs
from engine.options import Options
from engine.runtime.calibration import calibrate, costs_for, remember


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STREAMGRAPH_CACHE", str(tmp_path))
    return tmp_path / "calibration.json"


def test_measured_once_then_read_back(cache: Path) -> None:
    first = calibrate("numpy")
    assert cache.exists() and all(v >= 0 for v in first.to_dict().values())
    assert first.link_bytes_per_s > 0 and first.host_bytes_per_s > 0
    pinned = Costs(link_bytes_per_s=1.5e9)
    remember("numpy", pinned)
    assert calibrate("numpy") == pinned


@pytest.mark.parametrize(
    "entry",
    [
        {"link_bytes_per_s": -1.0},
        {"link_bytes_per_s": 0},
        {"link_bytes_per_s": "fast"},
        {"no_such_cost": 1.0},
        {"launch_s": float("nan")},
        [1, 2, 3],
    ],
)
def test_a_damaged_entry_is_measured_again(cache: Path, entry: object) -> None:
    key = get_backend("numpy").describe()
    cache.write_text(json.dumps({key: entry}))
    costs = calibrate("numpy")
    assert costs.link_bytes_per_s > 0 and json.loads(cache.read_text())[key] == costs.to_dict()


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '"x"'])
def test_a_damaged_file_is_replaced(cache: Path, text: str) -> None:
    cache.write_text(text)
    assert calibrate("numpy").link_bytes_per_s > 0
    assert isinstance(json.loads(cache.read_text()), dict)


def test_costs_for_says_where_the_costs_came_from(cache: Path) -> None:
    remember("numpy", Costs(link_bytes_per_s=2e9))
    costs, source = costs_for(Options(offload="auto", vram=1.0), "numpy")
    assert costs.link_bytes_per_s == 2e9 and source.startswith("calibrated on numpy")
    costs, source = costs_for(Options(offload="ngl=3"), "numpy")
    assert costs == Costs() and "not timed" in source
    costs, source = costs_for(Options(offload="auto", vram=1.0), "cupy")
    if "no such device" in source:  # a machine without CuPy plans with the nominal H200
        assert costs == Costs() and "H200" in source
