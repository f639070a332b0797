"""Decoding a GGUF's tensors (``engine.model.dequant`` through ``GGUFModel.weights``): chunks on
several threads equal one piece on one, stacked projections equal their parts concatenated
(and run a session to the same logits), and the progress callback follows the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf.quants import dequantize

from engine.model.gguf import GGUFModel, open_gguf
from engine.model.session import Session
from graph.models import STACKED, weight_shapes
from tests.gguf_fixtures import GEMMA3, GEMMA3_TYPES, LLAMA, LLAMA_TYPES, write_model

CONFIGS = {"llama": (LLAMA, LLAMA_TYPES), "gemma3": (GEMMA3, GEMMA3_TYPES)}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(model, {name: reference f32 array}) for each arch."""
    cfg, types = CONFIGS[request.param]
    path = tmp_path_factory.mktemp("dequant") / f"{request.param}.gguf"
    written = write_model(path, cfg, types)
    shapes = weight_shapes(cfg)
    ref = {n: dequantize(data, q).reshape(shapes[n]) for n, (data, q) in written.items()}
    return open_gguf(path), ref


def test_threads_and_chunks_give_the_same_arrays(
    model: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.model.dequant as dequant

    m, ref = model
    monkeypatch.setattr(dequant, "CHUNK_BYTES", 4096)  # many chunks per tensor
    for n in (1, 3):
        monkeypatch.setattr(dequant, "workers", lambda n=n: n)
        for dtype in ("f32", "bf16"):
            w = m.weights(dtype)
            for name, want in ref.items():
                np.testing.assert_array_equal(w[name], want.astype(w[name].dtype), err_msg=name)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_stacked_weights_are_their_parts_concatenated(model: tuple, dtype: str) -> None:
    m, _ = model
    seen: list[tuple[str, int, int]] = []
    parts = m.weights(dtype)
    stacked = m.weights(dtype, lambda *a: seen.append(a), stack=True)
    assert set(stacked) == set(weight_shapes(m.config, stack=True))
    assert len(seen) == len(m.tensors) and seen[-1][1:] == (len(seen), len(seen))
    for layer in range(m.config.n_layer):
        for group, members in STACKED.items():
            want = np.concatenate([parts[f"blk.{layer}.{x}.weight"] for x in members])
            got = stacked[f"blk.{layer}.{group}.weight"]
            assert got.dtype == want.dtype and got.flags.c_contiguous
            np.testing.assert_array_equal(got, want)
    for name in set(stacked) & set(parts):
        np.testing.assert_array_equal(stacked[name], parts[name])


def test_a_session_runs_the_same_on_stacked_weights(model: tuple) -> None:
    m, _ = model
    ids = [3, 17, 42, 5, 60, 1, 9, 33, 2, 8, 11]
    want = Session(m.config, m.weights(), n_ctx=16).prefill(ids, logits="all")
    got = Session(m.config, m.weights(stack=True), n_ctx=16).prefill(ids, logits="all")
    np.testing.assert_array_equal(got, want)


def test_nan_in_a_stacked_part_names_the_part(tmp_path: Path) -> None:
    path = tmp_path / "nan.gguf"
    bad = np.zeros((256, 256), np.float32)
    bad[7, 3] = np.inf
    write_model(path, LLAMA, LLAMA_TYPES, raw={"blk.1.attn_q.weight": (bad, None, None)})
    with pytest.raises(
        ValueError, match=r"tensor blk.1.attn_q.weight holds NaN or Inf \(first in row 7\)"
    ):
        GGUFModel(path).weights(stack=True)
