"""The CUDA kernels that read GGUF block types as stored, against ``gguf.quants.dequantize``
followed by NumPy (the NumPy backend dequantizes with it), ``gpu`` marker: skipped without CUDA.

Decode products (``k_matvec_q``, up to 8 rows, f32 arithmetic) are held to f32 tolerance; longer
products decode tiles into f16 for cuBLAS and are held to f16's. Row gathers are exact. Every
graph runs eagerly, is captured, then replayed: the replay must equal the eager run bitwise.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from backends.base import Quantized, dequantize
from backends.cuda_matvec import (
    MATVEC_Q_VARIANTS,
    MAX_INPUT_FLOATS,
    MAX_INPUT_FLOATS_Q,
    MVQ_STAGES,
    MVS_PIECES,
    PRE_COPY,
    _bind_staged,
    q_smem,
    staged_ring_bytes,
)
from engine.model.gguf import config_for, open_gguf
from engine.model.session import Session
from engine.options import Options
from engine.runtime.executor import Executor
from graph import GraphBuilder, f32
from graph.dtypes import DTYPES, i32
from tests.conftest import close
from tests.gguf_fixtures import GEMMA3, GEMMA3_TYPES, LLAMA, LLAMA_TYPES, encode, write_model

pytestmark = pytest.mark.gpu

TYPES = ["q4_0", "q5_0", "q8_0", "q4_k", "q5_k", "q6_k"]
PROMPT = [1, 5, 9, 2, 33, 7, 18, 4, 60, 11, 3, 3, 8, 40, 2, 19, 27]


def _blocks(name: str, n: int, k: int, seed: int) -> Quantized:
    """An (n, k) matrix of ``name`` blocks: quantized normal values, or (K types) random
    blocks with small finite scales."""
    rng = np.random.default_rng(seed)
    raw = encode(rng.standard_normal((n, k)).astype(np.float32), T[name.upper()], rng)
    return Quantized(np.ascontiguousarray(raw.reshape(n, -1)), DTYPES[name], (n, k))


def _runs(graph, weights, inputs, gpu, runs: int = 3):  # noqa: ANN001, ANN202
    """NumPy's outputs, and the GPU's of every run (eager, capture, replays)."""
    want = Executor(graph, weights, "numpy").run(inputs)
    dev = Executor(graph, weights, gpu, options=Options(mode="graph"))
    got = [dev.run(inputs) for _ in range(runs)]
    return want, got, dev


def _tol(name: str, rows: int, k: int) -> float:
    """f32 tolerance where ``k_matvec_q`` runs (rows and shared memory permitting), else f16's."""
    decode = rows <= 8 and q_smem(rows, k, DTYPES[name]) <= MAX_INPUT_FLOATS_Q * 4
    return 2e-5 * np.sqrt(k) if decode else 3e-3


def _replays_equal_eager(got: list[list[np.ndarray]]) -> None:
    for later in got[1:]:
        for a, b in zip(got[0], later, strict=True):
            assert np.array_equal(a, b, equal_nan=True), "a replay differs from the eager run"


@pytest.fixture(params=list(MATVEC_Q_VARIANTS))
def variant(gpu, request):  # noqa: ANN001, ANN201
    """Every decode kernel: int16 input with integer dots, f32 throughout, and the int16
    arithmetic on weights staged through shared memory."""
    saved, gpu.matvec_q = gpu.matvec_q, request.param
    yield request.param
    gpu.matvec_q = saved


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
@pytest.mark.parametrize(("n_out", "k"), [(37, 256), (1000, 768), (300, 4096), (129, 11008)])
def test_block_products(gpu, variant, name: str, rows: int, n_out: int, k: int) -> None:  # noqa: ANN001
    g = GraphBuilder()
    x = g.input("x", (rows, k), f32)
    w = g.weight("w", (n_out, k), name, layer=0)
    graph = g.build([g.mul_mat(w, x)])
    weights = {"w": _blocks(name, n_out, k, seed=k + rows)}
    inputs = {"x": np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)}
    want, got, _ = _runs(graph, weights, inputs, gpu)
    close(got[0][0], want[0], _tol(name, rows, k), f"{name} {rows}x{k} @ {n_out}")
    _replays_equal_eager(got)


@pytest.mark.parametrize("name", TYPES)
def test_prompt_products_in_several_tiles(gpu, name: str, monkeypatch) -> None:  # noqa: ANN001
    """A prompt product whose weight decodes in more tiles than one, the last one short (a
    7B head at the default tile size): each tile's rows land where they belong."""
    from backends import cuda_matmul

    n_out, k, rows = 1000, 768, 13
    monkeypatch.setattr(cuda_matmul, "BLOCK_TILE_BYTES", 2 * k * 96)  # 96-row tiles: 10 + 40
    g = GraphBuilder()
    x = g.input("x", (rows, k), f32)
    graph = g.build([g.mul_mat(g.weight("w", (n_out, k), name, layer=0), x)])
    weights = {"w": _blocks(name, n_out, k, seed=7)}
    inputs = {"x": np.random.default_rng(3).standard_normal((rows, k)).astype(np.float32)}
    want, got, _ = _runs(graph, weights, inputs, gpu)
    close(got[0][0], want[0], _tol(name, rows, k), f"{name} {rows}x{k} @ {n_out} in tiles")
    _replays_equal_eager(got)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows_per_warp", [1, 2, 4])
@pytest.mark.parametrize("m", [1, 3])
def test_staged_kernel_itself(gpu, name: str, rows_per_warp: int, m: int) -> None:  # noqa: ANN001
    """``k_matvec_qs`` bound directly (the executor falls back to ``k_matvec_q16`` where its
    ring does not fit, so this is where the staged kernel is sure to run): each rows per
    warp, one and three input rows, K of 11008, rows that do not start 16-byte aligned (Q6_K's
    210-byte blocks at K 11008, Q4_0/Q5_0/Q8_0 at K 4128), and (20000 rows) several row groups
    for every warp, the next group's rounds already in the ring when one group's sums are
    written; the weights' first copies issued before the wait for the input (``early``)."""
    import cupy as cp

    shapes = [(2113, 4096), (67, 11008), (20000, 4096)]
    shapes += [] if name.endswith("_k") else [(300, 4128)]
    for n_out, k in shapes:
        host = _blocks(name, n_out, k, seed=n_out + k)
        w = Quantized(cp.asarray(host.data), host.dtype, host.shape)
        x = np.random.default_rng(k).standard_normal((m, k)).astype(np.float32)
        xd = cp.asarray(x)
        out = cp.zeros((m, n_out), cp.float32)
        inputs = (xd, xd, None, None, None, 0.0, 0.0)
        early = n_out == 20000
        launch = _bind_staged(gpu, w, out, PRE_COPY, inputs, early, rows_per_warp)
        ring = staged_ring_bytes(w.dtype, rows_per_warp, gpu.matvec_warps, MVQ_STAGES, MVS_PIECES)
        if ring + q_smem(m, k, w.dtype) > gpu.smem_optin - 1024:
            assert launch is None, f"{name} {n_out}x{k}: the ring does not fit, no launch"
            continue
        assert launch is not None, f"{name} {n_out}x{k}: the ring fits"
        launch()
        cp.cuda.runtime.deviceSynchronize()
        want = x.astype(np.float64) @ dequantize(host).astype(np.float64).T
        close(out.get(), want, 2e-5 * np.sqrt(k), f"{name} {m}x{k} @ {n_out}, R={rows_per_warp}")


@pytest.mark.parametrize("name", ["q8_0", "q4_k", "q6_k"])
def test_staged_equals_int16_bit_for_bit(gpu, name: str) -> None:  # noqa: ANN001
    """Each lane adds its pieces in the same order with the same integer dot in both kernels,
    whatever rows a warp takes, so the staged products equal k_matvec_q16's exactly: here on
    7B shapes with several row groups a warp (the gate and up projections stacked, the head)."""
    import cupy as cp

    from backends.cuda_matvec import matvec

    for n_out, k in ((22016, 4096), (4096, 11008), (32000, 4096)):
        host = _blocks(name, n_out, k, seed=n_out)
        w = Quantized(cp.asarray(host.data), host.dtype, host.shape)
        xd = cp.asarray(np.random.default_rng(k).standard_normal((1, k)).astype(np.float32))
        outs = {}
        for variant in ("int16", "staged"):
            saved, gpu.matvec_q = gpu.matvec_q, variant
            try:
                outs[variant] = cp.zeros((1, n_out), cp.float32)
                launch = matvec(gpu, w, outs[variant], PRE_COPY, xd, xd, early=True)
            finally:
                gpu.matvec_q = saved
            launch()
        cp.cuda.runtime.deviceSynchronize()
        assert np.array_equal(outs["int16"].get(), outs["staged"].get()), f"{name} {n_out}x{k}"


@pytest.mark.parametrize("name", TYPES)
def test_block_product_at_one_block_and_16k(gpu, variant, name: str) -> None:  # noqa: ANN001
    """K from one block to 16384 (beyond shared memory at 8 rows: the tiled path)."""
    qk = 256 if name.endswith("_k") else 32
    for k, rows in ((qk, 1), (qk, 8), (16384, 1), (16384, 8)):
        g = GraphBuilder()
        x = g.input("x", (rows, k), f32)
        w = g.weight("w", (5, k), name, layer=0)
        graph = g.build([g.mul_mat(w, x)])
        weights = {"w": _blocks(name, 5, k, seed=k)}
        inputs = {"x": np.random.default_rng(k).standard_normal((rows, k)).astype(np.float32)}
        want, got, _ = _runs(graph, weights, inputs, gpu)
        close(got[0][0], want[0], _tol(name, rows, k), f"{name} {rows}x{k}")
        _replays_equal_eager(got)


@pytest.mark.parametrize("name", TYPES)
def test_block_row_gathers_are_exact(gpu, name: str) -> None:  # noqa: ANN001
    k = 512
    table = _blocks(name, 301, k, seed=3)
    g = GraphBuilder()
    idx = g.input("i", (7,), i32)
    graph = g.build([g.get_rows(g.weight("t", (301, k), name, layer=0), idx)])
    rows = np.array([0, 300, 17, 17, 299, 1, 150], np.int32)
    want = dequantize(table, rows)
    dev = Executor(graph, {"t": table}, gpu, options=Options(mode="graph"))
    for _ in range(3):
        (got,) = dev.run({"i": rows})
        assert np.array_equal(got, want)


@pytest.mark.parametrize("name", ["q4_k", "q6_k", "q8_0"])
@pytest.mark.parametrize("rows", [1, 4])
def test_block_fused_groups(gpu, variant, name: str, rows: int) -> None:  # noqa: ANN001
    """Norm into the product and GeGLU into the down projection read blocks too."""
    k, ff = 1024, 2816
    g = GraphBuilder()
    a = g.input("a", (rows, k), f32)
    b = g.input("b", (rows, k), f32)
    c = g.input("c", (rows, k), f32)
    nw = g.weight("nw", (k,), f32, layer=0)
    up = g.weight("up", (ff, k), name, layer=0)
    gate = g.weight("gate", (ff, k), name, layer=0)
    down = g.weight("down", (k, ff), name, layer=0)
    u = g.mul_mat(up, g.rms_norm(g.add(a, b), nw, 1e-6))  # the norm's one reader: fused
    y = g.mul_mat(down, g.geglu(g.mul_mat(gate, c), u))
    graph = g.build([y])
    rng = np.random.default_rng(rows)
    weights = {
        "nw": rng.standard_normal(k).astype(np.float32),
        "up": _blocks(name, ff, k, 1),
        "gate": _blocks(name, ff, k, 2),
        "down": _blocks(name, k, ff, 3),
    }
    inputs = {x: rng.standard_normal((rows, k)).astype(np.float32) for x in ("a", "b", "c")}
    want, got, dev = _runs(graph, weights, inputs, gpu)
    patterns = sorted(f.pattern for f in dev.fused)
    assert "norm_matvec" in patterns and "glu_matvec" in patterns, patterns
    close(got[0][0], want[0], 1e-4 * np.sqrt(ff), name)
    _replays_equal_eager(got)


@functools.lru_cache(maxsize=1)
def _warps_case(name: str, rows: int) -> tuple:  # (graph, weights, inputs, NumPy's outputs)
    """The norm, gate/up and GeGLU-into-down group of a 7B layer in ``name``, with its NumPy
    result: built once for every block size (the reference is the costly part)."""
    k, ff = 4096, 11008
    g = GraphBuilder()
    a = g.input("a", (rows, k), f32)
    b = g.input("b", (rows, k), f32)
    nw = g.weight("nw", (k,), f32, layer=0)
    gate_up = g.weight("gate_up", (2 * ff, k), name, layer=0)  # stacked, as models load it
    down = g.weight("down", (k, ff), name, layer=0)
    x = g.rms_norm(g.add(a, b), nw, 1e-6)
    gu = g.mul_mat(gate_up, x)  # one norm reader: the norm fuses into it
    gate = g.view(gu, (rows, ff), (2 * ff, 1), 0)
    up = g.view(gu, (rows, ff), (2 * ff, 1), ff)
    y = g.mul_mat(down, g.geglu(gate, up))
    graph = g.build([y])
    rng = np.random.default_rng(rows)

    def weight(n: int, kk: int, seed: int) -> np.ndarray | Quantized:
        if name in ("f16", "bf16"):  # stored in the weight's type by the executor
            return (rng.standard_normal((n, kk)) / np.sqrt(kk)).astype(np.float32)
        return _blocks(name, n, kk, seed)

    weights = {
        "nw": rng.standard_normal(k).astype(np.float32),
        "gate_up": weight(2 * ff, k, 1),
        "down": weight(k, ff, 3),
    }
    inputs = {x: rng.standard_normal((rows, k)).astype(np.float32) for x in ("a", "b")}
    return graph, weights, inputs, Executor(graph, weights, "numpy").run(inputs)


@pytest.mark.parametrize("rows_warps", [(1, 2), (1, 8), (1, 16), (4, 16)])  # one reference each
@pytest.mark.parametrize("name", ["f16", "bf16", "q4_k", "q6_k", "q8_0"])
def test_matvec_block_sizes(gpu, rows_warps: tuple[int, int], name: str) -> None:  # noqa: ANN001
    """Every matrix-vector kernel at ``matvec_warps`` (warps per block, compiled in as
    MV_WARPS) of 2, 8 and the default 16: the norm and GeGLU prologues (which each block runs
    over the whole input), the grid walking a matrix with more rows than resident warps, K of
    11008; at four input rows the inputs outgrow shared memory and the products run unfused
    (at 16 warps: the plain copy prologue)."""
    rows, warps = rows_warps
    graph, weights, inputs, want = _warps_case(name, rows)
    saved, gpu.matvec_warps = gpu.matvec_warps, warps
    try:
        dev = Executor(graph, weights, gpu, options=Options(mode="graph"))
        got = [dev.run(inputs) for _ in range(3)]
    finally:
        gpu.matvec_warps = saved

    def fits(k: int) -> bool:  # the input rows in the kernel's shared memory
        if name in ("f16", "bf16"):
            return rows * k <= MAX_INPUT_FLOATS
        return q_smem(rows, k, DTYPES[name]) <= MAX_INPUT_FLOATS_Q * 4

    patterns = sorted(f.pattern for f in dev.fused)
    assert patterns == [p for p, k in (("glu_matvec", 11008), ("norm_matvec", 4096)) if fits(k)]
    assert patterns == (["glu_matvec", "norm_matvec"] if rows == 1 else [])  # what that gives
    close(got[0][0], want[0], 1e-4 * np.sqrt(11008), f"{name} at {warps} warps")
    _replays_equal_eager(got)


def test_matvec_warps_outside_the_choices_is_an_error(gpu) -> None:  # noqa: ANN001
    g = GraphBuilder()
    x = g.input("x", (1, 256), f32)
    w = g.weight("w", (8, 256), "q8_0", layer=0)
    graph = g.build([g.mul_mat(w, x)])
    saved, gpu.matvec_warps = gpu.matvec_warps, 3
    try:
        with pytest.raises(Exception, match=r"matvec_warps 3: .* one of \(2, 4, 8, 16\)"):
            Executor(graph, {"w": _blocks("q8_0", 8, 256, 0)}, gpu)
    finally:
        gpu.matvec_warps = saved


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model_file(request, tmp_path_factory):  # noqa: ANN001, ANN201
    cfg, types = {"llama": (LLAMA, LLAMA_TYPES), "gemma3": (GEMMA3, GEMMA3_TYPES)}[request.param]
    path = tmp_path_factory.mktemp("qgpu") / f"{request.param}.gguf"
    write_model(path, cfg, types)
    return open_gguf(path)


def test_models_in_their_block_types(gpu, model_file) -> None:  # noqa: ANN001
    """A GGUF on the GPU runs in its own types (those the kernels read; others f16) and gives
    the NumPy reference's logits on the same bytes; streamed layers equal resident ones."""
    opts = Options(backend="cupy", n_ctx=64, n_batch=16, mode="graph", kv_type="f32")
    cfg = config_for(model_file, opts)
    assert cfg.is_quantized
    weights = model_file.weights_as(cfg)
    want_pre = Session(cfg, weights, "numpy", opts.replace(backend="numpy")).prefill(PROMPT)
    resident = Session(cfg, weights, gpu, opts)
    got_pre = resident.prefill(PROMPT)
    close(got_pre, want_pre, 1e-2, "prefill logits")  # prompt products in f16 tiles
    ref = Session(cfg, weights, "numpy", opts.replace(backend="numpy"))
    ref.prefill(PROMPT)
    steps = [resident.decode(t) for t in (3, 9, 14)]
    for t, got in zip((3, 9, 14), steps, strict=True):
        close(got, ref.decode(t), 1e-2, f"decode {t}")
    streamed = Session(cfg, weights, gpu, opts.replace(offload="*1+0"))
    assert np.array_equal(streamed.prefill(PROMPT), got_pre)
    assert np.array_equal(streamed.decode(3), steps[0])
