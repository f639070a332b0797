"""JSON (de)serialisation of graphs; ``from_json(to_json(g)) == g`` exactly.

Loading replays every node through the same checks the builder runs, so a file that is
malformed, names an unknown op, reads a node that does not exist (a dangling reference or a
cycle) or disagrees with shape inference raises ``GraphError`` with the node's position.
Before that, the text's nesting is checked without recursion (``graph.documents.parse``), and
sizes are bounded before anything is multiplied out: at most 32 dims, each within what a 64-bit
index reaches, and no tensor, nor all of them together, larger than this machine can hold
(``graph.documents.byte_limit``).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

from graph import documents
from graph.documents import DocumentError, count, human_bytes, show
from graph.dtypes import DTYPES, DType
from graph.ir import Graph, Node, make_node
from graph.ops import ALIAS_OPS, PARAMS, GraphError, Op, Params, RopeMode

__all__ = ["to_dict", "from_dict", "to_json", "from_json", "FORMAT", "VERSION"]

FORMAT = "streamgraph.graph"
VERSION = 1
MAX_DIMS = documents.MAX_DIMS  # ggml has 4; NumPy's arrays stop at 64
MAX_INDEX = 2**63 - 1  # a dim, stride or offset beyond int64 indexes nothing any backend holds


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
    flags = {f.name for f in dataclasses.fields(cls) if str(f.type) == "bool"}
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
                if len(v) > MAX_DIMS or any(abs(e) > MAX_INDEX for e in v):
                    raise ValueError(f"{k} must be at most {MAX_DIMS} ints within ±(2**63-1)")
                v = tuple(v)
            elif k in flags:
                if not isinstance(v, bool):
                    raise TypeError(f"{k} must be true or false")
            elif k in ("scale", "eps", "base", "freq_scale"):
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise TypeError(f"{k} must be a number")
                v = float(v)
            elif isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{k} must be an int")
            elif abs(v) > MAX_INDEX:
                raise ValueError(f"{k} must lie within ±(2**63-1)")
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
        _check_extent(f"{where} ({name!r})", shape, DTYPES[raw["dtype"]])
        op = ops[raw["op"]]
        params = _params_from_json(op, raw.get("params"), f"{where} ('{name}')")
        try:
            node = make_node(nodes, op, srcs, params, name, tuple(shape), DTYPES[raw["dtype"]])
        except GraphError as e:
            raise GraphError(f"{where}: {e}") from None
        nodes.append(node)
    _check_total(nodes)
    for o in outputs:
        if not isinstance(o, int) or isinstance(o, bool) or not 0 <= o < len(nodes):
            raise GraphError(f"output {o!r} is not a node id (0..{len(nodes) - 1})")
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise GraphError("'meta' must be an object")
    graph = Graph(tuple(nodes), tuple(outputs), meta)
    graph.validate()
    return graph


def _check_extent(where: str, shape: list[int], dtype: DType) -> None:
    """A declared shape's dims and bytes within bounds, checked before any inference multiplies
    them out: at most ``MAX_DIMS`` dims of at most ``MAX_INDEX`` each (so a product is at most
    ~2000 bits, quick to compute) and bytes within ``byte_limit``. Negative dims and partial
    quantized blocks are left to ``make_node``, which names them."""
    if len(shape) > MAX_DIMS:
        raise DocumentError(f"{where}: shape has {len(shape)} dims; at most {MAX_DIMS}")
    for d in shape:
        if d > MAX_INDEX:
            raise DocumentError(f"{where}: dim {count(d)} exceeds 2**63-1, which nothing indexes")
    if any(d < 0 for d in shape):
        return
    try:
        nbytes = dtype.nbytes(tuple(shape))
    except ValueError:
        return
    limit, what = documents.byte_limit()
    if nbytes > limit:
        raise DocumentError(
            f"{where}: {show(tuple(shape))} {dtype.name} is {count(nbytes)} bytes "
            f"({human_bytes(nbytes)}), more than {what}; is the file's shape right?"
        )


def _check_total(nodes: list[Node]) -> None:
    """All the graph's tensors (leaves and computed values; views and in-place writes own no
    bytes) together within ``byte_limit``: what running it could need with no reuse at all."""
    total = sum(n.nbytes for n in nodes if n.op not in ALIAS_OPS)
    limit, what = documents.byte_limit()
    if total > limit:
        raise DocumentError(
            f"the graph's tensors hold {count(total)} bytes ({human_bytes(total)}) together, more "
            f"than {what}; is the file's shape right?"
        )


def to_json(graph: Graph, indent: int | None = None) -> str:
    return json.dumps(to_dict(graph), indent=indent)


def from_json(text: str | bytes, source: str = "graph JSON") -> Graph:
    """The graph in ``text``; every problem is one ``GraphError`` (``source`` names the file
    in messages about the text itself)."""
    return from_dict(documents.parse(text, source))
