"""Model builders: a config in, a forward ``Graph`` out, weights named as in GGUF.

from graph.models import build, preset, kv_slots
cfg = preset("gemma3-tiny")
graph = build(cfg, n_tokens=8, slots=kv_slots(cfg, n_ctx=64, n_batch=8))
"""

from __future__ import annotations

from graph.dtypes import DType, dtype_of, f32
from graph.ir import Graph
from graph.models import gemma3, llama
from graph.models.common import Forward, Logits, kv_slots
from graph.models.config import (
    FULL,
    PRESETS,
    STACKED,
    SWA,
    ModelConfig,
    preset,
    stacked_parts,
    weight_layers,
    weight_shapes,
)

__all__ = [
    "ModelConfig",
    "PRESETS",
    "preset",
    "build",
    "kv_slots",
    "weight_shapes",
    "weight_layers",
    "STACKED",
    "stacked_parts",
    "FULL",
    "SWA",
]

BODIES = {"llama": llama.body, "gemma3": gemma3.body}


def build(
    cfg: ModelConfig,
    n_tokens: int,
    slots: dict[str, int],
    n_kv: dict[str, int] | None = None,
    logits: Logits = "last",
    cache_dtype: DType | str | None = None,
    stack: bool = False,
    segment: tuple[int, int] | None = None,
) -> Graph:
    """The forward graph of ``cfg`` for ``n_tokens`` tokens against caches of ``slots`` rows.

    ``segment = (first, end)``: only layers first..end-1, the head counted as layer n_layer (so
    ``end = n_layer + 1`` includes it). A segment after the first takes the input ``hidden``;
    one that ends before the head outputs its hidden states (``hidden_out``): a model split
    across backends runs its segments in turn.
    """
    f = Forward(
        cfg, n_tokens, dict(slots), dict(n_kv or {}), dtype_of(cache_dtype or f32), stack, segment
    )
    return f.head(BODIES[cfg.arch](f), logits)
