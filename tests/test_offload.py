"""The offload pass (``engine.passes.offload``): policies, the budget, the timing model, the
solver."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.spec import Costs
from engine.passes import offload
from engine.passes.offload import GPU, HOST, STREAMED
from graph.dtypes import DTYPES, bf16
from graph.models import build, kv_slots, preset
from graph.ops import GraphError
from tools.cli import main

GIB = 2**30


@pytest.fixture(scope="module")
def llama7b():  # noqa: ANN201
    cfg = preset("llama-7b").replace(dtype=bf16)
    return build(cfg, 1, kv_slots(cfg, 64, 1), logits="last")


def test_layer_tags_put_the_head_at_n_layer(llama7b) -> None:  # noqa: ANN001
    sizes = offload.layer_bytes(llama7b)
    assert sorted(sizes) == [-1, *range(33)]  # embedding, 32 blocks, the head as layer 32
    assert sizes[32] == 32000 * 4096 * 2  # output.weight (bf16); norm vectors stay resident


def test_policy_grammar() -> None:
    assert offload.parse_policy("*15+5", 32) == ("stream", 15, 5)
    assert offload.parse_policy("*15+", 32) == ("stream", 15, 0)  # ChatRWKV's *N+ is *N+0
    assert offload.parse_policy("ngl=33", 32) == ("ngl", 33, 0)
    assert offload.parse_policy("auto", 32)[0] == "auto"
    for bad in ("*x+1", "ngl=-1", "15+5", "fast"):
        with pytest.raises(GraphError, match="offload policy"):
            offload.parse_policy(bad, 32)


def test_n_gpu_layers_counts_the_head_as_a_layer(llama7b) -> None:  # noqa: ANN001
    p32 = offload.place(llama7b, "ngl=32")
    assert [p32.where(k) for k in (0, 31, 32)] == [GPU, GPU, HOST]  # all blocks, not the head
    p33 = offload.place(llama7b, "ngl=33")
    assert p33.where(32) == GPU and "among the first 33" in p33.layers[-1].cause
    p10 = offload.place(llama7b, "ngl=10")
    assert [p10.where(k) for k in (9, 10)] == [GPU, HOST] and p10.streamed_bytes == 0
    for p in (p32, p33, p10, offload.place(llama7b, "*15+5")):
        assert p.where(-1) == HOST  # the embedding never moves whole


def test_star_n_plus_k(llama7b) -> None:  # noqa: ANN001
    p = offload.place(llama7b, "*15+5")
    assert [p.where(k) for k in (0, 14, 15, 31)] == [GPU, GPU, STREAMED, STREAMED]
    assert p.where(32) == GPU  # no budget given: the head stays resident
    assert p.ahead == 5 and p.slots == 6
    streamed = [q for q in p.layers if q.where == STREAMED]
    assert [q.slot for q in streamed] == [i % 6 for i in range(len(streamed))]
    assert p.slot_bytes == max(q.nbytes for q in streamed)
    assert p.device_bytes == p.resident_bytes + 6 * p.slot_bytes
    tight = offload.place(llama7b, "*15+5", budget=p.device_bytes - 1)  # no room for the head
    assert tight.where(32) == STREAMED and tight.device_bytes < p.device_bytes


def test_a_budget_too_small_is_an_error_naming_the_bytes(llama7b) -> None:  # noqa: ANN001
    with pytest.raises(GraphError, match=r"budget 6\.00 GiB .* cannot hold placement \*30\+5: "):
        offload.place(llama7b, "*30+5", budget=6 * GIB)
    tiny = offload.place(llama7b, "auto", budget=GIB // 4)  # not one 7B block fits
    assert {p.where for p in tiny.layers} == {HOST} and "0 resident block(s)" in tiny.notes[0]
    small = offload.place(llama7b, "auto", budget=GIB)  # two blocks and one slot fit: streams
    assert HOST not in {p.where for p in small.layers if p.layer >= 0} and small.streamed_bytes
    with pytest.raises(GraphError, match="needs a budget"):
        offload.place(llama7b, "auto")


def test_the_timing_model_is_link_bound_when_streaming() -> None:
    costs = Costs(link_bytes_per_s=1e9, device_bytes_per_s=1e15, launch_s=0.0, copy_overhead_s=0)
    sizes = {0: 10**9, 1: 10**9, 2: 10**9}
    everything = {k: STREAMED for k in sizes}
    assert offload.predict(sizes, everything, 0, costs) == pytest.approx(3.0, rel=1e-6)
    resident = {k: GPU for k in sizes}
    assert offload.predict(sizes, resident, 0, costs) == pytest.approx(3e-6, rel=1e-6)
    # compute equal to the link: with K=1 a fetch overlaps the previous layer's compute
    even = Costs(link_bytes_per_s=1e9, device_bytes_per_s=1e9, launch_s=0.0, copy_overhead_s=0)
    serial = offload.predict(sizes, everything, 0, even)
    overlapped = offload.predict(sizes, everything, 1, even)
    assert overlapped < serial


def test_a_layer_computes_at_its_storage_types_rate() -> None:
    """A Q4_K layer is charged at the rate calibrated for Q4_K products (about half an f32
    product's on an H100), and K=1 wins once that compute is long enough to hide."""
    cfg = preset("llama-7b").replace(dtype=bf16)
    q = cfg.replace(weight_types=(("blk.0.attn_q.weight", DTYPES["q4_k"]),))
    g = build(q, 1, kv_slots(q, 64, 1), logits="last")
    by_type = offload.layer_type_bytes(g)
    assert by_type[0]["q4_k"] == 4096 * 4096 // 256 * 144 and by_type[1] == {
        "bf16": by_type[1]["bf16"]
    }
    assert sum(by_type[0].values()) == offload.layer_bytes(g)[0]
    fast = Costs(device_bytes_per_s=4e12, launch_s=0.0)
    slow = Costs(device_bytes_per_s=4e12, launch_s=0.0, device_rates=(("q4_k", 1e6),))
    t_fast = offload.place(g, "all", costs=fast).predicted_s
    sizes = offload.layer_bytes(g)
    assert t_fast == pytest.approx(sum(fast.device_s(n) for k, n in sizes.items() if k >= 0))
    t_slow = offload.place(g, "all", costs=slow).predicted_s
    assert t_slow - t_fast == pytest.approx(by_type[0]["q4_k"] / 1e6, rel=1e-3)
    # predict's own override: seconds per layer
    two, where = {0: 10**9, 1: 10**9}, {0: STREAMED, 1: STREAMED}
    link = Costs(link_bytes_per_s=1e9, device_bytes_per_s=1e15, launch_s=0.0, copy_overhead_s=0)
    serial = offload.predict(two, where, 0, link, compute={0: 1.0, 1: 1.0})
    ahead = offload.predict(two, where, 1, link, compute={0: 1.0, 1: 1.0})
    assert serial == pytest.approx(4.0) and ahead < serial


@settings(max_examples=40, deadline=None)
@given(st.floats(1.0, 14.0), st.floats(0.05, 3.0))
def test_auto_fits_its_budget_and_more_budget_is_never_slower(gib: float, more: float) -> None:
    cfg = preset("llama-7b").replace(dtype=bf16)
    graph = build(cfg, 1, kv_slots(cfg, 64, 1), logits="last")
    small = offload.place(graph, "auto", budget=int(gib * GIB))
    big = offload.place(graph, "auto", budget=int((gib + more) * GIB))
    assert small.device_bytes <= gib * GIB
    assert big.device_bytes <= (gib + more) * GIB
    assert big.predicted_s <= small.predicted_s * (1 + 1e-9)
    assert small.notes and "chose" in small.notes[0]


def test_graph_command_prints_the_placement(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "-m", "llama-7b", "--dtype", "bf16", "--offload", "*15+5"]) == 0
    out = capsys.readouterr().out
    assert "Placement *15+5:" in out and "layer 15" in out and "streamed slot 0" in out
