"""The CuPy backend's fused groups and its decode attention against the NumPy reference
(``gpu`` marker: skipped without CUDA).

Each test asserts that the fused kernel really ran (the group is in ``Executor.fused``), then
compares with NumPy, which runs the same members one by one. Tolerances as in
``test_cupy_backend``: relative to the largest magnitude, scaled by sqrt(K) for products.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.model.session import Session
from engine.model.weights import device_weights, random_weights
from engine.options import Options
from engine.runtime.executor import Executor
from graph import GraphBuilder, f32
from graph.dtypes import bf16
from graph.models import preset
from tests.conftest import close

pytestmark = pytest.mark.gpu


def _both(graph, weights, inputs, gpu, states=None, runs=2):  # noqa: ANN001, ANN202
    """Outputs (and final states) of NumPy and of the GPU executor, which is returned too."""
    cpu_states = {k: v.copy() for k, v in (states or {}).items()}
    dev_states = {k: gpu.from_host(v) for k, v in (states or {}).items()}
    cpu = Executor(graph, weights, "numpy", states=cpu_states)
    dev = Executor(graph, weights, gpu, states=dev_states, options=Options(mode="graph"))
    inputs = {k: v for k, v in inputs.items() if k in cpu.input_names}
    for _ in range(runs):  # graph mode: warm run, capture, replays
        want, got = cpu.run(inputs), dev.run(inputs)
    host_states = {k: gpu.to_host(v) for k, v in dev_states.items()}
    return want, got, cpu_states, host_states, dev


def _patterns(ex: Executor) -> list[str]:
    return sorted(f.pattern for f in ex.fused)


@pytest.mark.parametrize("pre", ["none", "norm_res", "add"])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize(("k", "n_out"), [(64, 5), (640, 1536), (2048, 20000), (4096, 300)])
@pytest.mark.parametrize("wdtype", ["f32", "bf16"])
def test_norm_matvec(gpu, pre: str, rows: int, k: int, n_out: int, wdtype: str) -> None:  # noqa: ANN001
    g = GraphBuilder()
    a = g.input("a", (rows, k), f32)
    b = g.input("b", (rows, k), f32)
    w1 = g.weight("w1", (k,), f32, layer=0)
    w2 = g.weight("w2", (k,), f32, layer=0)
    w = g.weight("w", (n_out, k), wdtype, layer=0)
    if pre == "norm_res":
        v = g.rms_norm(a, w1, 1e-6, residual=b)
    elif pre == "add":
        v = g.add(a, b)
    else:
        v = a
    y = g.mul_mat(w, g.rms_norm(v, w2, 1e-5))
    # v read again after the product (a residual): the kernel must write it
    graph = g.build([y, g.scale(v, 2.0)] if pre != "none" else [y])
    rng = np.random.default_rng(k + rows)
    inputs = {x: rng.standard_normal((rows, k), np.float32) for x in ("a", "b")}
    weights = {
        "w1": rng.standard_normal(k).astype(np.float32),
        "w2": rng.standard_normal(k).astype(np.float32),
        "w": rng.standard_normal((n_out, k)).astype(np.float32),
    }
    weights = {n: v for n, v in weights.items() if any(x.name == n for x in graph.weights)}
    want, got, _, _, dev = _both(graph, weights, inputs, gpu)
    assert [f.pattern for f in dev.fusions] == ["norm_matvec"]
    assert ("pre" in dev.fusions[0].roles) == (pre != "none")
    # the input vectors are built in shared memory: larger ones run as separate launches
    assert _patterns(dev) == (["norm_matvec"] if rows * k <= 11 * 1024 else [])
    for i, (a_, b_) in enumerate(zip(got, want, strict=True)):
        close(a_, b_, 2e-5 * np.sqrt(k), f"output {i}")


@pytest.mark.parametrize("act", ["geglu", "swiglu"])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize(("k", "n_out"), [(64, 7), (2048, 640), (11008, 4096)])
@pytest.mark.parametrize("wdtype", ["f16", "bf16"])
def test_glu_matvec_on_halves_of_a_stacked_projection(gpu, act, rows, k, n_out, wdtype) -> None:  # noqa: ANN001
    g = GraphBuilder()
    x = g.input("x", (rows, 2 * k), f32)
    gate = g.view(x, (rows, k), (2 * k, 1), 0)
    up = g.view(x, (rows, k), (2 * k, 1), k)
    w = g.weight("w", (n_out, k), wdtype, layer=0)
    y = g.mul_mat(w, getattr(g, act)(gate, up))
    graph = g.build([y])
    rng = np.random.default_rng(k)
    inputs = {"x": rng.standard_normal((rows, 2 * k), np.float32)}
    weights = {"w": (rng.standard_normal((n_out, k)) / np.sqrt(k)).astype(np.float32)}
    want, got, _, _, dev = _both(graph, weights, inputs, gpu)
    assert _patterns(dev) == (["glu_matvec"] if rows * k <= 11 * 1024 else [])
    close(got[0], want[0], 8 * 2.0**-8, act)


def test_unsupported_layouts_fall_back_to_one_launch_per_node(gpu) -> None:  # noqa: ANN001
    """K = 333 is not a whole number of 16-byte weight loads: the members run one by one."""
    g = GraphBuilder()
    a = g.input("a", (1, 333), f32)
    w2 = g.weight("w2", (333,), f32, layer=0)
    w = g.weight("w", (50, 333), "bf16", layer=0)
    graph = g.build([g.mul_mat(w, g.rms_norm(a, w2, 1e-6))])
    rng = np.random.default_rng(0)
    weights = {"w2": np.ones(333, np.float32), "w": rng.standard_normal((50, 333), np.float32)}
    inputs = {"a": rng.standard_normal((1, 333), np.float32)}
    want, got, _, _, dev = _both(graph, weights, inputs, gpu)
    assert dev.fusions and not dev.fused and dev.n_launches == 2
    close(got[0], want[0], 1e-4)


def _front_end(n, hq, hk, d, dv, m, *, norms, mode, n_dims, cache):  # noqa: ANN001, ANN202
    """Projection views -> (norms) -> rope -> cache writes -> attention, as the builders make."""
    g = GraphBuilder()
    width = hq * d + hk * d + hk * dv
    qkv = g.input("qkv", (n, width), f32)
    pos = g.input("pos", (n,), "i32")
    idx = g.input("idx", (n,), "i32")
    kpos = g.input("kpos", (m,), "i32")
    q = g.view(qkv, (n, hq, d), (width, d, 1), 0)
    k = g.view(qkv, (n, hk, d), (width, d, 1), hq * d)
    v = g.view(qkv, (n, hk, dv), (width, dv, 1), hq * d + hk * d)
    if norms:
        q = g.rms_norm(q, g.weight("qn", (d,), f32, layer=0), 1e-6)
        k = g.rms_norm(k, g.weight("kn", (d,), f32, layer=0), 1e-6)
    q = g.rope(q, pos, base=10000.0, mode=mode, n_dims=n_dims, freq_scale=0.5)
    k = g.rope(k, pos, base=10000.0, mode=mode, n_dims=n_dims, freq_scale=0.5)
    kc = g.set_rows(g.state("ck", (m, hk, d), cache), k, idx)
    vc = g.set_rows(g.state("cv", (m, hk, dv), cache), v, idx)
    att = g.attention(q, kc, vc, pos, kpos, scale=d**-0.5)
    return g.build([att])


@pytest.mark.parametrize(
    ("hq", "hk", "d", "dv", "norms", "mode", "n_dims"),
    [
        (4, 1, 256, 256, True, "neox", 256),  # Gemma 3 270M
        (8, 2, 64, 64, False, "normal", 64),  # Llama-like
        (6, 3, 128, 64, True, "neox", 96),  # partial rotary, Dv != D
    ],
)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("cache", ["f32", "f16", "bf16"])
def test_rope_store(gpu, hq, hk, d, dv, norms, mode, n_dims, n, cache) -> None:  # noqa: ANN001
    m = 40
    graph = _front_end(n, hq, hk, d, dv, m, norms=norms, mode=mode, n_dims=n_dims, cache=cache)
    rng = np.random.default_rng(hq * d + n)
    width = hq * d + hk * d + hk * dv
    start = 17
    inputs = {
        "qkv": rng.standard_normal((n, width), np.float32),
        "pos": np.arange(start, start + n, dtype=np.int32),
        "idx": np.arange(start, start + n, dtype=np.int32),
        "kpos": np.where(np.arange(m) < start + n, np.arange(m), -1).astype(np.int32),
    }
    weights = {"qn": rng.standard_normal(d).astype(np.float32)} if norms else {}
    if norms:
        weights["kn"] = rng.standard_normal(d).astype(np.float32)
    dt = graph.states[0].dtype.numpy
    states = {s: rng.standard_normal((m, hk, w)).astype(dt) for s, w in (("ck", d), ("cv", dv))}
    want, got, cpu_states, dev_states, dev = _both(graph, weights, inputs, gpu, states)
    assert _patterns(dev) == ["rope_store"]
    tol = 2e-5 if cache == "f32" else 8 * 2.0**-8
    close(got[0], want[0], tol, "attention output")
    for s in states:
        close(dev_states[s], cpu_states[s], tol, f"cache {s}")


@pytest.mark.parametrize(
    ("n", "m", "h", "hk", "d", "dv", "window"),
    [
        (1, 1, 4, 1, 256, 256, 0),
        (1, 64, 4, 1, 256, 256, 0),
        (1, 65, 4, 1, 256, 256, 0),
        (1, 300, 4, 1, 256, 256, 512),
        (1, 2100, 4, 1, 256, 256, 0),  # several tiles per split and 32 splits
        (5, 300, 6, 1, 64, 32, 7),  # two groups of query heads, one of two heads
        (8, 700, 8, 8, 128, 128, 0),
        (2, 130, 2, 2, 80, 48, 0),
    ],
)
@pytest.mark.parametrize("kv", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("merge", ["last_block", "kernel"])
def test_decode_attention(gpu, n, m, h, hk, d, dv, window, kv, merge) -> None:  # noqa: ANN001
    """Key splits merged by the last block to finish, or by a second launch."""
    saved = gpu.attn_merge
    gpu.attn_merge = merge
    try:
        _decode_attention(gpu, n, m, h, hk, d, dv, window, kv)
    finally:
        gpu.attn_merge = saved


def _decode_attention(gpu, n, m, h, hk, d, dv, window, kv) -> None:  # noqa: ANN001
    g = GraphBuilder()
    q = g.input("q", (n, h, d), f32)
    k = g.input("k", (m, hk, d), kv)
    v = g.input("v", (m, hk, dv), kv)
    qp, kp = g.input("qpos", (n,), "i32"), g.input("kpos", (m,), "i32")
    graph = g.build([g.attention(q, k, v, qp, kp, scale=d**-0.5, window=window)])
    rng = np.random.default_rng(m + n)
    filled = max(1, m - 9)  # the last rows are empty (-1)
    kpos = np.full(m, -1, np.int32)
    kpos[:filled] = rng.permutation(filled)  # ring order: positions out of row order
    inputs = {
        "q": rng.standard_normal((n, h, d), np.float32),
        "k": rng.standard_normal((m, hk, d), np.float32),
        "v": rng.standard_normal((m, hk, dv), np.float32),
        "qpos": np.arange(filled - n, filled, dtype=np.int32).clip(0),
        "kpos": kpos,
    }
    want, got, _, _, _ = _both(graph, {}, inputs, gpu, runs=4)  # tickets reset between runs
    assert any(name.startswith("k_attn_decode") for name in gpu._functions)
    tol = {"f32": 2e-5, "f16": 8 * 2.0**-11, "bf16": 8 * 2.0**-8}[kv]
    close(got[0], want[0], tol)


@pytest.mark.parametrize(
    ("n", "m", "end", "h", "hk", "d", "window"),
    [
        (1, 64, 1, 4, 1, 256, 0),  # one key: most splits empty
        (1, 2048, 700, 4, 1, 256, 0),  # a coarse bucket far past the filled rows
        (1, 4096, 4096, 32, 32, 128, 0),  # full
        (3, 1536, 1100, 32, 32, 128, 0),  # three tokens, each its own bound
        (1, 1023, 2046, 4, 1, 256, 512),  # a ring that has wrapped: every row read
        (4, 519, 521, 4, 1, 256, 512),  # decode tokens on both sides of a ring's wrap
        (8, 768, 520, 8, 2, 128, 0),
        (64, 2048, 897, 32, 32, 128, 0),  # flash: the last query's row opens a 64-key tile
        (64, 2048, 1057, 4, 1, 256, 0),  # flash at head dim 256: a 32-key tile opened
        (64, 575, 604, 4, 1, 256, 512),  # a prompt chunk straddling the ring's wrap
        (200, 1024, 700, 4, 1, 256, 512),
    ],
)
@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("merge", ["last_block", "kernel"])
def test_prefix_rows_stop_at_the_query_row(gpu, n, m, end, h, hk, d, window, kv, merge) -> None:  # noqa: ANN001
    """AttentionParams.prefix_rows (a session's caches): the decode, flash and f32 kernels read
    rows 0..qp only, their splits cut at run time; the same result as the NumPy reference
    (which checks the promise). Positions 0..end-1 were written in order to row pos mod m, the
    queries are the last n; rows never written hold garbage, and each query's own key is made
    to dominate its scores, so a kernel that stops one row early fails."""
    g = GraphBuilder()
    q = g.input("q", (n, h, d), f32)
    k = g.input("k", (m, hk, d), kv)
    v = g.input("v", (m, hk, d), kv)
    qp, kp = g.input("qpos", (n,), "i32"), g.input("kpos", (m,), "i32")
    graph = g.build([g.attention(q, k, v, qp, kp, scale=d**-0.5, window=window, prefix_rows=True)])
    rng = np.random.default_rng(m + n + end)
    kpos = np.full(m, -1, np.int32)
    pos = np.arange(end)
    kpos[pos % m] = pos  # the latest position written to each row
    qq = rng.standard_normal((n, h, d), np.float32)
    kk = rng.standard_normal((m, hk, d), np.float32)
    vv = rng.standard_normal((m, hk, d), np.float32)
    kk[kpos < 0], vv[kpos < 0] = 1e4, 1e4  # garbage where nothing was written
    qpos = np.arange(end - n, end, dtype=np.int32)
    for t, p in enumerate(qpos):  # the query's own key: score ~sqrt(d) / 2 above the rest
        kk[p % m] = 0.5 * qq[t, :: h // hk]
    inputs = {"q": qq, "k": kk, "v": vv, "qpos": qpos, "kpos": kpos}
    saved, gpu.attn_merge = gpu.attn_merge, merge
    try:
        want, got, _, _, _ = _both(graph, {}, inputs, gpu, runs=3)
    finally:
        gpu.attn_merge = saved
    flash = kv != "f32" and n > 8  # f16 Q and P on tensor cores
    tol = {"f32": 2e-5, "f16": 8 * 2.0**-8 if flash else 8 * 2.0**-11}[kv]
    close(got[0], want[0], tol)


@pytest.mark.parametrize("name", ["llama-tiny", "gemma3-tiny"])
def test_models_fused_and_unfused_agree_with_numpy(gpu, name: str) -> None:  # noqa: ANN001
    cfg = preset(name)
    w = random_weights(cfg, seed=3)
    cpu = Session(cfg, w, "numpy", n_ctx=64, n_batch=8)
    fused = Session(cfg, w, gpu, n_ctx=64, n_batch=8, kv_type="f32")  # the reference's cache
    plain = Session(cfg, w, gpu, n_ctx=64, n_batch=8, fusion=False, kv_type="f32")
    ids = list(range(3, 9))
    for s in (cpu, fused, plain):
        s.prefill(ids)
    tok = 5
    for step in range(7):
        want = cpu.decode(tok)
        close(fused.decode(tok), want, 1e-4, f"fused, step {step}")
        close(plain.decode(tok), want, 1e-4, f"unfused, step {step}")
        tok = (tok * 7 + 3) % cfg.n_vocab
    ex = fused.executor(fused.step_key(1, fused.n_past + 1))
    assert {"norm_matvec", "glu_matvec", "rope_store"} <= set(_patterns(ex))
    unfused = plain.executor(plain.step_key(1, plain.n_past + 1))
    assert not unfused.fused and ex.n_launches < unfused.n_launches


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_programmatic_dependent_launch_changes_no_bit(gpu, mode: str) -> None:  # noqa: ANN001
    """Kernels that start before their predecessor ends (PDL) must wait for it before reading
    its results: any missing wait shows up as a difference from plain launches."""
    if gpu._driver is None:
        pytest.skip("no cuLaunchKernelEx in this CUDA driver")
    cfg = preset("gemma3-270m").replace(dtype=bf16)
    w = device_weights(cfg, gpu, seed=2)
    saved = gpu.pdl
    outs = {}
    try:
        for pdl in (False, True):
            gpu.pdl = pdl
            s = Session(cfg, w, gpu, n_ctx=128, n_batch=16, mode=mode)
            got = [s.prefill(list(range(5, 21)))]
            tok = 9
            for _ in range(5):
                got.append(s.decode(tok))
                tok = (tok * 13 + 1) % cfg.n_vocab
            outs[pdl] = got
    finally:
        gpu.pdl = saved
    for a, b in zip(outs[True], outs[False], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 4097), (1, 262144), (2, 3, 1000)])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_argmax(gpu, shape, dtype) -> None:  # noqa: ANN001
    """Blocks fold their parts into one atomic maximum per row; ties go to the first index;
    the per-row state is reset by each launch (graph replays run it again)."""
    g = GraphBuilder()
    x = g.input("x", shape, dtype)
    graph = g.build([g.argmax(x)])
    rng = np.random.default_rng(shape[-1])
    for run in range(3):
        v = rng.standard_normal(shape).astype(np.float32)
        flat = v.reshape(-1, shape[-1])
        flat[:, -1] = flat[:, shape[-1] // 2] = 9.0 + run  # a tie far apart
        want, got, _, _, _ = _both(graph, {}, {"x": v}, gpu)
        np.testing.assert_array_equal(got[0], want[0])
        assert (got[0].reshape(-1) == shape[-1] // 2).all()
