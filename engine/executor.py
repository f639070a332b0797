"""Run a graph on a backend: all planning at construction, a flat loop of kernel calls per run.

    ex = Executor(graph, weights, backend="numpy")
    logits, = ex.run({"tokens": ids, "pos": pos})

Construction validates the graph, plans memory (``engine.memory``), allocates one arena, binds
weights, constants and states, makes every node's array (views into the arena or into their
base) and turns the graph into a list of ``(kernel, node, out, srcs)`` steps. ``run`` copies the
inputs into their arena slots, walks the steps and copies the outputs out. Nothing is looked up,
allocated or decided per node per call.

The fusion pass (``engine.fusion``) marks chains that one kernel can run; a backend with a kernel
for a group's pattern runs it as one launch at the group's last node, any other runs its members
one by one there. ``fusion=False`` turns the pass off (one launch per node, for comparison).

``STREAMGRAPH_DEBUG=2`` prints one line per node with its time, the way tinygrad's DEBUG does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from backends import COMPUTE_OPS, Backend, get_backend
from engine import fusion as fusion_pass
from engine import memory, offload, scheduler, streaming
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
        scratch = {}
        for n in graph.nodes:
            if n.op in be.kernels:
                nbytes = be.scratch_bytes(n, [graph.nodes[s] for s in n.srcs])
                if nbytes:
                    scratch[n.id] = nbytes
        # a caller's own plan knows nothing of fused groups, so it runs without them
        self.fusions = fusion_pass.find(graph) if fusion and plan is None else []
        steps = fusion_pass.step_of(graph, self.fusions)
        # streams: the scheduler's assignment; a plan of one stream runs without events
        self.schedule: scheduler.Schedule | None = None
        if streams != 1 and plan is None:
            sched = scheduler.schedule(graph, streams, steps, mode)
            if sched.n_streams > 1:
                self.schedule = sched
        # tables kept in host memory (the token embedding): the rows a step needs are gathered
        # on the host and copied in with the inputs; the table never reaches the device
        self._gathers = _host_gathers(graph, set(host_tables))
        self.plan = (
            plan
            if plan is not None
            else memory.plan(
                graph,
                scratch,
                reuse=reuse,
                steps=steps,
                schedule=self.schedule,
                early={g for g, _, _ in self._gathers},
            )
        )
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
        events = {u: be.event() for u in sched.records} if sched is not None else {}

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
        """
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
        for st in self._side.values():
            st.synchronize()  # (the join already orders them; this surfaces a worker's error)
        if self.ring is not None:
            self.ring.copy_stream.synchronize()
        self.backend.synchronize()  # the staged outputs are complete; the inputs free again
        return [host.copy() if copy else host for host, _ in self._outputs]

    def launch(self) -> None:
        """Issue every kernel once (inputs must already be set)."""
        if self._debug >= 2 and self.ring is None:
            return self._launch_debug()
        for copy in self._copies_in:
            copy()
        if self._sync:
            return self._launch_streams()
        if self.ring is not None:
            return self._ring_steps.launch(self._steps, self._copies_out, _failed)
        i = 0
        try:
            for i, (step, _) in enumerate(self._steps):  # noqa: B007
                step()
        except Exception as e:
            raise _failed(self._steps[i][1], e) from e
        for copy in self._copies_out:
            copy()

    def _launch_streams(self) -> None:
        """The steps on their streams, with the schedule's waits and records, between the fork
        and the join."""
        main, fork = self._main, self._fork
        if fork is not None:
            fork.record(main)
            for st in self._side.values():
                fork.wait(st)
        sync = self._sync
        i = 0
        try:
            for i, (step, _) in enumerate(self._steps):  # noqa: B007
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
            raise _failed(self._steps[i][1], e) from e
        for k, st in self._side.items():
            for copy in self._side_out.get(k, ()):
                copy()
            self._joins[k].record(st)
            self._joins[k].wait(main)
        for copy in self._copies_out:
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


def _host_gathers(graph: Graph, tables: set[str]) -> list[tuple[int, int, int]]:
    """(GET_ROWS node, table weight, index input) for the gathers from host-kept tables."""
    out = []
    for n in graph.nodes:
        if n.op is Op.WEIGHT and n.name in tables:
            readers = [graph.nodes[u] for u in graph.consumers[n.id]]
            if any(r.op is not Op.GET_ROWS or r.srcs[0] != n.id for r in readers):
                raise GraphError(f"host table {n.name} is read by more than row gathers")
        if n.op is not Op.GET_ROWS:
            continue
        table, idx = (graph.nodes[s] for s in n.srcs)
        if table.op is Op.WEIGHT and table.name in tables:
            if idx.op is not Op.INPUT:
                raise GraphError(
                    f"{n.label} gathers from host table {table.name} with a computed index; "
                    "only rows picked by an input can be gathered on the host"
                )
            out.append((n.id, table.id, idx.id))
    return out


def run(
    graph: Graph,
    inputs: Mapping[str, Any],
    weights: Mapping[str, Any],
    backend: str | Backend = "numpy",
    states: Mapping[str, Array] | None = None,
) -> list[np.ndarray]:
    """Build an ``Executor`` and run it once: the one-call way to evaluate a graph."""
    return Executor(graph, weights, backend, states).run(inputs)
