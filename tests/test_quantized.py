"""GGUF weights kept in their block types: the file's bytes as weights (``Quantized``), the
config that says which matrix is which type, the NumPy reference computing on them, plans and
the ring counting their real bytes, and the choice of storage per backend (``config_for``)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from backends import device_spec
from backends.base import Quantized
from engine.model.gguf import config_for, open_gguf
from engine.model.session import Session, plan_for
from engine.options import Options
from graph.dtypes import f16, f32, q4_k, q8_0
from graph.models import weight_shapes
from tests.gguf_fixtures import GEMMA3, GEMMA3_TYPES, LLAMA, LLAMA_TYPES, write_model

PROMPT = [1, 5, 9, 2, 33, 7, 18, 4, 60, 11]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model_file(request, tmp_path_factory):
    cfg, types = {"llama": (LLAMA, LLAMA_TYPES), "gemma3": (GEMMA3, GEMMA3_TYPES)}[request.param]
    path = tmp_path_factory.mktemp("q") / f"{request.param}.gguf"
    written = write_model(path, cfg, types)
    return open_gguf(path), written


def test_stored_config_names_each_matrix_type(model_file) -> None:
    model, written = model_file
    cfg = model.stored_config()
    for name, (_, qtype) in written.items():
        shape = weight_shapes(cfg)[name]
        want = qtype.name.lower() if len(shape) == 2 else "f32"
        assert cfg.weight_dtype(name).name == want, name
    # the bytes a run holds are the file's (a tied head once)
    assert cfg.n_bytes() == sum(t.n_bytes for t in model.tensors.values())
    assert cfg.is_quantized and "+" in cfg.storage


def test_stored_weights_are_the_file_bytes(model_file) -> None:
    model, written = model_file
    weights = model.weights_as(model.stored_config())
    for name, (data, qtype) in written.items():
        w = weights[name]
        if isinstance(w, Quantized):
            assert w.dtype.name == qtype.name.lower()
            assert np.array_equal(np.asarray(w.data).reshape(-1), data.reshape(-1).view(np.uint8))
            assert not w.data.flags.writeable  # a view of the mapped file, not a copy


def test_unreadable_block_types_fall_back_to_f16(model_file) -> None:
    model, written = model_file
    cfg = model.stored_config(readable={"q8_0", "q4_k"})
    for name, (_, qtype) in written.items():
        if len(weight_shapes(cfg)[name]) != 2:
            continue
        got = cfg.weight_dtype(name)
        if qtype.name in ("Q8_0", "Q4_K"):
            assert got in (q8_0, q4_k)
        elif qtype.name.startswith("Q"):
            assert got == f16, name
    weights = model.weights_as(cfg)
    for name, (_, qtype) in written.items():
        if qtype.name in ("Q2_K", "Q5_1"):
            assert weights[name].dtype == np.float16


@pytest.mark.parametrize("stack", [False, True])
def test_reference_on_block_types_equals_dequantized_at_load(model_file, stack: bool) -> None:
    """The NumPy backend computing on the file's blocks (the reference of the GPU's block
    kernels) gives the logits of the same model dequantized to f32 at load."""
    model, _ = model_file
    stored = model.stored_config()
    opts = Options(n_ctx=32, n_batch=4, stack=stack)
    a = Session(stored, model.weights_as(stored, stack=stack), options=opts)
    flat = model.config.dequantized(f32)
    b = Session(flat, model.weights(f32, stack=stack), options=opts)
    la, lb = a.prefill(PROMPT), b.prefill(PROMPT)
    # the same values; only f32 summation order differs where a layer stacks in one and not
    # the other (mixed types do not stack: a product per part, blocked differently by BLAS)
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5 if not stack else 2e-4)
    assert np.array_equal(np.argmax(a.decode(3)), np.argmax(b.decode(3)))


def test_stacks_only_layers_of_one_type(model_file) -> None:
    model, _ = model_file
    cfg = model.stored_config()
    stacked = weight_shapes(cfg, stack=True)
    for layer in range(cfg.n_layer):
        for group in ("attn_qkv", "ffn_gate_up"):
            assert (f"blk.{layer}.{group}.weight" in stacked) == cfg.stacks(layer, group)
    assert "blk.0.attn_qkv.weight" not in stacked  # Q4_0 / Q5_0 / Q8_0 (llama) or mixed
    weights = model.weights_as(cfg, stack=True)
    assert set(stacked) - {"output.weight"} <= set(weights)


def test_streamed_block_layers_equal_resident(model_file) -> None:
    """The ring carries a block-typed layer's bytes as they are: streamed equals resident."""
    model, _ = model_file
    cfg = model.stored_config()
    w = model.weights_as(cfg)
    base = Options(n_ctx=32, n_batch=4)
    resident = Session(cfg, w, options=base).prefill(PROMPT)
    streamed = Session(cfg, w, options=base.replace(offload="*1+0")).prefill(PROMPT)
    assert np.array_equal(resident, streamed)


def test_storage_follows_the_backend_and_dtype(model_file) -> None:
    model, written = model_file
    gpu = config_for(model, Options(backend="cupy"))
    readable = device_spec("cupy").block_types
    for name, (_, qtype) in written.items():
        if len(weight_shapes(gpu)[name]) == 2 and qtype.name.startswith("Q"):
            want = qtype.name.lower() if qtype.name.lower() in readable else "f16"
            assert gpu.weight_dtype(name).name == want
    assert config_for(model, Options(backend="numpy")).storage == "f32"
    asked = config_for(model, Options(backend="cupy", dtype="bf16"))
    assert asked.storage == "bf16" and not asked.is_quantized


def test_gpu_plan_counts_block_bytes(model_file) -> None:
    """A plan for the GPU (nominal spec, no GPU needed) holds the blocks' bytes, not 16-bit."""
    model, _ = model_file
    opts = Options(backend="cupy", n_ctx=32)
    cfg = config_for(model, opts)
    q = plan_for(cfg, opts)
    assert q.device_weight_bytes == cfg.n_bytes(opts.stack)
    assert q.config.storage in str(q)


def test_wrong_block_type_is_named() -> None:
    from engine.runtime.executor import Executor
    from graph.builder import GraphBuilder
    from graph.dtypes import i32
    from graph.ops import GraphError

    g = GraphBuilder()
    w = g.weight("w", (4, 32), q8_0, layer=0)
    graph = g.build([g.get_rows(w, g.input("i", (1,), i32))])
    raw = np.zeros((4, 18), np.uint8)  # q4_0 rows of 32
    from graph.dtypes import q4_0

    with pytest.raises(GraphError, match="weight w is q4_0, the graph expects q8_0"):
        Executor(graph, {"w": Quantized(raw, q4_0, (4, 32))}, "numpy", {})


def test_quantized_value_checks_its_bytes() -> None:
    with pytest.raises(ValueError, match=r"q8_0 \(4, 64\) is stored as uint8 \(4, 68\)"):
        Quantized(np.zeros((4, 64), np.uint8), q8_0, (4, 64))
    with pytest.raises(TypeError, match="block type"):
        Quantized(np.zeros((4, 64), np.uint8), f32, (4, 64))


def test_reference_dequantize_is_gguf() -> None:
    from backends.base import dequantize

    rng = np.random.default_rng(0)
    raw = np.zeros((3, 2 * 34), np.uint8)
    raw[:] = rng.integers(0, 256, raw.shape)
    raw.reshape(-1, 34)[:, :2] = np.array([0.01], np.float16).view(np.uint8)  # finite scales
    w = Quantized(raw, q8_0, (3, 64))
    assert np.array_equal(dequantize(w), gguf_dequantize(raw, T.Q8_0))
    assert np.array_equal(dequantize(w, np.array([2, 0])), gguf_dequantize(raw, T.Q8_0)[[2, 0]])


def test_commands_keep_the_file_types_unless_dtype_is_given(model_file) -> None:
    """No ``--dtype`` is no choice: a GGUF on the GPU runs in its block types; the flag still
    dequantizes."""
    import argparse

    from tools.args import options_from, run_flags

    model, _ = model_file
    parser = argparse.ArgumentParser(parents=[run_flags()])
    plain = options_from(parser.parse_args(["--backend", "cupy"]))
    assert plain.dtype is None and config_for(model, plain).is_quantized
    asked = options_from(parser.parse_args(["--backend", "cupy", "--dtype", "f32"]))
    assert config_for(model, asked).storage == "f32"


def test_a_quantized_7b_streams_its_block_bytes() -> None:
    """The offload pass on the 7B shape in Q4_K (nominal GPU spec, no GPU needed): the ring's
    slots and the bytes streamed per token are the blocks', under a third of bf16's, so the
    same budget keeps several times the layers resident."""
    from graph.dtypes import bf16
    from graph.models import preset

    base = preset("llama-7b")
    matrices = [n for n, s in weight_shapes(base).items() if len(s) == 2]
    q = base.replace(weight_types=tuple((n, q4_k) for n in matrices))
    opts = Options(backend="cupy", offload="auto", vram=1.8, n_ctx=256)
    pq = plan_for(q, opts)
    pb = plan_for(base.replace(dtype=bf16), opts.replace(dtype="bf16"))
    shapes = weight_shapes(q, opts.stack)
    size = {n: q.weight_dtype(n).nbytes(s) for n, s in shapes.items()}
    layer0 = [n for n in shapes if n.startswith("blk.0.") and len(shapes[n]) == 2]
    assert pq.placement.slot_bytes == sum(size[n] for n in layer0)  # (norms stay resident)
    assert pq.placement.streamed_bytes == sum(size[n] for n in pq.streamed)
    assert pq.device_weight_bytes <= 1.8 * 2**30
    resident_q = sum(p.where == "gpu" for p in pq.placement.layers)
    resident_b = sum(p.where == "gpu" for p in pb.placement.layers)
    assert resident_q >= 3 * max(resident_b, 1), (resident_q, resident_b)


@pytest.mark.parametrize("ngl", [0, 1])
def test_split_models_keep_the_stored_stacking(model_file, ngl: int) -> None:
    """A split model's host layers are widened from the stored weights: the host graph names
    them as the stored config stacks them (a layer of mixed types stays separate)."""
    model, _ = model_file
    cfg = model.stored_config()
    w = model.weights_as(cfg, stack=True)
    base = Options(n_ctx=32, n_batch=4, stack=True)
    whole = Session(cfg, w, options=base).prefill(PROMPT)
    split = Session(cfg, w, options=base.replace(offload=f"ngl={ngl}")).prefill(PROMPT)
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5)


def test_block_weights_in_host_memory_count_against_the_budget(model_file, monkeypatch) -> None:
    """The session's memory check is told only of weights already on the device: blocks in
    host memory (the file's mapping) still have to fit."""
    import engine.model.session as session_module

    model, _ = model_file
    cfg = model.stored_config()
    seen = []
    real = session_module.check_memory

    def check(plan, be, there=0):  # noqa: ANN001, ANN202
        seen.append(there)
        return real(plan, be, there)

    monkeypatch.setattr(session_module, "check_memory", check)
    Session(cfg, model.weights_as(cfg), options=Options(n_ctx=32, n_batch=4))
    assert seen == [0]


def test_weights_of_another_config_are_named(model_file) -> None:
    """Stored blocks given to a config that dequantizes: the part is named, not the group."""
    from graph.ops import GraphError

    model, _ = model_file
    stored = model.stored_config()
    wide = model.config.dequantized(f16)
    with pytest.raises(GraphError, match=r"weight blk\.0\.\w+\.weight is q\w+, the model stores"):
        Session(wide, model.weights_as(stored), options=Options(n_ctx=32, stack=True))
