"""What a graph's layers weigh, per layer tag: the tallies the offload pass places and times by.

layer_bytes(graph)        # {-1: embedding bytes, 0..n-1: each block's, n: the head's}
layer_type_bytes(graph)   # the same split by storage type (each type computes at its rate)
layer_host_bytes(graph)   # as the CPU backend computes them (f32)
layer_copies(graph)       # weight matrices a layer's fetch copies
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from graph.ir import Graph, Node

__all__ = ["layer_bytes", "layer_type_bytes", "layer_host_bytes", "layer_copies"]


def _matrices(graph: Graph) -> Iterator[tuple[int, Node]]:
    """Each weight matrix with its layer tag (-1 embedding, 0..n-1 blocks, n the head). Norm
    vectors (a few KiB a layer) are left out: they always stay resident
    (``engine.runtime.streaming``)."""
    for n in graph.weights:
        if len(n.shape) >= 2:
            yield (n.layer if n.layer is not None else 0), n


def _tally(graph: Graph, value: Callable[[Node], int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for layer, n in _matrices(graph):
        out[layer] = out.get(layer, 0) + value(n)
    return out


def layer_bytes(graph: Graph) -> dict[int, int]:
    """Bytes of weight matrices per layer tag (``_matrices``)."""
    return _tally(graph, lambda n: n.nbytes)


def layer_host_bytes(graph: Graph) -> dict[int, int]:
    """Bytes of weight matrices per layer tag as the CPU backend computes with them: f32 (a
    session widens a host layer's 16-bit matrices once, at load; NumPy's products would widen
    them at every call)."""
    return _tally(graph, lambda n: n.numel * 4)


def layer_copies(graph: Graph) -> dict[int, int]:
    """Weight matrices per layer tag: the copies a fetch of the layer makes."""
    return _tally(graph, lambda n: 1)


def layer_type_bytes(graph: Graph) -> dict[int, dict[str, int]]:
    """Bytes of weight matrices per layer tag and storage type (``layer_bytes`` split by type):
    what ``Costs.layer_s`` charges a layer's compute by, each type at its own rate."""
    out: dict[int, dict[str, int]] = {}
    for layer, n in _matrices(graph):
        by_type = out.setdefault(layer, {})
        by_type[n.dtype.name] = by_type.get(n.dtype.name, 0) + n.nbytes
    return out
