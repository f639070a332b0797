"""Nodes and graphs: plain frozen records, built once, checked by ``validate()``.

A ``Graph`` is a tuple of ``Node`` in topological order (every source id is smaller than its
consumer's id) plus the ids of its outputs. A node's id is its index. Views carry their layout
(element strides and offset into the storage of ``base``), so passes and backends never guess
which tensors share bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

from graph.dtypes import DType
from graph.ops import (
    ALIAS_OPS,
    INFER,
    LAYER_INPUT,
    LEAF_OPS,
    PARAMS,
    SIDE_EFFECT_OPS,
    SRC_COUNT,
    GraphError,
    Op,
    Params,
    PermuteParams,
    TensorMeta,
    ViewParams,
    WeightParams,
)

__all__ = ["Node", "Graph", "make_node", "contiguous_strides"]


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major element strides of ``shape``."""
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


@dataclass(frozen=True, slots=True)
class Node:
    """One tensor: a leaf (input, weight, constant, state) or an op on earlier nodes."""

    id: int
    op: Op
    srcs: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: DType
    params: Params
    name: str
    strides: tuple[int, ...]  # element strides into the storage of `base`
    offset: int  # element offset into the storage of `base`
    base: int  # id of the node owning the storage: itself unless a view or in-place write

    @property
    def label(self) -> str:
        """The name if it has one, else ``%id``: how messages and printers refer to a node."""
        return self.name or f"%{self.id}"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's elements (for a view: what it reads, not its base)."""
        return self.dtype.nbytes(self.shape)

    @property
    def is_leaf(self) -> bool:
        return self.op in LEAF_OPS

    @property
    def is_alias(self) -> bool:
        return self.op in ALIAS_OPS

    @property
    def contiguous(self) -> bool:
        """Row-major over the dims that are not 1 (their strides do not matter). Asked of
        every source of every node a graph build makes, hence the plain loop."""
        want = 1
        for d, s in zip(reversed(self.shape), reversed(self.strides), strict=True):
            if d != 1:
                if s != want:
                    return False
                want *= d
        return True

    @property
    def layer(self) -> int | None:
        """The layer tag of a weight (head = n_layer, token embedding = -1); None otherwise."""
        return self.params.layer if isinstance(self.params, WeightParams) else None

    def meta(self) -> TensorMeta:
        return TensorMeta(self.label, self.shape, self.dtype, self.contiguous, self.op)

    def __str__(self) -> str:
        srcs = ", ".join(f"%{s}" for s in self.srcs)
        extra = ""
        if self.op is Op.WEIGHT:
            layer = self.layer
            extra = f"  layer={'input' if layer == LAYER_INPUT else layer}"
        elif self.params is not None and self.op is not Op.CONSTANT:
            extra = "  " + _params_text(self.params)
        if self.is_alias:
            extra += f"  (alias of %{self.base}+{self.offset})"
        name = f"  '{self.name}'" if self.name else ""
        shape = "(" + ", ".join(map(str, self.shape)) + ")"
        head = f"%{self.id:<4} {self.op.name:<9} {shape:<18} {self.dtype.name:<5}"
        return f"{head} <- {srcs}{name}{extra}"


def _params_text(p: Params) -> str:
    fields = getattr(p, "__dataclass_fields__", {})
    parts = []
    for k in fields:
        v = getattr(p, k)
        parts.append(f"{k}={getattr(v, 'value', getattr(v, 'name', v))}")
    return " ".join(parts)


def make_node(
    nodes: Sequence[Node],
    op: Op,
    srcs: Sequence[int],
    params: Params = None,
    name: str = "",
    shape: tuple[int, ...] | None = None,
    dtype: DType | None = None,
) -> Node:
    """Check and infer one new node appended after ``nodes``; raises ``GraphError`` if invalid.

    Leaves take ``shape`` and ``dtype``; every other op infers them from its sources.
    """
    nid = len(nodes)
    srcs = tuple(int(s) for s in srcs)
    if len(srcs) not in SRC_COUNT[op]:
        raise GraphError(f"{op.name} '{name or nid}' takes {SRC_COUNT[op]} inputs, got {len(srcs)}")
    for s in srcs:
        if not 0 <= s < nid:
            raise GraphError(
                f"{op.name} '{name or nid}' reads node {s}, which is not an earlier node "
                f"(node ids 0..{nid - 1} exist): dangling reference or cycle"
            )
    want = PARAMS[op]
    if (want is None) != (params is None) or (want is not None and not isinstance(params, want)):
        raise GraphError(f"{op.name} '{name or nid}' needs params {want}, got {params!r}")
    if op in LEAF_OPS:
        if shape is None or dtype is None:
            raise GraphError(f"{op.name} '{name}' needs a shape and dtype")
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise GraphError(f"{op.name} '{name}' has a negative dim in {shape}")
        try:  # block-quantized types need whole blocks per row
            dtype.nbytes(shape)
        except ValueError as e:
            raise GraphError(f"{op.name} '{name}' {shape}: {e}") from None
        if not name:
            raise GraphError(f"every {op.name.lower()} needs a name")
        if op is Op.CONSTANT:
            if dtype.is_quantized or len(params.data) != dtype.nbytes(shape):  # type: ignore[union-attr]
                raise GraphError(
                    f"constant '{name}' holds {len(params.data)} bytes, "  # type: ignore[union-attr]
                    f"{shape} {dtype} needs {dtype.nbytes(shape)}"
                )
        return Node(nid, op, (), shape, dtype, params, name, contiguous_strides(shape), 0, nid)

    src_nodes = [nodes[s] for s in srcs]
    out_shape, out_dtype = INFER[op](op, params, [n.meta() for n in src_nodes])
    if shape is not None and tuple(shape) != out_shape:
        raise GraphError(
            f"{op.name} '{name or nid}' declares shape {tuple(shape)}, inferred {out_shape}"
        )
    if dtype is not None and dtype != out_dtype:
        raise GraphError(f"{op.name} '{name or nid}' declares dtype {dtype}, inferred {out_dtype}")
    if op not in ALIAS_OPS:
        return Node(
            nid, op, srcs, out_shape, out_dtype, params, name, contiguous_strides(out_shape), 0, nid
        )
    src = src_nodes[0]
    if isinstance(params, PermuteParams):
        strides = tuple(src.strides[a] for a in params.axes)
        offset = src.offset
    elif isinstance(params, ViewParams):
        strides, offset = params.strides, src.offset + params.offset
    elif op is Op.RESHAPE:
        strides, offset = contiguous_strides(out_shape), src.offset
    else:  # SET_ROWS: the updated destination itself
        strides, offset = src.strides, src.offset
    return Node(nid, op, srcs, out_shape, out_dtype, params, name, strides, offset, src.base)


@dataclass(frozen=True)
class Graph:
    """A static DAG: nodes in topological order and the ids of its outputs."""

    nodes: tuple[Node, ...]
    outputs: tuple[int, ...]
    meta: dict[str, object] = field(default_factory=dict, compare=False, hash=False)
    # every node was made by make_node from the nodes before it (GraphBuilder, and dce of
    # such a graph): validate() need not re-derive them, half the cost of planning a step
    derived: bool = field(default=False, compare=False, hash=False, repr=False)

    # -- derived views (computed once per graph) ---------------------------------------------
    @cached_property
    def consumers(self) -> tuple[tuple[int, ...], ...]:
        """For each node, the ids of the nodes that read it, in order."""
        out: list[list[int]] = [[] for _ in self.nodes]
        for n in self.nodes:
            for s in n.srcs:
                out[s].append(n.id)
        return tuple(tuple(c) for c in out)

    @cached_property
    def by_name(self) -> dict[str, Node]:
        """Leaves (and named nodes) by name; leaf names are unique."""
        return {n.name: n for n in self.nodes if n.name}

    def leaves(self, op: Op) -> list[Node]:
        return [n for n in self.nodes if n.op is op]

    @property
    def inputs(self) -> list[Node]:
        return self.leaves(Op.INPUT)

    @property
    def weights(self) -> list[Node]:
        return self.leaves(Op.WEIGHT)

    @property
    def states(self) -> list[Node]:
        return self.leaves(Op.STATE)

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, key: int | str) -> Node:
        if isinstance(key, str):
            if key not in self.by_name:
                raise KeyError(f"no node named {key!r} in the graph")
            return self.by_name[key]
        return self.nodes[key]

    # -- checks and passes ---------------------------------------------------------------------
    def validate(self) -> None:
        """Re-derive every node from its sources and check the graph-level rules.

        Topological order, shapes and dtypes, unique leaf names, outputs in range, and KV-cache
        discipline: a state is written by at most one SET_ROWS, and once written nothing reads
        the state leaf directly (readers take the write's result, which orders them after it).
        A ``derived`` graph's nodes were made by ``make_node`` already: only their order is
        checked, not re-derived.
        """
        rebuilt: list[Node] = []
        for n in self.nodes:
            if n.id != len(rebuilt):
                raise GraphError(f"node {n.label} has id {n.id} at position {len(rebuilt)}")
            if self.derived:
                if any(not 0 <= s < n.id for s in n.srcs):
                    raise GraphError(f"node {n.label} reads a later node: {n.srcs}")
                rebuilt.append(n)
                continue
            again = make_node(rebuilt, n.op, n.srcs, n.params, n.name, n.shape, n.dtype)
            if again != n:
                raise GraphError(f"node {n.label} does not match its re-derivation: {again}")
            rebuilt.append(again)
        seen: set[str] = set()
        for n in self.nodes:
            if n.is_leaf:
                if n.name in seen:
                    raise GraphError(f"two leaves are named {n.name!r}")
                seen.add(n.name)
        for o in self.outputs:
            if not 0 <= o < len(self.nodes):
                raise GraphError(f"output {o} is not a node (0..{len(self.nodes) - 1})")
        for st in self.states:
            readers = self.consumers[st.id]
            writes = [
                c
                for c in readers
                if self.nodes[c].op is Op.SET_ROWS and self.nodes[c].srcs[0] == st.id
            ]
            if len(writes) > 1:
                raise GraphError(
                    f"state {st.name} is written by {len(writes)} SET_ROWS; at most one"
                )
            if writes and len(readers) > 1:
                raise GraphError(
                    f"state {st.name} is read directly by "
                    f"{[self.nodes[c].label for c in readers if c not in writes]} "
                    "besides its write; "
                    "read the SET_ROWS result instead so the read is ordered after the write"
                )

    def dce(self) -> Graph:
        """The graph without nodes that neither an output nor a side effect (SET_ROWS) needs."""
        keep = [False] * len(self.nodes)
        stack = list(self.outputs) + [n.id for n in self.nodes if n.op in SIDE_EFFECT_OPS]
        while stack:
            i = stack.pop()
            if not keep[i]:
                keep[i] = True
                stack.extend(self.nodes[i].srcs)
        if all(keep):
            return self
        remap: dict[int, int] = {}
        nodes: list[Node] = []
        for n in self.nodes:
            if keep[n.id]:
                remap[n.id] = len(nodes)
                nodes.append(
                    Node(
                        len(nodes),
                        n.op,
                        tuple(remap[s] for s in n.srcs),
                        n.shape,
                        n.dtype,
                        n.params,
                        n.name,
                        n.strides,
                        n.offset,
                        remap[n.base],
                    )
                )
        outputs = tuple(remap[o] for o in self.outputs)
        return Graph(tuple(nodes), outputs, dict(self.meta), derived=self.derived)

    # -- display -------------------------------------------------------------------------------
    def summary(self) -> str:
        ops: dict[str, int] = {}
        for n in self.nodes:
            ops[n.op.name] = ops.get(n.op.name, 0) + 1
        wbytes = sum(n.nbytes for n in self.weights)
        return (
            f"Graph: {len(self.nodes)} nodes, {len(self.inputs)} inputs, "
            f"{len(self.weights)} weights "
            f"({wbytes / 2**20:.2f} MiB), {len(self.states)} states, outputs "
            f"{[self.nodes[o].label for o in self.outputs]}"
        )

    def __str__(self) -> str:
        lines = [self.summary()]
        lines += [str(n) for n in self.nodes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<{self.summary()}>"

    def _repr_svg_(self) -> str | None:
        """Jupyter shows a graph as a picture (Graphviz; None, and so the text, without it)."""
        from graph.drawing import document, svg_or_none

        return svg_or_none(document(self))
