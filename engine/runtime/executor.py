"""Run a step plan on a backend: everything bound at construction, one flat loop per run.

    ex = Executor(step_plan, weights, backend="numpy")     # engine.passes.plans.StepPlan
    ex = Executor(graph, weights, options=Options(streams=2))   # a bare graph, planned here
    logits, = ex.run({"tokens": ids, "pos": pos})

Construction allocates the plan's arena, binds weights, constants and states, makes every
node's array (views into the arena or into their base), and turns the plan's steps into one
list of prepared operations (``BoundOp``): the input copies, the forks, each step's waits, its
launch (one for a fused group whose kernel the backend has, else one per member), its record
and the ring slots it frees, then the output copies and the joins. ``run`` copies the inputs
in, calls that list in order (or replays its capture) and copies the outputs out: nothing is
looked up, allocated or decided per node per call.

Observers (``engine.runtime.observers``) watch the same loop: a trace (``ex.trace = Trace()``)
times every operation on the device; ``STREAMGRAPH_DEBUG=2`` prints one line per launch with
its time, the way tinygrad's DEBUG does. While one watches, runs are eager (a captured CUDA
graph cannot be timed kernel by kernel); a capture already made replays again once it stops.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends import Backend, get_backend
from backends.base import Quantized, dequantize, on_host
from engine.options import Options
from engine.passes.fusion import Fusion
from engine.passes.steps import StepPlan, plan_graph
from engine.runtime.binding import bind_states, bind_weights, shape_text
from engine.runtime.observers import DebugObserver, Observer, TraceObserver
from engine.runtime.streaming import WeightRing
from engine.views.trace import Trace
from graph.ir import Graph, Node
from graph.ops import ALIAS_OPS, GraphError, Op

__all__ = ["Executor", "BoundOp", "run"]

Array = Any


def _failed(node: Node, e: Exception) -> RuntimeError:
    """A kernel's failure, naming the node it ran for."""
    return RuntimeError(f"{node.op.name} {node.label} {shape_text(node.shape)} failed: {e}")


@dataclass(frozen=True, slots=True)
class BoundOp:
    """One operation of a run, prepared: what to call, and what it is (for observers).

    ``kind``: copy in, fork, ring fork, ring start, ready, wait, launch, record, free, copy out,
    join, ring end. ``step``: the plan's step index (launches, waits, records, ready, free);
    ``node``: a launch's node; ``detail``: a wait's producer step node, a ready/free's fetch, a
    launch's fused group (None for one node), a copy's bytes, a fork/join's stream index."""

    fn: Callable[[], None]
    kind: str
    stream: Any
    step: int | None = None
    node: Node | None = None
    detail: Any = None


class Executor:
    """A step plan bound to a backend, its weights and its states, ready to run many times."""

    def __init__(
        self,
        plan: StepPlan | Graph,
        weights: Mapping[str, Any],
        backend: str | Backend = "numpy",
        states: Mapping[str, Array] | None = None,
        *,
        options: Options | None = None,
        ring: WeightRing | None = None,
        trace: Trace | None = None,
        trace_label: str | None = None,
    ) -> None:
        be = get_backend(backend)
        if isinstance(plan, Graph):
            plan = plan_graph(plan, be.spec, options)
        elif options is not None:
            raise GraphError("options apply when a bare graph is planned; this plan is made")
        if plan.spec != be.spec:
            raise GraphError(
                f"this step plan was made for {plan.spec}; backend {be.name} is {be.spec}: "
                "plan again for it"
            )
        if (ring is None) != (plan.ring is None) or (ring is not None and ring.plan != plan.ring):
            raise GraphError(
                "a plan that streams weights runs with the WeightRing of its own RingPlan"
                if plan.ring is not None
                else "this plan streams no weights: bind it without a ring"
            )
        self.plan, self.graph, self.mode, self.backend, self.ring = (
            plan,
            plan.graph,
            plan.mode,
            be,
            ring,
        )
        d = plan.decisions
        self.fusions, self.schedule = d.fusions, d.schedule
        be.check_fits(plan.arena_bytes, f"the arena of a {len(plan.graph)}-node graph")
        self.arena = be.alloc(plan.arena_bytes)
        self.states: dict[str, Array] = {}
        self.weights: dict[str, Array] = {}
        if ring is not None:
            need = {n.name for n in self.graph.weights}
            self.weights.update({k: v for k, v in ring.arrays.items() if k in need})
        bind_weights(self.graph, self.plan, self.backend, weights, self.weights)
        bind_states(self.graph, self.backend, states or {}, self.states)
        self._arrays = self._make_arrays()
        self._main = be.main_stream()
        self._side = {k: be.stream() for k in plan.side_streams}
        self._events = {s.node: be.event() for s in plan.steps if s.record}
        self.fused: list[Fusion] = []  # the groups that run as one launch
        self._ops = self._bind(weights)
        self._fns = [op.fn for op in self._ops]
        self.n_launches = sum(op.kind == "launch" for op in self._ops)
        """Kernel launches per run (views and leaves cost none)."""
        self._replay: Callable[[], None] | None = None
        self._warmed = False
        self.trace_label = trace_label  # names this executor's tracks: "CPU backend" (a split)
        debug = int(os.environ.get("STREAMGRAPH_DEBUG", "0") or 0)
        self._default_observer: Observer | None = DebugObserver() if debug >= 2 else None
        self._observer = self._default_observer
        self._observed: list[Callable[[], None]] | None = None  # the ops wrapped for it
        self._trace: Trace | None = None
        self.trace = trace

    # -- binding -------------------------------------------------------------------------------
    def _make_arrays(self) -> list[Array]:
        """Every node's array: weights, states and constants bound, views of their base, the
        rest at their planned arena offsets."""
        be, nodes = self.backend, self.graph.nodes
        offsets = self.plan.decisions.plan.offset_of()
        arrays: list[Array] = [None] * len(nodes)
        storage: dict[int, Array] = {}  # storage root id -> flat byte buffer
        for n in nodes:
            if n.op is Op.WEIGHT:
                arrays[n.id] = self.weights.get(n.name)  # None: a host table, gathered there
            elif n.op is Op.STATE:
                arrays[n.id] = self.states[n.name]
            elif n.op is Op.CONSTANT:
                host = np.frombuffer(n.params.data, dtype=n.dtype.numpy.newbyteorder("<"))  # type: ignore[union-attr]
                arrays[n.id] = be.from_host(host.astype(n.dtype.numpy).reshape(n.shape))
            elif n.op in ALIAS_OPS:
                base = nodes[n.base]
                if n.base not in storage:
                    storage[n.base] = be.byte_buffer(arrays[n.base])
                arrays[n.id] = be.view(
                    storage[n.base], n.offset * base.dtype.itemsize, n.shape, n.dtype, n.strides
                )
            else:
                arrays[n.id] = be.view(self.arena, offsets[n.id], n.shape, n.dtype, n.strides)
        return arrays

    def _stream(self, k: int) -> Any:
        return self._side.get(k, self._main)

    def _bind(self, weights: Mapping[str, Any]) -> list[BoundOp]:
        """The plan as one list of prepared operations (see ``BoundOp``)."""
        plan, be, main, ring = self.plan, self.backend, self._main, self.ring
        ops = [self._bind_inputs(weights)]
        fork = be.event() if self._side else None
        if fork is not None:
            ops.append(BoundOp(functools.partial(fork.record, main), "fork", main))
            for k, st in self._side.items():
                ops.append(BoundOp(functools.partial(fork.wait, st), "fork", st, detail=k))
        if ring is not None:
            ops.append(BoundOp(functools.partial(ring.fork, main), "ring fork", ring.copy_stream))
            start = functools.partial(ring.start, plan.free_first)
            ops.append(BoundOp(start, "ring start", ring.copy_stream))
        group_at = {f.anchor: f for f in self.fusions}
        for i, s in enumerate(plan.steps):
            st = self._stream(s.stream)
            for j in s.ready:
                assert ring is not None
                ops.append(
                    BoundOp(functools.partial(ring.wait_ready, j), "ready", main, i, detail=j)
                )
            for w in s.waits:
                wait = functools.partial(self._events[w].wait, st)
                ops.append(BoundOp(wait, "wait", st, i, detail=w))
            ops += self._bind_launches(i, s.members, group_at.get(s.node), st)
            if s.record:
                record = functools.partial(self._events[s.node].record, st)
                ops.append(BoundOp(record, "record", st, i, self.graph.nodes[s.node]))
            for j in s.free:
                assert ring is not None
                ops.append(BoundOp(functools.partial(ring.free, j), "free", main, i, detail=j))
        ops += self._bind_outputs()
        return ops

    def _bind_inputs(self, weights: Mapping[str, Any]) -> BoundOp:
        """The inputs' staging buffers and one operation that copies them all in (with the
        rows gathered from host tables); the copies are launches like the kernels', so a
        captured run moves its own inputs in (one replay per step)."""
        be, nodes, arrays = self.backend, self.graph.nodes, self._arrays
        self._inputs = {
            nodes[i].name: (nodes[i], *be.input_stage(arrays[i])) for i in self.plan.inputs
        }
        self._input_names = frozenset(self._inputs)
        self._gather_stages = []
        for g, t, idx in self.plan.gathers:
            stage, copy = be.input_stage(arrays[g])
            table = weights[nodes[t].name]
            if not on_host(table):
                raise GraphError(
                    f"host table {nodes[t].name} must be in host memory: a NumPy array or "
                    "quantized blocks over one"
                )
            self._gather_stages.append((stage, table, nodes[idx].name, copy))
        copies = [copy for _, _, copy in self._inputs.values()]
        copies += [copy for *_, copy in self._gather_stages]
        nbytes = sum(n.nbytes for n, *_ in self._inputs.values())
        nbytes += sum(stage.nbytes for stage, *_ in self._gather_stages)
        return BoundOp(_all(copies), "copy in", self._main, detail=nbytes)

    def _bind_launches(
        self, i: int, members: tuple[int, ...], group: Fusion | None, stream: Any
    ) -> list[BoundOp]:
        """A step's launches: its group's one kernel where the backend has it, else each
        member's own (the backend may refuse a group whose layout its kernel does not take)."""
        be, nodes, arrays = self.backend, self.graph.nodes, self._arrays
        scratch = {m: self.arena[off : off + size] for m, off, size in self.plan.steps[i].scratch}
        if group is not None and group.pattern in be.spec.fused_patterns:
            launch = be.compile_fused(group, self.graph, arrays, scratch, stream)
            if launch is not None:
                self.fused.append(group)
                return [BoundOp(launch, "launch", stream, i, nodes[group.anchor], group)]
        out = []
        for m in members:
            n = nodes[m]
            srcs = tuple(arrays[s] for s in n.srcs)
            fixed = tuple(nodes[s].op in (Op.WEIGHT, Op.CONSTANT) for s in n.srcs)
            launch = be.compile(n, arrays[m], srcs, scratch.get(m), fixed, stream)
            out.append(BoundOp(launch, "launch", stream, i, n))
        return out

    def _bind_outputs(self) -> list[BoundOp]:
        """Each output copied out on its producer's stream; every other stream then joins the
        main one; the ring's copy stream joins it too; then the main stream's outputs."""
        be, main, arrays = self.backend, self._main, self._arrays
        by_stream: dict[int, list[Callable[[], None]]] = {}
        nbytes: dict[int, int] = {}
        self._outputs = []
        for o, k in self.plan.outputs:
            host, copy = (
                be.output_stage(arrays[o], self._side[k]) if k else be.output_stage(arrays[o])
            )
            self._outputs.append((host, copy))
            by_stream.setdefault(k, []).append(copy)
            nbytes[k] = nbytes.get(k, 0) + host.nbytes
        ops = []
        for k, st in self._side.items():
            if by_stream.get(k):
                ops.append(BoundOp(_all(by_stream[k]), "copy out", st, detail=nbytes[k]))
            join = be.event()
            ops.append(BoundOp(_record_wait(join, st, main), "join", main, detail=k))
        if self.ring is not None:
            ops.append(BoundOp(self.ring.end, "ring end", main))
        ops.append(BoundOp(_all(by_stream.get(0, [])), "copy out", main, detail=nbytes.get(0, 0)))
        return ops

    # -- running -------------------------------------------------------------------------------
    def set_inputs(self, inputs: Mapping[str, Any]) -> None:
        extra = inputs.keys() - self._input_names
        if extra:
            raise GraphError(
                f"unknown input(s) {sorted(extra)}; the graph takes {sorted(self._inputs)}"
            )
        for name, (node, host, _) in self._inputs.items():
            if name not in inputs:
                raise GraphError(f"missing input {name} {shape_text(node.shape)} {node.dtype.name}")
            value = inputs[name]
            shape = tuple(np.shape(value))
            if shape != node.shape:
                raise GraphError(
                    f"input {name} has shape {shape_text(shape)}, "
                    f"the graph expects {shape_text(node.shape)}"
                )
            host[...] = np.asarray(value)
        for stage, table, idx_name, _ in self._gather_stages:
            idx = np.asarray(inputs[idx_name]).reshape(-1)
            n_rows = table.shape[0]
            if idx.size and (idx.min() < 0 or idx.max() >= n_rows):
                raise GraphError(f"row index out of range 0..{n_rows - 1} for the host table")
            rows = dequantize(table, idx) if isinstance(table, Quantized) else table[idx]
            stage[...] = rows.reshape(stage.shape)

    def run(self, inputs: Mapping[str, Any], copy: bool = True) -> list[np.ndarray]:
        """Run once; returns host copies of the outputs in the graph's output order.

        In ``graph`` mode the first run is eager (kernels compile, libraries initialise), the
        second captures the whole forward pass, and every later run replays the capture.
        ``copy=False`` returns the staging buffers themselves, which the next run overwrites.
        While an observer watches, every run is eager (see ``_run_observed``).
        """
        if self._observer is not None:
            return self._run_observed(inputs, copy)
        self.set_inputs(inputs)
        if self.ring is not None:
            self.ring.settle(self._main)
        if self._replay is not None:
            self._replay()
        elif self.mode == "graph" and self._warmed:
            self._replay = self.backend.capture(self.launch)
            self._replay()
        else:
            self.launch()
            self._warmed = True
        self._wait()
        return [host.copy() if copy else host for host, _ in self._outputs]

    def launch(self) -> None:
        """Issue every operation once (inputs must already be set)."""
        self._loop(self._fns)

    def _loop(self, fns: list[Callable[[], None]]) -> None:
        """The one launch loop: eager runs, captures and observed runs all go through it."""
        i = 0
        try:
            for i, fn in enumerate(fns):  # noqa: B007
                fn()
        except Exception as e:
            node = self._ops[i].node
            if node is None:
                raise
            raise _failed(node, e) from e

    def _wait(self) -> None:
        for st in self._side.values():
            st.synchronize()  # (the join already orders them; this surfaces a worker's error)
        if self.ring is not None:
            self.ring.copy_stream.synchronize()
        self.backend.synchronize()  # the staged outputs are complete; the inputs free again

    # -- observers (engine.runtime.observers) -------------------------------------------------
    @property
    def ops(self) -> tuple[BoundOp, ...]:
        """The operations of one run, in issue order."""
        return tuple(self._ops)

    @property
    def observer(self) -> Observer | None:
        return self._observer

    @observer.setter
    def observer(self, observer: Observer | None) -> None:
        """Watch every run with ``observer`` (None: the default, ``STREAMGRAPH_DEBUG``'s)."""
        self._observer = observer if observer is not None else self._default_observer
        self._observed = None

    @property
    def trace(self) -> Trace | None:
        """The trace this executor's runs record into, or None (the default, which costs
        nothing: the traced operations are built only when one is set). While a trace is set
        every run is eager; a streaming executor's ring records its fetches into it too."""
        return self._trace

    @trace.setter
    def trace(self, trace: Trace | None) -> None:
        self._trace = trace
        self.observer = TraceObserver(trace) if trace is not None else None
        if self.ring is not None:
            self.ring.trace = trace

    def _run_observed(self, inputs: Mapping[str, Any], copy: bool) -> list[np.ndarray]:
        """``run`` with every operation wrapped by the observer, eagerly."""
        obs = self._observer
        assert obs is not None
        if self._observed is None:
            self._observed = [obs.wrap(self, op) for op in self._ops]
        perf = time.perf_counter
        t0 = perf()
        obs.start(self)
        try:
            self.set_inputs(inputs)
            obs.phase(self, "set inputs", t0, perf())
            if self.ring is not None and self.ring.settle(self._main):
                obs.primed(self)
            self._loop(self._observed)
            t1 = perf()
            self._wait()
            obs.phase(self, "synchronize", t1, perf())
            outs = [host.copy() if copy else host for host, _ in self._outputs]
            obs.finish(self, t0, perf())
        except BaseException:
            obs.fail(self)
            raise
        self._warmed = True
        return outs

    @property
    def streams(self) -> dict[int, Any]:
        """The backend stream of each stream index the plan uses (0: the main one)."""
        return {0: self._main, **self._side}

    @property
    def tokens_per_run(self) -> int | None:
        """Tokens one run takes (the ``tokens`` input's length), None for a graph without."""
        entry = self._inputs.get("tokens")
        return None if entry is None else entry[0].numel

    @property
    def input_names(self) -> frozenset[str]:
        """Inputs this graph reads (dead-code elimination may have dropped some a builder made)."""
        return self._input_names

    def array(self, node: int | str) -> Array:
        """The backend array of a node (valid until the next run overwrites it)."""
        return self._arrays[self.graph[node].id]


def _all(fns: list[Callable[[], None]]) -> Callable[[], None]:
    """One operation that calls ``fns`` in order."""

    def all_of() -> None:
        for fn in fns:
            fn()

    return all_of


def _record_wait(event: Any, producer: Any, consumer: Any) -> Callable[[], None]:
    """``consumer`` waits until ``producer`` reaches this point."""

    def join() -> None:
        event.record(producer)
        event.wait(consumer)

    return join


def run(
    graph: Graph,
    inputs: Mapping[str, Any],
    weights: Mapping[str, Any],
    backend: str | Backend = "numpy",
    states: Mapping[str, Array] | None = None,
) -> list[np.ndarray]:
    """Build an ``Executor`` and run it once: the one-call way to evaluate a graph."""
    return Executor(graph, weights, backend, states).run(inputs)
