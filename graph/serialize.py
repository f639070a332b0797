"""JSON (de)serialisation of graphs; ``from_json(to_json(g)) == g`` exactly.

Loading replays every node through the same checks the builder runs, so a file that is
malformed, names an unknown op, reads a node that does not exist (a dangling reference or a
cycle) or disagrees with shape inference raises ``GraphError`` with the node's position.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

from graph.dtypes import DTYPES
from graph.ir import Graph, Node, make_node
from graph.ops import PARAMS, GraphError, Op, Params, RopeMode

__all__ = ["to_dict", "from_dict", "to_json", "from_json", "FORMAT", "VERSION"]

FORMAT = "streamgraph.graph"
VERSION = 1


def _params_to_json(p: Params) -> dict[str, Any] | None:
    if p is None:
        return None
    out: dict[str, Any] = {}
    for f in dataclasses.fields(p):
        v = getattr(p, f.name)
        if isinstance(v, bytes):
            v = base64.b64encode(v).decode("ascii")
        elif isinstance(v, RopeMode):
            v = v.value
        elif hasattr(v, "block_size"):  # a DType
            v = v.name
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def _params_from_json(op: Op, raw: Any, where: str) -> Params:
    cls = PARAMS[op]
    if cls is None:
        if raw is not None:
            raise GraphError(f"{where}: {op.name} takes no params, got {raw!r}")
        return None
    if not isinstance(raw, dict):
        raise GraphError(
            f"{where}: {op.name} needs params {[f.name for f in dataclasses.fields(cls)]}"
        )
    names = {f.name for f in dataclasses.fields(cls)}
    tuples = {f.name for f in dataclasses.fields(cls) if str(f.type).startswith("tuple")}
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    if not required <= raw.keys() or not raw.keys() <= names:
        raise GraphError(f"{where}: {op.name} params must be {sorted(names)}, got {sorted(raw)}")
    vals: dict[str, Any] = {}
    try:
        for k, v in raw.items():
            if k == "data":
                v = base64.b64decode(v, validate=True)
            elif k == "mode":
                v = RopeMode(v)
            elif k == "dtype":
                v = DTYPES[v]
            elif k in tuples:
                if not isinstance(v, list) or not all(
                    isinstance(e, int) and not isinstance(e, bool) for e in v
                ):
                    raise TypeError(f"{k} must be a list of ints")
                v = tuple(v)
            elif k in ("scale", "eps", "base", "freq_scale"):
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise TypeError(f"{k} must be a number")
                v = float(v)
            elif isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{k} must be an int")
            vals[k] = v
        return cls(**vals)
    except (KeyError, ValueError, TypeError) as e:
        raise GraphError(f"{where}: bad {op.name} params {raw!r}: {e}") from None


def to_dict(graph: Graph) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "nodes": [
            {
                "id": n.id,
                "op": n.op.value,
                "name": n.name,
                "srcs": list(n.srcs),
                "shape": list(n.shape),
                "dtype": n.dtype.name,
                "params": _params_to_json(n.params),
            }
            for n in graph.nodes
        ],
        "outputs": list(graph.outputs),
        "meta": graph.meta,
    }


def from_dict(doc: Any) -> Graph:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise GraphError(f"not a streamgraph graph: expected an object with format {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise GraphError(
            f"graph format version {doc.get('version')!r} is not supported (want {VERSION})"
        )
    raw_nodes, outputs = doc.get("nodes"), doc.get("outputs")
    if not isinstance(raw_nodes, list) or not isinstance(outputs, list):
        raise GraphError("a graph needs a 'nodes' list and an 'outputs' list")
    ops = {o.value: o for o in Op}
    nodes: list[Node] = []
    for i, raw in enumerate(raw_nodes):
        where = f"node {i}"
        if not isinstance(raw, dict):
            raise GraphError(f"{where}: expected an object, got {type(raw).__name__}")
        missing = {"op", "srcs", "shape", "dtype"} - raw.keys()
        if missing:
            raise GraphError(f"{where}: missing {sorted(missing)}")
        if raw.get("id", i) != i:
            raise GraphError(f"{where}: has id {raw['id']}; ids must equal positions")
        if not isinstance(raw["op"], str) or raw["op"] not in ops:
            raise GraphError(f"{where}: unknown op {raw['op']!r}; known: {', '.join(ops)}")
        if not isinstance(raw["dtype"], str) or raw["dtype"] not in DTYPES:
            raise GraphError(f"{where}: unknown dtype {raw['dtype']!r}; known: {', '.join(DTYPES)}")
        srcs, shape = raw["srcs"], raw["shape"]
        for what, v in (("srcs", srcs), ("shape", shape)):
            if not isinstance(v, list) or not all(
                isinstance(e, int) and not isinstance(e, bool) for e in v
            ):
                raise GraphError(f"{where}: {what} must be a list of ints, got {v!r}")
        name = raw.get("name", "")
        if not isinstance(name, str):
            raise GraphError(f"{where}: name must be a string")
        op = ops[raw["op"]]
        params = _params_from_json(op, raw.get("params"), f"{where} ('{name}')")
        try:
            node = make_node(nodes, op, srcs, params, name, tuple(shape), DTYPES[raw["dtype"]])
        except GraphError as e:
            raise GraphError(f"{where}: {e}") from None
        nodes.append(node)
    for o in outputs:
        if not isinstance(o, int) or isinstance(o, bool) or not 0 <= o < len(nodes):
            raise GraphError(f"output {o!r} is not a node id (0..{len(nodes) - 1})")
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise GraphError("'meta' must be an object")
    graph = Graph(tuple(nodes), tuple(outputs), meta)
    graph.validate()
    return graph


def to_json(graph: Graph, indent: int | None = None) -> str:
    return json.dumps(to_dict(graph), indent=indent)


def from_json(text: str | bytes) -> Graph:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise GraphError(f"graph JSON does not parse: {e}") from None
    return from_dict(doc)
