"""Tiny synthetic GGUF files for the loader tests (``tests/test_gguf.py``), written with
``gguf.GGUFWriter``: a llama and a gemma3 of small shapes whose matrices are stored in many
different GGML types, plus knobs to break a file in one specific way.

Every matrix's input dim is a multiple of 256, so any type (K-quants need whole 256-element
rows) fits any matrix. ``gguf.quants.quantize`` has no K-quant encoders, so K-quant tensors are
random block bytes whose f16 scale fields (``d``/``dmin``) are overwritten with small finite
values: they dequantize to finite numbers. ``write_model`` returns the bytes it wrote per tensor
and the type, so a test can dequantize them independently of the file.

``raw_gguf`` and its parts build headers byte by byte, for the files a writer refuses to make:
counts and lengths that lie, strings that are not UTF-8, nested arrays, unknown types.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf.quants import quant_shape_to_byte_shape, quantize

from engine.model.weights import random_weights
from graph.models import ModelConfig, weight_shapes

LLAMA = ModelConfig(
    arch="llama",
    n_vocab=64,
    n_embd=256,
    n_layer=2,
    n_head=4,
    n_head_kv=2,
    head_dim=64,
    n_ff=512,
    rms_eps=1e-5,
    rope_base=10000.0,
    name="llama-gguf-test",
)
GEMMA3 = ModelConfig(
    arch="gemma3",
    n_vocab=64,
    n_embd=256,
    n_layer=6,
    n_head=4,
    n_head_kv=1,
    head_dim=64,
    n_ff=256,
    rms_eps=1e-6,
    rope_base=1e6,
    sliding_window=8,
    swa_pattern=6,
    attn_scale=64**-0.5,
    tied_embeddings=True,
    name="gemma3-gguf-test",
)

# Types of the matrices; every other matrix is F32, every norm F32.
LLAMA_TYPES = {
    "token_embd.weight": T.F16,
    "blk.0.attn_q.weight": T.Q4_0,
    "blk.0.attn_k.weight": T.Q5_0,
    "blk.0.attn_v.weight": T.Q8_0,
    "blk.0.attn_output.weight": T.Q4_K,
    "blk.0.ffn_gate.weight": T.Q6_K,
    "blk.0.ffn_up.weight": T.Q5_K,
    "blk.0.ffn_down.weight": T.BF16,
    "blk.1.attn_q.weight": T.Q2_K,
    "blk.1.attn_k.weight": T.Q3_K,
    "blk.1.attn_v.weight": T.Q4_1,
    "blk.1.attn_output.weight": T.Q5_1,
    "blk.1.ffn_up.weight": T.F16,
    "output.weight": T.Q6_K,
}
GEMMA3_TYPES = {
    "token_embd.weight": T.Q8_0,
    "blk.0.attn_q.weight": T.Q4_K,
    "blk.0.attn_v.weight": T.Q6_K,
    "blk.1.ffn_gate.weight": T.BF16,
    "blk.2.ffn_down.weight": T.Q5_K,
    "blk.3.attn_output.weight": T.Q4_0,
    "blk.5.ffn_up.weight": T.F16,
}

# Byte offsets of the f16 scale fields inside one block of each K-quant type.
K_SCALES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def k_quant_bytes(shape: tuple[int, ...], qtype: T, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks for a tensor of NumPy ``shape``, scales small and finite."""
    byte_shape = quant_shape_to_byte_shape(shape, qtype)
    data = rng.integers(0, 256, byte_shape, dtype=np.uint8)
    blocks = data.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    for at in K_SCALES[qtype]:
        d = rng.uniform(1e-4, 1e-3, len(blocks)).astype(np.float16)
        blocks[:, at : at + 2] = d.view(np.uint8).reshape(-1, 2)
    return data


def encode(w: np.ndarray, qtype: T, rng: np.random.Generator) -> np.ndarray:
    """``w`` stored as ``qtype``: f32/f16 arrays, or uint8 rows of blocks."""
    if qtype == T.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if qtype == T.F16:
        return w.astype(np.float16)
    if qtype in K_SCALES:
        return k_quant_bytes(w.shape, qtype, rng)
    return quantize(w.astype(np.float32), qtype)


def write_model(
    path: Path,
    cfg: ModelConfig,
    types: dict[str, T],
    *,
    arch: str | None = None,
    meta: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    raw: dict[str, tuple[np.ndarray, tuple[int, ...] | None, Any]] | None = None,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, T]]:
    """Write ``cfg`` as GGUF at ``path``; return {tensor name: (bytes/array written, type)}.

    ``meta``: metadata to add or replace, key -> (value, GGUFValueType), or None to leave the
    key out (keys without the arch prefix start with ``general.``; ``{a}`` is the arch).
    ``drop``: tensors to leave out. ``raw``: tensors to write as given, name -> (array,
    raw_shape, raw_dtype), in place of (or in addition to) the model's.
    """
    a = arch or cfg.arch
    keys: dict[str, Any] = {
        "general.name": (cfg.name, V.STRING),
        "{a}.embedding_length": (cfg.n_embd, V.UINT32),
        "{a}.block_count": (cfg.n_layer, V.UINT32),
        "{a}.feed_forward_length": (cfg.n_ff, V.UINT32),
        "{a}.attention.head_count": (cfg.n_head, V.UINT32),
        "{a}.attention.head_count_kv": (cfg.n_head_kv, V.UINT32),
        "{a}.attention.key_length": (cfg.head_dim, V.UINT32),
        "{a}.attention.value_length": (cfg.head_dim, V.UINT32),
        "{a}.attention.layer_norm_rms_epsilon": (cfg.rms_eps, V.FLOAT32),
        "{a}.rope.freq_base": (cfg.rope_base, V.FLOAT32),
        "{a}.context_length": (2048, V.UINT32),
    }
    if cfg.sliding_window:
        keys["{a}.attention.sliding_window"] = (cfg.sliding_window, V.UINT32)
    keys.update(meta or {})
    w = GGUFWriter(str(path), a)
    for key, val in keys.items():
        key = key.format(a=a)
        if val is None:
            w.kv_data[0].pop(key, None)  # general.architecture is added by the writer itself
        else:
            w.add_key_value(key, val[0], val[1])

    rng = np.random.default_rng(seed)
    weights = random_weights(cfg, seed=seed)
    written: dict[str, tuple[np.ndarray, T]] = {}
    raw = dict(raw or {})
    for name in weight_shapes(cfg):
        if name in drop or (name == "output.weight" and cfg.tied_embeddings):
            continue
        if name in raw:
            data, shape, qtype = raw.pop(name)
            w.add_tensor(name, data, raw_shape=shape, raw_dtype=qtype)
            continue
        qtype = types.get(name, T.F32)
        data = encode(weights[name], qtype, rng)
        w.add_tensor(name, data, raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
        written[name] = (data, qtype)
    for name, (data, shape, qtype) in raw.items():
        w.add_tensor(name, data, raw_shape=shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


# -- hand-made headers: what GGUFWriter refuses to write -----------------------------------------


def gguf_string(text: str | bytes, length: int | None = None) -> bytes:
    """A GGUF string: u64 length (``length`` to lie about it), then the bytes."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def gguf_kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    """One metadata entry: key, u32 value type, the value's bytes as given."""
    return gguf_string(key) + struct.pack("<I", vtype) + payload


def gguf_array(item_type: int, count: int, payload: bytes) -> bytes:
    """An array value's bytes (after its ARRAY type): u32 item type, u64 count, the items."""
    return struct.pack("<IQ", item_type, count) + payload


def gguf_tensor_info(name: str, ne: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    """One tensor-table entry; ``ne`` in GGUF order (innermost first)."""
    dims = struct.pack(f"<I{len(ne)}Q", len(ne), *ne)
    return gguf_string(name) + dims + struct.pack("<IQ", ggml_type, offset)


def raw_gguf(
    kvs: list[bytes],
    tensors: Sequence[bytes] = (),
    data: bytes = b"",
    *,
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    align: int = 32,
) -> bytes:
    """A whole file from parts (``gguf_kv``, ``gguf_tensor_info``): the counts may lie."""
    head = b"GGUF" + struct.pack(
        "<IQQ",
        version,
        len(tensors) if n_tensors is None else n_tensors,
        len(kvs) if n_kv is None else n_kv,
    )
    body = head + b"".join(kvs) + b"".join(tensors)
    if data:
        body += bytes(-len(body) % align) + data
    return body
