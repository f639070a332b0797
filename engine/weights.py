"""Generated ("dummy") weights of any model shape, for tests and benchmarks without a model file.

Deterministic per (config, seed). Matrices are drawn N(0, 1/in) so activations keep a sane scale
through many layers; norm weights are 1 + small noise (the GGUF convention, where Gemma's
``1 + w`` is already folded in). A tied model gets ``output.weight`` as the same array as
``token_embd.weight``.
"""

from __future__ import annotations

import numpy as np

from graph.dtypes import DType, dtype_of
from graph.models.config import ModelConfig, weight_shapes

__all__ = ["random_weights", "tie_output"]


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


def tie_output(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Bind ``output.weight`` to the token embedding for tied models (no copy)."""
    if cfg.tied_embeddings and "output.weight" not in weights and "token_embd.weight" in weights:
        weights["output.weight"] = weights["token_embd.weight"]
    return weights
