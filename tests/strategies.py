"""Hypothesis strategies that draw random *valid* streamgraph graphs and the arrays to run them.

``graph_cases()`` builds a DAG with ``GraphBuilder`` one random op at a time. Operands are taken
from a pool of earlier tensors (so a tensor is often read several times: fan-out) or made fresh
as new inputs or weights of a fitting shape. It covers CONT, CAST, ADD/MUL with broadcasting,
SCALE, RMS_NORM (with or without weight), MUL_MAT (mostly with weights), GEGLU, SWIGLU,
GET_ROWS (constant or input i32 index), RESHAPE, PERMUTE/transpose, rows()/VIEW, ROPE,
ATTENTION (sometimes over a KV-cache STATE written by SET_ROWS) and standalone SET_ROWS whose
result later ops read. Storage types are drawn from ``dtypes``; dims are 1..7.

The graph is built with ``dce=False`` so it may hold dead nodes; tests call ``.dce()`` when they
want the pruned graph. Float arrays come from a drawn seed and stay in a moderate range (weights
of a matmul are scaled by 1/sqrt(K)) so that f16/bf16 rounding stays small; index arrays are
always in range (distinct for SET_ROWS, so the write order does not matter).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from graph import GraphBuilder, RopeMode, Tensor
from graph.dtypes import FLOAT_DTYPES, DType, f32, i32
from graph.ir import Graph

__all__ = ["Case", "graph_cases", "f32_cases", "OP_KINDS"]

Gen = Callable[[np.random.Generator], np.ndarray]


@dataclass
class Case:
    """A graph (built without DCE) and everything needed to run it twice."""

    graph: Graph
    seed: int
    inputs: list[dict[str, np.ndarray]]  # two input sets: a first call and a second call
    weights: dict[str, np.ndarray]
    states: dict[str, np.ndarray]  # initial states (copy before handing to an executor)
    ops: list[str] = field(default_factory=list)  # the op kinds drawn, in order

    @property
    def dtypes(self) -> set[DType]:
        return {n.dtype for n in self.graph.nodes if n.dtype.is_float}

    def fresh_states(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.states.items()}

    def __repr__(self) -> str:
        return f"Case(seed={self.seed}, ops={self.ops}, outputs={self.graph.outputs})\n{self.graph}"


def _uniform(shape: tuple[int, ...], dtype: DType, lo: float, hi: float) -> Gen:
    return lambda rng: rng.uniform(lo, hi, size=shape).astype(dtype.numpy)


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


class _Ctx:
    """Building state for one drawn graph."""

    def __init__(self, draw: st.DrawFn, dtypes: tuple[DType, ...], allow_states: bool) -> None:
        self.draw = draw
        self.allow_states = allow_states
        self.dtypes = dtypes
        self.b = GraphBuilder()
        self.pool: list[Tensor] = []  # float tensors later ops may read
        self.input_gens: dict[str, Gen] = {}
        self.weight_gens: dict[str, Gen] = {}
        self.state_gens: dict[str, Gen] = {}
        self.index_inputs: dict[tuple, list[Tensor]] = {}  # (n, lo, hi, distinct) -> i32 inputs
        self.count = 0

    # -- drawing helpers -----------------------------------------------------------------------
    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def flag(self) -> bool:
        return self.draw(st.booleans())

    def dim(self, lo: int = 1, hi: int = 7) -> int:
        return self.draw(st.integers(lo, hi))

    def dtype(self) -> DType:
        return self.draw(st.sampled_from(self.dtypes))

    def shape(self) -> tuple[int, ...]:
        rank = self.draw(st.integers(1, 3))
        return tuple(self.dim(1, 5) for _ in range(rank))

    def pick(self, pred: Callable[[Tensor], bool] = lambda t: True) -> Tensor | None:
        cands = [t for t in self.pool if pred(t)]
        if not cands:
            return None
        return cands[-1 - self.draw(st.integers(0, len(cands) - 1))]  # shrinks to the newest

    # -- leaves --------------------------------------------------------------------------------
    def leaf(
        self,
        shape: tuple[int, ...],
        *,
        weight: bool | None = None,
        lo: float = -2.0,
        hi: float = 2.0,
        dtype: DType | None = None,
    ) -> Tensor:
        dt = dtype or self.dtype()
        if weight is None:
            weight = self.flag()
        if weight:
            t = self.b.weight(self.name("w"), shape, dt, layer=self.draw(st.integers(-1, 3)))
            self.weight_gens[t.node.name] = _uniform(shape, dt, lo, hi)
        else:
            t = self.b.input(self.name("x"), shape, dt)
            self.input_gens[t.node.name] = _uniform(shape, dt, lo, hi)
        self.pool.append(t)
        return t

    def operand(self, shape: tuple[int, ...]) -> Tensor:
        """A tensor of exactly ``shape``: from the pool (fan-out) or a new leaf."""
        if self.flag():
            t = self.pick(lambda t: t.shape == shape)
            if t is not None:
                return t
        return self.leaf(shape)

    def index(self, n: int, lo: int, hi: int, *, distinct: bool = False) -> Tensor:
        """A 1-D i32 index of ``n`` entries in [lo, hi): a constant, a new input or a shared one."""
        if distinct:
            assert hi - lo >= n
        kind = self.draw(st.sampled_from(["input", "constant", "shared"]))
        key = (n, lo, hi, distinct)
        if kind == "shared" and self.index_inputs.get(key):
            shared = self.index_inputs[key]
            return shared[self.draw(st.integers(0, len(shared) - 1))]
        if kind == "constant":
            if distinct:
                vals = self.draw(st.permutations(range(lo, hi)))[:n]
            else:
                vals = self.draw(st.lists(st.integers(lo, hi - 1), min_size=n, max_size=n))
            return self.b.constant(self.name("c"), np.array(vals, dtype=np.int32), i32)
        t = self.b.input(self.name("i"), (n,), i32)
        if distinct:
            self.input_gens[t.node.name] = lambda rng: rng.permutation(np.arange(lo, hi))[
                :n
            ].astype(np.int32)
        else:
            self.input_gens[t.node.name] = lambda rng: rng.integers(lo, hi, size=n).astype(np.int32)
        self.index_inputs.setdefault(key, []).append(t)
        return t

    def written_state(self, src: Tensor, rows: int | None = None) -> Tensor:
        """A fresh STATE of ``rows`` rows like ``src``'s, with ``src`` written at distinct rows."""
        n = src.shape[0]
        rows = rows if rows is not None else self.dim(n, max(n, 7))
        st_shape = (rows, *src.shape[1:])
        dt = self.dtype()
        state = self.b.state(self.name("s"), st_shape, dt)
        self.state_gens[state.node.name] = _uniform(st_shape, dt, -1.0, 1.0)
        out = self.b.set_rows(state, src, self.index(n, 0, rows, distinct=True))
        self.pool.append(out)  # readers take the write's result, never the state itself
        return out

    # -- ops: each appends one (or a few) nodes and returns the new tensor ---------------------
    def op_cont(self) -> Tensor:
        return self.b.cont(self.pick())

    def op_cast(self) -> Tensor:
        return self.b.cast(self.pick(), self.dtype())

    def op_binary(self, mul: bool) -> Tensor:
        x = self.pick()
        y = None
        if self.flag():  # any earlier tensor that broadcasts against x

            def fits(t: Tensor) -> bool:
                try:
                    np.broadcast_shapes(t.shape, x.shape)
                except ValueError:
                    return False
                return len(np.broadcast_shapes(t.shape, x.shape)) <= 4

            y = self.pick(fits)
        if y is None:
            shape = list(x.shape)
            drop = self.draw(st.integers(0, len(shape) - 1))
            shape = shape[drop:]
            for i in range(len(shape)):
                if self.flag():
                    shape[i] = 1
            if drop == 0 and len(x.shape) < 3 and self.draw(st.integers(0, 3)) == 0:
                shape = [self.dim(1, 3), *shape]  # y has more dims: x broadcasts up
            y = self.leaf(tuple(shape))
        a, b = (y, x) if self.flag() else (x, y)
        return self.b.mul(a, b) if mul else self.b.add(a, b)

    def op_add(self) -> Tensor:
        return self.op_binary(mul=False)

    def op_mul(self) -> Tensor:
        return self.op_binary(mul=True)

    def op_scale(self) -> Tensor:
        s = self.draw(
            st.one_of(st.sampled_from([-1.0, 0.5, 2.0]), st.floats(-2, 2, allow_nan=False))
        )
        return self.b.scale(self.pick(), s)

    def op_rms_norm(self) -> Tensor:
        x = self.pick()
        w = None
        if self.flag():
            w = self.pick(lambda t: t.shape == x.shape[-1:]) if self.flag() else None
            if w is None:
                w = self.leaf(x.shape[-1:], weight=True, lo=0.5, hi=1.5)
        eps = self.draw(st.sampled_from([1e-6, 1e-5, 1e-2]))
        return self.b.rms_norm(x, w, eps=eps)

    def op_mul_mat(self) -> Tensor:
        x = self.pick()
        k = x.shape[-1]
        a = None
        if self.draw(st.integers(0, 3)) == 0:  # an activation as `a`
            a = self.pick(lambda t: len(t.shape) == 2 and t.shape[1] == k)
        if a is None:
            bound = math.sqrt(3.0 / k)  # keeps the output's scale near the input's
            a = self.leaf(
                (self.dim(), k), weight=self.draw(st.integers(0, 3)) > 0, lo=-bound, hi=bound
            )
        return self.b.mul_mat(a, x)

    def op_glu(self, geglu: bool) -> Tensor:
        g = self.pick()
        u = self.operand(g.shape)
        return self.b.geglu(g, u) if geglu else self.b.swiglu(g, u)

    def op_geglu(self) -> Tensor:
        return self.op_glu(True)

    def op_swiglu(self) -> Tensor:
        return self.op_glu(False)

    def op_get_rows(self) -> Tensor:
        table = self.pick(lambda t: len(t.shape) <= 2) if self.flag() else None
        if table is None:  # an embedding table
            table = self.leaf((self.dim(), self.dim()), weight=True, lo=-1.0, hi=1.0)
        n = self.dim()
        return self.b.get_rows(table, self.index(n, 0, table.shape[0]))

    def op_reshape(self) -> Tensor | None:
        x = self.pick(lambda t: t.node.contiguous)
        if x is None:
            return None
        rank = self.draw(st.integers(1, 3))
        dims = [1] * rank
        for p in _prime_factors(math.prod(x.shape)):
            dims[self.draw(st.integers(0, rank - 1))] *= p
        return self.b.reshape(x, dims)

    def consumed(self, t: Tensor | None) -> Tensor | None:
        """``t`` (a view), often read at once by a computing op: strided reads for the kernels."""
        if t is None or not self.flag():
            return t
        self.pool.append(t)
        kind = self.draw(st.sampled_from(["add", "mul_mat", "rms_norm", "scale", "cast"]))
        if kind == "add":
            return self.b.add(t, self.operand(t.shape))
        if kind == "mul_mat":
            k = t.shape[-1]
            bound = math.sqrt(3.0 / k)
            return self.b.mul_mat(self.leaf((self.dim(), k), weight=True, lo=-bound, hi=bound), t)
        if kind == "rms_norm":
            return self.b.rms_norm(t)
        if kind == "scale":
            return self.b.scale(t, -0.5)
        return self.b.cast(t, self.dtype())

    def op_permute(self) -> Tensor | None:
        return self.consumed(self._permute())

    def op_view(self) -> Tensor | None:
        return self.consumed(self._view())

    def _permute(self) -> Tensor | None:
        x = self.pick(lambda t: len(t.shape) >= 2)
        if x is None:
            return None
        if self.flag():
            return self.b.transpose(x)
        return self.b.permute(x, self.draw(st.permutations(range(len(x.shape)))))

    def _view(self) -> Tensor | None:
        x = self.pick(lambda t: t.node.contiguous)
        if x is None:
            return None
        if self.flag():
            start = self.draw(st.integers(0, x.shape[0] - 1))
            stop = self.draw(st.integers(start + 1, x.shape[0]))
            return self.b.rows(x, start, stop)
        room = math.prod(x.shape) - 1  # the last element a view may read
        rank = self.draw(st.integers(1, 3))
        shape, strides = [], []
        for _ in range(rank):
            d = self.dim(1, 4)
            if d > 1 and room // (d - 1) == 0:
                d = 1
            s = self.draw(st.integers(0, room // (d - 1) if d > 1 else 3))
            room -= (d - 1) * s
            shape.append(d)
            strides.append(s)
        offset = self.draw(st.integers(0, room))
        return self.b.view(x, shape, strides, offset)

    def op_rope(self) -> Tensor:
        x = self.pick(lambda t: len(t.shape) == 3 and t.shape[2] % 2 == 0)
        if x is None:
            x = self.leaf((self.dim(1, 4), self.dim(1, 3), 2 * self.dim(1, 3)))
        n_dims = 2 * self.draw(st.integers(1, x.shape[2] // 2))
        pos = self.index(x.shape[0], 0, 8)
        return self.b.rope(
            x,
            pos,
            base=self.draw(st.sampled_from([10000.0, 100.0, 10.0])),
            mode=self.draw(st.sampled_from(list(RopeMode))),
            n_dims=n_dims,
            freq_scale=self.draw(st.sampled_from([1.0, 0.5])),
        )

    def op_attention(self) -> Tensor:
        q = self.pick(lambda t: len(t.shape) == 3)
        if q is None:
            q = self.leaf((self.dim(1, 4), self.dim(1, 4), self.dim(1, 4)))
        n, n_head, d = q.shape
        n_kv = self.draw(st.sampled_from([h for h in range(1, n_head + 1) if n_head % h == 0]))
        k = (
            self.pick(lambda t: t.shape[1:] == (n_kv, d) and len(t.shape) == 3)
            if self.flag()
            else None
        )
        if k is None:
            k = self.leaf((self.dim(1, 5), n_kv, d))
        m = k.shape[0]
        v = (
            self.pick(lambda t: len(t.shape) == 3 and t.shape[:2] == (m, n_kv))
            if self.flag()
            else None
        )
        if v is None:
            v = self.leaf((m, n_kv, self.dim(1, 4)))
        if self.allow_states and self.draw(st.integers(0, 2)) == 0:  # k, v through KV caches
            m = self.dim(m, max(m, 7))  # cache rows; the m new rows land at distinct slots
            k = self.written_state(k, m)
            v = self.written_state(v, m) if self.flag() else self.leaf((m, n_kv, self.dim(1, 4)))
        scale = 1 / math.sqrt(d) if self.flag() else self.draw(st.floats(0.1, 1.0))
        return self.b.attention(
            q,
            k,
            v,
            self.index(n, 0, 8),
            self.index(m, -1, 8),
            scale=scale,
            window=self.draw(st.sampled_from([0, 0, 1, 2, 3])),
        )

    def op_set_rows(self) -> Tensor | None:
        src = self.pick(lambda t: t.shape[0] <= 7)
        return None if src is None else self.written_state(src)


OP_KINDS = [  # drawn with a bias to the front of the list, so the op-heavy ones come first
    "mul_mat",
    "attention",
    "add",
    "rms_norm",
    "rope",
    "view",
    "set_rows",
    "mul",
    "get_rows",
    "geglu",
    "swiglu",
    "permute",
    "reshape",
    "scale",
    "cast",
    "cont",
]


@st.composite
def graph_cases(
    draw: st.DrawFn,
    dtypes: tuple[DType, ...] = FLOAT_DTYPES,
    max_ops: int = 10,
    states: bool = True,
) -> Case:
    """A random valid graph over storage types ``dtypes`` plus its arrays (see the module doc)."""
    ctx = _Ctx(draw, dtypes, states)
    for _ in range(draw(st.integers(1, 3))):
        ctx.leaf(ctx.shape(), weight=False)
    kinds = OP_KINDS if states else [k for k in OP_KINDS if k != "set_rows"]
    drawn: list[str] = []
    for _ in range(draw(st.integers(1, max_ops))):
        kind = draw(st.sampled_from(kinds))
        t = getattr(ctx, f"op_{kind}")()
        if t is None:
            continue
        drawn.append(kind)
        if t not in ctx.pool:
            ctx.pool.append(t)
    outs = [ctx.pool[-1]]
    for _ in range(draw(st.integers(0, 2))):
        outs.append(ctx.pick())
    graph = ctx.b.build(outs, dce=False)

    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    weights = {k: g(rng) for k, g in ctx.weight_gens.items()}
    init_states = {k: g(rng) for k, g in ctx.state_gens.items()}
    inputs = [{k: g(rng) for k, g in ctx.input_gens.items()} for _ in range(2)]
    return Case(graph, seed, inputs, weights, init_states, drawn)


def f32_cases(**kw: object) -> st.SearchStrategy[Case]:
    return graph_cases(dtypes=(f32,), **kw)  # type: ignore[arg-type]
