"""Run a graph on a backend: all planning at construction, a flat loop of kernel calls per run.

    ex = Executor(graph, weights, backend="numpy")
    logits, = ex.run({"tokens": ids, "pos": pos})

Construction validates the graph, plans memory (``engine.passes.memory``), allocates one arena,
binds weights, constants and states, makes every node's array (views into the arena or into their
base) and turns the graph into a list of ``(kernel, node, out, srcs)`` steps. ``run`` copies the
inputs into their arena slots, walks the steps and copies the outputs out. Nothing is looked up,
allocated or decided per node per call.

The fusion pass (``engine.passes.fusion``) marks chains that one kernel can run; a backend with a
kernel for a group's pattern runs it as one launch at the group's last node, any other runs its
members one by one there. ``fusion=False`` turns the pass off (one launch per node, for comparison).

``STREAMGRAPH_DEBUG=2`` prints one line per node with its time, the way tinygrad's DEBUG does.
``trace=Trace()`` (``engine.views.trace``) records every run's launches, copies and event waits on a
timeline of its streams, timed on the device (``tools.timeline`` draws it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends import COMPUTE_OPS, Backend, get_backend
from engine.passes import fusion as fusion_pass
from engine.passes import memory, offload
from engine.passes.plans import decide, host_gathers
from engine.runtime import streaming
from engine.views.trace import COPY, HOST, PASSES, Recorder, Trace, step_info
from graph.ir import Graph, Node
from graph.ops import ALIAS_OPS, GraphError, Op

__all__ = ["Executor", "run", "MODES"]

MODES = ("eager", "graph")
"""eager: one launch per node per run; graph: the run captured once and replayed."""

Array = Any


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _failed(node: Node, e: Exception) -> RuntimeError:
    """A kernel's failure, naming the node it ran for."""
    return RuntimeError(f"{node.op.name} {node.label} {_shape_text(node.shape)} failed: {e}")


class Executor:
    """A graph bound to a backend, its weights and its states, ready to run many times."""

    def __init__(
        self,
        graph: Graph,
        weights: Mapping[str, Any],
        backend: str | Backend = "numpy",
        states: Mapping[str, Array] | None = None,
        plan: memory.MemoryPlan | None = None,
        mode: str = "eager",
        reuse: bool = True,
        fusion: bool = True,
        streams: int | str = 1,
        stress: float = 0.0,
        placement: offload.Placement | None = None,
        ring: streaming.WeightRing | None = None,
        host_tables: Collection[str] = (),
        trace: Trace | None = None,
        trace_label: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        graph.validate()
        self.graph, self.mode = graph, mode
        self.backend = be = get_backend(backend)
        missing = sorted(
            op.name
            for op in {n.op for n in graph.nodes}
            if op in COMPUTE_OPS and op not in be.kernels
        )
        if missing:
            raise GraphError(f"backend {be.name} has no kernel for {', '.join(sorted(missing))}")
        # tables kept in host memory (the token embedding): the rows a step needs are gathered
        # on the host and copied in with the inputs; the table never reaches the device
        self._gathers = host_gathers(graph, set(host_tables))
        d = decide(graph, be, fusion, streams, mode, reuse, host_tables, plan)
        self.fusions, self.schedule, self.plan = d.fusions, d.schedule, d.plan
        steps = self._step_of = d.steps
        be.check_fits(self.plan.arena_bytes, f"the arena of a {len(graph)}-node graph")
        self.arena = be.alloc(self.plan.arena_bytes)
        self.states: dict[str, Array] = {}
        self.weights: dict[str, Array] = {}
        # streamed layers: their weights live in a ring of slots fed by a copy stream
        self.ring: streaming.WeightRing | None = ring
        if ring is None and placement is not None and placement.streamed_bytes:
            copy_stream = be.stream(**({"stress": stress, "seed": 99} if stress else {}))
            self.ring = streaming.WeightRing(be, graph, placement, weights, copy_stream)
        if self.ring is not None:
            if self.schedule is not None:
                raise GraphError("weight streaming runs the compute on one stream: use streams=1")
            need = {n.name for n in graph.weights}
            self.weights.update({k: v for k, v in self.ring.arrays.items() if k in need})
        self._bind_weights(weights)
        self._bind_states(states or {})

        nodes = graph.nodes
        offsets = self.plan.offset_of()
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
        self._arrays = arrays

        scratch_at = self.plan.scratch_of()

        sched = self.schedule
        self._main = be.main_stream()
        self._side: dict[int, Any] = {}  # stream index -> backend stream
        if sched is not None:
            for k in sorted({sched.stream[u] for u in sched.steps} - {0}):
                opts = {"stress": stress, "seed": k} if stress else {}
                self._side[k] = be.stream(**opts)
        events = self._events = {u: be.event() for u in sched.records} if sched else {}

        def stream_of(unit: int) -> Any:
            k = sched.stream[unit] if sched is not None else 0
            return self._side.get(k, self._main)

        def one(n: Node, stream: Any) -> tuple[Callable[[], None], Node]:
            tmp = None
            if n.id in scratch_at:
                off, size = scratch_at[n.id]
                tmp = self.arena[off : off + size]  # a flat byte range of the arena
            srcs = tuple(arrays[s] for s in n.srcs)
            fixed = tuple(nodes[s].op in (Op.WEIGHT, Op.CONSTANT) for s in n.srcs)
            return be.compile(n, arrays[n.id], srcs, tmp, fixed, stream), n

        group_at = {f.anchor: f for f in self.fusions}
        in_group = {i for f in self.fusions for i in f.nodes}
        self._steps: list[tuple[Callable[[], None], Node]] = []
        self._sync: dict[int, tuple[Any, list[Any], Any]] = {}  # step -> stream, waits, record
        self.fused: list[fusion_pass.Fusion] = []  # the groups that run as one launch
        gathered = {g for g, _, _ in self._gathers}
        for n in nodes:
            if n.op not in be.kernels or (n.id in in_group and n.id not in group_at):
                continue
            if n.id in gathered:
                continue
            st = stream_of(n.id)
            if sched is not None:
                waits = [events[w] for w in sched.waits.get(n.id, ())]
                self._sync[len(self._steps)] = (st, waits, events.get(n.id))
            f = group_at.get(n.id)
            if f is None:
                self._steps.append(one(n, st))
                continue
            tmps = {}
            for i in f.nodes:
                if i in scratch_at:
                    off, size = scratch_at[i]
                    tmps[i] = self.arena[off : off + size]
            launch = be.compile_fused(f, graph, arrays, tmps, st)
            if launch is not None:
                self._steps.append((launch, n))
                self.fused.append(f)
            else:
                first = len(self._steps)
                self._steps.extend(one(nodes[i], st) for i in f.nodes)
                if first in self._sync:  # the group's record goes after its last member
                    st_, waits_, rec = self._sync.pop(first)
                    self._sync[first] = (st_, waits_, None)
                    self._sync[len(self._steps) - 1] = (st_, [], rec)
        if self.ring is not None:
            members = [
                list(f.nodes)
                if (f := group_at.get(n.id)) is not None and f in self.fused
                else [n.id]
                for _, n in self._steps
            ]
            self._ring_steps = streaming.RingSteps(self.ring, graph, members, be, self._main)
        # the fork (every other stream waits for the inputs, copied on the main stream) and the
        # join (the main stream waits for every other before the outputs are copied out)
        self._fork = be.event() if self._side else None
        self._joins = {k: be.event() for k in self._side}
        # host staging of inputs and outputs; their copies are launches like the kernels', so a
        # captured run moves its own inputs in and outputs out (one replay per step)
        self._inputs = {n.name: (n, *be.input_stage(arrays[n.id])) for n in graph.inputs}
        # with streams, an output is copied out on its producer's stream, before the join
        out_streams = []
        for o in graph.outputs:
            root = nodes[nodes[o].base]
            k = sched.stream[steps[root.id]] if sched is not None and not root.is_leaf else 0
            out_streams.append(k if k in self._side else 0)
        self._outputs = [
            be.output_stage(arrays[o], self._side.get(k)) if k else be.output_stage(arrays[o])
            for o, k in zip(graph.outputs, out_streams, strict=True)
        ]
        self._gather_stages = []
        for g, t, idx in self._gathers:
            stage, copy = be.input_stage(arrays[g])
            table = weights[nodes[t].name]
            if not isinstance(table, np.ndarray):
                raise GraphError(f"host table {nodes[t].name} must be a NumPy array")
            self._gather_stages.append((stage, table, nodes[idx].name, copy))
        self._copies_in = [copy for _, _, copy in self._inputs.values()]
        self._copies_in += [copy for *_, copy in self._gather_stages]
        self._input_names = frozenset(self._inputs)
        self._copies_out = [
            c for (_, c), k in zip(self._outputs, out_streams, strict=True) if not k
        ]
        self._side_out: dict[int, list[Callable[[], None]]] = {}
        for (_, c), k in zip(self._outputs, out_streams, strict=True):
            if k:
                self._side_out.setdefault(k, []).append(c)
        self._debug = int(os.environ.get("STREAMGRAPH_DEBUG", "0") or 0)
        self._replay: Callable[[], None] | None = None
        self._warmed = False
        self.trace_label = trace_label  # names this executor's tracks: "CPU backend" (a split)
        self._trace: Trace | None = None
        self._traced: _Traced | None = None  # the wrapped launches of the current trace
        self.trace = trace

    # -- binding -------------------------------------------------------------------------------
    def _bind_weights(self, weights: Mapping[str, Any]) -> None:
        host = {self.graph.nodes[t].name for _, t, _ in self._gathers}
        need = [n for n in self.graph.weights if n.name not in self.weights and n.name not in host]
        absent = [n.name for n in need if n.name not in weights]
        if absent:
            shown = ", ".join(absent[:6]) + (
                f" and {len(absent) - 6} more" if len(absent) > 6 else ""
            )
            raise GraphError(f"missing {len(absent)} weight(s): {shown}")
        for n in need:
            w = weights[n.name]
            shape = tuple(getattr(w, "shape", ()))
            if shape != n.shape:
                raise GraphError(
                    f"weight {n.name} has shape {_shape_text(shape)}, "
                    f"the graph expects {_shape_text(n.shape)}"
                )
            if n.dtype.is_quantized:
                raise GraphError(
                    f"weight {n.name} is {n.dtype.name}: backend {self.backend.name} computes on "
                    "f32/f16/bf16; dequantize it at load"
                )
            host = w if isinstance(w, np.ndarray) else None
            if host is not None:
                if host.dtype != n.dtype.numpy or not host.flags.c_contiguous:
                    host = np.ascontiguousarray(host.astype(n.dtype.numpy))
                self.weights[n.name] = self.backend.from_host(host)
            else:  # already a backend array
                if str(w.dtype) != str(n.dtype.numpy):
                    raise GraphError(
                        f"weight {n.name} is {w.dtype}, the graph expects {n.dtype.name}"
                    )
                self.weights[n.name] = w

    def _bind_states(self, states: Mapping[str, Array]) -> None:
        for n in self.graph.states:
            s = states.get(n.name)
            if s is None:
                s = self.backend.view(self.backend.alloc(n.nbytes), 0, n.shape, n.dtype, n.strides)
            elif tuple(s.shape) != n.shape or str(s.dtype) != str(n.dtype.numpy):
                raise GraphError(
                    f"state {n.name} is {_shape_text(s.shape)} {s.dtype}, "
                    f"the graph expects {_shape_text(n.shape)} {n.dtype.name}"
                )
            elif not s.flags.c_contiguous:  # else SET_ROWS would write a copy, not the caller's
                raise GraphError(f"state {n.name} must be C-contiguous: it is written in place")
            self.states[n.name] = s

    # -- running -------------------------------------------------------------------------------
    def set_inputs(self, inputs: Mapping[str, Any]) -> None:
        extra = inputs.keys() - self._input_names
        if extra:
            raise GraphError(
                f"unknown input(s) {sorted(extra)}; the graph takes {sorted(self._inputs)}"
            )
        for name, (node, host, _) in self._inputs.items():
            if name not in inputs:
                raise GraphError(
                    f"missing input {name} {_shape_text(node.shape)} {node.dtype.name}"
                )
            value = inputs[name]
            shape = tuple(np.shape(value))
            if shape != node.shape:
                raise GraphError(
                    f"input {name} has shape {_shape_text(shape)}, "
                    f"the graph expects {_shape_text(node.shape)}"
                )
            host[...] = np.asarray(value)
        for stage, table, idx_name, _ in self._gather_stages:
            idx = np.asarray(inputs[idx_name]).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= len(table)):
                raise GraphError(f"row index out of range 0..{len(table) - 1} for the host table")
            stage[...] = table[idx].reshape(stage.shape)

    def run(self, inputs: Mapping[str, Any], copy: bool = True) -> list[np.ndarray]:
        """Run once; returns host copies of the outputs in the graph's output order.

        In ``graph`` mode the first run is eager (kernels compile, libraries initialise), the
        second captures the whole forward pass, and every later run replays the capture.
        ``copy=False`` returns the staging buffers themselves, which the next run overwrites.
        While a trace is set every run is eager (see ``_run_traced``).
        """
        if self._trace is not None:
            return self._run_traced(inputs, copy)
        self.set_inputs(inputs)
        if self.ring is not None:
            self.ring.settle(self._main)
        if self._replay is not None:
            self._replay()
        elif self.mode == "graph" and self._warmed and self._debug < 2:
            self._replay = self.backend.capture(self.launch)
            self._replay()
        else:
            self.launch()
            self._warmed = True
        self._wait()
        return [host.copy() if copy else host for host, _ in self._outputs]

    def _wait(self) -> None:
        for st in self._side.values():
            st.synchronize()  # (the join already orders them; this surfaces a worker's error)
        if self.ring is not None:
            self.ring.copy_stream.synchronize()
        self.backend.synchronize()  # the staged outputs are complete; the inputs free again

    def launch(self) -> None:
        """Issue every kernel once (inputs must already be set)."""
        if self._debug >= 2 and self.ring is None:
            return self._launch_debug()
        self._issue(self._steps, self._copies_in, self._copies_out, self._side_out)

    def _issue(
        self,
        steps: list[tuple[Callable[[], None], Node]],
        copies_in: list[Callable[[], None]],
        copies_out: list[Callable[[], None]],
        side_out: dict[int, list[Callable[[], None]]],
        rec: Recorder | None = None,
    ) -> None:
        """One run's launches: the executor's own, or their traced wraps (``rec`` set)."""
        for copy in copies_in:
            copy()
        if self._sync:
            return self._launch_streams(steps, copies_out, side_out, rec)
        if self.ring is not None:
            return self._ring_steps.launch(steps, copies_out, _failed, rec)
        i = 0
        try:
            for i, (step, _) in enumerate(steps):  # noqa: B007
                step()
        except Exception as e:
            raise _failed(steps[i][1], e) from e
        for copy in copies_out:
            copy()

    def _launch_streams(
        self,
        steps: list[tuple[Callable[[], None], Node]],
        copies_out: list[Callable[[], None]],
        side_out: dict[int, list[Callable[[], None]]],
        rec: Recorder | None,
    ) -> None:
        """The steps on their streams, with the schedule's waits and records, between the fork
        and the join (``rec``: a traced run, whose fork and join waits are shown too)."""
        main, fork = self._main, self._fork
        if fork is not None:
            fork.record(main)
            for st in self._side.values():
                fork.wait(st)
                if rec is not None:
                    rec.note(st, "wait fork (inputs in)", "wait")
        sync = self._sync
        i = 0
        try:
            for i, (step, _) in enumerate(steps):  # noqa: B007
                entry = sync.get(i)
                if entry is None:
                    step()
                    continue
                st, waits, rec = entry
                for ev in waits:
                    ev.wait(st)
                step()
                if rec is not None:
                    rec.record(st)
        except Exception as e:
            raise _failed(steps[i][1], e) from e
        for k, st in self._side.items():
            for copy in side_out.get(k, ()):
                copy()
            self._joins[k].record(st)
            self._joins[k].wait(main)
            if rec is not None:
                rec.note(main, f"wait join (stream {k})", "wait")
        for copy in copies_out:
            copy()

    def _launch_debug(self) -> None:
        for copy in self._copies_in:
            copy()
        for step, node in self._steps:
            t0 = time.perf_counter()
            try:
                step()
            except Exception as e:
                raise _failed(node, e) from e
            for st in self._side.values():
                st.synchronize()
            self.backend.synchronize()
            dt = (time.perf_counter() - t0) * 1e6
            print(f"{dt:9.1f} us  {node}", flush=True)
        for outs in self._side_out.values():
            for copy in outs:
                copy()
        for st in self._side.values():
            st.synchronize()
        for copy in self._copies_out:
            copy()

    # -- tracing (engine.views.trace) ---------------------------------------------------------
    @property
    def trace(self) -> Trace | None:
        """The trace this executor's runs record into, or None (the default, which costs
        nothing: the traced launches are built only when one is set).

        While a trace is set every run is eager, each launch bracketed by marks on its stream:
        a captured CUDA graph runs as one unit whose kernels cannot be timed one by one, so
        ``graph`` mode pauses (a capture already made replays again once the trace is unset).
        A streaming executor's ring records its fetches into the same trace."""
        return self._trace

    @trace.setter
    def trace(self, trace: Trace | None) -> None:
        self._trace, self._traced = trace, None
        if self.ring is not None:
            self.ring.trace = trace

    def _track(self, k: int) -> str:
        label = self.trace_label
        if label is None:
            return f"stream {k}"
        return label if k == 0 else f"{label} stream {k}"

    def _instrument(self, trace: Trace) -> _Traced:
        """This executor's launches wrapped for ``trace``: each step named by its node (a fused
        group by its pattern) on its stream's track, with the schedule's waits and records."""
        main, sched, nodes = self._main, self.schedule, self.graph.nodes
        tracks = {id(main): self._track(0)}
        tracks.update({id(st): self._track(k) for k, st in self._side.items()})
        if self.ring is not None:
            tracks[id(self.ring.copy_stream)] = COPY
        rec = Recorder(trace, self.backend, tracks)
        fused = {f.anchor: f for f in self.fused}
        producer = {id(ev): u for u, ev in self._events.items()}

        def event(ev: Any) -> str:
            u = producer[id(ev)]
            what = nodes[u].name or f"{nodes[u].op.name} %{u}"
            return f"{what} (stream {sched.stream[u] if sched is not None else 0})"

        steps = []
        for i, (launch, node) in enumerate(self._steps):
            k = sched.stream[self._step_of[node.id]] if sched is not None else 0
            f = fused.get(node.id)
            members = [nodes[m] for m in f.nodes] if f is not None else [node]
            name, args = step_info(self.graph, members, f.pattern if f is not None else None)
            _, waits, record = self._sync.get(i, (None, (), None))
            wrapped = rec.wrap(
                launch,
                self._side.get(k, main),
                name,
                "fused" if f is not None else "kernel",
                args,
                [event(ev) for ev in waits],
                event(record) if record is not None else None,
            )
            steps.append((wrapped, node))
        n_in = sum(n.nbytes for n, *_ in self._inputs.values())
        n_in += sum(stage.nbytes for stage, *_ in self._gather_stages)
        copies_in = rec.bracket(self._copies_in, main, "copy inputs", "copy", {"bytes": n_in})
        out_bytes = {id(c): host.nbytes for host, c in self._outputs}

        def outs(copies: list[Callable[[], None]], st: Any) -> list[Callable[[], None]]:
            n = sum(out_bytes[id(c)] for c in copies)
            return rec.bracket(copies, st, "copy outputs", "copy", {"bytes": n})

        side_out = {k: outs(cs, self._side[k]) for k, cs in self._side_out.items()}
        tokens = self._inputs.get("tokens")
        name = "forward" if tokens is None else f"forward, {tokens[0].numel} token(s)"
        if self.trace_label is not None:
            name += f" on {self.trace_label}"
        return _Traced(trace, rec, steps, copies_in, outs(self._copies_out, main), side_out, name)

    def _run_traced(self, inputs: Mapping[str, Any], copy: bool) -> list[np.ndarray]:
        """``run`` recording into the trace: a new clock, the host's own spans (inputs, issue,
        synchronize), the wrapped launches, and the marks read once the streams are done."""
        trace = self._trace
        assert trace is not None
        t = self._traced
        if t is None or t.trace is not trace:
            t = self._traced = self._instrument(trace)
        perf = time.perf_counter
        t0 = perf()
        trace.start(self.backend)
        try:
            self.set_inputs(inputs)
            trace.host_span(HOST, "set inputs", "issue", t0, perf())
            if self.ring is not None and self.ring.pending:
                self.ring.settle(self._main)
                t.rec.note(self._main, "wait primed fetches", "wait")
            self._issue(t.steps, t.copies_in, t.copies_out, t.side_out, t.rec)
            t1 = perf()
            self._wait()
            trace.host_span(HOST, "synchronize", "sync", t1, perf())
            outs = [host.copy() if copy else host for host, _ in self._outputs]
            trace.host_span(PASSES, t.name, "run", t0, perf(), {"launches": len(t.steps)})
            trace.resolve()
        except BaseException:
            trace.discard()
            raise
        self._warmed = True
        return outs

    @property
    def input_names(self) -> frozenset[str]:
        """Inputs this graph reads (dead-code elimination may have dropped some a builder made)."""
        return self._input_names

    @property
    def n_launches(self) -> int:
        """Kernel launches per run (views and leaves cost none)."""
        return len(self._steps)

    def array(self, node: int | str) -> Array:
        """The backend array of a node (valid until the next run overwrites it)."""
        return self._arrays[self.graph[node].id]


@dataclass
class _Traced:
    """An executor's launches wrapped for one trace (``Executor._instrument``)."""

    trace: Trace
    rec: Recorder
    steps: list[tuple[Callable[[], None], Node]]
    copies_in: list[Callable[[], None]]
    copies_out: list[Callable[[], None]]
    side_out: dict[int, list[Callable[[], None]]]
    name: str


def run(
    graph: Graph,
    inputs: Mapping[str, Any],
    weights: Mapping[str, Any],
    backend: str | Backend = "numpy",
    states: Mapping[str, Array] | None = None,
) -> list[np.ndarray]:
    """Build an ``Executor`` and run it once: the one-call way to evaluate a graph."""
    return Executor(graph, weights, backend, states).run(inputs)
