"""Multi-stream runs on the CuPy backend (``gpu`` marker: skipped without CUDA): every stream
count, eager and captured, equals the single-stream run bitwise (same kernels, other order).
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from engine.model.session import Session
from engine.model.weights import device_weights, random_weights
from engine.options import Options
from engine.runtime.executor import Executor
from graph import GraphBuilder, f32
from graph.dtypes import bf16
from graph.models import preset

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("streams", [2, 4, 8, "auto"])
@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("rows", [1, 64])  # matrix-vector kernel / cuBLAS on every stream
def test_fan_out_equals_one_stream(gpu, streams, mode: str, rows: int) -> None:  # noqa: ANN001
    d = 1024
    g = GraphBuilder()
    x = g.input("x", (rows, d), f32)
    outs = [g.mul_mat(g.weight(f"w{i}", (d, d), bf16, layer=0), x) for i in range(8)]
    graph = g.build(outs)
    rng = np.random.default_rng(rows)
    weights = {f"w{i}": rng.standard_normal((d, d), np.float32) / 32 for i in range(8)}
    one = Executor(graph, weights, gpu, options=Options(mode=mode))
    many = Executor(graph, weights, gpu, options=Options(mode=mode, streams=streams))
    if streams != "auto":
        assert many.schedule is not None and many.schedule.n_streams == min(8, streams)
    for _ in range(3):
        inputs = {"x": rng.standard_normal((rows, d), np.float32)}
        for a, b in zip(many.run(inputs), one.run(inputs), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_gemma3_270m_shape_on_four_streams_equals_one(gpu, mode: str) -> None:  # noqa: ANN001
    """Separate Q/K/V and gate/up products (stack=False) give each layer branches."""
    cfg = preset("gemma3-270m").replace(dtype=bf16)
    w = device_weights(cfg, gpu, seed=5)
    one = Session(cfg, w, gpu, n_ctx=128, n_batch=32, mode=mode, stack=False)
    many = Session(cfg, w, gpu, n_ctx=128, n_batch=32, mode=mode, stack=False, streams=4)
    ids = [int(t) for t in np.random.default_rng(0).integers(0, cfg.n_vocab, 32)]
    np.testing.assert_array_equal(many.prefill(ids), one.prefill(ids))
    tok = 7
    for _ in range(4):
        np.testing.assert_array_equal(many.decode(tok), one.decode(tok))
        tok = (tok * 31 + 1) % cfg.n_vocab
    ex = many.executor(many.step_key(1, many.n_past + 1))
    assert ex.schedule is not None and ex.schedule.n_streams >= 3


@pytest.mark.parametrize("name", ["llama-tiny", "gemma3-tiny"])
def test_tiny_models_on_streams_equal_numpy(gpu, name: str) -> None:  # noqa: ANN001
    cfg = preset(name)
    w = random_weights(cfg, seed=8)
    cpu = Session(cfg, w, "numpy", n_ctx=64, n_batch=8, stack=False)
    dev = Session(cfg, w, gpu, n_ctx=64, n_batch=8, stack=False, streams=8, kv_type="f32")
    ids = list(range(2, 12))
    np.testing.assert_allclose(dev.prefill(ids), cpu.prefill(ids), rtol=1e-4, atol=1e-4)
    tok = 3
    for _ in range(5):
        np.testing.assert_allclose(dev.decode(tok), cpu.decode(tok), rtol=1e-4, atol=1e-4)
        tok = (tok * 5 + 2) % cfg.n_vocab


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("policy", ["*12+2", "*0+0"])
def test_streamed_270m_shape_equals_resident(gpu, mode: str, policy: str) -> None:  # noqa: ANN001
    """Layers fetched from pinned host memory into a ring on a copy stream, captured into the
    step's graph, give the resident run's logits bit for bit."""
    cfg = preset("gemma3-270m").replace(dtype=bf16)
    w = {k: gpu.to_host(v) for k, v in device_weights(cfg, gpu, seed=6).items()}
    ref = Session(cfg, w, gpu, n_ctx=64, n_batch=16, mode=mode)
    s = Session(cfg, w, gpu, n_ctx=64, n_batch=16, mode=mode, offload=policy)
    ids = list(range(5, 21))
    np.testing.assert_array_equal(s.prefill(ids), ref.prefill(ids))
    tok = 9
    for _ in range(4):
        want = ref.decode(tok)
        np.testing.assert_array_equal(s.decode(tok), want)
        tok = int(np.argmax(want))
    # a new executor runs eagerly after the decode's capture: it must not wait on events
    # last recorded inside that capture (CUDA refuses it)
    s.prepare()
    np.testing.assert_array_equal(s.prefill([4, 2, 7]), ref.prefill([4, 2, 7]))
    np.testing.assert_array_equal(s.decode(tok), ref.decode(tok))
    ex = s.executor(s.step_key(1, s.n_past + 1))
    assert ex.ring is not None and ex.ring.streamed_bytes == s.placement.streamed_bytes


def test_dropped_streamed_sessions_give_their_pinned_memory_back(gpu) -> None:  # noqa: ANN001
    """Each streamed session pins a host copy of its streamed layers. A sweep of placements in
    one process (``streamgraph bench --strategy ... --vram 6,8,10``) kept every one of them
    pinned until the host ran out of memory; now a dropped session returns them to CuPy's
    pinned pool, and the next session runs as the first did."""
    import cupy as cp

    cfg = preset("gemma3-tiny")
    w = random_weights(cfg, seed=3)
    pool = cp.get_default_pinned_memory_pool()
    s = Session(cfg, w, gpu, n_ctx=16, n_batch=4, offload="*0+1")
    s.prefill([1, 2, 3])
    s.prepare()  # fetches in flight when it goes
    n_pinned = len(s.ring._keep)
    free_before = pool.n_free_blocks()
    del s
    gc.collect()
    assert pool.n_free_blocks() >= free_before + n_pinned
    s = Session(cfg, w, gpu, n_ctx=16, n_batch=4, offload="*0+1")
    ref = Session(cfg, w, gpu, n_ctx=16, n_batch=4)
    np.testing.assert_array_equal(s.prefill([1, 2, 3]), ref.prefill([1, 2, 3]))


def test_n_gpu_layers_runs_the_rest_on_the_cpu(gpu) -> None:  # noqa: ANN001
    """ngl=9: layers 0-8 on the GPU, 9-17 and the head on the CPU backend."""
    cfg = preset("gemma3-270m").replace(dtype=bf16)
    w = {k: gpu.to_host(v) for k, v in device_weights(cfg, gpu, seed=6).items()}
    ref = Session(cfg, w, "numpy", n_ctx=32, n_batch=8)
    s = Session(cfg, w, gpu, n_ctx=32, n_batch=8, offload="ngl=9", kv_type="f32")
    assert s.split == 9
    ids = list(range(5, 13))
    np.testing.assert_allclose(s.prefill(ids), ref.prefill(ids), rtol=3e-2, atol=3e-2)
    for tok in (3, 4):
        np.testing.assert_allclose(s.decode(tok), ref.decode(tok), rtol=3e-2, atol=3e-2)
