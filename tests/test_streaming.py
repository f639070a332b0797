"""Weight streaming (``engine.runtime.streaming``) on the NumPy backend: the ring's copy stream is a
worker thread and its events really synchronise, so a streamed run must equal the all-resident
one bitwise, and the stress mode must turn a missing "slot ready" wait into a wrong result.
"""

from __future__ import annotations

import dataclasses
import gc
import weakref

import numpy as np
import pytest

from backends import get_backend
from backends.numpy_backend import NumpyBackend
from backends.spec import Costs
from engine.model.session import Session
from engine.model.weights import random_weights, tie_output
from engine.options import Options
from engine.passes import offload
from engine.passes.plans import plan_graph
from engine.passes.ring import ring_plan
from engine.runtime.calibration import remember
from engine.runtime.executor import Executor
from engine.runtime.streaming import WeightRing
from graph.dtypes import dtype_of
from graph.models import build, kv_slots, preset
from graph.ops import GraphError


@pytest.mark.parametrize("name", ["llama-tiny", "gemma3-tiny"])
@pytest.mark.parametrize("policy", ["*0+0", "*0+1", "*1+0", "*0+2"])
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_streamed_sessions_equal_resident_ones(name: str, policy: str, mode: str) -> None:
    cfg = preset(name)
    w = random_weights(cfg, seed=3)
    ref = Session(cfg, w, n_ctx=32, n_batch=4, mode=mode)
    s = Session(cfg, w, n_ctx=32, n_batch=4, mode=mode, offload=policy)
    assert s.placement is not None and s.placement.streamed_bytes > 0
    streamed = {p.layer for p in s.placement.layers if p.where == offload.STREAMED}
    for name_, arr in s.weights.items():  # streamed matrices stay host arrays, never uploaded
        layer = int(name_.split(".")[1]) if name_.startswith("blk.") else None
        if layer in streamed and arr.ndim == 2:
            assert isinstance(arr, np.ndarray)
    ids = list(range(3, 12))
    np.testing.assert_array_equal(s.prefill(ids, "all"), ref.prefill(ids, "all"))
    tok = 5
    for _ in range(5):
        want = ref.decode(tok)
        np.testing.assert_array_equal(s.decode(tok), want)
        tok = int(np.argmax(want))
    ex = s.executor(s.step_key(1, s.n_past + 1))
    assert ex.ring is not None and ex.ring.slots == s.placement.slots
    assert ex.ring.streamed_bytes == s.placement.streamed_bytes


def _decode_graph():  # noqa: ANN202
    cfg = preset("llama-tiny")
    graph = build(cfg, 1, kv_slots(cfg, 16, 1), logits="last")
    return cfg, graph, tie_output(cfg, dict(random_weights(cfg, seed=9)))


def _feeds(cfg, graph, rng):  # noqa: ANN001, ANN202
    names = {n.name: n for n in graph.inputs}
    feed = {}
    for k, n in names.items():
        if k == "tokens":
            feed[k] = rng.integers(0, cfg.n_vocab, n.shape).astype(np.int32)
        elif k.startswith("kv_pos"):
            feed[k] = np.where(np.arange(n.shape[0]) == 0, 0, -1).astype(np.int32)
        else:
            feed[k] = np.zeros(n.shape, np.int32)
    return feed


def _streamed(graph, weights, policy, be=None, plan_edit=None):  # noqa: ANN001, ANN202
    """An executor of ``graph`` streaming its layers as ``policy`` places them, with a ring of
    its own (``plan_edit``: a change to the step plan first)."""
    be = be or get_backend("numpy")
    rp = ring_plan(graph, offload.place(graph, policy))
    plan = plan_graph(graph, be.spec, ring=rp)
    plan = plan_edit(plan) if plan_edit else plan
    return Executor(plan, weights, be, ring=WeightRing(be, rp, weights))


def test_stress_mode_turns_a_missing_ready_wait_into_a_wrong_result() -> None:
    cfg, graph, weights = _decode_graph()
    stressed = NumpyBackend(stress=0.01)
    ref = Executor(graph, weights)
    ex = _streamed(graph, weights, "*0+0", stressed)  # one slot: every layer overwrites the last
    rng = np.random.default_rng(0)

    def differs(runs: int) -> int:
        bad = 0
        for _ in range(runs):
            feed = _feeds(cfg, graph, rng)
            want, got = ref.run(feed), ex.run(feed)
            bad += not np.array_equal(got[0], want[0])
        return bad

    assert differs(4) == 0  # every wait in place: stress changes nothing

    def no_ready(plan):  # noqa: ANN001, ANN202 - compute no longer waits for its layer's fetch
        return dataclasses.replace(
            plan, steps=tuple(dataclasses.replace(s, ready=()) for s in plan.steps)
        )

    ex = _streamed(graph, weights, "*0+0", stressed, no_ready)
    assert differs(8) > 0


def test_ring_holds_k_plus_one_slots_of_the_largest_streamed_layer() -> None:
    _, graph, weights = _decode_graph()
    placement = offload.place(graph, "*0+1")
    ex = _streamed(graph, weights, "*0+1")
    assert ex.ring is not None and ex.ring.slots == 2 == len(ex.ring.buffers)
    sizes = offload.layer_bytes(graph)
    largest = max(sizes[p.layer] for p in placement.layers if p.where == offload.STREAMED)
    assert largest <= ex.ring.device_bytes / 2 <= largest + 256 * 16


@pytest.mark.parametrize("name", ["llama-tiny", "gemma3-tiny"])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_n_gpu_layers_splits_the_model_between_backends(name: str, dtype: str) -> None:
    """ngl=N: layers 0..N-1 on the session's backend, the rest and the head on the CPU
    backend, the hidden states crossing once; ngl=n_layer+1 keeps everything on the device.
    Half-precision host layers are widened to f32 once (exactly), not at every product."""
    cfg = preset(name).replace(dtype=dtype_of(dtype))
    w = random_weights(cfg, seed=4)
    ref = Session(cfg, w, n_ctx=32, n_batch=4)
    for ngl in range(cfg.n_layer + 2):
        ref.reset()
        s = Session(cfg, w, n_ctx=32, n_batch=4, offload=f"ngl={ngl}")
        assert s.split == (ngl if ngl <= cfg.n_layer else None)
        ids = [3, 1, 4, 1, 5, 9]
        np.testing.assert_array_equal(s.prefill(ids, "all"), ref.prefill(ids, "all"))
        for tok in (2, 6):
            np.testing.assert_array_equal(s.decode(tok), ref.decode(tok))
        assert s.decode_greedy(7) == ref.decode_greedy(7)
        if s.split is not None:
            head = s.weights["output.weight"]
            assert isinstance(head, np.ndarray) and head.dtype == np.float32
            host_caches = [k for k, v in s.states.items() if int(k.split(".")[1]) >= ngl]
            assert all(isinstance(s.states[k], np.ndarray) for k in host_caches)
            ex = s.executor(s.step_key(1, s.n_past + 1))
            assert len(ex.parts) == (2 if ngl else 1)


def test_streaming_needs_one_compute_stream() -> None:
    _, graph, weights = _decode_graph()
    rp = ring_plan(graph, offload.place(graph, "*0+0"))
    with pytest.raises(GraphError, match="one stream: use --streams 1"):
        plan_graph(graph, get_backend("numpy").spec, Options(streams=2), ring=rp)


def test_one_ring_serves_every_executor_and_the_next_pass_is_fetched_ahead() -> None:
    cfg = preset("gemma3-tiny")
    w = random_weights(cfg, seed=2)
    s = Session(cfg, w, n_ctx=32, n_batch=4, offload="*0+1")
    ring = s.ring
    assert ring is not None and len(ring.fetches) > ring.slots
    s.prefill([1, 2, 3, 4, 5])
    decode = s.executor(s.step_key(1, s.n_past + 1))
    s.decode(3)
    assert decode.ring is ring and s.executor(s.step_key(4, 4)).ring is ring
    before = ring.fetched
    s.decode(4)
    assert ring.fetched - before == len(ring.fetches)  # a pass fetches each layer once
    assert ring.primed


def test_a_dropped_session_lets_its_ring_and_host_copies_go() -> None:
    """A sweep builds one streamed session after another in one process: each must give its
    ring and its pinned host copies back when dropped, with its last fetches in flight."""
    cfg = preset("llama-tiny")
    s = Session(cfg, random_weights(cfg, seed=4), n_ctx=16, n_batch=4, offload="*0+1")
    s.prefill([1, 2, 3])
    s.prepare()  # the next pass's first fetches are queued when the session goes
    assert s.ring is not None
    ring, host = weakref.ref(s.ring), weakref.ref(s.ring._keep[0])
    del s
    gc.collect()
    assert ring() is None and host() is None


def test_layers_that_fit_their_own_slots_are_fetched_once() -> None:
    cfg = preset("llama-tiny")
    s = Session(cfg, random_weights(cfg, seed=2), n_ctx=32, n_batch=4, offload="*0+5")
    ring = s.ring
    assert ring is not None and ring.resident
    s.prefill([1, 2, 3])
    after_first = ring.fetched
    for t in range(4):
        s.decode(t + 1)
    assert ring.fetched == after_first == len(ring.fetches)


def test_calibration_is_measured_once_then_read_back(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from engine.runtime.calibration import calibrate

    monkeypatch.setenv("STREAMGRAPH_CACHE", str(tmp_path))
    costs = calibrate("numpy")
    assert costs.link_bytes_per_s > 0 and costs.device_bytes_per_s > 0 and costs.launch_s > 0
    assert (tmp_path / "calibration.json").exists()
    assert calibrate("numpy") == costs  # from the cache, not measured again


def pin_slow_host_costs() -> None:
    """Calibrate the NumPy backend as a device whose host computes slowly (a GPU's case), so
    that ``auto`` streams rather than splits."""
    remember("numpy", Costs(link_bytes_per_s=10e9, device_bytes_per_s=10e9, host_bytes_per_s=1e6))


def test_auto_sessions_fit_their_budget_and_equal_resident(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("STREAMGRAPH_CACHE", str(tmp_path))
    pin_slow_host_costs()  # else auto computes the later layers on the host: on NumPy, faster
    cfg = preset("llama-tiny")
    w = random_weights(cfg, seed=7)
    total = sum(offload.layer_bytes(build(cfg, 1, kv_slots(cfg, 16, 1))).values())
    vram = 0.7 * total / 2**30
    s = Session(cfg, w, n_ctx=32, n_batch=4, offload="auto", vram=vram)
    assert s.placement is not None and s.placement.device_bytes <= vram * 2**30
    assert s.placement.streamed_bytes > 0 and s.placement.notes
    ref = Session(cfg, w, n_ctx=32, n_batch=4)
    ids = [3, 1, 4, 1, 5]
    np.testing.assert_array_equal(s.prefill(ids), ref.prefill(ids))
    for tok in (9, 2, 6):
        np.testing.assert_array_equal(s.decode(tok), ref.decode(tok))


def test_the_parameter_cache_keeps_the_first_layers_and_counts_hits() -> None:
    cfg = preset("gemma3-tiny")
    w = random_weights(cfg, seed=5)
    graph = build(cfg, 1, kv_slots(cfg, 16, 1))
    one_layer = offload.layer_bytes(graph)[0]
    s = Session(cfg, w, n_ctx=32, n_batch=4, offload="*0+0", cache=1.5 * one_layer / 2**30)
    ref = Session(cfg, w, n_ctx=32, n_batch=4)
    ring = s.ring
    assert ring is not None and [f.layer for f in ring.plan.cached] == [0]  # room for one
    np.testing.assert_array_equal(s.prefill([1, 2, 3]), ref.prefill([1, 2, 3]))
    for tok in (4, 5, 6):
        np.testing.assert_array_equal(s.decode(tok), ref.decode(tok))
    stats = ring.cache.stats()
    assert stats["hits"] == 4  # four passes, one cached layer each
    assert stats["misses"] == 4 * len(ring.fetches)
    assert stats["bytes_saved"] == 4 * ring.cache.used


def test_host_tables_send_only_the_gathered_rows() -> None:
    cfg, graph, weights = _decode_graph()
    ref = Executor(graph, weights)
    plan = plan_graph(graph, get_backend("numpy").spec, host_tables={"token_embd.weight"})
    ex = Executor(plan, weights)
    assert "token_embd.weight" not in ex.weights  # never bound to the device
    rng = np.random.default_rng(3)
    for _ in range(3):
        feed = _feeds(cfg, graph, rng)
        np.testing.assert_array_equal(ex.run(feed)[0], ref.run(feed)[0])
    bad = dict(_feeds(cfg, graph, rng), tokens=np.array([cfg.n_vocab], np.int32))
    with pytest.raises(GraphError, match="out of range"):
        ex.run(bad)


def test_offloading_sessions_keep_the_embedding_in_host_memory() -> None:
    cfg = preset("gemma3-tiny")
    s = Session(cfg, random_weights(cfg, seed=1), n_ctx=16, n_batch=4, offload="*2+0")
    assert isinstance(s.weights["token_embd.weight"], np.ndarray)
    ex = s.executor(s.step_key(1, 1))
    assert "token_embd.weight" not in ex.weights and "output.weight" in ex.weights


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_prepare_starts_the_first_fetches_before_the_first_step(mode: str) -> None:
    cfg = preset("llama-tiny")
    w = random_weights(cfg, seed=8)
    s = Session(cfg, w, n_ctx=16, n_batch=4, offload="*0+0", mode=mode)
    ref = Session(cfg, w, n_ctx=16, n_batch=4)
    ring = s.ring
    assert ring is not None and not ring.primed
    s.prepare()
    assert ring.primed and ring.pending and ring.fetched == ring.slots
    s.prepare()  # already under way: nothing more
    assert ring.fetched == ring.slots
    np.testing.assert_array_equal(s.prefill([2, 7, 1]), ref.prefill([2, 7, 1]))
    assert not ring.pending  # the run's main stream waited for them first
    for tok in (8, 3, 9):  # the decode executor: eager, captured, replayed
        np.testing.assert_array_equal(s.decode(tok), ref.decode(tok))
    s.prepare()  # primed by the last pass: nothing more
    np.testing.assert_array_equal(s.prefill([4, 4]), ref.prefill([4, 4]))


def test_numpy_events_keep_cudas_capture_rules() -> None:
    """A replayed capture does not record its events' objects: CUDA refuses to wait on them
    outside the capture (the bug a streamed 7B bench hit when a new executor ran eagerly after
    another one's capture). The NumPy backend refuses the same wait, so CI sees it."""
    from backends import get_backend

    be = get_backend("numpy")
    main = be.main_stream()
    ev = be.event()
    replay = be.capture(lambda: ev.record(main))
    replay()
    with pytest.raises(RuntimeError, match="outside any capture on an event last recorded in a"):
        ev.wait(main)
    ev.record(main)  # recorded eagerly again: waits outside captures are fine
    ev.wait(main)
    inside = be.capture(lambda: ev.wait(main))
    with pytest.raises(RuntimeError, match="inside a capture on an event last recorded in no"):
        inside()


def test_the_timing_model_counts_each_copy() -> None:
    """Each weight matrix is one copy with a fixed cost: more, smaller copies predict slower."""
    costs = Costs(link_bytes_per_s=1e9, copy_overhead_s=1e-3, launch_s=0.0)
    sizes = {0: 10**6, 1: 10**6}
    where = {0: offload.STREAMED, 1: offload.STREAMED}
    one = offload.predict(sizes, where, 0, costs, copies={0: 1, 1: 1})
    four = offload.predict(sizes, where, 0, costs, copies={0: 4, 1: 4})
    assert four - one == pytest.approx(2 * 3 * 1e-3, rel=1e-6)
