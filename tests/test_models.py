"""Model builders and the KV-cached session: against Hugging Face transformers, and on their own.

The ``reference`` tests build a tiny random HF model (torch CPU, f32) of a config's shape, rename
its weights to GGUF layout (``tests/hf_reference.py``) and compare logits position by position.
Everything else needs only NumPy: graph structure, logits requests, cache bookkeeping, errors.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from engine.model.session import Session
from engine.model.weights import random_weights
from graph.dtypes import bf16
from graph.models import build, kv_slots, preset, weight_layers, weight_shapes
from graph.ops import GraphError, Op
from graph.serialize import from_json, to_json

LLAMA, GEMMA = preset("llama-tiny"), preset("gemma3-tiny")
IDS = [int(t) for t in np.random.default_rng(7).integers(0, 512, 24)]
N_PROMPT = 10  # prompt length; the remaining IDS are decoded one by one


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|"""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    path = Path(__file__).with_name("hf_reference.py")
    spec = importlib.util.spec_from_file_location("hf_reference", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def generate(sess: Session, ids: list[int], n_prompt: int) -> np.ndarray:
    """Logits (len(ids) - n_prompt + 1, vocab): prefill ids[:n_prompt], then decode the rest."""
    out = [sess.prefill(ids[:n_prompt])]
    out += [sess.decode(t) for t in ids[n_prompt:]]
    return np.stack(out)


# -- against transformers ------------------------------------------------------------------------

VARIANTS = {
    "llama": LLAMA,
    "llama-mha": LLAMA.replace(n_head_kv=4),
    "llama-kv1": LLAMA.replace(n_head_kv=1),
    "gemma3": GEMMA,
    "gemma3-mha": GEMMA.replace(n_head_kv=4),
    "gemma3-kv1": GEMMA.replace(n_head_kv=1),
}


@pytest.mark.reference
@pytest.mark.parametrize("n_batch", [N_PROMPT, 3], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_transformers(hf, name: str, n_batch: int) -> None:
    cfg = VARIANTS[name]
    model = hf.hf_model(cfg, seed=1)
    ref = hf.hf_logits(model, IDS)  # (24, vocab), full-sequence forward
    sess = Session(cfg, hf.gguf_weights(model, cfg), n_ctx=32, n_batch=n_batch)
    if cfg.sliding_window:
        ring = sess.slots["swa"]
        assert ring == cfg.sliding_window + n_batch - 1 == kv_slots(cfg, 32, n_batch)["swa"]
        assert len(IDS) > max(ring, 2 * cfg.sliding_window)  # the ring wraps around
    got = generate(sess, IDS, N_PROMPT)
    assert len(got) >= 5  # prefill + at least 4 decode steps
    for i, row in enumerate(got):
        pos = N_PROMPT - 1 + i
        assert rel(row, ref[pos]) < 1e-4, f"position {pos}"


@pytest.mark.reference
def test_sliding_window_matters(hf) -> None:
    """The Gemma comparison is sensitive to the window: a wider one gives other late logits."""
    model = hf.hf_model(GEMMA, seed=1)
    ref = hf.hf_logits(model, IDS)
    wide = GEMMA.replace(sliding_window=64)
    got = generate(Session(wide, hf.gguf_weights(model, GEMMA), n_ctx=32), IDS, N_PROMPT)
    assert rel(got[-1], ref[-1]) > 1e-3


# -- builders (NumPy only) -----------------------------------------------------------------------


@pytest.fixture(scope="module", params=[LLAMA, GEMMA], ids=["llama", "gemma3"])
def cfg_w(request):
    cfg = request.param
    return cfg, random_weights(cfg, seed=3)


def graph_for(cfg, n=6, logits="last", **kw):
    return build(cfg, n, kv_slots(cfg, n_ctx=16, n_batch=8), logits=logits, **kw)


def test_logits_last_computes_head_on_one_row(cfg_w) -> None:
    cfg, w = cfg_w
    g = graph_for(cfg, 6, "last")
    head = g["logits"]
    assert head.op is Op.MUL_MAT and head.shape == (1, cfg.n_vocab)
    assert [g.nodes[o].name for o in g.outputs] == ["logits"]
    out = Session(cfg, w, n_ctx=16).forward(IDS[:6], "last")
    assert out.shape == (1, cfg.n_vocab)
    assert graph_for(cfg, 6, "all")["logits"].shape == (6, cfg.n_vocab)


def test_logits_all_equals_one_token_at_a_time(cfg_w) -> None:
    cfg, w = cfg_w
    n = 10  # past gemma3-tiny's window of 4
    every = Session(cfg, w, n_ctx=16).prefill(IDS[:n], "all")
    assert every.shape == (n, cfg.n_vocab)
    one = Session(cfg, w, n_ctx=16, n_batch=1)
    stepwise = np.stack([one.decode(t) for t in IDS[:n]])
    assert rel(every, stepwise) < 1e-5


def test_logits_row_subset(cfg_w) -> None:
    cfg, w = cfg_w
    g = graph_for(cfg, 6, (0, 3))
    assert g["logits"].shape == (2, cfg.n_vocab)
    rows_const = g["logits_rows"]
    assert rows_const.op is Op.CONSTANT
    assert any(n.op is Op.GET_ROWS and rows_const.id in n.srcs for n in g.nodes)
    every = Session(cfg, w, n_ctx=16).forward(IDS[:6], "all")
    pair = Session(cfg, w, n_ctx=16).forward(IDS[:6], (0, 3))
    span = Session(cfg, w, n_ctx=16).forward(IDS[:6], (2, 3, 4))  # contiguous: a view
    np.testing.assert_allclose(pair, every[[0, 3]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(span, every[2:5], rtol=1e-5, atol=1e-6)


def test_logits_none_keeps_kv_writes(cfg_w) -> None:
    cfg, w = cfg_w
    g = graph_for(cfg, 6, "none")
    g.validate()
    assert g.outputs == ()
    assert "logits" not in g.by_name and "output.weight" not in g.by_name
    writes = [n for n in g.nodes if n.op is Op.SET_ROWS]
    assert len(writes) == 2 * cfg.n_layer
    assert {g.nodes[n.srcs[0]].name for n in writes} == {
        f"cache_{kv}.{i}" for kv in "kv" for i in range(cfg.n_layer)
    }
    a, b = Session(cfg, w, n_ctx=16), Session(cfg, w, n_ctx=16)
    assert a.prefill(IDS[:8], "none") is None
    b.prefill(IDS[:8], "last")
    for t in IDS[8:12]:
        np.testing.assert_array_equal(a.decode(t), b.decode(t))


def test_weights_names_and_layer_tags(cfg_w) -> None:
    cfg, _ = cfg_w
    g = graph_for(cfg, 4, "last")
    g.validate()
    tags = {n.name: n.layer for n in g.weights}
    assert set(tags) == set(weight_shapes(cfg)) == set(weight_layers(cfg))
    assert tags == weight_layers(cfg)
    assert {n.name: n.shape for n in g.weights} == weight_shapes(cfg)
    assert tags["token_embd.weight"] == -1
    assert tags["output_norm.weight"] == tags["output.weight"] == cfg.n_layer
    for i in range(cfg.n_layer):
        assert tags[f"blk.{i}.attn_q.weight"] == tags[f"blk.{i}.ffn_down.weight"] == i


@pytest.mark.parametrize("logits", ["last", "all", "none", (0, 3), (1, 2)])
def test_graph_validates_and_json_round_trips(cfg_w, logits) -> None:
    cfg, _ = cfg_w
    for kw in ({}, {"n_kv": {"full": 8}}, {"cache_dtype": "f16"}):
        g = graph_for(cfg, 5, logits, **kw)
        g.validate()
        again = from_json(to_json(g))
        assert again == g
        again.validate()


def test_bad_build_requests_raise(cfg_w) -> None:
    cfg, _ = cfg_w
    slots = kv_slots(cfg, n_ctx=16, n_batch=8)
    for rows in [(4,), (-1,), (), (0, 9)]:
        with pytest.raises(GraphError, match="logits rows"):
            build(cfg, 4, slots, logits=rows)
    for m in (0, slots["full"] + 1):
        with pytest.raises(GraphError, match="n_kv"):
            build(cfg, 4, slots, n_kv={"full": m})
    with pytest.raises(GraphError, match="n_tokens=0"):
        build(cfg, 0, slots)
    with pytest.raises(GraphError, match="no cache size"):
        build(cfg, 4, {})


# -- session -------------------------------------------------------------------------------------


def test_decode_equals_fresh_full_prefill(cfg_w) -> None:
    cfg, w = cfg_w
    n_ctx = len(IDS)
    sess = Session(cfg, w, n_ctx=n_ctx, n_batch=4)  # swa ring: 4 + 4 - 1 = 7 rows, wraps
    got = generate(sess, IDS, 6)
    for i, row in enumerate(got):
        k = 6 + i
        fresh = Session(cfg, w, n_ctx=n_ctx, n_batch=n_ctx).prefill(IDS[:k], "all")
        assert rel(row, fresh[-1]) < 1e-5, f"{k} tokens"


def test_chunked_prefill_equals_unchunked(cfg_w) -> None:
    cfg, w = cfg_w
    whole = generate(Session(cfg, w, n_ctx=24, n_batch=24), IDS[:22], 18)
    for n_batch in (1, 4, 5):
        chunked = generate(Session(cfg, w, n_ctx=24, n_batch=n_batch), IDS[:22], 18)
        assert rel(chunked, whole) < 1e-5, f"n_batch={n_batch}"


def test_reset_gives_identical_logits(cfg_w) -> None:
    cfg, w = cfg_w
    sess = Session(cfg, w, n_ctx=24, n_batch=4)
    first = generate(sess, IDS[:20], 9)
    sess.reset()
    assert sess.n_past == 0
    np.testing.assert_array_equal(generate(sess, IDS[:20], 9), first)


def test_context_overflow_and_bad_tokens_leave_session_usable(cfg_w) -> None:
    cfg, w = cfg_w
    sess, ref = Session(cfg, w, n_ctx=16, n_batch=4), Session(cfg, w, n_ctx=16, n_batch=4)
    sess.prefill(IDS[:10])
    ref.prefill(IDS[:10])
    with pytest.raises(ValueError, match="n_ctx=16"):
        sess.prefill(IDS[10:17])  # 10 + 7 > 16: refused before any chunk runs
    for bad in ([cfg.n_vocab], [-1], [1, 2, 3, 4, 5, cfg.n_vocab]):  # last: in a later chunk
        with pytest.raises(ValueError, match="token ids"):
            sess.prefill(bad)
    with pytest.raises(ValueError, match="token ids"):
        sess.decode(cfg.n_vocab)
    assert sess.n_past == 10
    for t in IDS[10:16]:
        np.testing.assert_array_equal(sess.decode(t), ref.decode(t))
    with pytest.raises(ValueError, match="n_ctx=16"):
        sess.decode(IDS[16])
    assert sess.n_past == 16
    sess.reset()
    np.testing.assert_array_equal(sess.prefill(IDS[:3]), Session(cfg, w, n_ctx=16).prefill(IDS[:3]))


def test_missing_or_misshaped_weight(cfg_w) -> None:
    cfg, w = cfg_w
    missing = {k: v for k, v in w.items() if k != "blk.1.attn_k.weight"}
    with pytest.raises(GraphError, match=r"blk\.1\.attn_k\.weight"):
        Session(cfg, missing, n_ctx=8)
    wrong = dict(w)
    wrong["blk.0.ffn_up.weight"] = np.zeros((3, cfg.n_embd), np.float32)
    with pytest.raises(GraphError) as e:
        Session(cfg, wrong, n_ctx=8)
    msg = str(e.value)
    assert "blk.0.ffn_up.weight" in msg
    assert f"(3, {cfg.n_embd})" in msg and f"({cfg.n_ff}, {cfg.n_embd})" in msg


# K/V stored rounded: f16 keeps 11 significant bits, bf16 8. Measured logits error (max abs diff /
# max abs) on these shapes is ~5e-4 (f16) and ~4e-3 (bf16); the bounds leave ~4x headroom.
CACHE_TOL = {"f16": 2e-3, "bf16": 2e-2}


@pytest.mark.parametrize("cache_dtype", list(CACHE_TOL))
def test_half_precision_cache_stays_close(cfg_w, cache_dtype: str) -> None:
    cfg, w = cfg_w
    exact = generate(Session(cfg, w, n_ctx=24, n_batch=4), IDS[:20], 9)
    sess = Session(cfg, w, n_ctx=24, n_batch=4, kv_type=cache_dtype)
    assert all(
        str(s.dtype) == {"f16": "float16", "bf16": "bfloat16"}[cache_dtype]
        for s in sess.states.values()
    )
    half = generate(sess, IDS[:20], 9)
    assert np.isfinite(half).all()
    assert 0 < rel(half, exact) < CACHE_TOL[cache_dtype]


def test_random_weights_deterministic_and_tied() -> None:
    for cfg in (LLAMA, GEMMA):
        a, b, c = (random_weights(cfg, seed=s) for s in (5, 5, 6))
        assert set(a) == set(weight_shapes(cfg))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            assert a[k].shape == weight_shapes(cfg)[k] and a[k].dtype == np.float32
        assert not np.array_equal(a["blk.0.attn_q.weight"], c["blk.0.attn_q.weight"])
    g = random_weights(GEMMA, seed=0)
    assert GEMMA.tied_embeddings and g["output.weight"] is g["token_embd.weight"]
    lw = random_weights(LLAMA, seed=0)
    assert not LLAMA.tied_embeddings
    assert not np.array_equal(lw["output.weight"], lw["token_embd.weight"])


def test_bf16_weights_run(cfg_w) -> None:
    cfg, _ = cfg_w
    cfg16 = cfg.replace(dtype=bf16)
    w = random_weights(cfg16, seed=2)
    assert w["blk.0.attn_q.weight"].dtype == bf16.numpy
    assert w["blk.0.attn_norm.weight"].dtype == np.float32  # norms stay f32
    g = graph_for(cfg16)
    assert g["blk.0.attn_q.weight"].dtype == bf16 and g["output_norm.weight"].dtype.name == "f32"
    got = generate(Session(cfg16, w, n_ctx=16, n_batch=4), IDS[:12], 8)
    assert np.isfinite(got).all()
    # The same (bf16-representable) weights as f32: products of exact values, f32 accumulation.
    w32 = {k: np.asarray(v, np.float32) for k, v in w.items()}
    exact = generate(Session(cfg, w32, n_ctx=16, n_batch=4), IDS[:12], 8)
    assert rel(got, exact) < 1e-4


def test_chunked_prefill_returns_rows_from_every_chunk() -> None:
    cfg = preset("gemma3-tiny")
    weights = random_weights(cfg, seed=4)
    ids = list(range(3, 20))
    whole = Session(cfg, weights, n_ctx=64, n_batch=64).prefill(ids, logits="all")
    chunked = Session(cfg, weights, n_ctx=64, n_batch=5)
    np.testing.assert_allclose(chunked.prefill(ids, logits="all"), whole, atol=1e-5)
    chunked.reset()
    rows = chunked.prefill(ids, logits=(16, 3, 7, 3))  # any order, repeats, across chunks
    np.testing.assert_allclose(rows, whole[[16, 3, 7, 3]], atol=1e-5)
    chunked.reset()
    assert chunked.prefill(ids, logits="none") is None
    with pytest.raises(ValueError, match="within 0..16"):
        chunked.prefill(ids, logits=(17,))
    with pytest.raises(ValueError, match="logits must be"):
        chunked.prefill(ids, logits="first")
