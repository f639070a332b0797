"""Generated ("dummy") weights of any model shape, for tests and benchmarks without a model file.

Deterministic per (config, seed). Matrices are drawn N(0, 1/in) so activations keep a sane scale
through many layers; norm weights are 1 + small noise (the GGUF convention, where Gemma's
``1 + w`` is already folded in). A tied model gets ``output.weight`` as the same array as
``token_embd.weight``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np

from backends.base import Quantized, dequantize
from graph.dtypes import DType, dtype_of, f32
from graph.ir import contiguous_strides
from graph.models.config import ModelConfig, weight_shapes

__all__ = ["random_weights", "device_weights", "tie_output", "concat_rows", "widened"]


def random_weights(
    cfg: ModelConfig, seed: int = 0, dtype: DType | str | None = None
) -> dict[str, np.ndarray]:
    """All weights of ``cfg``: matrices in ``dtype`` (default: the config's), norms in f32."""
    mat_dtype = dtype_of(dtype) if dtype is not None else cfg.dtype
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in weight_shapes(cfg).items():
        if name == "output.weight" and cfg.tied_embeddings:
            continue
        if len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
            out[name] = w.astype(np.float32)
        else:
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= np.float32(1.0 / np.sqrt(shape[1]))
            out[name] = w.astype(mat_dtype.numpy, copy=False)
    return tie_output(cfg, out)


def device_weights(
    cfg: ModelConfig,
    backend: Any,
    seed: int = 0,
    dtype: DType | str | None = None,
    stack: bool = False,
    on_host: Collection[str] = (),
) -> dict[str, Any]:
    """Generated weights made on the backend's device when it can draw them (no host copy of a
    multi-GB model), else ``random_weights``. Same distributions; different numbers than the
    host generator, deterministic per seed and layout.

    ``stack``: the stacked projections (``graph.models.STACKED``) are drawn as one matrix each,
    as a session with ``stack`` uses them (no second copy made by stacking). ``on_host``: names
    to hand out as host arrays (what a plan streams or computes on the host): each is drawn on
    the device and copied out at once, so the device never holds more than one of them."""
    fill = getattr(backend, "fill_normal", None)
    if fill is None:
        return random_weights(cfg, seed, dtype)
    mat_dtype = dtype_of(dtype) if dtype is not None else cfg.dtype
    out: dict[str, Any] = {}
    for i, (name, shape) in enumerate(weight_shapes(cfg, stack).items()):
        if name == "output.weight" and cfg.tied_embeddings:
            continue
        dt = f32 if len(shape) == 1 else mat_dtype
        arr = backend.view(backend.alloc(dt.nbytes(shape)), 0, shape, dt, contiguous_strides(shape))
        if len(shape) == 1:
            fill(arr, seed * 1_000_003 + i, 1.0, 0.1)
        else:
            fill(arr, seed * 1_000_003 + i, 0.0, 1.0 / np.sqrt(shape[1]))
        out[name] = backend.to_host(arr) if name in on_host else arr
        del arr
    return tie_output(cfg, out)


def tie_output(cfg: ModelConfig, weights: dict[str, Any]) -> dict[str, Any]:
    """Bind ``output.weight`` to the token embedding for tied models (no copy)."""
    if cfg.tied_embeddings and "output.weight" not in weights and "token_embd.weight" in weights:
        weights["output.weight"] = weights["token_embd.weight"]
    return weights


def concat_rows(parts: list[Any]) -> Any:
    """Host matrices stacked by rows, ``Quantized`` ones by their rows of blocks (one type)."""
    if all(isinstance(p, Quantized) for p in parts):
        types = {p.dtype for p in parts}
        if len(types) != 1:
            raise ValueError(f"cannot stack rows of {', '.join(t.name for t in types)}")
        data = np.concatenate([np.asarray(p.data) for p in parts])
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        return Quantized(data, parts[0].dtype, shape)
    return np.concatenate([np.asarray(p) for p in parts])


def widened(w: Any) -> np.ndarray:
    """A host matrix in f32 (a ``Quantized`` one decoded)."""
    return dequantize(w) if isinstance(w, Quantized) else np.asarray(w).astype(np.float32)
