"""Reading documents (``graph.documents``, ``graph.serialize``, ``tools.graph_dump.load``): a
dump document is checked field by field, text is refused before Python's recursive parser sees
it when it is nested too deep, sizes are bounded by what the machine holds, and whatever bytes
a file holds, reading it ends in a valid document or one ``GraphError`` on one line, quickly."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.options import Options
from graph import GraphBuilder, documents, drawing, f32, from_json, i32, to_json
from graph.documents import DocumentError, check_dump
from graph.ops import GraphError
from graph.serialize import to_dict
from tools import graph_dump

NUMPY = Options(backend="numpy", n_ctx=512)
FAST = 2.0  # seconds any one document may take to be read or refused


@pytest.fixture(scope="module")
def streams_doc() -> dict[str, Any]:
    """Streams, event waits and fused groups."""
    return graph_dump.from_model("gemma3-tiny", NUMPY.replace(streams=3, stack=False), 4)


@pytest.fixture(scope="module")
def placed_doc() -> dict[str, Any]:
    """Per-layer placements, ring slots and a predicted time (planned for the GPU, here)."""
    return graph_dump.from_model("gemma3-tiny", Options(backend="cupy", offload="*1+1"), 1)


def _small_graph() -> Any:
    b = GraphBuilder()
    x = b.input("x", (2, 3), f32)
    c = b.constant("pos", np.arange(2, dtype=np.int32))
    w = b.weight("w", (4, 3), f32, layer=0)
    y = b.scale(b.reshape(b.mul_mat(w, x), (2, 1, 4)), 0.5)
    z = b.rope(y, c, base=10000.0)
    s = b.state("cache", (3, 4), f32)
    b.set_rows(s, b.reshape(z, (2, 4)), b.input("slots", (2,), i32))
    return b.build([z], dce=False)


def _write(tmp: Path, doc: Any, name: str = "doc.json") -> Path:
    path = tmp / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _set(doc: dict[str, Any], path: list[Any], value: Any) -> None:
    obj = doc
    for k in path[:-1]:
        obj = obj[k]
    if value is _DROP:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


_DROP = object()


def _first(doc: dict[str, Any], test: Callable[[dict[str, Any]], bool]) -> int:
    return next(i for i, n in enumerate(doc["nodes"]) if test(n))


def _compute(d: dict[str, Any]) -> int:
    return _first(d, lambda n: n["kind"] == "compute" and n["step"] is not None)


def _input(d: dict[str, Any]) -> int:
    return _first(d, lambda n: n["kind"] == "input")


# (which document, mutation as (path, value) pairs or a function, fragments of the message)
BAD_DUMPS: dict[str, tuple[str, Any, list[str]]] = {
    "minimal": ("streams", lambda d: {"format": drawing.FORMAT}, ["missing title, n_layer"]),
    "newer version": ("streams", [(["format"], "streamgraph-dump/2")], ["is 'streamgraph-dump/2'"]),
    "unknown top field": ("streams", [(["extra"], 1)], ["unknown field 'extra'"]),
    "title not text": ("streams", [(["title"], 5)], ["title: expected a string, got int"]),
    "nodes an object": ("streams", [(["nodes"], {})], ["nodes: expected a list, got an object"]),
    "node a number": ("streams", [(["nodes", 0], 5)], ["nodes[0]: expected an object, got int"]),
    "node missing bytes": (
        "streams",
        [(["nodes", 0, "bytes"], _DROP)],
        ["nodes[0]: missing bytes"],
    ),
    "node unknown field": ("streams", [(["nodes", 0, "href"], "x")], ["unknown field 'href'"]),
    "shape a string": (
        "streams",
        [(["nodes", 1, "shape"], "abc")],
        ["nodes[1].shape: expected a list"],
    ),
    "shape of floats": ("streams", [(["nodes", 1, "shape"], [2.0])], ["shape[0]: expected an int"]),
    "negative dim": ("streams", [(["nodes", 1, "shape"], [-1])], ["shape[0]: -1 is outside 0.."]),
    "too many dims": ("streams", [(["nodes", 1, "shape"], [1] * 33)], ["33 dims; at most 32"]),
    "bytes a boolean": ("streams", [(["nodes", 1, "bytes"], True)], ["got a boolean True"]),
    "bytes a string": ("streams", [(["nodes", 1, "bytes"], "12")], ["bytes: expected an int"]),
    "bytes beyond the machine": ("streams", [(["nodes", 1, "bytes"], 2**52)], ["more than"]),
    "offset beyond JavaScript": ("streams", [(["nodes", 1, "offset"], 2**60)], ["is outside"]),
    "unknown op": ("streams", [(["nodes", 1, "op"], "SOFTMAX")], ["nodes[1].op: 'SOFTMAX' is not"]),
    "unknown dtype": ("streams", [(["nodes", 1, "dtype"], "f64")], ["nodes[1].dtype: 'f64'"]),
    "markup for a dtype": (
        "streams",
        [(["nodes", 1, "dtype"], 'f32>, URL="javascript:alert(1)", label=<z')],
        ["nodes[1].dtype", "is not one of"],
    ),
    "unknown kind": ("streams", [(["nodes", 1, "kind"], "gadget")], ["kind: 'gadget' is not"]),
    "kind not its op's": (
        "streams",
        lambda d: _set(d, ["nodes", _input(d), "kind"], "compute"),
        ["but a node of op INPUT is of kind 'input'"],
    ),
    "unknown device": ("streams", [(["nodes", 1, "device"], "tpu")], ["device: 'tpu' is not one"]),
    "stream a string": ("streams", [(["nodes", 1, "stream"], "<b>")], ["stream: expected an int"]),
    "layer below the embedding": (
        "streams",
        [(["nodes", 1, "layer"], -2)],
        ["layer: -2 is outside"],
    ),
    "duplicate id": (
        "streams",
        lambda d: _set(d, ["nodes", 1, "id"], d["nodes"][0]["id"]),
        ["nodes[1].id", "ids are unique"],
    ),
    "anchor missing": (
        "streams",
        lambda d: _set(d, ["nodes", _compute(d), "step"], 99999),
        ["node 99999 (the step that launches it) is not in the document"],
    ),
    "edge to nowhere": (
        "streams",
        [(["edges", 0], [0, 99999])],
        ["edges[0][1]: node 99999 is not"],
    ),
    "edge backwards": (
        "streams",
        lambda d: _set(d, ["edges", 0], d["edges"][0][::-1]),
        ["edges[0]", "not an earlier node"],
    ),
    "edge of three": ("streams", [(["edges", 0], [0, 1, 2])], ["edges[0]: expected 2 items"]),
    "wait to nowhere": (
        "streams",
        lambda d: _set(d, ["waits", 0, 1], 99999),
        ["waits[0][1]: node 99999 is not"],
    ),
    "output missing": ("streams", [(["outputs"], [99999])], ["outputs[0]: node 99999 is not"]),
    "layers keyed by text": ("placed", [(["layers", "x"], {})], ["layers['x']", "its tag"]),
    "layer placed nowhere": ("placed", [(["layers", "1", "where"], "moon")], ["layers['1'].where"]),
    "summary without streams": ("streams", [(["summary", "streams"], _DROP)], ["missing streams"]),
    "no stream at all": ("streams", [(["summary", "streams"], 0)], ["at least one stream"]),
    "a negative count": ("streams", [(["summary", "steps"], -1)], ["summary.steps: -1 is outside"]),
    "peak bytes as text": (
        "streams",
        [(["summary", "peak_bytes"], {"cpu": "1 GiB"})],
        ["summary.peak_bytes['cpu']: expected an int"],
    ),
    "infinite prediction": (
        "placed",
        [(["summary", "predicted_ms"], math.inf)],
        ["summary.predicted_ms: inf is not a finite number"],
    ),
    "nested option": ("streams", [(["options", "vram"], [1])], ["options['vram']: expected a"]),
    "unknown summary field": ("streams", [(["summary", "evil"], 1)], ["unknown field 'evil'"]),
}


@pytest.mark.parametrize("name", list(BAD_DUMPS))
def test_malformed_dump_document_raises_document_error(
    name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Each problem is one line naming the file and the field: never a KeyError or TypeError,
    and never a document drawn with a shape of "abc" (they were, before)."""
    which, change, fragments = BAD_DUMPS[name]
    doc = copy.deepcopy(request.getfixturevalue(f"{which}_doc"))
    if callable(change):
        doc = change(doc) or doc
    else:
        for path, value in change:
            _set(doc, path, value)
    path = _write(tmp_path, doc)
    with pytest.raises(DocumentError) as info:
        graph_dump.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for f in fragments:
        assert f in message, (f, message)


def test_valid_dumps_read_back_as_themselves(
    streams_doc: dict[str, Any], placed_doc: dict[str, Any], tmp_path: Path
) -> None:
    """What ``annotate`` writes is what the checker accepts: whole, split, selected."""
    split = graph_dump.from_model("gemma3-tiny", Options(backend="cupy", offload="ngl=1"), 2)
    for doc in (streams_doc, placed_doc, split, graph_dump.select(streams_doc, (1, 1))):
        assert check_dump(doc) is doc
        path = graph_dump.write(doc, tmp_path / "d.json")
        assert graph_dump.load(path) == doc


def test_deep_nesting_is_refused_before_parsing(tmp_path: Path) -> None:
    """Python's ``json`` recurses: 100,000 levels were a RecursionError out of ``load``."""
    deep = "[" * 100_000 + "]" * 100_000
    path = _write(tmp_path, deep, "deep.json")
    with pytest.raises(DocumentError, match=r"deep\.json does not parse: nested deeper than 64"):
        graph_dump.load(path)
    with pytest.raises(GraphError, match="graph JSON does not parse: nested deeper than 64"):
        from_json(deep)
    obj = '{"a":' * 100_000 + "1" + "}" * 100_000
    with pytest.raises(DocumentError, match="nested deeper"):
        graph_dump.load(_write(tmp_path, obj, "obj.json"))


def test_the_depth_scan_skips_strings() -> None:
    """Brackets inside strings, escaped quotes and backslashes do not count."""
    documents.check_depth(json.dumps({"a": "[" * 1000 + '\\"{{' + "\\" * 7}), "x")
    documents.check_depth("[" * 64 + "]" * 64, "x")
    with pytest.raises(DocumentError, match="at character 64"):
        documents.check_depth("[" * 65 + "]" * 65, "x")
    documents.check_depth('["\\"' + "[" * 70, "x")  # an escaped quote: still in the string
    with pytest.raises(DocumentError):  # an escaped backslash, then the string ends
        documents.check_depth('["\\\\"' + "[" * 70, "x")


def _graph_doc(shape: list[int], dtype: str = "f32") -> str:
    node = {"op": "input", "name": "huge", "srcs": [], "shape": shape, "dtype": dtype}
    return json.dumps(
        {"format": "streamgraph.graph", "version": 1, "nodes": [node], "outputs": [0]}
    )


def test_sizes_beyond_the_machine_are_refused(tmp_path: Path) -> None:
    """A 1e9 x 1e9 tensor was accepted and planned; it is one error naming the node and its
    bytes, before any planning."""
    text = _graph_doc([10**9, 10**9])
    with pytest.raises(DocumentError) as info:
        from_json(text)
    message = str(info.value)
    assert "node 0 ('huge')" in message and "4000000000000000000 bytes" in message
    assert "more than" in message and "\n" not in message
    path = _write(tmp_path, text, "huge.json")
    with pytest.raises(DocumentError, match=r"huge\.json: node 0 \('huge'\).* bytes"):
        graph_dump.load(path)


@pytest.mark.parametrize(
    "shape,fragment",
    [
        ([10**4000], "exceeds 2**63-1"),
        ([10**18] * 32, "bytes (~2**"),
        ([2] * 33, "33 dims; at most 32"),
        ([2**62, 2**62, 0], None),  # no elements: nothing to hold
    ],
)
def test_absurd_dims_are_refused_quickly(shape: list[int], fragment: str | None) -> None:
    start = time.perf_counter()
    if fragment is None:
        assert from_json(_graph_doc(shape))[0].nbytes == 0
    else:
        with pytest.raises(DocumentError) as info:
            from_json(_graph_doc(shape))
        assert fragment in str(info.value) and len(str(info.value)) < 400
    assert time.perf_counter() - start < 0.5


def test_absurd_params_are_refused() -> None:
    doc = to_dict(_small_graph())
    reshape = next(n for n in doc["nodes"] if n["op"] == "reshape")
    reshape["params"]["shape"] = [10**30, 2]
    with pytest.raises(GraphError, match=r"shape must be at most 32 ints within"):
        from_json(json.dumps(doc))


def test_the_graph_total_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors each within the limit, together beyond it (views and in-place writes own no
    bytes)."""
    monkeypatch.setattr(documents, "byte_limit", lambda: (100, "a 100-byte test machine"))
    b = GraphBuilder()
    x = b.input("x", (4, 4), f32)  # 64 bytes
    y = b.scale(b.reshape(x, (16,)), 2.0)  # a view (none) and 64 more
    text = to_json(b.build([y]))
    with pytest.raises(DocumentError, match="hold 128 bytes .* more than a 100-byte test machine"):
        from_json(text)
    monkeypatch.setattr(documents, "byte_limit", lambda: (128, "enough"))
    assert len(from_json(text)) == 3


def test_the_limit_is_this_machines_memory() -> None:
    limit, what = documents.byte_limit()
    assert limit >= 2**20 and ("physical memory" in what or limit == documents.CEILING)


# ---- property: whatever a file holds --------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["<a href='javascript:x'>", "</script>", "f32", "MUL_MAT", "gpu", "1e999"])
)
JSON = st.recursive(
    SCALARS,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def nested(draw: st.DrawFn) -> Any:
    """A JSON value wrapped in a random number of lists and objects (up to past the limit)."""
    value = draw(JSON)
    for _ in range(draw(st.integers(0, 2) | st.integers(0, 90))):
        value = [value] if draw(st.booleans()) else {draw(st.text(max_size=3)): value}
    return value


@st.composite
def mutated(draw: st.DrawFn, bases: list[Any]) -> Any:
    """A valid document with one field replaced by random JSON, removed, or one added."""
    doc = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 3))):
        obj: Any = doc
        nodes = doc.get("nodes") if isinstance(doc, dict) else None
        if isinstance(nodes, list) and nodes and draw(st.booleans()):  # where the rules are
            node = draw(st.sampled_from(nodes))
            obj = node if isinstance(node, dict | list) else obj
        while True:  # walk down to a random container
            keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
            if not keys:
                break
            k = draw(st.sampled_from(keys))
            if not isinstance(obj[k], dict | list) or draw(st.integers(0, 7)) == 0:
                break
            obj = obj[k]
        keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
        action = draw(st.sampled_from(["replace", "drop", "add"])) if keys else "add"
        if action == "add" and isinstance(obj, dict):
            obj[draw(st.text(max_size=6))] = draw(nested())
        elif action == "add":
            obj.append(draw(nested()))
        elif action == "drop":
            del obj[draw(st.sampled_from(keys))]
        else:
            obj[draw(st.sampled_from(keys))] = draw(nested())
    return doc


_BASES: list[Any] = []


def _bases() -> list[Any]:
    """Valid documents to mutate: a graph, its dump, and dumps with streams and placements."""
    if not _BASES:
        graph = _small_graph()
        _BASES.append(to_dict(graph))
        _BASES.append(graph_dump.from_graph(graph, NUMPY, title="small"))
        llama = graph_dump.from_model("llama-tiny", NUMPY.replace(streams=2, stack=False), 2)
        _BASES.append(graph_dump.select(llama, (0, 0)))
        placed = graph_dump.from_model("llama-tiny", Options(backend="cupy", offload="*1+1"))
        _BASES.append(graph_dump.select(placed, (1, 1)))
    return _BASES


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file the property tests rewrite for each example."""
    return tmp_path_factory.mktemp("documents") / "doc.json"


def _reads_cleanly(data: bytes, path: Path) -> None:
    """``load`` and ``from_json`` give a valid document or one one-line ``GraphError``;
    anything else (KeyError, RecursionError, MemoryError...) fails the test, as does time."""
    path.write_bytes(data)
    for read in (lambda: graph_dump.load(path, NUMPY), lambda: from_json(data)):
        start = time.perf_counter()
        try:
            got = read()
        except GraphError as e:
            assert str(e) and "\n" not in str(e), repr(str(e))
        else:
            if isinstance(got, dict):
                check_dump(got)
            else:
                assert from_json(to_json(got)) == got
        assert time.perf_counter() - start < FAST


PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY
@given(st.binary(max_size=300))
def test_random_bytes_read_cleanly(scratch: Path, data: bytes) -> None:
    _reads_cleanly(data, scratch)


@PROPERTY
@given(nested(), st.integers(0, 2) | st.integers(0, 5000))
def test_random_json_reads_cleanly(scratch: Path, value: Any, depth: int) -> None:
    """Random values, nested a little or far past Python's recursion limit."""
    _reads_cleanly(("[" * depth + json.dumps(value) + "]" * depth).encode(), scratch)


@PROPERTY
@given(st.data())
def test_mutated_documents_read_cleanly(scratch: Path, data: st.DataObject) -> None:
    doc = data.draw(mutated(_bases()))
    _reads_cleanly(json.dumps(doc).encode(), scratch)


def test_the_property_bases_are_valid(scratch: Path) -> None:
    for doc in _bases():
        _reads_cleanly(json.dumps(doc).encode(), scratch)
    assert check_dump(_bases()[1]) and from_json(json.dumps(_bases()[0]))
