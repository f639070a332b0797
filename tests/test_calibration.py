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
    numbers = {k: v for k, v in first.to_dict().items() if k != "device_rates"}
    assert cache.exists() and all(v >= 0 for v in numbers.values())
    assert first.link_bytes_per_s > 0 and first.host_bytes_per_s > 0
    assert first.device_rates == ()  # NumPy computes every storage type in f32: no rate per type
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
        {"device_rates": [["q4_k", 1e12]]},
        {"device_rates": {"q4_k": -1.0}},
        {"device_rates": {"q4_k": "fast"}},
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


def test_rates_per_storage_type_are_measured_and_kept(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device whose kernels read storage types as stored gets a rate per type; an entry
    written before those rates existed is measured again, while a pinned one (``remember``,
    rates or none) is kept as given."""
    from engine.runtime import calibration

    monkeypatch.setattr(calibration, "rate_types", lambda be: ("f16", "bf16", "q8_0"))
    monkeypatch.setattr(calibration, "RATE_PROBE_K", 256)  # 2 MiB f16 matrices, not 32
    monkeypatch.setattr(calibration, "RATE_PROBE_BYTES", 4 << 20)
    key = get_backend("numpy").describe()
    cache.write_text(json.dumps({key: {"link_bytes_per_s": 1e9}}))  # an older entry
    costs = calibrate("numpy")
    rates = dict(costs.device_rates)
    assert set(rates) == {"f16", "bf16", "q8_0"} and all(r > 0 for r in rates.values())
    assert json.loads(cache.read_text())[key]["device_rates"] == rates
    assert costs.rate("q8_0") == rates["q8_0"]
    assert costs.rate("q4_k") == costs.device_bytes_per_s  # a type not measured
    assert calibrate("numpy") == costs  # read back (in the same order), not measured again
    assert hash(calibrate("numpy")) == hash(costs)
    pinned = Costs(link_bytes_per_s=3e9)
    remember("numpy", pinned)
    assert calibrate("numpy") == pinned


def test_a_layer_is_charged_by_its_types() -> None:
    costs = Costs(device_bytes_per_s=4e12, launch_s=1e-5, device_rates=(("q4_k", 2e12),))
    assert costs.layer_s({"q4_k": 2_000_000}) == pytest.approx(1e-5 + 1e-6)
    assert costs.layer_s({"q4_k": 2_000_000, "f32": 4_000_000}) == pytest.approx(1e-5 + 2e-6)
    assert costs.layer_s({"bf16": 4_000_000}) == costs.device_s(4_000_000)
    said = costs.describe(["q4_k", "bf16"])  # what a plan and bench print
    assert "device 4.00 TB/s (q4_k 2.00, bf16 4.00 TB/s)" in said and "10 µs" in said


def test_rates_in_any_order_are_the_same_costs() -> None:
    a = Costs(device_rates=(("q8_0", 1e12), ("f16", 2e12)))
    b = Costs(device_rates={"f16": 2e12, "q8_0": 1e12})  # type: ignore[arg-type]
    assert a == b and hash(a) == hash(b) and a.device_rates[0][0] == "f16"


def test_a_type_whose_kernels_fail_is_left_out(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    """A type whose probe fails on the device is charged the f32 rate, and said so; the
    calibration of the other types goes on."""
    from backends import BackendError
    from engine.runtime import calibration

    def probe(be, dtype: str, launch_s: float) -> float:  # noqa: ANN001
        if dtype == "q4_k":
            raise BackendError("no kernel")
        return 1e12

    monkeypatch.setattr(calibration, "rate_types", lambda be: ("q4_k", "q8_0"))
    monkeypatch.setattr(calibration, "measure_rate", probe)
    costs = calibration.measure("numpy")
    assert costs.device_rates == (("q8_0", 1e12),)
    assert costs.rate("q4_k") == costs.device_bytes_per_s
    assert "no rate for q4_k weights (no kernel)" in capsys.readouterr().err
