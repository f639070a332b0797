"""The tensor-core prompt attention (``k_flash_attn``, backends/flash_attention.cu) against the
NumPy reference (``gpu`` marker: skipped without CUDA).

K and V are given in the cache's 16-bit type to both sides, so the reference differs only by
what the kernel rounds besides: Q (times scale * log2 e) and the probabilities, to that type.
Tolerances: 8 units of the type's last place, relative to the largest output magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.model.session import Session
from engine.model.weights import random_weights
from engine.options import Options
from engine.runtime.executor import Executor
from graph import GraphBuilder, f32
from graph.models import preset
from tests.conftest import close

pytestmark = pytest.mark.gpu

TOL = {"f16": 8 * 2.0**-11, "bf16": 8 * 2.0**-8}


def _graph(n: int, m: int, h: int, hk: int, d: int, kv: str, window: int):  # noqa: ANN202
    g = GraphBuilder()
    q = g.input("q", (n, h, d), f32)
    k = g.input("k", (m, hk, d), kv)
    v = g.input("v", (m, hk, d), kv)
    qp, kp = g.input("qpos", (n,), "i32"), g.input("kpos", (m,), "i32")
    return g.build([g.attention(q, k, v, qp, kp, scale=d**-0.5, window=window)])


def _inputs(n: int, m: int, h: int, hk: int, d: int, cached: int, order: str, seed: int) -> dict:
    """A prompt chunk of ``n`` tokens at positions cached..cached+n-1 over a cache of ``m``
    rows already holding ``cached`` tokens; rows past those are empty (-1). ``order``:
    "rows" (row j holds position j) or "ring" (positions permuted over the filled rows)."""
    rng = np.random.default_rng(seed)
    filled = min(m, cached + n)
    kpos = np.full(m, -1, np.int32)
    kpos[:filled] = np.arange(filled) if order == "rows" else rng.permutation(filled)
    return {
        "q": (2 * rng.standard_normal((n, h, d))).astype(np.float32),
        "k": rng.standard_normal((m, hk, d)).astype(np.float32),
        "v": rng.standard_normal((m, hk, d)).astype(np.float32),
        "qpos": np.arange(cached, cached + n, dtype=np.int32),
        "kpos": kpos,
    }


def _run(gpu, graph, inputs, mode: str, kernel: str = "flash") -> np.ndarray:  # noqa: ANN001
    saved, gpu.prompt_attention = gpu.prompt_attention, kernel
    try:
        ex = Executor(graph, {}, gpu, options=Options(mode=mode))
        for _ in range(2):  # graph mode: warm run, capture and replay
            out = ex.run(inputs)[0]
    finally:
        gpu.prompt_attention = saved
    return out


@pytest.mark.parametrize(
    ("n", "m", "h", "hk", "d", "window", "cached", "order"),
    [
        (9, 9, 2, 2, 64, 0, 0, "rows"),  # the first prompt length past the decode kernel's
        (17, 17, 4, 1, 128, 0, 0, "rows"),  # grouped-query: 4 query heads on one kv head
        (64, 64, 2, 1, 256, 0, 0, "rows"),
        (65, 65, 3, 3, 128, 0, 0, "rows"),  # one row past a block of queries and a key tile
        (130, 130, 8, 2, 256, 0, 0, "rows"),
        (300, 300, 2, 1, 256, 64, 0, "rows"),  # a sliding window shorter than the prompt
        (100, 700, 4, 2, 128, 0, 400, "rows"),  # a chunk over a partly filled cache
        (100, 700, 4, 2, 128, 0, 400, "ring"),  # the same cache in ring order
        (77, 512, 2, 1, 256, 37, 200, "ring"),  # window, ring order, chunk
        (513, 513, 4, 4, 64, 0, 0, "rows"),
        (4097, 4097, 2, 1, 128, 0, 0, "rows"),
    ],
)
@pytest.mark.parametrize("kv", ["f16", "bf16"])
def test_flash_attention_against_numpy(gpu, n, m, h, hk, d, window, cached, order, kv) -> None:  # noqa: ANN001
    graph = _graph(n, m, h, hk, d, kv, window)
    inputs = _inputs(n, m, h, hk, d, cached, order, seed=n + m + d)
    want = Executor(graph, {}, "numpy").run(inputs)[0]
    got = _run(gpu, graph, inputs, "graph")
    assert any(name.startswith("k_flash_attn") for name in gpu._functions)
    np.testing.assert_equal(np.isfinite(got), True)
    tol = TOL[kv]
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got.astype(np.float64) - want).max()) / scale
    assert err <= tol, f"max error {err:.2e} of the largest magnitude, allowed {tol:.2e}"


@pytest.mark.parametrize("kv", ["f16", "bf16"])
def test_flash_replay_is_bitwise_eager(gpu, kv) -> None:  # noqa: ANN001
    graph = _graph(200, 600, 4, 2, 128, kv, 0)
    inputs = _inputs(200, 600, 4, 2, 128, 300, "ring", seed=5)
    np.testing.assert_array_equal(
        _run(gpu, graph, inputs, "graph"), _run(gpu, graph, inputs, "eager")
    )


def test_queries_that_see_no_key_get_zero(gpu) -> None:  # noqa: ANN001
    """As the reference: an empty cache row set (every key -1) leaves the output 0, not NaN."""
    graph = _graph(40, 64, 2, 2, 64, "f16", 0)
    inputs = _inputs(40, 64, 2, 2, 64, 0, "rows", seed=1)
    inputs["kpos"][:] = -1
    got = _run(gpu, graph, inputs, "graph")
    np.testing.assert_array_equal(got, np.zeros_like(got))


def test_simple_kernel_still_serves_on_request(gpu) -> None:  # noqa: ANN001
    """``prompt_attention = "simple"``: the f32-arithmetic kernel on a 16-bit cache."""
    graph = _graph(70, 70, 2, 1, 128, "f16", 0)
    inputs = _inputs(70, 70, 2, 1, 128, 0, "rows", seed=2)
    got = _run(gpu, graph, inputs, "graph", kernel="simple")
    want = Executor(graph, {}, "numpy").run(inputs)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama-tiny", "gemma3-tiny"])
@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("kernel", ["flash", "simple"])
def test_models_on_the_default_cache_equal_numpy_on_the_same_cache(gpu, name, mode, kernel) -> None:  # noqa: ANN001
    """No --cache-type on the GPU: an f16 cache, prompts through either prompt kernel; the
    NumPy reference keeps its cache in f16 too, so only the kernel's own roundings (the flash
    kernel's Q and probabilities to f16) separate them."""
    cfg = preset(name)
    w = random_weights(cfg, seed=11)
    saved, gpu.prompt_attention = gpu.prompt_attention, kernel
    try:
        dev = Session(cfg, w, gpu, n_ctx=64, n_batch=16, mode=mode)
        cpu = Session(cfg, w, "numpy", n_ctx=64, n_batch=16, kv_type="f16")
        assert dev.cache_dtype.name == "f16"
        ids = list(range(3, 17))  # past the decode kernel's 8 tokens: the flash kernel
        close(dev.prefill(ids, logits="all"), cpu.prefill(ids, logits="all"), 4e-3, "prefill")
        assert kernel != "flash" or any(n.startswith("k_flash_attn") for n in gpu._functions)
        tok = 7
        for step in range(6):
            close(dev.decode(tok), cpu.decode(tok), 4e-3, f"decode step {step}")
            tok = (tok * 31 + 5) % cfg.n_vocab
    finally:
        gpu.prompt_attention = saved
