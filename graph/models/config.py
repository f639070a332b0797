"""Model hyper-parameters, named presets, and the weight names and shapes a model needs.

Weight names follow GGUF (``token_embd.weight``, ``blk.N.attn_q.weight``, ...), shapes are
NumPy order with matrices stored (out, in). The head is always ``output.weight``, tagged
layer ``n_layer``; a model with tied embeddings binds the token embedding's array to it, so
placement can still put the head on the GPU while the embedding stays in host memory.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from graph.dtypes import DType, f32
from graph.ops import LAYER_INPUT

__all__ = [
    "ModelConfig",
    "PRESETS",
    "preset",
    "weight_shapes",
    "weight_layers",
    "STACKED",
    "stacked_parts",
    "FULL",
    "SWA",
]

FULL = "full"
SWA = "swa"
"""Attention kinds of a layer: over the whole context, or over a sliding window."""

ARCHES = ("llama", "gemma3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    rms_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_freq_scale: float = 1.0
    rope_base_swa: float = 10000.0  # gemma3: local (sliding) layers
    sliding_window: int = 0  # 0: no sliding-window layers
    swa_pattern: int = 0  # gemma3: every swa_pattern-th layer (1-based) is global, the rest slide
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    tied_embeddings: bool = False
    dtype: DType = f32  # storage type of the weight matrices
    name: str = ""
    # Storage of single matrices where it differs from ``dtype``: a GGUF file's own types
    # (Q4_K_M mixes Q4_K and Q6_K), kept where the backend computes on them.
    weight_types: tuple[tuple[str, DType], ...] = ()
    # (layer, group) pairs of ``STACKED`` that stay separate whatever the types say: a config
    # widened from one whose parts differed in type keeps its source's stacking (``dequantized``)
    unstacked: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ValueError(f"unknown architecture {self.arch!r}; supported: {', '.join(ARCHES)}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"{self.n_head} heads are not a multiple of {self.n_head_kv} kv heads")

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """FULL or SWA for each layer."""
        if not self.sliding_window or not self.swa_pattern:
            return (FULL,) * self.n_layer
        return tuple(FULL if (i + 1) % self.swa_pattern == 0 else SWA for i in range(self.n_layer))

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @functools.cached_property
    def _types(self) -> dict[str, DType]:
        return dict(self.weight_types)

    @functools.cached_property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """``_weight_shapes``, computed once: a graph build asks for it per projection."""
        return _weight_shapes(self)

    @functools.cached_property
    def _stacked_shapes(self) -> dict[str, tuple[int, ...]]:
        return _stack_shapes(self, self._shapes)

    @functools.cached_property
    def _matrices(self) -> frozenset[str]:
        return frozenset(n for n, s in self._shapes.items() if len(s) == 2)

    def weight_dtype(self, name: str) -> DType:
        """How weight ``name`` is stored: its entry in ``weight_types``, else ``dtype`` for a
        matrix and f32 for a norm vector. A stacked matrix (``STACKED``) has its parts' type, a
        tied head the embedding's."""
        found = self._types.get(name)
        if found is not None:
            return found
        if name == "output.weight" and self.tied_embeddings:  # the embedding's own array
            return self.weight_dtype("token_embd.weight")
        parts = stacked_parts(name)
        if parts:
            return self.weight_dtype(parts[0])
        return self.dtype if name in self._matrices else f32

    def stacks(self, layer: int, group: str) -> bool:
        """Whether the parts of ``STACKED[group]`` in ``layer`` can be one matrix: only rows of
        one storage type stack (a Q4_K_M file stores some layers' V in Q6_K, Q and K in Q4_K)."""
        if (layer, group) in self.unstacked:
            return False
        types = {self.weight_dtype(f"blk.{layer}.{m}.weight") for m in STACKED[group]}
        return len(types) == 1

    @property
    def storage(self) -> str:
        """The matrices' storage in a word: ``bf16``, or a file's own types (``q4_k+q6_k``)."""
        if not self.weight_types:
            return self.dtype.name
        return "+".join(sorted({t.name for _, t in self.weight_types}))

    def dequantized(self, dtype: DType = f32, keep_stacking: bool = False) -> ModelConfig:
        """The same model with every matrix stored as ``dtype``. ``keep_stacking``: the layers
        whose parts could not stack here (types differed) stay separate, so the names match
        weights widened from this config's (a split model's host layers)."""
        keep = ()
        if keep_stacking:
            keep = tuple(
                (layer, group)
                for layer in range(self.n_layer)
                for group in STACKED
                if not self.stacks(layer, group)
            )
        return self.replace(dtype=dtype, weight_types=(), unstacked=keep)

    @property
    def is_quantized(self) -> bool:
        """Whether any weight is stored in a GGUF block type."""
        return self.dtype.is_quantized or any(t.is_quantized for _, t in self.weight_types)

    def n_params(self) -> int:
        shapes = weight_shapes(self)
        if self.tied_embeddings:
            shapes.pop("output.weight")
        total = 0
        for s in shapes.values():
            n = 1
            for d in s:
                n *= d
            total += n
        return total

    def n_bytes(self, stack: bool = False) -> int:
        """Bytes of every weight as stored (``weight_dtype``; a tied head counted once)."""
        shapes = weight_shapes(self, stack)
        if self.tied_embeddings:
            shapes.pop("output.weight", None)
        return sum(self.weight_dtype(n).nbytes(s) for n, s in shapes.items())


STACKED: dict[str, tuple[str, ...]] = {
    "attn_qkv": ("attn_q", "attn_k", "attn_v"),
    "ffn_gate_up": ("ffn_gate", "ffn_up"),
}
"""Projections that read the same input, stored as one matrix (rows stacked in this order) when
a graph is built with ``stack=True``: one matrix product instead of three (or two)."""


def stacked_parts(name: str) -> tuple[str, ...]:
    """The GGUF names a stacked weight name stands for (``blk.3.attn_qkv.weight`` ->
    ``blk.3.attn_q.weight``, ...); empty for any other name."""
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in STACKED:
        return ()
    return tuple(f"blk.{parts[1]}.{m}.weight" for m in STACKED[parts[2]])


def weight_shapes(cfg: ModelConfig, stack: bool = False) -> dict[str, tuple[int, ...]]:
    """Every weight the builders read, by GGUF name, with its NumPy shape.

    With ``stack`` the stacked projections of ``STACKED`` replace their parts, in each layer
    where they share a storage type (``ModelConfig.stacks``). A new dict each call (the
    config keeps its own).
    """
    return dict(cfg._stacked_shapes if stack else cfg._shapes)  # noqa: SLF001


def _stack_shapes(
    cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blk":
            for stacked, members in STACKED.items():
                if parts[2] in members and cfg.stacks(int(parts[1]), stacked):
                    key = f"blk.{parts[1]}.{stacked}.weight"
                    rows = sum(shapes[f"blk.{parts[1]}.{m}.weight"][0] for m in members)
                    out[key] = (rows, shape[1])
                    break
            else:
                out[name] = shape
        else:
            out[name] = shape
    return out


def _weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, hd = cfg.n_embd, cfg.head_dim
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (cfg.n_vocab, d)}
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = (d,)
        out[p + "attn_q.weight"] = (cfg.n_head * hd, d)
        out[p + "attn_k.weight"] = (cfg.n_head_kv * hd, d)
        out[p + "attn_v.weight"] = (cfg.n_head_kv * hd, d)
        out[p + "attn_output.weight"] = (d, cfg.n_head * hd)
        if cfg.arch == "gemma3":
            out[p + "attn_q_norm.weight"] = (hd,)
            out[p + "attn_k_norm.weight"] = (hd,)
            out[p + "post_attention_norm.weight"] = (d,)
            out[p + "post_ffw_norm.weight"] = (d,)
        out[p + "ffn_norm.weight"] = (d,)
        out[p + "ffn_gate.weight"] = (cfg.n_ff, d)
        out[p + "ffn_up.weight"] = (cfg.n_ff, d)
        out[p + "ffn_down.weight"] = (d, cfg.n_ff)
    out["output_norm.weight"] = (d,)
    out["output.weight"] = (cfg.n_vocab, d)
    return out


def weight_layers(cfg: ModelConfig, stack: bool = False) -> dict[str, int]:
    """The layer tag of every weight: blocks 0..n_layer-1, head n_layer, token embedding -1."""
    tags = {}
    for name in weight_shapes(cfg, stack):
        if name.startswith("blk."):
            tags[name] = int(name.split(".")[1])
        elif name == "token_embd.weight":
            tags[name] = LAYER_INPUT
        else:
            tags[name] = cfg.n_layer
    return tags


PRESETS: dict[str, ModelConfig] = {
    # Gemma 3 270M: the shape of the real GGUF (google/gemma-3-270m).
    "gemma3-270m": ModelConfig(
        arch="gemma3",
        n_vocab=262144,
        n_embd=640,
        n_layer=18,
        n_head=4,
        n_head_kv=1,
        head_dim=256,
        n_ff=2048,
        rms_eps=1e-6,
        rope_base=1e6,
        rope_base_swa=1e4,
        sliding_window=512,
        swa_pattern=6,
        attn_scale=256**-0.5,
        tied_embeddings=True,
        name="gemma3-270m",
    ),
    # Llama 2 7B shape, for streaming and offload benchmarks with generated weights.
    "llama-7b": ModelConfig(
        arch="llama",
        n_vocab=32000,
        n_embd=4096,
        n_layer=32,
        n_head=32,
        n_head_kv=32,
        head_dim=128,
        n_ff=11008,
        rms_eps=1e-5,
        rope_base=10000.0,
        name="llama-7b",
    ),
    # Small shapes that run in milliseconds on the CPU: tests and the quick default benchmark.
    "gemma3-tiny": ModelConfig(
        arch="gemma3",
        n_vocab=512,
        n_embd=64,
        n_layer=3,
        n_head=4,
        n_head_kv=2,
        head_dim=16,
        n_ff=128,
        rope_base=1e6,
        rope_base_swa=1e4,
        sliding_window=4,
        swa_pattern=3,
        attn_scale=16**-0.5,
        tied_embeddings=True,
        name="gemma3-tiny",
    ),
    "llama-tiny": ModelConfig(
        arch="llama",
        n_vocab=512,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_head_kv=2,
        head_dim=16,
        n_ff=160,
        rms_eps=1e-5,
        rope_base=10000.0,
        name="llama-tiny",
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown built-in model {name!r}; built-in: {', '.join(PRESETS)}")
    return PRESETS[name]
