"""The op vocabulary: one ``Op`` enum, one frozen params record per op, one shape rule per op.

Every table keyed by ``Op`` (``SRC_COUNT``, ``PARAMS``, ``INFER`` here; kernel tables in the
backends) is checked to be complete by the tests, the way ggml asserts its op count.

Semantics (shapes in NumPy order; ``...`` is any number of leading dims):

==========  =====================================================================================
INPUT       leaf fed per call (token ids, positions, KV slot indices)
WEIGHT      leaf bound once (``WeightParams.layer``: 0..n_layer-1, head = n_layer, embedding = -1)
CONSTANT    leaf whose bytes live in the graph (``ConstantParams.data``)
STATE       leaf that persists across calls and is written in place (KV caches)
RESHAPE     view: same elements, new shape; the source must be contiguous
PERMUTE     view: axes reordered (``transpose`` is a two-axis permute)
VIEW        view: explicit shape, element strides and element offset into a contiguous source
CONT        copy into a fresh contiguous tensor
CAST        copy into a fresh contiguous tensor of another float type
GET_ROWS    out[i] = table[idx[i]]; table (R, ...) idx (n,) i32 -> (n, ...) f32
ADD, MUL    a + b, a * b with NumPy broadcasting; result in a's dtype
SCALE       x * s
RMS_NORM    x / sqrt(mean(x^2, last axis) + eps) [* w] [+ r]; w (D,) optional; r, a residual of
            x's shape, optional (needs w): Gemma's post-norm-and-add is one op, one launch
MUL_MAT     a (N, K) stored as GGUF stores weights (out, in); b (..., K) -> (..., N) f32
ROPE        rotary embedding of x (n, heads, d) at positions pos (n,); the first n_dims of d rotate;
            NORMAL pairs (2i, 2i+1) (GGUF llama), NEOX pairs (i, i + n_dims/2) (Gemma, HF layout)
ATTENTION   softmax(scale * q k^T + mask) v per head; q (n, H, D), k (m, Hk, D), v (m, Hk, Dv),
            q_pos (n,) i32, kv_pos (m,) i32 -> (n, H, Dv) f32. Query head h reads kv head
            h // (H / Hk) (grouped-query). Key j is visible to query i iff kv_pos[j] >= 0 and
            kv_pos[j] <= q_pos[i] and (window == 0 or q_pos[i] - kv_pos[j] < window): causal,
            empty slots (-1) masked, sliding window optional. A query that sees no key gives 0.
GEGLU       gelu_tanh(gate) * up
SWIGLU      silu(gate) * up
SET_ROWS    dst[idx[i]] = src[i] in place; dst is a STATE; the result aliases dst, so readers of
            the cache after the write depend on it
ARGMAX      index of the largest value along the last axis, (..., V) -> (...,) i32; the first
            such index on ties (NumPy's rule); greedy decoding without copying logits out
==========  =====================================================================================

Compute is f32 inside every kernel; results are stored in the output dtype. The attention is
one fused op rather than mul_mat + soft_max + mask because the mask is derived from positions
(no (n, m) mask tensor to build or copy) and a fused kernel is what the GPU backend wants.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from graph.dtypes import DType, f32, i32

__all__ = [
    "Op",
    "RopeMode",
    "GraphError",
    "WeightParams",
    "ConstantParams",
    "ReshapeParams",
    "PermuteParams",
    "ViewParams",
    "CastParams",
    "ScaleParams",
    "RmsNormParams",
    "RopeParams",
    "AttentionParams",
    "Params",
    "SRC_COUNT",
    "PARAMS",
    "INFER",
    "LEAF_OPS",
    "VIEW_OPS",
    "ALIAS_OPS",
    "SIDE_EFFECT_OPS",
    "TensorMeta",
    "LAYER_INPUT",
]


class GraphError(ValueError):
    """A graph that cannot be built, loaded or run: the message names the op, inputs and shapes."""


class Op(enum.Enum):
    INPUT = "input"
    WEIGHT = "weight"
    CONSTANT = "constant"
    STATE = "state"
    RESHAPE = "reshape"
    PERMUTE = "permute"
    VIEW = "view"
    CONT = "cont"
    CAST = "cast"
    GET_ROWS = "get_rows"
    ADD = "add"
    MUL = "mul"
    SCALE = "scale"
    RMS_NORM = "rms_norm"
    MUL_MAT = "mul_mat"
    ROPE = "rope"
    ATTENTION = "attention"
    GEGLU = "geglu"
    SWIGLU = "swiglu"
    SET_ROWS = "set_rows"
    ARGMAX = "argmax"


class RopeMode(enum.Enum):
    NORMAL = "normal"
    NEOX = "neox"


LAYER_INPUT = -1
"""Layer tag of the token embedding, which is streamed by rows rather than offloaded whole."""


@dataclass(frozen=True, slots=True)
class WeightParams:
    layer: int


@dataclass(frozen=True, slots=True)
class ConstantParams:
    data: bytes  # raw little-endian bytes in the node's dtype, C order


@dataclass(frozen=True, slots=True)
class ReshapeParams:
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PermuteParams:
    axes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ViewParams:
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements
    offset: int  # in elements


@dataclass(frozen=True, slots=True)
class CastParams:
    dtype: DType


@dataclass(frozen=True, slots=True)
class ScaleParams:
    scale: float


@dataclass(frozen=True, slots=True)
class RmsNormParams:
    eps: float


@dataclass(frozen=True, slots=True)
class RopeParams:
    mode: RopeMode
    n_dims: int
    base: float
    freq_scale: float = 1.0


@dataclass(frozen=True, slots=True)
class AttentionParams:
    scale: float
    window: int = 0  # 0: no sliding window
    # prefix_rows: the keys are a cache filled in position order from row 0 (modulo a ring that
    # has wrapped), so no key a query at position p sees lies in a row past p: kernels may stop
    # reading at row p (a session's caches; the NumPy reference checks the promise)
    prefix_rows: bool = False


Params = (
    WeightParams
    | ConstantParams
    | ReshapeParams
    | PermuteParams
    | ViewParams
    | CastParams
    | ScaleParams
    | RmsNormParams
    | RopeParams
    | AttentionParams
    | None
)

LEAF_OPS = frozenset({Op.INPUT, Op.WEIGHT, Op.CONSTANT, Op.STATE})
VIEW_OPS = frozenset({Op.RESHAPE, Op.PERMUTE, Op.VIEW})
ALIAS_OPS = VIEW_OPS | {Op.SET_ROWS}
"""Ops whose result shares its first source's storage (no bytes of their own)."""
SIDE_EFFECT_OPS = frozenset({Op.SET_ROWS})
"""Ops kept by dead-code elimination even when no output reads them."""

# Number of sources; a tuple means "any of these counts" (optional trailing sources).
SRC_COUNT: dict[Op, tuple[int, ...]] = {
    Op.INPUT: (0,),
    Op.WEIGHT: (0,),
    Op.CONSTANT: (0,),
    Op.STATE: (0,),
    Op.RESHAPE: (1,),
    Op.PERMUTE: (1,),
    Op.VIEW: (1,),
    Op.CONT: (1,),
    Op.CAST: (1,),
    Op.GET_ROWS: (2,),
    Op.ADD: (2,),
    Op.MUL: (2,),
    Op.SCALE: (1,),
    Op.RMS_NORM: (1, 2, 3),
    Op.MUL_MAT: (2,),
    Op.ROPE: (2,),
    Op.ATTENTION: (5,),
    Op.GEGLU: (2,),
    Op.SWIGLU: (2,),
    Op.SET_ROWS: (3,),
    Op.ARGMAX: (1,),
}

PARAMS: dict[Op, type | None] = {
    Op.INPUT: None,
    Op.WEIGHT: WeightParams,
    Op.CONSTANT: ConstantParams,
    Op.STATE: None,
    Op.RESHAPE: ReshapeParams,
    Op.PERMUTE: PermuteParams,
    Op.VIEW: ViewParams,
    Op.CONT: None,
    Op.CAST: CastParams,
    Op.GET_ROWS: None,
    Op.ADD: None,
    Op.MUL: None,
    Op.SCALE: ScaleParams,
    Op.RMS_NORM: RmsNormParams,
    Op.MUL_MAT: None,
    Op.ROPE: RopeParams,
    Op.ATTENTION: AttentionParams,
    Op.GEGLU: None,
    Op.SWIGLU: None,
    Op.SET_ROWS: None,
    Op.ARGMAX: None,
}


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """What shape inference sees of a source: its name (for messages), shape, dtype, layout."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    contiguous: bool
    op: Op


def _fail(op: Op, srcs: list[TensorMeta], why: str) -> GraphError:
    shown = ", ".join(f"{s.name} {s.shape} {s.dtype.name}" for s in srcs)
    return GraphError(f"{op.name}({shown}): {why}")


def _need_float(op: Op, srcs: list[TensorMeta], *which: int) -> None:
    for i in which:
        if not srcs[i].dtype.is_float or srcs[i].dtype.is_quantized:
            raise _fail(op, srcs, f"input {srcs[i].name} must be f32/f16/bf16, not {srcs[i].dtype}")


def _need_index(op: Op, srcs: list[TensorMeta], i: int, n: int | None = None) -> None:
    s = srcs[i]
    if s.dtype != i32 or len(s.shape) != 1:
        raise _fail(op, srcs, f"{s.name} must be a 1-D i32 index, got {s.shape} {s.dtype}")
    if n is not None and s.shape[0] != n:
        raise _fail(op, srcs, f"{s.name} has {s.shape[0]} entries, expected {n}")


Shape = tuple[int, ...]
Inferred = tuple[Shape, DType]


def _leaf(op: Op, p: Params, s: list[TensorMeta]) -> Inferred:
    raise _fail(op, s, "leaves carry their own shape and dtype")  # pragma: no cover


def _reshape(op: Op, p: ReshapeParams, s: list[TensorMeta]) -> Inferred:
    if not s[0].contiguous:
        raise _fail(op, s, "source is not contiguous; insert cont() before reshape")
    if any(d < 0 for d in p.shape) or math.prod(p.shape) != math.prod(s[0].shape):
        raise _fail(op, s, f"cannot reshape {math.prod(s[0].shape)} elements to {p.shape}")
    return p.shape, s[0].dtype


def _permute(op: Op, p: PermuteParams, s: list[TensorMeta]) -> Inferred:
    if sorted(p.axes) != list(range(len(s[0].shape))):
        raise _fail(op, s, f"axes {p.axes} are not a permutation of {len(s[0].shape)} dims")
    return tuple(s[0].shape[a] for a in p.axes), s[0].dtype


def _view(op: Op, p: ViewParams, s: list[TensorMeta]) -> Inferred:
    if not s[0].contiguous:
        raise _fail(op, s, "source is not contiguous; insert cont() before view")
    if len(p.shape) != len(p.strides) or any(d < 0 for d in p.shape) or p.offset < 0:
        raise _fail(op, s, f"bad view shape {p.shape} strides {p.strides} offset {p.offset}")
    if any(st < 0 for st in p.strides):
        raise _fail(op, s, f"negative strides {p.strides} are not supported")
    if math.prod(p.shape) > 0:
        last = p.offset + sum((d - 1) * st for d, st in zip(p.shape, p.strides, strict=True))
        if last >= math.prod(s[0].shape):
            raise _fail(
                op,
                s,
                f"view shape {p.shape} strides {p.strides} offset {p.offset} reads "
                f"element {last}, past the source's {math.prod(s[0].shape)}",
            )
    return p.shape, s[0].dtype


def _copy(op: Op, p: None, s: list[TensorMeta]) -> Inferred:
    return s[0].shape, s[0].dtype


def _cast(op: Op, p: CastParams, s: list[TensorMeta]) -> Inferred:
    _need_float(op, s, 0)
    if not p.dtype.is_float or p.dtype.is_quantized:
        raise _fail(op, s, f"cannot cast to {p.dtype}; targets are f32, f16, bf16")
    return s[0].shape, p.dtype


def _get_rows(op: Op, p: None, s: list[TensorMeta]) -> Inferred:
    if len(s[0].shape) < 1:
        raise _fail(op, s, "table must have at least one dim")
    _need_index(op, s, 1)
    return (s[1].shape[0], *s[0].shape[1:]), f32


def _binary(op: Op, p: None, s: list[TensorMeta]) -> Inferred:
    _need_float(op, s, 0, 1)
    try:
        shape = tuple(int(d) for d in np.broadcast_shapes(s[0].shape, s[1].shape))
    except ValueError:
        raise _fail(op, s, "shapes do not broadcast") from None
    return shape, s[0].dtype


def _unary(op: Op, p: Params, s: list[TensorMeta]) -> Inferred:
    _need_float(op, s, 0)
    return s[0].shape, s[0].dtype


def _rms_norm(op: Op, p: RmsNormParams, s: list[TensorMeta]) -> Inferred:
    _need_float(op, s, *range(len(s)))
    if not s[0].shape:
        raise _fail(op, s, "cannot normalise a scalar")
    if len(s) >= 2 and s[1].shape != s[0].shape[-1:]:
        raise _fail(op, s, f"weight must have shape {s[0].shape[-1:]}")
    if len(s) == 3 and s[2].shape != s[0].shape:
        raise _fail(op, s, f"residual must have shape {s[0].shape}")
    return s[0].shape, s[0].dtype


def _mul_mat(op: Op, p: None, s: list[TensorMeta]) -> Inferred:
    a, b = s
    if len(a.shape) != 2 or len(b.shape) < 1:
        raise _fail(op, s, "a must be 2-D (out, in) and b at least 1-D (..., in)")
    if a.shape[1] != b.shape[-1]:
        raise _fail(op, s, f"inner dims differ: a has {a.shape[1]}, b has {b.shape[-1]}")
    if not a.dtype.is_float:
        raise _fail(op, s, f"a must be a float or block-quantized type, not {a.dtype}")
    _need_float(op, s, 1)
    return (*b.shape[:-1], a.shape[0]), f32


def _rope(op: Op, p: RopeParams, s: list[TensorMeta]) -> Inferred:
    _need_float(op, s, 0)
    if len(s[0].shape) != 3:
        raise _fail(op, s, "x must be (tokens, heads, head_dim)")
    _need_index(op, s, 1, s[0].shape[0])
    if p.n_dims <= 0 or p.n_dims % 2 or p.n_dims > s[0].shape[2]:
        raise _fail(op, s, f"n_dims={p.n_dims} must be even and at most head_dim {s[0].shape[2]}")
    return s[0].shape, s[0].dtype


def _attention(op: Op, p: AttentionParams, s: list[TensorMeta]) -> Inferred:
    q, k, v = s[0], s[1], s[2]
    _need_float(op, s, 0, 1, 2)
    if len(q.shape) != 3 or len(k.shape) != 3 or len(v.shape) != 3:
        raise _fail(op, s, "q, k, v must be (tokens, heads, head_dim)")
    if k.shape[:2] != v.shape[:2] or q.shape[2] != k.shape[2]:
        raise _fail(op, s, "k and v must share (kv_len, kv_heads); q and k must share head_dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise _fail(op, s, f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    _need_index(op, s, 3, q.shape[0])
    _need_index(op, s, 4, k.shape[0])
    if p.window < 0:
        raise _fail(op, s, f"window must be >= 0, got {p.window}")
    return (q.shape[0], q.shape[1], v.shape[2]), f32


def _glu(op: Op, p: None, s: list[TensorMeta]) -> Inferred:
    _need_float(op, s, 0, 1)
    if s[0].shape != s[1].shape:
        raise _fail(op, s, "gate and up must have the same shape")
    return s[0].shape, s[0].dtype


def _set_rows(op: Op, p: None, s: list[TensorMeta]) -> Inferred:
    dst, src = s[0], s[1]
    if dst.op is not Op.STATE:
        raise _fail(op, s, f"destination {dst.name} must be a state tensor (e.g. a KV cache)")
    _need_float(op, s, 0, 1)
    if len(src.shape) != len(dst.shape) or src.shape[1:] != dst.shape[1:]:
        raise _fail(op, s, f"rows of {src.shape} do not fit rows of {dst.shape}")
    _need_index(op, s, 2, src.shape[0])
    return dst.shape, dst.dtype


def _argmax(op: Op, p: None, s: list[TensorMeta]) -> Inferred:
    _need_float(op, s, 0)
    if not s[0].shape or s[0].shape[-1] < 1:
        raise _fail(op, s, "needs at least one element along the last axis")
    return s[0].shape[:-1], i32


INFER: dict[Op, Callable[..., Inferred]] = {
    Op.INPUT: _leaf,
    Op.WEIGHT: _leaf,
    Op.CONSTANT: _leaf,
    Op.STATE: _leaf,
    Op.RESHAPE: _reshape,
    Op.PERMUTE: _permute,
    Op.VIEW: _view,
    Op.CONT: _copy,
    Op.CAST: _cast,
    Op.GET_ROWS: _get_rows,
    Op.ADD: _binary,
    Op.MUL: _binary,
    Op.SCALE: _unary,
    Op.RMS_NORM: _rms_norm,
    Op.MUL_MAT: _mul_mat,
    Op.ROPE: _rope,
    Op.ATTENTION: _attention,
    Op.GEGLU: _glu,
    Op.SWIGLU: _glu,
    Op.SET_ROWS: _set_rows,
    Op.ARGMAX: _argmax,
}
