"""``GraphBuilder``: the programmatic way to write a graph.

    >>> from graph import GraphBuilder, f32
    >>> g = GraphBuilder()
    >>> x = g.input("x", (4, 64), f32)
    >>> w = g.weight("w", (128, 64), f32, layer=0)   # stored (out, in), as GGUF stores it
    >>> y = g.add(g.mul_mat(w, x), g.input("b", (4, 128), f32), name="y")
    >>> graph = g.build(outputs=[y])
    >>> graph[graph.outputs[0]].shape
    (4, 128)

Every method checks shapes and dtypes at once and raises ``GraphError`` naming the op, the
inputs and their shapes; nothing is deferred to run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from graph.dtypes import DType, dtype_of
from graph.ir import Graph, Node, contiguous_strides, make_node
from graph.ops import (
    AttentionParams,
    CastParams,
    ConstantParams,
    GraphError,
    Op,
    Params,
    PermuteParams,
    ReshapeParams,
    RmsNormParams,
    RopeMode,
    RopeParams,
    ScaleParams,
    ViewParams,
    WeightParams,
)

__all__ = ["GraphBuilder", "Tensor"]


@dataclass(frozen=True, slots=True)
class Tensor:
    """A handle on a node being built: ``shape``, ``dtype``, ``name`` and arithmetic sugar."""

    builder: GraphBuilder
    id: int

    @property
    def node(self) -> Node:
        return self.builder.nodes[self.id]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.node.shape

    @property
    def dtype(self) -> DType:
        return self.node.dtype

    @property
    def name(self) -> str:
        return self.node.label

    def __add__(self, other: Tensor) -> Tensor:
        return self.builder.add(self, other)

    def __mul__(self, other: Tensor | float) -> Tensor:
        if isinstance(other, Tensor):
            return self.builder.mul(self, other)
        return self.builder.scale(self, float(other))

    def __repr__(self) -> str:
        return f"Tensor({self.node})"


class GraphBuilder:
    """Appends checked nodes in topological order; ``build()`` returns the frozen ``Graph``."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self._names: set[str] = set()

    # -- plumbing ------------------------------------------------------------------------------
    def _add(
        self,
        op: Op,
        srcs: Sequence[Tensor],
        params: Params = None,
        name: str = "",
        shape: tuple[int, ...] | None = None,
        dtype: DType | None = None,
    ) -> Tensor:
        for s in srcs:
            if not isinstance(s, Tensor) or s.builder is not self:
                raise GraphError(f"{op.name} '{name}': {s!r} is not a tensor of this builder")
        if op in (Op.INPUT, Op.WEIGHT, Op.CONSTANT, Op.STATE):
            if name in self._names:
                raise GraphError(f"a leaf named {name!r} already exists")
            self._names.add(name)
        node = make_node(self.nodes, op, [s.id for s in srcs], params, name, shape, dtype)
        self.nodes.append(node)
        return Tensor(self, node.id)

    def build(self, outputs: Sequence[Tensor], *, dce: bool = True) -> Graph:
        """Freeze the graph; by default drop what neither ``outputs`` nor a KV write needs."""
        for o in outputs:
            if not isinstance(o, Tensor) or o.builder is not self:
                raise GraphError(f"output {o!r} is not a tensor of this builder")
        graph = Graph(tuple(self.nodes), tuple(o.id for o in outputs), derived=True)
        return graph.dce() if dce else graph

    # -- leaves --------------------------------------------------------------------------------
    def input(self, name: str, shape: Sequence[int], dtype: DType | str) -> Tensor:
        """A tensor fed on every call (token ids, positions, ...)."""
        return self._add(Op.INPUT, [], None, name, tuple(shape), dtype_of(dtype))

    def weight(self, name: str, shape: Sequence[int], dtype: DType | str, layer: int) -> Tensor:
        """A tensor bound once; ``layer`` drives placement (head = n_layer, embedding = -1)."""
        return self._add(
            Op.WEIGHT, [], WeightParams(int(layer)), name, tuple(shape), dtype_of(dtype)
        )

    def constant(self, name: str, value: np.ndarray, dtype: DType | str | None = None) -> Tensor:
        """A small tensor whose bytes are stored in the graph (and its JSON)."""
        dt = dtype_of(dtype if dtype is not None else value.dtype)
        arr = np.ascontiguousarray(
            np.asarray(value).astype(dt.numpy).astype(dt.numpy.newbyteorder("<"))
        )
        return self._add(Op.CONSTANT, [], ConstantParams(arr.tobytes()), name, arr.shape, dt)

    def state(self, name: str, shape: Sequence[int], dtype: DType | str) -> Tensor:
        """A tensor that outlives a call and is written in place (a KV cache)."""
        return self._add(Op.STATE, [], None, name, tuple(shape), dtype_of(dtype))

    # -- views and copies ----------------------------------------------------------------------
    def reshape(self, x: Tensor, shape: Sequence[int], name: str = "") -> Tensor:
        shape = tuple(int(d) for d in shape)
        if shape.count(-1) == 1:
            known = int(np.prod([d for d in shape if d != -1]))
            total = int(np.prod(x.shape))
            if known == 0 or total % known:
                raise GraphError(f"RESHAPE({x.name} {x.shape}): cannot infer -1 in {shape}")
            shape = tuple(total // known if d == -1 else d for d in shape)
        return self._add(Op.RESHAPE, [x], ReshapeParams(shape), name)

    def permute(self, x: Tensor, axes: Sequence[int], name: str = "") -> Tensor:
        return self._add(Op.PERMUTE, [x], PermuteParams(tuple(int(a) for a in axes)), name)

    def transpose(self, x: Tensor, a: int = -2, b: int = -1, name: str = "") -> Tensor:
        axes = list(range(len(x.shape)))
        if not axes:
            raise GraphError(f"PERMUTE({x.name} {x.shape}): cannot transpose a scalar")
        if not (-len(axes) <= a < len(axes) and -len(axes) <= b < len(axes)):
            raise GraphError(
                f"PERMUTE({x.name} {x.shape}): no axes {a} and {b} to swap in {len(axes)}-D"
            )
        axes[a], axes[b] = axes[b], axes[a]
        return self.permute(x, axes, name)

    def view(
        self,
        x: Tensor,
        shape: Sequence[int],
        strides: Sequence[int],
        offset: int = 0,
        name: str = "",
    ) -> Tensor:
        """A view with explicit element strides and offset into the contiguous ``x``."""
        p = ViewParams(tuple(int(d) for d in shape), tuple(int(s) for s in strides), int(offset))
        return self._add(Op.VIEW, [x], p, name)

    def rows(self, x: Tensor, start: int, stop: int, name: str = "") -> Tensor:
        """``x[start:stop]`` along the first axis, as a view (no copy)."""
        n = x.shape[0]
        if not 0 <= start <= stop <= n:
            raise GraphError(f"VIEW({x.name} {x.shape}): rows {start}:{stop} out of 0:{n}")
        if not x.node.contiguous:
            raise GraphError(f"VIEW({x.name} {x.shape}): source is not contiguous; cont() it first")
        shape = (stop - start, *x.shape[1:])
        inner = int(np.prod(x.shape[1:]))
        return self.view(x, shape, contiguous_strides(shape), start * inner, name)

    def cont(self, x: Tensor, name: str = "") -> Tensor:
        return self._add(Op.CONT, [x], None, name)

    def cast(self, x: Tensor, dtype: DType | str, name: str = "") -> Tensor:
        return self._add(Op.CAST, [x], CastParams(dtype_of(dtype)), name)

    # -- compute -------------------------------------------------------------------------------
    def get_rows(self, table: Tensor, idx: Tensor, name: str = "") -> Tensor:
        return self._add(Op.GET_ROWS, [table, idx], None, name)

    def add(self, a: Tensor, b: Tensor, name: str = "") -> Tensor:
        return self._add(Op.ADD, [a, b], None, name)

    def mul(self, a: Tensor, b: Tensor, name: str = "") -> Tensor:
        return self._add(Op.MUL, [a, b], None, name)

    def scale(self, x: Tensor, s: float, name: str = "") -> Tensor:
        return self._add(Op.SCALE, [x], ScaleParams(float(s)), name)

    def rms_norm(
        self,
        x: Tensor,
        w: Tensor | None = None,
        eps: float = 1e-6,
        name: str = "",
        residual: Tensor | None = None,
    ) -> Tensor:
        """``norm(x) * w``, plus ``residual`` when given (one op for norm-then-add)."""
        srcs = [x] if w is None else [x, w]
        if residual is not None:
            if w is None:
                raise GraphError(f"RMS_NORM({x.name} {x.shape}): a residual needs a weight")
            srcs.append(residual)
        return self._add(Op.RMS_NORM, srcs, RmsNormParams(float(eps)), name)

    def mul_mat(self, a: Tensor, b: Tensor, name: str = "") -> Tensor:
        """``b @ a.T``: a is (out, in) as GGUF stores weights, b is (..., in)."""
        return self._add(Op.MUL_MAT, [a, b], None, name)

    def rope(
        self,
        x: Tensor,
        pos: Tensor,
        *,
        base: float,
        mode: RopeMode | str = RopeMode.NORMAL,
        n_dims: int | None = None,
        freq_scale: float = 1.0,
        name: str = "",
    ) -> Tensor:
        mode = RopeMode(mode) if isinstance(mode, str) else mode
        nd = x.shape[-1] if n_dims is None else int(n_dims)
        return self._add(
            Op.ROPE, [x, pos], RopeParams(mode, nd, float(base), float(freq_scale)), name
        )

    def attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_pos: Tensor,
        kv_pos: Tensor,
        *,
        scale: float,
        window: int = 0,
        prefix_rows: bool = False,
        name: str = "",
    ) -> Tensor:
        """Attention of ``q`` over the keys ``k`` and values ``v`` (rows of a cache), causal by
        position (``q_pos``, ``kv_pos``; -1 marks an empty row) and within ``window``.
        ``prefix_rows``: see ``AttentionParams``."""
        p = AttentionParams(float(scale), int(window), bool(prefix_rows))
        return self._add(Op.ATTENTION, [q, k, v, q_pos, kv_pos], p, name)

    def geglu(self, gate: Tensor, up: Tensor, name: str = "") -> Tensor:
        return self._add(Op.GEGLU, [gate, up], None, name)

    def swiglu(self, gate: Tensor, up: Tensor, name: str = "") -> Tensor:
        return self._add(Op.SWIGLU, [gate, up], None, name)

    def argmax(self, x: Tensor, name: str = "") -> Tensor:
        """Index of the largest value along the last axis (i32; first one on ties)."""
        return self._add(Op.ARGMAX, [x], None, name)

    def set_rows(self, dst: Tensor, src: Tensor, idx: Tensor, name: str = "") -> Tensor:
        """Write ``src[i]`` into row ``idx[i]`` of the state ``dst``; returns the updated state."""
        return self._add(Op.SET_ROWS, [dst, src, idx], None, name)
