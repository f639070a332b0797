"""The fusion pass: groups of nodes that a backend may run as one kernel.

    groups = engine.passes.fusion.find(graph)
    for f in groups:
        print(f)        # fusion norm_matvec at %41: %38 %40 %41 (writes %38 %41)

Decode is launch-bound on a GPU: every dependent launch costs ~2 us however little it does, and a
Gemma 3 layer is a dozen of them. This pass finds the chains that one kernel can do without a
trip through memory and marks them; it changes nothing in the graph. Each group runs at the
position of its last node (the anchor). A backend that has a kernel for a pattern runs the
group as one launch; any other backend runs the members one by one, so the results are the
same either way and the NumPy backend stays the reference.

Patterns (members in brackets):

``norm_matvec``  [pre?, norm, matmul]: a matrix product with few rows whose input is an RMS norm
    (weight, no residual) of ``pre``'s result, where ``pre`` is an RMS norm that adds a residual,
    an ADD, or absent (the norm reads any value). The kernel recomputes the short input vector
    in every block and writes ``pre`` where others read it.
``glu_matvec``  [glu, matmul]: a matrix product whose input is GEGLU or SWIGLU of two views
    (the gate/up halves of a stacked projection).
``rope_store``  [q_norm?, k_norm?, q_rope, k_rope, k_write, v_write]: the attention front end:
    per-head norms, rope and both cache writes, one block per head.

The memory plan (``engine.passes.memory.plan``) takes ``step_of(graph, groups)`` so that every
member's inputs stay live, and every member's result gets bytes of its own, for the whole
group: a fused kernel reads all of its inputs while writing any of its results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from graph.ir import Graph, Node
from graph.ops import Op

__all__ = ["Fusion", "find", "step_of", "PATTERNS"]

PATTERNS = ("norm_matvec", "glu_matvec", "rope_store")


@dataclass(frozen=True)
class Fusion:
    """One group: its pattern, members (graph order; the last is the anchor) and roles."""

    pattern: str
    nodes: tuple[int, ...]
    outputs: tuple[int, ...]  # members whose results are read outside the group
    roles: Mapping[str, int] = field(default_factory=dict, compare=False)

    @property
    def anchor(self) -> int:
        return self.nodes[-1]

    def __str__(self) -> str:
        members = " ".join(f"%{i}" for i in self.nodes)
        writes = " ".join(f"%{i}" for i in self.outputs)
        return f"fusion {self.pattern} at %{self.anchor}: {members} (writes {writes})"

    def to_dict(self) -> dict[str, object]:
        return {
            "pattern": self.pattern,
            "nodes": list(self.nodes),
            "outputs": list(self.outputs),
            "roles": dict(self.roles),
        }


class _Matcher:
    def __init__(self, graph: Graph, max_rows: int) -> None:
        self.g, self.max_rows = graph, max_rows
        self.nodes = graph.nodes
        self.users = graph.consumers
        self.outputs = set(graph.outputs)
        self.taken: set[int] = set()

    def node(self, i: int) -> Node:
        return self.nodes[i]

    def only_user(self, i: int) -> int | None:
        """The single consumer of ``i`` (None if it has several, none, or is a graph output)."""
        users = self.users[i]
        if len(users) != 1 or i in self.outputs:
            return None
        return users[0]

    def peel(self, i: int) -> int:
        """Step back through reshapes/views that show all of their source unchanged, each with
        a single reader: such a view and its source are the same bytes in the same order."""
        while True:
            n = self.node(i)
            if n.op not in (Op.RESHAPE, Op.VIEW):
                return i
            src = self.node(n.srcs[0])
            whole = n.contiguous and n.numel == src.numel and n.offset == src.offset
            if not (whole and src.contiguous and self.only_user(src.id) == n.id):
                return i
            i = src.id

    def is_weight(self, i: int) -> bool:
        return self.node(i).op is Op.WEIGHT

    def external_users_after(self, members: Sequence[int]) -> tuple[int, ...] | None:
        """Members read outside the group; None if any such read comes before the anchor
        (the group could not run at its anchor then)."""
        inside, anchor = set(members), max(members)
        outs = []
        for m in members:
            outside = [
                u for u in self.users[m] if u not in inside and not self._view_into(u, inside)
            ]
            if any(u < anchor for u in outside):
                return None
            if outside or m in self.outputs:
                outs.append(m)
        return tuple(outs)

    def _view_into(self, u: int, inside: set[int]) -> bool:
        """``u`` is a view chain whose every reader is inside the group (free to skip)."""
        n = self.node(u)
        if n.op not in (Op.RESHAPE, Op.VIEW) or u in self.outputs:
            return False
        return bool(self.users[u]) and all(
            v in inside or self._view_into(v, inside) for v in self.users[u]
        )

    def claim(self, pattern: str, members: list[int], roles: dict[str, int]) -> Fusion | None:
        members = sorted(members)
        if self.taken & set(members):
            return None
        outs = self.external_users_after(members)
        if outs is None:
            return None
        self.taken |= set(members)
        return Fusion(pattern, tuple(members), outs, roles)

    # -- patterns ----------------------------------------------------------------------------------
    def norm_matvec(self, mm: Node) -> Fusion | None:
        x = self.node(mm.srcs[1])
        if x.numel // max(x.shape[-1], 1) > self.max_rows:
            return None
        norm = self.node(self.peel(x.id))
        if norm.op is not Op.RMS_NORM or len(norm.srcs) != 2 or not norm.contiguous:
            return None
        if not self.is_weight(norm.srcs[1]) or self.only_user(norm.id) is None:
            return None
        if norm.id != x.id and self.only_user(x.id) != mm.id:
            return None
        roles = {"matmul": mm.id, "norm": norm.id}
        members = [norm.id, mm.id]
        pre = self.node(self.peel(norm.srcs[0]))
        fusable_pre = (pre.op is Op.RMS_NORM and len(pre.srcs) == 3) or (
            pre.op is Op.ADD
            and pre.shape == self.node(pre.srcs[0]).shape == self.node(pre.srcs[1]).shape
        )
        if fusable_pre and pre.contiguous and pre.id not in self.taken:
            users = [
                u for u in self.users[pre.id] if u != norm.id and not self._view_into(u, {norm.id})
            ]
            if all(u > mm.id for u in users):
                roles["pre"] = pre.id
                members.append(pre.id)
        return self.claim("norm_matvec", members, roles)

    def glu_matvec(self, mm: Node) -> Fusion | None:
        x = self.node(mm.srcs[1])
        if x.numel // max(x.shape[-1], 1) > self.max_rows:
            return None
        glu = self.node(self.peel(x.id))
        if glu.op not in (Op.GEGLU, Op.SWIGLU) or self.only_user(glu.id) is None:
            return None
        if glu.id != x.id and self.only_user(x.id) != mm.id:
            return None
        return self.claim("glu_matvec", [glu.id, mm.id], {"matmul": mm.id, "glu": glu.id})

    def rope_store(self, att: Node) -> Fusion | None:
        qr = self.node(att.srcs[0])
        ks = self.node(self._through_views(att.srcs[1]))
        vs = self.node(self._through_views(att.srcs[2]))
        if qr.op is not Op.ROPE or ks.op is not Op.SET_ROWS or vs.op is not Op.SET_ROWS:
            return None
        if ks.id == vs.id:  # one cache read as both K and V: not the two writes of a layer
            return None
        kr = self.node(ks.srcs[1])
        if kr.op is not Op.ROPE or ks.srcs[2] != vs.srcs[2]:
            return None
        if qr.params != kr.params or qr.srcs[1] != kr.srcs[1]:
            return None
        if self.only_user(qr.id) != att.id or self.only_user(kr.id) != ks.id:
            return None
        roles = {"q_rope": qr.id, "k_rope": kr.id, "k_write": ks.id, "v_write": vs.id}
        for name, rope in (("q_norm", qr), ("k_norm", kr)):
            n = self.node(rope.srcs[0])
            if n.op is Op.RMS_NORM and len(n.srcs) == 2 and self.only_user(n.id) == rope.id:
                if self.is_weight(n.srcs[1]):
                    roles[name] = n.id
        if ("q_norm" in roles) != ("k_norm" in roles):
            return None
        return self.claim("rope_store", list(roles.values()), roles)

    def _through_views(self, i: int) -> int:
        while self.node(i).op in (Op.RESHAPE, Op.VIEW):
            i = self.node(i).srcs[0]
        return i


def find(
    graph: Graph, patterns: Sequence[str] = PATTERNS, max_rows: int | None = None
) -> list[Fusion]:
    """The groups of ``patterns`` in ``graph``, disjoint, in anchor order. ``max_rows``: matrix
    products with at most this many input rows are matrix-vector products (decode), a device
    fact (``DeviceSpec.matvec_max_rows``); by default the one every backend plans with."""
    if max_rows is None:
        from backends import device_spec

        max_rows = device_spec("numpy").matvec_max_rows
    unknown = set(patterns) - set(PATTERNS)
    if unknown:
        raise ValueError(
            f"unknown fusion pattern(s) {sorted(unknown)}; known: {', '.join(PATTERNS)}"
        )
    m = _Matcher(graph, max_rows)
    found: list[Fusion] = []
    for n in graph.nodes:
        f = None
        if n.op is Op.ATTENTION and "rope_store" in patterns:
            f = m.rope_store(n)
        elif n.op is Op.MUL_MAT:
            if "norm_matvec" in patterns:
                f = m.norm_matvec(n)
            if f is None and "glu_matvec" in patterns:
                f = m.glu_matvec(n)
        if f is not None:
            found.append(f)
    return sorted(found, key=lambda f: f.anchor)


def step_of(graph: Graph, groups: Sequence[Fusion]) -> list[int]:
    """The step at which each node runs: its own id, or its group's anchor."""
    steps = [n.id for n in graph.nodes]
    for f in groups:
        for i in f.nodes:
            steps[i] = f.anchor
    return steps
