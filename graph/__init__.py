"""The IR: dtypes, the ``Op`` vocabulary, nodes and graphs, the builder, JSON and model builders.

Imports nothing else of ours and no GPU library: every pass and tool can read a graph anywhere.

    from graph import GraphBuilder, f32
    g = GraphBuilder()
    x = g.input("x", (4, 64), f32)
    w = g.weight("w", (128, 64), f32, layer=0)
    graph = g.build(outputs=[g.mul_mat(w, x)])
    print(graph)
"""

from graph.builder import GraphBuilder, Tensor
from graph.dtypes import DTYPES, DType, bf16, dtype_of, f16, f32, i32
from graph.ir import Graph, Node
from graph.ops import LAYER_INPUT, GraphError, Op, RopeMode
from graph.serialize import from_json, to_json

__all__ = [
    "GraphBuilder",
    "Tensor",
    "Graph",
    "Node",
    "Op",
    "RopeMode",
    "GraphError",
    "LAYER_INPUT",
    "DType",
    "DTYPES",
    "dtype_of",
    "f32",
    "f16",
    "bf16",
    "i32",
    "to_json",
    "from_json",
]
