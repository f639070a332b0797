"""Executor modes and backend-requested scratch memory, on the NumPy backend."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from backends import device_spec, get_backend
from backends.cuda_spec import nominal
from engine.model.sampling import Sampler, SamplerConfig
from engine.model.session import Session
from engine.model.weights import random_weights
from engine.options import Options
from engine.passes import memory
from engine.passes.plans import KV_PAD, kv_bucket, plan_model
from engine.runtime.executor import Executor
from graph import GraphBuilder, f32
from graph.models import build, kv_slots, preset


def test_scratch_is_planned_live_only_during_its_step_and_shares_no_live_bytes() -> None:
    cfg = preset("llama-tiny")
    graph = build(cfg, 4, kv_slots(cfg, 16, 4))
    mm = [n.id for n in graph.nodes if n.op.name == "MUL_MAT"]
    plan = memory.plan(graph, {i: 1000 for i in mm})
    plan.validate(graph)
    scratch = [a for a in plan.allocations if a.scratch]
    assert sorted(a.node for a in scratch) == mm and all(a.size == 1024 for a in scratch)
    values = [a for a in plan.allocations if not a.scratch]
    for s in scratch:
        assert s.first == s.last == s.node
        for v in values:
            assert not s.overlaps(v), f"scratch of %{s.node} overlaps live %{v.node}"
    assert plan.scratch_of()[mm[0]][1] == 1024
    assert plan.max_live_bytes >= memory.plan(graph).max_live_bytes  # (arena size is a heuristic)


def test_graph_mode_on_numpy_equals_eager_on_every_run() -> None:
    cfg = preset("gemma3-tiny")
    w = random_weights(cfg, seed=2)
    eager = Session(cfg, w, n_ctx=32, n_batch=8)
    outs = {}
    for mode in ("eager", "graph"):
        g = build(cfg, 1, kv_slots(cfg, 32, 8), stack=eager.stack)
        ex = Executor(g, eager.weights, "numpy", options=Options(mode=mode))
        outs[mode] = []
        for t in range(4):  # warm-up, capture, then replays
            inputs = {
                "tokens": np.array([t + 3], np.int32),
                "pos": np.array([t], np.int32),
                "kv_idx.full": np.array([t], np.int32),
                "kv_pos.full": np.array([p if p <= t else -1 for p in range(32)], np.int32),
                "kv_idx.swa": np.array([t], np.int32),
                "kv_pos.swa": np.array([p if p <= t else -1 for p in range(11)], np.int32),
            }
            outs[mode].append(ex.run(inputs)[0])
    for a, b in zip(outs["eager"], outs["graph"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_unknown_mode_is_refused() -> None:
    g = GraphBuilder()
    x = g.input("x", (2,), f32)
    with pytest.raises(ValueError, match=r"mode \(--graphs\) takes one of graph, eager"):
        Executor(g.build([g.scale(x, 2.0)]), {}, options=Options(mode="replay"))


@pytest.mark.parametrize("name", ["llama-tiny", "gemma3-tiny"])
def test_stacked_projections_equal_separate_ones(name: str) -> None:
    """stack=True: one product with stacked Q/K/V (and gate/up) rows, then strided views."""
    cfg = preset(name)
    w = random_weights(cfg, seed=6)
    fused, plain = (
        Session(cfg, w, n_ctx=32, n_batch=8),
        Session(cfg, w, n_ctx=32, n_batch=8, stack=False),
    )
    graph = fused.executor(fused.step_key(8, 8)).graph
    names = {n.name for n in graph.weights}
    assert "blk.0.attn_qkv.weight" in names and "blk.0.attn_q.weight" not in names
    assert "blk.0.ffn_gate_up.weight" in names
    ids = list(range(5, 17))  # two chunks: strided views of multi-row products too
    np.testing.assert_allclose(fused.prefill(ids, "all"), plain.prefill(ids, "all"), atol=2e-5)
    for tok in (3, 9, 27):
        np.testing.assert_allclose(fused.decode(tok), plain.decode(tok), atol=2e-5)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_rms_norm_with_residual_is_norm_then_add(dtype: str) -> None:
    g = GraphBuilder()
    x = g.input("x", (3, 5), dtype)
    r = g.input("r", (3, 5), dtype)
    w = g.weight("w", (5,), f32, layer=0)
    fused = g.rms_norm(x, w, 1e-5, residual=r)
    apart = g.add(r, g.rms_norm(x, w, 1e-5))
    graph = g.build([fused, apart])
    rng = np.random.default_rng(0)
    feed = {k: rng.standard_normal((3, 5)).astype(np.float32) for k in ("x", "r")}
    a, b = Executor(graph, {"w": rng.standard_normal(5).astype(np.float32)}).run(feed)
    # the fused op rounds once, norm-then-add rounds the norm to storage first
    tol = 0 if dtype == "f32" else 2.0**-7
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=tol * 4, rtol=tol)
    with pytest.raises(Exception, match="residual must have shape"):
        g.rms_norm(x, w, residual=g.input("r2", (5,), f32))
    with pytest.raises(Exception, match="a residual needs a weight"):
        g.rms_norm(x, residual=r)


def test_attending_only_the_filled_rows_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers attend to the filled prefix of their cache, padded to KV_PAD; with a pad of 4 on a
    tiny model the prefix grows every 4 tokens, through the ring's wrap, and must equal
    attending to every row."""
    import engine.passes.plans as plans_module

    cfg = preset("gemma3-tiny")
    w = random_weights(cfg, seed=7)
    ids = [int(t) for t in np.random.default_rng(2).integers(0, cfg.n_vocab, 30)]
    outs = []
    for pad in (4, 10_000):
        monkeypatch.setattr(plans_module, "KV_PAD", pad)
        sess = Session(cfg, w, n_ctx=40, n_batch=4)
        rows = [sess.prefill(ids[:6])]
        rows += [sess.decode(t) for t in ids[6:]]
        outs.append(np.array(rows))
        if pad == 4:
            assert sess.n_kv_for(9) == {"full": 12, "swa": 7}  # swa ring: 4 + 4 - 1 rows
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_kv_buckets_are_fine_where_padding_rows_are_read_and_coarse_where_they_are_not() -> None:
    fine = [kv_bucket(e) for e in (1, 64, 65, 300, 1100, 5000)]
    assert fine == [64, 64, 128, 320, 1152, 5056]
    coarse = [kv_bucket(e, coarse=True) for e in (1, 65, 256, 257, 700, 1024, 1025, 2049, 5000)]
    assert coarse == [64, 128, 256, 512, 768, 1024, 1536, 3072, 6144]
    for e in range(1, 20_000, 7):  # a bucket holds its positions and wastes under half of it
        b = kv_bucket(e, coarse=True)
        assert e <= b < max(2 * e, 4 * KV_PAD + 1) and b % KV_PAD == 0


def test_a_long_context_needs_few_executors_where_attention_stops_at_the_query_row() -> None:
    """On the GPU (whose attention reads only rows 0..qp of a session's cache) a 16,384-token
    context is 15 decode steps' executors, not 256: each costs a plan, a binding and a capture
    the first time a generation reaches it."""
    cfg = preset("llama-7b")
    options = Options(backend="cupy", dtype="f16", n_ctx=16384)
    gpu = plan_model(cfg, nominal(), options)
    cpu = plan_model(cfg, device_spec("numpy"), options.replace(backend="numpy"))
    assert gpu.spec.prefix_attention and not cpu.spec.prefix_attention
    ends = range(1, 16385)
    assert len({gpu.step_key(1, e, "argmax") for e in ends}) == 15
    assert len({cpu.step_key(1, e, "argmax") for e in ends}) == 256
    # a split model's CPU layers compute every row they are given: fine buckets there
    split = plan_model(cfg, nominal(), options.replace(offload="ngl=16"))
    assert any(s.on_host for s in split.segments)
    assert len({split.step_key(1, e, "argmax") for e in ends}) == 256


def test_coarse_buckets_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference with the GPU's coarse buckets (padding rows empty, which it checks each
    step: the prefix_rows promise) computes what it does with fine ones, through a sliding
    ring's wrap and past three bucket edges."""
    cfg = preset("gemma3-tiny")
    w = random_weights(cfg, seed=5)
    ids = [int(t) for t in np.random.default_rng(3).integers(0, cfg.n_vocab, 40)]
    options = Options(backend="numpy", n_ctx=800, n_batch=64)
    outs, keys = [], []
    be = get_backend("numpy")
    for coarse in (False, True):
        spec = dataclasses.replace(device_spec("numpy"), prefix_attention=coarse)
        monkeypatch.setattr(be, "spec", spec)  # this backend, with the GPU's buckets
        sess = Session(cfg, w, be, plan=plan_model(cfg, spec, options))
        rows = [sess.prefill(ids * 14)]  # 560 positions in passes of 64
        rows += [sess.decode(t) for t in ids[:8]]
        outs.append(np.array(rows))
        keys.append(len(sess._executors))  # noqa: SLF001
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    assert keys[1] < keys[0]


def test_the_reference_checks_the_prefix_rows_promise() -> None:
    g = GraphBuilder()
    q = g.input("q", (1, 2, 8), f32)
    k, v = g.input("k", (4, 2, 8), f32), g.input("v", (4, 2, 8), f32)
    qp, kp = g.input("qpos", (1,), "i32"), g.input("kpos", (4,), "i32")
    graph = g.build([g.attention(q, k, v, qp, kp, scale=0.5, prefix_rows=True, name="attn")])
    rng = np.random.default_rng(0)
    feed = {x: rng.standard_normal((4 if x != "q" else 1, 2, 8), np.float32) for x in "qkv"}
    ok = Executor(graph, {}).run(
        {**feed, "qpos": np.array([2], np.int32), "kpos": np.array([0, 1, 2, -1], np.int32)}
    )
    assert np.isfinite(ok[0]).all()
    with pytest.raises(Exception, match=r"attn.*row 3, past its position.*prefix_rows"):
        Executor(graph, {}).run(
            {**feed, "qpos": np.array([2], np.int32), "kpos": np.array([0, 1, -1, 2], np.int32)}
        )


@pytest.mark.parametrize("name", ["llama-tiny", "gemma3-tiny"])
def test_greedy_decoding_on_the_backend_picks_the_logits_argmax(name: str) -> None:
    """``logits="argmax"`` ends the graph in ARGMAX: the id equals the argmax of the logits,
    and greedy ``generate`` gives the same tokens through either path."""
    cfg = preset(name)
    g = build(cfg, 1, kv_slots(cfg, 32, 4), logits="argmax")
    assert [g.nodes[o].op.name for o in g.outputs] == ["ARGMAX"]
    assert g.nodes[g.outputs[0]].shape == (1,)
    w = random_weights(cfg, seed=11)
    a, b = Session(cfg, w, n_ctx=32, n_batch=4), Session(cfg, w, n_ctx=32, n_batch=4)
    a.prefill([1, 2, 3])
    b.prefill([1, 2, 3])
    tok = 5
    for _ in range(6):
        want = int(np.argmax(a.decode(tok)))
        assert b.decode_greedy(tok) == want
        tok = want
    on_device = list(Session(cfg, w, n_ctx=32, n_batch=4).generate([4, 5], 8))
    on_host = Session(cfg, w, n_ctx=32, n_batch=4)
    on_host.decode_greedy = None  # type: ignore[assignment,method-assign]  # would fail if used
    host_sampler = _HostArgmax()
    assert list(on_host.generate([4, 5], 8, host_sampler)) == on_device


class _HostArgmax(Sampler):
    """Greedy, but claims not to be a plain argmax: generate() must sample on the host."""

    def __init__(self) -> None:
        super().__init__(SamplerConfig.greedy())

    @property
    def is_argmax(self) -> bool:
        return False


@pytest.mark.parametrize("opts", [{}, {"offload": "*0+0"}, {"streams": 2, "stack": False}])
def test_debug_prints_a_line_per_launch_in_every_mode(
    opts: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """STREAMGRAPH_DEBUG=2 is an observer of the one launch loop: it watches streamed and
    multi-stream runs too (it used to be silently off while streaming), and changes nothing."""
    cfg = preset("llama-tiny")
    w = random_weights(cfg, seed=3)
    plain = Session(cfg, w, n_ctx=16, n_batch=4, **opts).prefill([1, 2, 3])
    monkeypatch.setenv("STREAMGRAPH_DEBUG", "2")
    sess = Session(cfg, w, n_ctx=16, n_batch=4, **opts)
    got = sess.prefill([1, 2, 3])
    lines = [x for x in capsys.readouterr().out.splitlines() if " us  %" in x]
    ex = sess.executor(sess.step_key(3, 3))
    assert len(lines) == ex.n_launches > 0
    np.testing.assert_array_equal(got, plain)
