"""Weights and states bound to an executor: each checked against the node that names it.

Kept apart from the executor (``engine.runtime.executor``): these are the checks a user's
mistakes meet first (a missing weight, a wrong shape, a block type the backend cannot compute
on, a non-contiguous cache), and each error names the tensor and what the graph expects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from backends import Backend
from backends.base import Quantized
from engine.passes.steps import StepPlan
from graph.ir import Graph
from graph.ops import GraphError

__all__ = ["bind_weights", "bind_states", "shape_text"]


def _types(spec: Any) -> str:
    return ", ".join(("f32", "f16", "bf16", *spec.block_types))


def shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def bind_weights(
    graph: Graph, plan: StepPlan, backend: Backend, weights: Mapping[str, Any], bound: dict
) -> None:
    """Check each weight the graph needs against its node (present, shape, storage type, one
    the backend computes on) and put it in ``bound`` as a backend array: host arrays copied
    over once, backend arrays taken as they are. Weights already in ``bound`` and host tables
    (gathered on the host, ``plan.gathers``) are left alone."""
    host_tables = {graph.nodes[t].name for _, t, _ in plan.gathers}
    need = [n for n in graph.weights if n.name not in bound and n.name not in host_tables]
    absent = [n.name for n in need if n.name not in weights]
    if absent:
        shown = ", ".join(absent[:6]) + (f" and {len(absent) - 6} more" if len(absent) > 6 else "")
        raise GraphError(f"missing {len(absent)} weight(s): {shown}")
    for n in need:
        w = weights[n.name]
        shape = tuple(getattr(w, "shape", ()))
        if shape != n.shape:
            raise GraphError(
                f"weight {n.name} has shape {shape_text(shape)}, "
                f"the graph expects {shape_text(n.shape)}"
            )
        if isinstance(w, Quantized) or n.dtype.is_quantized:
            if not isinstance(w, Quantized) or w.dtype != n.dtype:
                have = w.dtype.name if isinstance(w, Quantized) else str(w.dtype)
                raise GraphError(f"weight {n.name} is {have}, the graph expects {n.dtype.name}")
            if n.dtype.name not in backend.spec.block_types:
                raise GraphError(
                    f"weight {n.name} is {n.dtype.name}, which backend {backend.name} "
                    f"does not compute on (it reads {_types(backend.spec)}); "
                    "dequantize it at load (--dtype f16, bf16 or f32)"
                )
            bound[n.name] = backend.weight_from_host(w)
            continue
        host = w if isinstance(w, np.ndarray) else None
        if host is not None:
            if host.dtype != n.dtype.numpy or not host.flags.c_contiguous:
                host = np.ascontiguousarray(host.astype(n.dtype.numpy))
            bound[n.name] = backend.from_host(host)
        else:  # already a backend array
            if str(w.dtype) != str(n.dtype.numpy):
                raise GraphError(f"weight {n.name} is {w.dtype}, the graph expects {n.dtype.name}")
            bound[n.name] = w


def bind_states(graph: Graph, backend: Backend, states: Mapping[str, Any], bound: dict) -> None:
    """The caller's state arrays (a KV cache) checked against their nodes, or new ones
    allocated, in ``bound``: states are written in place, so a caller's must be contiguous."""
    for n in graph.states:
        s = states.get(n.name)
        if s is None:
            s = backend.view(backend.alloc(n.nbytes), 0, n.shape, n.dtype, n.strides)
        elif tuple(s.shape) != n.shape or str(s.dtype) != str(n.dtype.numpy):
            raise GraphError(
                f"state {n.name} is {shape_text(s.shape)} {s.dtype}, "
                f"the graph expects {shape_text(n.shape)} {n.dtype.name}"
            )
        elif not s.flags.c_contiguous:  # else SET_ROWS would write a copy, not the caller's
            raise GraphError(f"state {n.name} must be C-contiguous: it is written in place")
        bound[n.name] = s
