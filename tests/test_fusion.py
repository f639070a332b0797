"""The fusion pass (``engine.passes.fusion``), the memory plan it drives and the executor that runs
it.

Covered: the groups found in model graphs (decode vs prefill, Gemma 3 vs Llama), the structural
invariants of every group (disjoint, compute-only members, outside readers after the anchor,
``step_of``), hand-built cases that must not stack, ``memory.plan(steps=...)`` keeping members'
results apart from each other and from members' inputs, and bitwise equality of fusion on/off on
the NumPy backend: model sessions (logits and KV caches), random graphs of ``graph_cases`` and
random chains of fusable motifs (``motif_graphs``, since random DAGs almost never stack).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends import COMPUTE_OPS, device_spec
from engine import Executor
from engine.model.session import Session
from engine.model.weights import random_weights
from engine.options import Options
from engine.passes import fusion, memory
from graph import Graph, GraphBuilder, f32, i32
from graph.dtypes import FLOAT_DTYPES
from graph.models import build, kv_slots, preset
from graph.ops import VIEW_OPS, Op
from tests.strategies import Case, graph_cases

TINY = ("gemma3-tiny", "llama-tiny")
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def model_graph(name: str, n_tokens: int, **kw) -> tuple[object, Graph]:
    cfg = preset(name)
    return cfg, build(cfg, n_tokens, kv_slots(cfg, 64, 16), logits="last", stack=True, **kw)


def _feeds_only(g: Graph, u: int, inside: set[int]) -> bool:
    """``u`` is a view (chain) that no output holds and that only members of ``inside`` read."""
    if g.nodes[u].op not in VIEW_OPS or u in g.outputs or not g.consumers[u]:
        return False
    return all(v in inside or _feeds_only(g, v, inside) for v in g.consumers[u])


def check_groups(g: Graph, groups: list[fusion.Fusion]) -> None:
    """The invariants the executor and the memory plan rely on, re-derived from the graph."""
    steps = fusion.step_of(g, groups)
    assert len(steps) == len(g) and [f.anchor for f in groups] == sorted(f.anchor for f in groups)
    seen: set[int] = set()
    for f in groups:
        assert f.pattern in fusion.PATTERNS
        assert list(f.nodes) == sorted(set(f.nodes)), f"{f}: members not distinct and in order"
        assert f.anchor == f.nodes[-1] == max(f.nodes) and set(f.roles.values()) == set(f.nodes)
        assert not seen & set(f.nodes), f"{f} overlaps an earlier group"
        seen |= set(f.nodes)
        inside = set(f.nodes)
        for m in f.nodes:
            assert g.nodes[m].op in COMPUTE_OPS, f"{f}: %{m} is {g.nodes[m].op.name}"
            assert steps[m] == f.anchor
            outside = [
                u for u in g.consumers[m] if u not in inside and not _feeds_only(g, u, inside)
            ]
            assert all(u > f.anchor for u in outside), f"{f}: %{m} read at {outside}"
            assert (m in f.outputs) == bool(outside or m in g.outputs), (f, m, outside)
    assert all(steps[n.id] == n.id for n in g.nodes if n.id not in seen)


def check_group_bytes(g: Graph, plan: memory.MemoryPlan, groups: list[fusion.Fusion]) -> None:
    """No member result (or member scratch) shares a byte with another one or with an input
    of any member: a fused kernel reads all of its inputs while writing any of its results."""
    values = {a.node: a for a in plan.allocations if not a.scratch}
    scratch = {a.node: a for a in plan.allocations if a.scratch}

    for f in groups:
        outs = [d[m] for d in (values, scratch) for m in f.nodes if m in d]
        roots = {g.nodes[s].base for m in f.nodes for s in g.nodes[m].srcs} - set(f.nodes)
        ins = [values[r] for r in sorted(roots) if r in values]
        for i, a in enumerate(outs):
            for b in outs[i + 1 :] + ins:
                meet = max(a.offset, b.offset) < min(a.offset + a.size, b.offset + b.size)
                assert not meet, f"{f}: %{a.node} and %{b.node} share bytes"


def run_both(g: Graph, weights: dict, inputs: list[dict], states: dict) -> dict[bool, Executor]:
    """Run ``g`` with fusion on and off from the same states; outputs and states bitwise equal."""
    ex, outs, st_ = {}, {}, {}
    for on in (True, False):
        st_[on] = {k: v.copy() for k, v in states.items()}
        ex[on] = Executor(g, weights, "numpy", st_[on], options=Options(fusion=on))
        names = ex[on].input_names
        outs[on] = [o for i in inputs for o in ex[on].run({k: i[k] for k in names})]
    for a, b in zip(outs[True], outs[False], strict=True):
        np.testing.assert_array_equal(a, b)
    for k in states:
        np.testing.assert_array_equal(st_[True][k], st_[False][k])
    assert ex[True].fused == [] and ex[False].fused == [] and ex[False].fusions == []
    return ex


# -- 1. the groups of model graphs ------------------------------------------------------------


def _mm(g: Graph, f: fusion.Fusion) -> tuple[str, int]:
    """The weight name and input rows of a group's matrix product."""
    w, x = (g.nodes[s] for s in g.nodes[f.roles["matmul"]].srcs)
    return w.name, x.numel // x.shape[-1]


@pytest.mark.parametrize("name", [*TINY, "gemma3-270m"])
def test_decode_groups_of_models(name: str) -> None:
    cfg, g = model_graph(name, 1)
    groups = fusion.find(g)
    check_groups(g, groups)
    by = {p: [f for f in groups if f.pattern == p] for p in fusion.PATTERNS}
    L, gemma = cfg.n_layer, cfg.arch == "gemma3"
    counts = Counter(f.pattern for f in groups)
    assert counts == dict(rope_store=L, norm_matvec=2 * L + 1, glu_matvec=L)
    for f in by["rope_store"]:
        qk_norms = {"q_norm", "k_norm"} if gemma else set()
        assert set(f.roles) == {"q_rope", "k_rope", "k_write", "v_write"} | qk_norms
        assert g.nodes[f.roles["q_rope"]].params == g.nodes[f.roles["k_rope"]].params
        # the rope that attention reads and both cache writes are read after the group
        assert set(f.outputs) == {f.roles["q_rope"], f.roles["k_write"], f.roles["v_write"]}
    kinds = Counter(_mm(g, f)[0].split(".")[-2] for f in by["norm_matvec"])
    assert kinds == {"attn_qkv": L, "ffn_gate_up": L, "output": 1}
    # every norm but the first layer's attention norm (after the embedding) folds its residual
    pres = [g.nodes[f.roles["pre"]].op for f in by["norm_matvec"] if "pre" in f.roles]
    assert len(pres) == 2 * L and set(pres) == {Op.RMS_NORM if gemma else Op.ADD}
    downs = {f"blk.{i}.ffn_down.weight" for i in range(L)}
    assert {_mm(g, f)[0] for f in by["glu_matvec"]} == downs
    glu_op = Op.GEGLU if gemma else Op.SWIGLU
    assert all(g.nodes[f.roles["glu"]].op is glu_op for f in by["glu_matvec"])


@pytest.mark.parametrize("name", [*TINY, "gemma3-270m"])
def test_prefill_fuses_no_matrix_product_of_many_rows(name: str) -> None:
    cfg, g = model_graph(name, 16)
    groups = fusion.find(g)
    check_groups(g, groups)
    mats = [f for f in groups if f.pattern != "rope_store"]
    assert all(_mm(g, f)[1] <= device_spec("cupy").matvec_max_rows for f in mats)
    # only the head (logits="last": one row) is left; it reads a partial view, so no pre
    assert [_mm(g, f) for f in mats] == [("output.weight", 1)] and "pre" not in mats[0].roles
    assert sum(f.pattern == "rope_store" for f in groups) == cfg.n_layer


# -- 3. what must not fuse ----------------------------------------------------------------------


@pytest.mark.parametrize("rows", [(1,), (8,), (2, 4), (9,), (3, 3)])
@pytest.mark.parametrize("second_reader", [False, True])
def test_norm_matvec_rows_and_readers(rows: tuple[int, ...], second_reader: bool) -> None:
    b, k = GraphBuilder(), 16
    norm = b.rms_norm(b.input("x", (*rows, k), f32), b.weight("wn", (k,), f32, 0))
    y = b.mul_mat(b.weight("W", (8, k), f32, 0), norm)
    g = b.build([y, b.scale(norm, 2.0)] if second_reader else [y])
    groups = fusion.find(g)
    check_groups(g, groups)
    fused = int(np.prod(rows)) <= 8 and not second_reader
    assert [f.roles.get("norm") for f in groups] == ([norm.id] if fused else [])


@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("early", [False, True])
def test_pre_read_before_the_product_stays_out(add: bool, early: bool) -> None:
    b, k = GraphBuilder(), 16
    a, r = b.input("a", (1, k), f32), b.input("r", (1, k), f32)
    pre = b.add(a, r) if add else b.rms_norm(a, b.weight("w1", (k,), f32, 0), residual=r)
    norm = b.rms_norm(pre, b.weight("w2", (k,), f32, 0))
    side = b.scale(pre, 3.0) if early else None
    y = b.mul_mat(b.weight("W", (k, k), f32, 0), norm)
    g = b.build([y, side if early else b.scale(pre, 3.0)])
    (f,) = fusion.find(g)
    check_groups(g, [f])
    assert f.pattern == "norm_matvec" and f.roles["norm"] == norm.id
    if early:  # pre must run before `side` reads it, so it cannot wait for the anchor
        assert "pre" not in f.roles and f.nodes == (norm.id, y.id)
    else:
        assert f.roles["pre"] == pre.id and set(f.outputs) == {pre.id, y.id}


def test_unknown_pattern_and_subsets() -> None:
    _, g = model_graph("llama-tiny", 1)
    with pytest.raises(ValueError, match="unknown fusion pattern"):
        fusion.find(g, ["norm_matvec", "matvec_norm"])
    only = fusion.find(g, ["glu_matvec"])
    assert only and {f.pattern for f in only} == {"glu_matvec"} and fusion.find(g, []) == []


def _rope_store(k_base=1e4, same_pos=True, norms="qk", kv_same=False) -> Graph:
    b = GraphBuilder()
    pos = b.input("pos", (1,), i32)
    q, k = b.input("q", (1, 2, 4), f32), b.input("k", (1, 1, 4), f32)
    q = b.rms_norm(q, b.weight("qn", (4,), f32, 0)) if "q" in norms else q
    k = b.rms_norm(k, b.weight("kn", (4,), f32, 0)) if "k" in norms else k
    q = b.rope(q, pos, base=1e4)
    k = b.rope(k, pos if same_pos else b.input("pos2", (1,), i32), base=k_base)
    idx = b.input("idx", (1,), i32)
    kc = b.set_rows(b.state("kc", (3, 1, 4), f32), k, idx)
    v = b.input("v", (1, 1, 4), f32)
    vc = kc if kv_same else b.set_rows(b.state("vc", (3, 1, 4), f32), v, idx)
    return b.build([b.attention(q, kc, vc, pos, b.input("kvp", (3,), i32), scale=0.5)])


def _arrays(g: Graph, rng: np.random.Generator) -> tuple[dict, dict, dict]:
    """Weights, inputs and states: floats N(0, 1); idx* distinct rows; kvp* positions or -1."""
    arr: dict[Op, dict] = {Op.WEIGHT: {}, Op.INPUT: {}, Op.STATE: {}}
    rows = min((n.shape[0] for n in g.states), default=1)
    for n in (n for n in g.nodes if n.op in arr):
        if n.dtype != i32:
            v = rng.standard_normal(n.shape)
        elif n.name.startswith("idx"):
            v = rng.permutation(rows)[: n.shape[0]]
        else:
            v = rng.integers(-1 if n.name.startswith("kvp") else 0, 8, n.shape)
        arr[n.op][n.name] = np.asarray(v).astype(n.dtype.numpy)
    return arr[Op.WEIGHT], arr[Op.INPUT], arr[Op.STATE]


@pytest.mark.parametrize(
    "kw", [{}, {"norms": ""}, {"k_base": 1e2}, {"same_pos": 0}, {"norms": "k"}]
)
def test_rope_store_needs_matching_ropes(kw: dict) -> None:
    """Formed with or without q/k norms; not when the ropes differ or only K has a norm."""
    g, formed = _rope_store(**kw), int(kw in ({}, {"norms": ""}))
    groups = fusion.find(g)
    check_groups(g, groups)
    assert [f.pattern for f in groups] == ["rope_store"] * formed
    w, x, s = _arrays(g, np.random.default_rng(0))
    assert len(run_both(g, w, [x], s)[True].fusions) == formed


def test_rope_store_with_one_cache_for_k_and_v() -> None:
    """K and V read from the same cache write is not a layer's front end: no group (a group
    would list that write twice and launch it twice)."""
    g = _rope_store(kv_same=True)
    assert fusion.find(g) == []
    w, x, s = _arrays(g, np.random.default_rng(1))
    ex = run_both(g, w, [x], s)
    assert ex[True].n_launches == ex[False].n_launches  # each member launched once
    check_groups(g, ex[True].fusions)


# -- 4. the memory plan with fusion steps -------------------------------------------------------


@pytest.mark.parametrize("n_tokens", [1, 3, 16])
@pytest.mark.parametrize("name", [*TINY, "gemma3-270m"])
def test_plan_with_fusion_steps(name: str, n_tokens: int) -> None:
    _, g = model_graph(name, n_tokens)
    groups = fusion.find(g)
    scratch = {f.anchor: 1000 for f in groups} | {f.nodes[0]: 300 for f in groups}
    plan = memory.plan(g, scratch, steps=fusion.step_of(g, groups))
    plan.validate(g)
    check_group_bytes(g, plan, groups)


def test_fusion_steps_change_the_plan() -> None:
    """Without the steps the product reuses an input of ``pre``; with them it cannot."""
    b, k = GraphBuilder(), 16
    a, r = b.input("a", (1, k), f32), b.input("r", (1, k), f32)
    pre = b.rms_norm(a, b.weight("w1", (k,), f32, 0), residual=r)
    y = b.mul_mat(b.weight("W", (k, k), f32, 0), b.rms_norm(pre, b.weight("w2", (k,), f32, 0)))
    g = b.build([y])
    groups = fusion.find(g)
    assert [len(f.nodes) for f in groups] == [3]
    with pytest.raises(AssertionError, match="share bytes"):
        check_group_bytes(g, memory.plan(g), groups)
    plan = memory.plan(g, steps=fusion.step_of(g, groups))
    plan.validate(g)
    check_group_bytes(g, plan, groups)


def test_invalid_steps_are_refused() -> None:
    _, g = model_graph("llama-tiny", 1)
    n, good = len(g), list(range(len(g)))
    memory.plan(g, steps=good).validate(g)
    for bad in (good[:-1], [*good, n], [*good[:20], 19, *good[21:]], [*good[:-1], n]):
        with pytest.raises(ValueError, match="steps"):
            memory.plan(g, steps=bad)


# -- 5. the executor: fusion on and off agree bitwise ------------------------------------------


@pytest.mark.parametrize("n_batch, prompt", [(8, 11), (16, 13)])
@pytest.mark.parametrize("name", TINY)
def test_sessions_fusion_on_off_agree_bitwise(name: str, n_batch: int, prompt: int) -> None:
    cfg, kw = preset(name), {"n_ctx": 64, "n_batch": n_batch}
    weights = random_weights(cfg, seed=7)
    sess = {on: Session(cfg, weights, "numpy", fusion=on, **kw) for on in (True, False)}
    tokens = np.random.default_rng(3).integers(0, cfg.n_vocab, prompt).tolist()
    logits = {on: s.prefill(tokens) for on, s in sess.items()}
    for _ in range(3):
        np.testing.assert_array_equal(logits[True], logits[False])
        logits = {on: s.decode(int(logits[True].argmax())) for on, s in sess.items()}
    np.testing.assert_array_equal(logits[True], logits[False])
    for key in sess[True].states:
        np.testing.assert_array_equal(sess[True].states[key], sess[False].states[key])
    assert sess[True]._executors.keys() == sess[False]._executors.keys()
    for key, on in sess[True]._executors.items():
        off = sess[False]._executors[key]
        assert on.fusions and not off.fusions, key
        assert on.fused == [] and off.fused == []  # NumPy has no fused kernels
        assert on.n_launches == off.n_launches  # so the members still run one by one
        check_groups(on.graph, on.fusions)
        check_group_bytes(on.graph, on.plan.decisions.plan, on.fusions)


def test_executor_decode_over_prefix_views_agrees_bitwise() -> None:
    cfg = preset("gemma3-tiny")
    slots, n_kv, p = kv_slots(cfg, 64, 8), {"full": 16, "swa": 8}, 6
    weights = Session(cfg, random_weights(cfg, seed=2), n_ctx=64, n_batch=8).weights  # stacked
    g = build(cfg, 1, slots, n_kv, stack=True)
    inputs = {"tokens": np.array([42], np.int32), "pos": np.array([p], np.int32)}
    for kind, m in n_kv.items():
        inputs[f"kv_idx.{kind}"] = np.array([p % slots[kind]], np.int32)
        inputs[f"kv_pos.{kind}"] = np.where(np.arange(m) <= p, np.arange(m), -1).astype(np.int32)
    _, _, states = _arrays(g, np.random.default_rng(5))
    ex = run_both(g, weights, [inputs], states)
    assert Counter(f.pattern for f in ex[True].fusions)["rope_store"] == cfg.n_layer
    assert ex[True].n_launches == ex[False].n_launches
    off = Executor(g, weights, states=states, options=Options(fusion=False))
    assert not off.fusions and not off.plan.decisions.fusions  # the plan says so too


# -- 6. random graphs ---------------------------------------------------------------------------


@st.composite
def motif_graphs(draw: st.DrawFn) -> Graph:
    """A chain of norm -> product, GLU -> product and rope -> cache -> attention -> product
    blocks with drawn row counts, dtypes, pre ops, mismatched ropes, attended prefixes and
    extra readers of the members before or after the product."""
    b, n, d = GraphBuilder(), draw(st.integers(1, 10)), 8
    flag, count = (lambda: draw(st.booleans())), iter(range(1000))
    dt = draw(st.sampled_from(FLOAT_DTYPES))

    def w(*shape: int) -> object:
        return b.weight(f"w{next(count)}", shape, dt if len(shape) == 2 else f32, 0)

    h, pos, extra = b.input(f"x{next(count)}", (n, d), f32), b.input("pos", (n,), i32), []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["norm", "glu", "rope"]))
        if kind == "norm":
            pre = draw(st.sampled_from(["", "add", "res"]))
            r = b.input(f"x{next(count)}", (n, d), f32)
            h = b.add(h, r) if pre == "add" else b.rms_norm(h, w(d), residual=r) if pre else h
            x = b.rms_norm(h, w(d))
            extra += [b.scale(draw(st.sampled_from([h, x])), 0.5)] if flag() else []  # early
        elif kind == "glu":
            y = b.mul_mat(w(2 * d, d), h)
            gate, up = b.view(y, (n, d), (2 * d, 1), 0), b.view(y, (n, d), (2 * d, 1), d)
            x = b.geglu(gate, up) if flag() else b.swiglu(gate, up)
            extra += [b.scale(x, 0.5)] if flag() else []
        else:
            q, k, v = (b.reshape(b.mul_mat(w(c * 4, d), h), (n, c, 4)) for c in (2, 1, 1))
            if flag():
                q, k = b.rms_norm(q, w(4)), b.rms_norm(k, w(4))
            q = b.rope(q, pos, base=1e4)
            k = b.rope(k, pos, base=1e4 if flag() else 100.0)
            m = n + draw(st.integers(0, 3))
            idx = b.input(f"idx{next(count)}", (n,), i32)
            kc = b.set_rows(b.state(f"kc{next(count)}", (m, 1, 4), f32), k, idx)
            extra += [b.scale(kc, 0.5)] if flag() else []  # read between the cache writes
            vc = b.set_rows(b.state(f"vc{next(count)}", (m, 1, 4), f32), v, idx)
            m_att = draw(st.integers(1, m))
            kc, vc = (b.rows(kc, 0, m_att), b.rows(vc, 0, m_att)) if m_att < m else (kc, vc)
            kvp = b.input(f"kvp{next(count)}", (m_att,), i32)
            x = b.reshape(b.attention(q, kc, vc, pos, kvp, scale=0.5), (n, 8))
        before, h = [h, x], b.mul_mat(w(d, d), x)
        extra += [b.scale(draw(st.sampled_from([h, *before])), 2.0)] if flag() else []  # late
    return b.build([h, *extra])


def check_fusion_on_off(g: Graph, weights: dict, inputs: list[dict], states: dict) -> None:
    groups = fusion.find(g)
    check_groups(g, groups)
    plan = memory.plan(g, steps=fusion.step_of(g, groups))
    plan.validate(g)
    check_group_bytes(g, plan, groups)
    ex = run_both(g, weights, inputs, states)
    assert ex[True].fusions == groups and ex[True].n_launches == ex[False].n_launches


@PROPERTY
@given(graph_cases(), st.booleans())
def test_random_graphs_fusion_on_off_agree_bitwise(case: Case, dce: bool) -> None:
    g = case.graph.dce() if dce else case.graph
    check_fusion_on_off(g, case.weights, case.inputs, case.states)


@PROPERTY
@given(motif_graphs(), st.integers(0, 2**32 - 1))
def test_random_motifs_fusion_on_off_agree_bitwise(g: Graph, seed: int) -> None:
    rng = np.random.default_rng(seed)
    weights, inputs, states = _arrays(g, rng)
    check_fusion_on_off(g, weights, [inputs, _arrays(g, rng)[1]], states)
