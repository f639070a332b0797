"""The memory pass: one arena, every intermediate at a planned offset, bytes reused after last use.

    plan = engine.passes.memory.plan(graph)
    print(plan)            # one line per allocation: node, offset, size, live steps
    plan.validate(graph)   # no two allocations that are live at once share a byte

What lives in the arena: graph inputs (copied in before the first node runs, so they are live
from step -1) and the result of every node that computes (not views, which alias their base,
and not weights, constants or states, which are bound for the executor's lifetime). A value is
live from the step that writes it to the last step that reads it or any view of it; outputs
stay live to the end. A node's result is placed before its dead inputs are released, so no
kernel ever writes over its own sources. Placement is best-fit over a free list, with offsets
aligned to ``ALIGN`` bytes (what GPU kernels and vector loads want).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backends.spec import ALIGN
from graph.ir import Graph
from graph.ops import ALIAS_OPS, VIEW_OPS, Op

if TYPE_CHECKING:
    from engine.passes.scheduler import Schedule

__all__ = ["Allocation", "MemoryPlan", "plan", "ALIGN", "arena_nodes"]


@dataclass(frozen=True, slots=True)
class Allocation:
    node: int
    offset: int  # bytes into the arena
    size: int  # bytes, rounded up to ALIGN
    first: int  # step that writes it (-1: inputs, written before the run)
    last: int  # last step that reads it (len(graph): an output, read after the run)
    scratch: bool = False  # a kernel's temporary, live during its node's step only
    users: tuple[int, ...] = ()  # steps that write or read it (for multi-stream checks)

    def overlaps(self, other: Allocation) -> bool:
        """True if the two share a byte while both are live."""
        if not self.size or not other.size:
            return False
        bytes_meet = (
            self.offset < other.offset + other.size and other.offset < self.offset + self.size
        )
        # `b` may take `a`'s bytes at the very step `a` dies only if `b` is written later;
        # a node's result is placed before its inputs are freed, so equal steps conflict.
        live_meet = self.first <= other.last and other.first <= self.last
        return bytes_meet and live_meet


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    allocations: tuple[Allocation, ...]
    arena_bytes: int  # the arena's size: the peak of this plan
    max_live_bytes: int  # the most bytes live at one step: no plan can use less
    total_bytes: int  # what the arena would need without any reuse
    alignment: int = ALIGN

    def to_dict(self) -> dict[str, object]:
        """Plain data for JSON: the plan's totals and one record per allocation."""
        return {
            "arena_bytes": self.arena_bytes,
            "max_live_bytes": self.max_live_bytes,
            "total_bytes": self.total_bytes,
            "alignment": self.alignment,
            "allocations": [
                {
                    "node": a.node,
                    "offset": a.offset,
                    "size": a.size,
                    "first": a.first,
                    "last": a.last,
                }
                for a in self.allocations
            ],
        }

    def offset_of(self) -> dict[int, int]:
        """Arena offset of each node's value."""
        return {a.node: a.offset for a in self.allocations if not a.scratch}

    def scratch_of(self) -> dict[int, tuple[int, int]]:
        """(offset, size) of each node's scratch memory, for nodes that asked for some."""
        return {a.node: (a.offset, a.size) for a in self.allocations if a.scratch}

    def validate(self, graph: Graph, schedule: Schedule | None = None) -> None:
        """Raise ``AssertionError`` if two simultaneously live values share bytes; with a
        multi-stream ``schedule``, also if bytes pass to a writer that some reader of their
        previous value, on another stream, may not have finished with."""
        want = set(arena_nodes(graph))
        have = {a.node for a in self.allocations if not a.scratch}
        assert want == have, f"plan covers {sorted(have ^ want)} wrongly"
        by_offset = sorted(self.allocations, key=lambda a: a.offset)
        for i, a in enumerate(by_offset):
            assert a.offset % self.alignment == 0, f"node {a.node} at unaligned offset {a.offset}"
            assert a.offset + a.size <= self.arena_bytes, f"node {a.node} runs past the arena"
            for b in by_offset[i + 1 :]:
                if b.offset >= a.offset + a.size:
                    break
                assert not a.overlaps(b), (
                    f"nodes {a.node} and {b.node} share bytes while both are live"
                )
                if schedule is not None and a.size and b.size:
                    early, late = (a, b) if a.last < b.first else (b, a)
                    for r in early.users:
                        assert late.first >= 0 and schedule.done_before(late.first, r), (
                            f"node {late.node} (step %{late.first}) reuses the bytes of node "
                            f"{early.node} while step %{r} on another stream may still use them"
                        )
        assert self.max_live_bytes <= self.arena_bytes <= self.total_bytes

    def __str__(self) -> str:
        lines = [
            f"MemoryPlan: arena {self.arena_bytes:,} B (max live {self.max_live_bytes:,} B, "
            f"{self.total_bytes:,} B without reuse), {len(self.allocations)} allocations"
        ]
        for a in self.allocations:
            lines.append(
                f"  %{a.node:<5} @ {a.offset:>12,}  {a.size:>12,} B  live {a.first}..{a.last}"
            )
        return "\n".join(lines)


def arena_nodes(graph: Graph) -> list[int]:
    """Ids of the nodes whose values live in the arena."""
    return [n.id for n in graph.nodes if n.op is Op.INPUT or not (n.is_leaf or n.op in ALIAS_OPS)]


def _aligned(n: int, alignment: int = ALIGN) -> int:
    return -(-n // alignment) * alignment


# Long by design: one best-fit allocator over the steps, its free list shared by the small
# take/give helpers inside; split apart, the list and the schedule rule would be passed around.
def plan(
    graph: Graph,
    scratch: Mapping[int, int] | None = None,
    *,
    reuse: bool = True,
    steps: Sequence[int] | None = None,
    schedule: Schedule | None = None,
    early: Collection[int] = (),
    alignment: int = ALIGN,
) -> MemoryPlan:
    """Place every arena value so that no two live ones share bytes; see the module doc.

    ``scratch`` maps node ids to bytes of temporary memory their kernel needs (a backend's
    request, e.g. a cast of a matrix product's input); it is live during that step only.
    ``reuse=False`` gives every value bytes of its own: every intermediate survives the run,
    for debugging and profiling.
    ``steps`` gives the step each node runs at when that is not its own id: the members of a
    fused group (``engine.passes.fusion.step_of``) all run at their anchor, so their inputs live to
    it and their results are all placed at it.
    ``early``: computed nodes whose values are written before the run like inputs (rows the
    host gathers from a table kept in host memory). ``alignment``: of every offset and size
    (the device spec's).
    ``schedule`` (``engine.passes.scheduler``, built with the same steps): bytes freed by a value
    go to a later writer only if every step that used that value is known complete when the writer
    starts, on whichever stream it ran.
    """
    n_steps = len(graph.nodes)
    at = list(steps) if steps is not None else [n.id for n in graph.nodes]
    if len(at) != n_steps or any(
        not n.id <= s < n_steps for n, s in zip(graph.nodes, at, strict=False)
    ):
        raise ValueError("steps must give each node a step at or after its own id")
    last = list(at)  # last step reading each storage root
    users: dict[int, set[int]] = {}  # storage root -> steps that write or read it
    for n in graph.nodes:
        for s in n.srcs:
            root = graph.nodes[s].base
            last[root] = max(last[root], at[n.id])
            if n.op not in VIEW_OPS:  # a view reads nothing; its readers do
                users.setdefault(root, set()).add(at[n.id])
    for o in graph.outputs:
        last[graph.nodes[o].base] = n_steps

    # keys: node id for values, -1 - node id for scratch (so both fit one table)
    roots: list[int] = arena_nodes(graph)
    first = {i: (-1 if graph.nodes[i].op is Op.INPUT or i in early else at[i]) for i in roots}
    size = {i: _aligned(graph.nodes[i].nbytes, alignment) for i in roots}
    used = {i: users.get(i, set()) | ({at[i]} if first[i] >= 0 else set()) for i in roots}
    for i, nbytes in (scratch or {}).items():
        if nbytes > 0:
            key = -1 - i
            roots.append(key)
            first[key], size[key] = at[i], _aligned(nbytes, alignment)
            used[key] = {at[i]}
    lasts = {i: (last[i] if i >= 0 else at[-1 - i]) for i in roots}
    frees: dict[int, list[int]] = {}
    for i in roots:
        frees.setdefault(lasts[i], []).append(i)

    # free blocks: (offset, size, steps that used the bytes last); with a schedule a block goes
    # only to a writer that those steps are known to have finished before
    free: list[tuple[int, int, frozenset[int]]] = []
    top = 0
    offsets: dict[int, int] = {}
    live = max_live = 0

    def usable(block: tuple[int, int, frozenset[int]], step: int) -> bool:
        if schedule is None or not block[2]:
            return True
        return step >= 0 and all(schedule.done_before(step, u) for u in block[2])

    def take(nbytes: int, step: int) -> int:
        nonlocal top
        best = None
        for j, blk in enumerate(free):
            if blk[1] >= nbytes and (best is None or blk[1] < free[best][1]) and usable(blk, step):
                best = j
        if best is None:
            tail = free[-1] if free else None
            if tail is not None and tail[0] + tail[1] == top and usable(tail, step):
                off = free.pop()[0]  # grow the arena from a free tail
            else:
                off = top
            top = off + nbytes
            return off
        off, sz, who = free[best]
        if sz == nbytes:
            free.pop(best)
        else:
            free[best] = (off + nbytes, sz - nbytes, who)
        return off

    def give(off: int, nbytes: int, who: frozenset[int]) -> None:
        free.append((off, nbytes, who))
        free.sort(key=lambda b: b[0])
        merged: list[tuple[int, int, frozenset[int]]] = []
        for o, sz, w in free:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + sz, merged[-1][2] | w)
            else:
                merged.append((o, sz, w))
        free[:] = merged

    by_step: dict[int, list[int]] = {}
    for i in roots:
        by_step.setdefault(first[i], []).append(i)
    for step in range(-1, n_steps + 1):
        for i in by_step.get(step, ()):
            offsets[i] = take(size[i], step) if size[i] else 0
            live += size[i]
        max_live = max(max_live, live)
        for i in frees.get(step, ()):
            if size[i] and reuse:
                give(offsets[i], size[i], frozenset(used[i]))
            live -= size[i]

    allocs = tuple(
        Allocation(
            i if i >= 0 else -1 - i,
            offsets[i],
            size[i],
            first[i],
            lasts[i],
            i < 0,
            tuple(sorted(used[i])),
        )
        for i in roots
    )
    return MemoryPlan(allocs, top, max_live, sum(size.values()), alignment)
