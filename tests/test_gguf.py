"""The GGUF loader (``engine.model.gguf``) on tiny synthetic files written with ``gguf.GGUFWriter``
(``tests/gguf_fixtures.py``): no model download needed.

Good files: hyper-parameters into ``ModelConfig``, every supported GGML type dequantized exactly
as ``gguf.quants.dequantize`` does on the bytes written, F32 tensors memory-mapped, ``weights()``
in f32/f16/bf16, and a forward pass through ``Session`` against the reference weights and against
a hand-written NumPy llama. Bad files: each problem is one ``GGUFError`` naming the file and
what is wrong, and nothing else escapes.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import GGUFValueType as V
from gguf.quants import dequantize

from engine.model.gguf import SUPPORTED_TYPES, GGUFError, GGUFModel, open_gguf
from engine.model.session import Session
from graph.dtypes import DTYPES
from graph.models import FULL, SWA, weight_shapes
from tests.gguf_fixtures import GEMMA3, GEMMA3_TYPES, LLAMA, LLAMA_TYPES, write_model

CONFIGS = {"llama": (LLAMA, LLAMA_TYPES), "gemma3": (GEMMA3, GEMMA3_TYPES)}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch, (cfg, types) in CONFIGS.items():
        out[arch] = (d / f"{arch}.gguf", write_model(d / f"{arch}.gguf", cfg, types))
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def loaded(request: pytest.FixtureRequest, files: dict) -> tuple[GGUFModel, dict, dict]:
    """(model, {name: (bytes written, type)}, {name: reference f32 array}) for each arch."""
    path, written = files[request.param]
    shapes = weight_shapes(CONFIGS[request.param][0])
    ref = {n: dequantize(data, q).reshape(shapes[n]) for n, (data, q) in written.items()}
    return open_gguf(path), written, ref


# -- good files ----------------------------------------------------------------------------------


def test_config_round_trips(loaded: tuple) -> None:
    model, _, _ = loaded
    cfg = CONFIGS[model.arch][0]
    # the epsilon is stored as f32; everything else comes back exactly
    assert model.config == cfg.replace(rms_eps=float(np.float32(cfg.rms_eps)))
    assert model.config.name == f"{model.arch}-gguf-test"
    assert model.get_str("general.architecture") == model.arch


def test_gemma3_derived_settings(files: dict) -> None:
    c = open_gguf(str(files["gemma3"][0])).config  # str paths work too
    assert (c.sliding_window, c.swa_pattern, c.rope_base, c.rope_base_swa) == (8, 6, 1e6, 1e4)
    assert c.attn_scale == pytest.approx(1 / np.sqrt(c.head_dim)) and c.scale == c.attn_scale
    assert c.tied_embeddings  # no output.weight in the file
    assert c.layer_kinds == (SWA,) * 5 + (FULL,)
    llama = open_gguf(files["llama"][0]).config
    assert not llama.tied_embeddings and llama.sliding_window == 0 and llama.attn_scale is None
    assert set(llama.layer_kinds) == {FULL}


def test_types_bytes_and_describe(loaded: tuple) -> None:
    model, written, _ = loaded
    expect: dict[str, int] = {}
    for data, q in written.values():
        expect[q.name] = expect.get(q.name, 0) + data.nbytes
    by_type = model.bytes_by_type()
    assert by_type == expect
    assert list(by_type.values()) == sorted(by_type.values(), reverse=True)
    text = model.describe()
    assert str(model.path) in text and model.arch in text
    for kind in expect:
        count = sum(q.name == kind for _, q in written.values())
        assert any(ln.split()[:2] == [kind, str(count)] for ln in text.splitlines()), kind
    for name, info in model.tensors.items():
        data, q = written[name]
        assert (info.ggml_type, info.n_bytes) == (q.name, data.nbytes)
        assert info.dtype is DTYPES[q.name.lower()] and info.dtype.nbytes(info.shape) == data.nbytes
    if model.arch == "llama":  # the llama file alone holds every supported type
        assert set(by_type) == set(SUPPORTED_TYPES)
        assert "output.weight" in text
    else:
        assert "tied to token_embd" in text and "window 8 on 5 of 6 layers" in text


def test_tensors_match_reference_dequantization(loaded: tuple) -> None:
    model, written, ref = loaded
    shapes = weight_shapes(model.config)
    assert set(model.tensors) == set(written)
    for name in written:
        got = model.tensor(name)
        assert got.shape == shapes[name] == model.tensors[name].shape, name
        assert got.dtype == np.float32 and np.isfinite(got).all(), name
        np.testing.assert_array_equal(got, ref[name], err_msg=name)


def test_f32_tensors_are_memory_mapped(loaded: tuple) -> None:
    model, written, ref = loaded
    mapped = [n for n, (_, q) in written.items() if q == T.F32]
    assert mapped
    for name in mapped:
        arr = model.tensor(name)
        assert np.shares_memory(arr, model.reader.data), name
        assert not np.shares_memory(model.tensor(name, "f16"), model.reader.data)
    for name in (n for n, (_, q) in written.items() if q not in (T.F32, T.F16)):
        assert not np.shares_memory(model.tensor(name), model.reader.data), name


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_weights_in_each_dtype(loaded: tuple, dtype: str) -> None:
    model, _, ref = loaded
    npd = np.dtype(ml_dtypes.bfloat16) if dtype == "bf16" else np.dtype(dtype.replace("f", "float"))
    seen: list[tuple[str, int, int]] = []
    w = model.weights(dtype, progress=lambda *a: seen.append(a))
    shapes = weight_shapes(model.config)
    assert set(w) == set(shapes)
    for name, shape in shapes.items():
        want = npd if len(shape) == 2 else np.dtype(np.float32)
        assert w[name].shape == shape and w[name].dtype == want, name
        np.testing.assert_array_equal(w[name], ref.get(name, ref["token_embd.weight"]).astype(want))
    assert len(seen) == len(model.tensors) and seen[-1][1:] == (len(seen), len(seen))
    if model.config.tied_embeddings:
        assert w["output.weight"] is w["token_embd.weight"]
    else:
        assert not np.shares_memory(w["output.weight"], w["token_embd.weight"])


def test_session_on_loaded_weights_matches_reference_weights(loaded: tuple) -> None:
    model, _, ref = loaded
    ids = [3, 17, 42, 5, 60, 1, 9, 33, 2, 8, 11]  # longer than gemma3's window of 8
    got = Session(model.config, model.weights(), n_ctx=16).prefill(ids, logits="all")
    want = Session(model.config, ref, n_ctx=16).prefill(ids, logits="all")
    assert got.shape == (len(ids), model.config.n_vocab) and np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x) + eps) * w


def test_llama_one_token_by_hand(files: dict) -> None:
    """Logits of one token at position 0: rope is the identity and attention is just v."""
    model = open_gguf(files["llama"][0])
    c, w = model.config, {k: v.astype(np.float64) for k, v in model.weights().items()}
    tok = 7
    h = w["token_embd.weight"][tok]
    for il in range(c.n_layer):
        p = f"blk.{il}."
        x = rms_norm(h, w[p + "attn_norm.weight"], c.rms_eps)
        v = (w[p + "attn_v.weight"] @ x).reshape(c.n_head_kv, c.head_dim)
        h = h + w[p + "attn_output.weight"] @ np.repeat(v, c.n_head // c.n_head_kv, 0).ravel()
        x = rms_norm(h, w[p + "ffn_norm.weight"], c.rms_eps)
        gate, up = w[p + "ffn_gate.weight"] @ x, w[p + "ffn_up.weight"] @ x
        h = h + w[p + "ffn_down.weight"] @ (gate / (1 + np.exp(-gate)) * up)
    want = w["output.weight"] @ rms_norm(h, w["output_norm.weight"], c.rms_eps)
    got = Session(c, model.weights(), n_ctx=8).prefill([tok])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_unknown_tensor_name(files: dict) -> None:
    model = open_gguf(files["llama"][0])
    with pytest.raises(GGUFError, match="tensor blk.9.attn_q.weight is missing") as e:
        model.tensor("blk.9.attn_q.weight")
    assert str(model.path) in str(e.value)


# -- bad files -----------------------------------------------------------------------------------


def expect_error(path: Path, *needles: str) -> str:
    """Opening ``path`` raises GGUFError (nothing else) naming the file and each needle."""
    model = None
    with pytest.raises(GGUFError) as e:
        model = open_gguf(path)
    assert model is None  # nothing half-built comes back
    with pytest.raises(GGUFError):
        GGUFModel(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def data_end(path: Path) -> int:
    r = GGUFReader(path)
    return max(t.data_offset + t.n_bytes for t in r.tensors)


@pytest.mark.parametrize(
    "where",
    ["version", "counts", "metadata", "tensor info", "tensor data", "last byte"],
)
def test_truncated(files: dict, tmp_path: Path, where: str) -> None:
    good = files["llama"][0].read_bytes()
    start = GGUFReader(files["llama"][0]).data_offset
    cut = {
        "version": 9,
        "counts": 20,
        "metadata": 100,
        "tensor info": start - 40,
        "tensor data": (start + len(good)) // 2,
        "last byte": data_end(files["llama"][0]) - 1,
    }[where]
    path = tmp_path / "cut.gguf"
    path.write_bytes(good[:cut])
    expect_error(path, "not a readable GGUF file")


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "file is 0 bytes: too short"),
        (b"GGUF", "file is 4 bytes: too short"),
        (b"GGML" + bytes(60), "wrong magic b'GGML'"),
        (b"GGUF\x09\x00\x00\x00" + bytes(60), "version 9"),
    ],
)
def test_not_gguf(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    expect_error(path, needle)


def test_wrong_magic_on_a_real_file(files: dict, tmp_path: Path) -> None:
    path = tmp_path / "magic.gguf"
    path.write_bytes(b"GGJT" + files["llama"][0].read_bytes()[4:])
    expect_error(path, "wrong magic", "not a GGUF file")


def test_missing_path_and_directory(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.gguf", "cannot open", "No such file")
    expect_error(tmp_path, "cannot open")


Q8_ROW = 256 // 32 * 34  # bytes of one 256-element Q8_0 row

BAD = {
    "bytes short": (
        dict(
            raw={"blk.0.attn_q.weight": (np.zeros(256 * Q8_ROW - 34, np.int8), (256, 256), T.Q8_0)}
        ),
        ("tensors blk.0.attn_q.weight and blk.0.attn_k.weight overlap",),
    ),
    "bytes long": (
        dict(
            raw={"blk.0.attn_q.weight": (np.zeros(256 * Q8_ROW + 64, np.int8), (256, 256), T.Q8_0)}
        ),
        ("64 bytes after tensor blk.0.attn_q.weight belong to no tensor",),
    ),
    "last tensor short": (
        dict(raw={"output.weight": (np.zeros(64 * Q8_ROW - 34, np.int8), (64, 256), T.Q8_0)}),
        ("not a readable GGUF file",),
    ),
    "missing tensor": (
        dict(drop=("blk.0.ffn_up.weight",)),
        ("tensor blk.0.ffn_up.weight is missing",),
    ),
    "missing embedding": (dict(drop=("token_embd.weight",)), ("token_embd.weight is missing",)),
    "transposed": (
        dict(raw={"blk.0.ffn_up.weight": (np.zeros((256, 512), np.float32), None, None)}),
        ("blk.0.ffn_up.weight has shape (256, 512)", "expects (512, 256)"),
    ),
    "norm shape": (
        dict(raw={"blk.1.ffn_norm.weight": (np.ones(128, np.float32), None, None)}),
        ("blk.1.ffn_norm.weight has shape (128,)",),
    ),
    "0-d embedding": (
        dict(raw={"token_embd.weight": (np.ones((), np.float32), None, None)}),
        ("token_embd.weight has shape ()",),
    ),
    "IQ4_NL": (
        dict(raw={"blk.0.ffn_up.weight": (np.zeros((512, 8 * 18), np.uint8), None, T.IQ4_NL)}),
        ("blk.0.ffn_up.weight has type IQ4_NL", "supported: F32, F16, BF16"),
    ),
    "TQ1_0": (
        dict(raw={"blk.1.attn_k.weight": (np.zeros((128, 54), np.uint8), None, T.TQ1_0)}),
        ("blk.1.attn_k.weight has type TQ1_0",),
    ),
    "F64 extra tensor": (
        dict(raw={"rope_freqs.weight": (np.ones(32, np.float64), None, None)}),
        ("rope_freqs.weight has type F64",),
    ),
    "type id 200": (
        dict(raw={"blk.0.ffn_up.weight": (np.zeros((512, 256), np.float32), (512, 256), 200)}),
        ("not a readable GGUF file", "200"),
    ),
    "block_count string": (
        dict(meta={"{a}.block_count": ("2", V.STRING)}),
        ("metadata llama.block_count should be an integer, found STRING",),
    ),
    "block_count array": (
        dict(meta={"{a}.block_count": ([2, 2], V.ARRAY)}),
        ("llama.block_count should be an integer, found ARRAY",),
    ),
    "embedding float": (
        dict(meta={"{a}.embedding_length": (256.0, V.FLOAT32)}),
        ("llama.embedding_length should be an integer, found FLOAT32",),
    ),
    "eps string": (
        dict(meta={"{a}.attention.layer_norm_rms_epsilon": ("1e-5", V.STRING)}),
        ("llama.attention.layer_norm_rms_epsilon should be a number",),
    ),
    "architecture int": (
        dict(meta={"general.architecture": (3, V.UINT32)}),
        ("general.architecture should be a string, found UINT32",),
    ),
    "no feed_forward_length": (
        dict(meta={"{a}.feed_forward_length": None}),
        ("metadata key llama.feed_forward_length is missing",),
    ),
    "no head_count": (
        dict(meta={"{a}.attention.head_count": None}),
        ("llama.attention.head_count is missing",),
    ),
    "no architecture": (
        dict(meta={"general.architecture": None}),
        ("metadata key general.architecture is missing",),
    ),
    "unknown architecture": (
        dict(arch="mamba"),
        ("architecture 'mamba' is not supported; supported: llama, gemma3",),
    ),
    "zero kv heads": (
        dict(meta={"{a}.attention.head_count_kv": (0, V.UINT32)}),
        ("llama.attention.head_count_kv is 0; it must be positive",),
    ),
    "negative layers": (
        dict(meta={"{a}.block_count": (-1, V.INT32)}),
        ("llama.block_count is -1; it must be positive",),
    ),
    "absurd layers": (
        dict(meta={"{a}.block_count": (10**12, V.UINT64)}),
        ("block_count is 1000000000000, but the file holds only 21 tensors",),
    ),
    "heads vs kv heads": (
        dict(meta={"{a}.attention.head_count": (3, V.UINT32)}),
        ("3 heads are not a multiple of 2 kv heads",),
    ),
    "value_length": (
        dict(meta={"{a}.attention.value_length": (32, V.UINT32)}),
        ("value_length differs from key_length",),
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_llama_file(tmp_path: Path, case: str) -> None:
    kwargs, needles = BAD[case]
    path = tmp_path / "bad.gguf"
    write_model(path, LLAMA, LLAMA_TYPES, **kwargs)
    expect_error(path, *needles)


def test_bad_gemma3_file(tmp_path: Path) -> None:
    path = tmp_path / "g1.gguf"
    write_model(path, GEMMA3, GEMMA3_TYPES, drop=("blk.5.post_ffw_norm.weight",))
    expect_error(path, "tensor blk.5.post_ffw_norm.weight is missing (gemma3 needs it)")
    path = tmp_path / "g2.gguf"
    write_model(path, GEMMA3, GEMMA3_TYPES, meta={"{a}.attention.sliding_window": ("8", V.STRING)})
    expect_error(path, "gemma3.attention.sliding_window should be an integer")
