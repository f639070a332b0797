"""The CuPy backend against the NumPy reference (``gpu`` marker: skipped without CUDA).

Tolerances, relative to the output's largest magnitude: f32 2e-5 (different summation order,
fused multiply-adds, no TF32), f16 8 ulps of 2^-11, bf16 8 ulps of 2^-8, as the CPU property
tests use; whole models get 1e-4 (f32) and 3e-2 (bf16 weights) because errors compound over
layers.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from backends import COMPUTE_OPS, BackendError, get_backend
from engine.model.session import Session
from engine.model.weights import device_weights, random_weights
from engine.runtime.executor import Executor
from graph import GraphBuilder, f32
from graph.dtypes import bf16, f16
from graph.models import preset
from tests.conftest import close
from tests.strategies import Case, graph_cases

pytestmark = pytest.mark.gpu

TOL = {f32.name: 2e-5, f16.name: 8 * 2.0**-11, bf16.name: 8 * 2.0**-8}


def test_every_compute_op_compiles(gpu) -> None:  # noqa: ANN001
    assert set(gpu.kernels) == set(COMPUTE_OPS)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(graph_cases())
def test_random_graphs_equal_numpy(case: Case) -> None:
    """Every op, views, broadcasting, mixed storage types and KV writes, drawn at random."""
    gpu = get_backend("cupy")
    tol = max(TOL[d.name] for d in case.dtypes if d.name in TOL) if case.dtypes else TOL["f32"]
    cpu_states = case.fresh_states()
    cpu = Executor(case.graph, case.weights, "numpy", states=cpu_states)
    gpu_states = {k: gpu.from_host(v) for k, v in case.fresh_states().items()}
    dev = Executor(case.graph, case.weights, gpu, states=gpu_states)
    for inputs in case.inputs:  # twice: arena reuse across calls
        feed = {k: v for k, v in inputs.items() if k in cpu.input_names}
        want, got = cpu.run(feed), dev.run(feed)
        for o, a, b in zip(case.graph.outputs, got, want, strict=True):
            close(a, b, tol, f"output %{o} {case.graph.nodes[o].op.name} ops={case.ops}")
    for name, value in cpu_states.items():
        close(gpu.to_host(gpu_states[name]), value, tol, f"state {name}")


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 64])
@pytest.mark.parametrize("wdtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("k", [640, 333, 2048, 11008])
@pytest.mark.parametrize("n_out", [517, 64])
def test_mul_mat_gemv_and_cublas_paths(gpu, rows: int, wdtype: str, k: int, n_out: int) -> None:  # noqa: ANN001
    """GEMV (one or several warps per output) up to 8 rows, cuBLAS beyond."""
    g = GraphBuilder()
    x = g.input("x", (rows, k), f32)
    w = g.weight("w", (n_out, k), wdtype, layer=0)
    graph = g.build([g.mul_mat(w, x)])
    rng = np.random.default_rng(rows * 7 + k)
    inputs = {"x": rng.standard_normal((rows, k), np.float32)}
    weights = {"w": rng.standard_normal((n_out, k), np.float32)}
    if rows > 8 and wdtype != "f32":
        # more rows than the GEMV kernel takes: cuBLAS multiplies equal types, so the f32
        # activation is rounded to the weight's type first (llama.cpp does the same)
        rounded = inputs["x"].astype(graph.nodes[1].dtype.numpy).astype(np.float32)
        want = Executor(graph, weights, "numpy").run({"x": rounded})[0]
    else:
        want = Executor(graph, weights, "numpy").run(inputs)[0]
    got = Executor(graph, weights, gpu).run(inputs)[0]
    close(got, want, 1e-5 * np.sqrt(k), f"{rows} rows, {wdtype}, K={k}")


@pytest.mark.parametrize("name", ["llama-tiny", "gemma3-tiny"])
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_tiny_models_prefill_and_decode_equal_numpy(gpu, name: str, mode: str) -> None:  # noqa: ANN001
    cfg = preset(name)
    w = random_weights(cfg, seed=5)
    cpu = Session(cfg, w, "numpy", n_ctx=64, n_batch=8)
    dev = Session(cfg, w, gpu, n_ctx=64, n_batch=8, mode=mode, kv_type="f32")
    ids = list(range(3, 14))
    close(dev.prefill(ids, logits="all"), cpu.prefill(ids, logits="all"), 1e-4, "prefill")
    tok = 7
    for step in range(6):  # past the tiny gemma's window of 4
        close(dev.decode(tok), cpu.decode(tok), 1e-4, f"decode step {step}")
        tok = (tok * 31 + 5) % cfg.n_vocab


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_gemma3_270m_shape_equals_numpy(gpu, dtype: str) -> None:  # noqa: ANN001
    cfg = preset("gemma3-270m").replace(dtype=bf16 if dtype == "bf16" else f32)
    on_gpu = device_weights(cfg, gpu, seed=1)
    on_host = {k: gpu.to_host(v) for k, v in on_gpu.items() if k != "output.weight"}
    cpu = Session(cfg, on_host, "numpy", n_ctx=64, n_batch=16)
    dev = Session(cfg, on_gpu, gpu, n_ctx=64, n_batch=16, mode="graph", kv_type="f32")
    tol = 1e-4 if dtype == "f32" else 3e-2
    ids = [int(t) for t in np.random.default_rng(0).integers(0, cfg.n_vocab, 16)]
    want, got = cpu.prefill(ids), dev.prefill(ids)
    close(got, want, tol, "prefill")
    assert int(got.argmax()) == int(want.argmax()) or dtype == "bf16"
    tok = int(want.argmax())
    for step in range(4):
        close(dev.decode(tok), cpu.decode(tok), tol, f"decode {step}")
        tok = (tok + 1009) % cfg.n_vocab


def test_graph_replays_are_bitwise_equal_to_eager_and_stable(gpu) -> None:  # noqa: ANN001
    cfg = preset("gemma3-270m").replace(dtype=bf16)
    w = device_weights(cfg, gpu, seed=2)
    eager = Session(cfg, w, gpu, n_ctx=256, n_batch=32, mode="eager")
    graph = Session(cfg, w, gpu, n_ctx=256, n_batch=32, mode="graph")
    ids = list(range(100, 132))
    np.testing.assert_array_equal(graph.prefill(ids), eager.prefill(ids))
    tok = 5
    for _ in range(12):
        a, b = eager.decode(tok), graph.decode(tok)
        np.testing.assert_array_equal(b, a)
        tok = int(a.argmax())
    graph.reset()
    again = graph.prefill(ids)
    eager.reset()
    np.testing.assert_array_equal(again, eager.prefill(ids))


def test_device_weights_are_deterministic_and_scaled(gpu) -> None:  # noqa: ANN001
    cfg = preset("llama-tiny").replace(dtype=bf16)
    a = device_weights(cfg, gpu, seed=3)
    b = device_weights(cfg, gpu, seed=3)
    c = device_weights(cfg, gpu, seed=4)
    q = gpu.to_host(a["blk.0.attn_q.weight"]).astype(np.float32)
    np.testing.assert_array_equal(q, gpu.to_host(b["blk.0.attn_q.weight"]).astype(np.float32))
    assert not np.array_equal(q, gpu.to_host(c["blk.0.attn_q.weight"]).astype(np.float32))
    assert abs(q.mean()) < 0.02 and abs(q.std() * np.sqrt(q.shape[1]) - 1.0) < 0.05
    norm = gpu.to_host(a["blk.0.attn_norm.weight"])
    assert norm.dtype == np.float32 and abs(norm.mean() - 1.0) < 0.05


def test_arena_is_what_the_plan_says_and_oversized_plans_are_refused(gpu) -> None:  # noqa: ANN001
    cfg = preset("gemma3-tiny")
    sess = Session(cfg, random_weights(cfg), gpu, n_ctx=32, n_batch=8)
    sess.prefill([1, 2, 3])
    ex = next(iter(sess._executors.values()))
    assert ex.arena.nbytes == max(ex.plan.arena_bytes, 1)
    with pytest.raises(
        BackendError, match=r"needs .* GiB of GPU memory; .* GiB of .* GiB are free"
    ):
        gpu.check_fits(1 << 50, "a test plan")


def test_stream_makes_new_streams_beside_the_compute_stream(gpu) -> None:  # noqa: ANN001
    s = gpu.stream()
    assert s.ptr != gpu.compute_stream.ptr
    s.synchronize()
