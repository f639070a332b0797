"""Reading documents safely: JSON text checked before it is parsed, a dump document checked
field by field, and the sizes a machine can hold.

    doc = graph.documents.parse(data, "saved.json")    # depth-checked JSON, or DocumentError
    graph.documents.check_dump(doc, "saved.json")      # a valid dump document, or DocumentError
    limit, what = graph.documents.byte_limit()          # the most bytes a tensor (or graph) holds

Every problem is one ``DocumentError`` (a ``GraphError``) on one line that names the file, the
field's path (``nodes[3].shape``) and what is wrong, so a file from anywhere can be read by the
tools: nothing in it reaches a picture, a page or a planner unchecked. ``parse`` refuses text
nested deeper than any document of these formats can be before Python's recursive ``json``
sees it. ``check_dump`` is to a dump document (``graph.drawing``) what ``graph.serialize``'s
loader is to a graph: required fields, types, known kinds, devices, ops and dtypes, node ids
unique and every id that is referenced present, shapes lists of non-negative ints, numbers
finite and within what a machine (or JavaScript, for the page) can represent.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import reprlib
from collections.abc import Mapping
from typing import Any

from graph.drawing import FORMAT as DUMP_FORMAT
from graph.drawing import KINDS as KIND_OF
from graph.dtypes import DTYPES
from graph.ops import VIEW_OPS, GraphError, Op

__all__ = [
    "DocumentError",
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
    "parse",
    "check_depth",
    "check_dump",
    "byte_limit",
    "finite",
    "human_bytes",
]

MAX_DEPTH = 64
"""Nesting a document may have: a dump is 4 deep and a graph 5 (plus its ``meta``)."""
MAX_DOCUMENT_BYTES = 64 * 2**20
"""The largest file read: a 7B model's graph is ~130 KB and its dump ~340 KB."""
CEILING = 2**40
"""Bytes a tensor or a graph may hold (1 TiB: more than any one machine's memory today)."""
MAX_INT = 2**53
"""Integers in a dump must stay exact in JavaScript, which draws the page."""
MAX_DIMS = 32
DEVICES = ("gpu", "cpu", "streamed", "host")
KINDS = (*KIND_OF.values(), "view", "compute")
OPS = {o.name: o for o in Op}

_STRUCTURE = re.compile(r'[\[\]{}"\\]')
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 40
_SHOW.maxlist = _SHOW.maxdict = 4
_SHOW.maxlevel = 2
_SHOW.maxlong = 24


class DocumentError(GraphError):
    """A document (a graph or dump JSON file) that is malformed: the message names the file,
    the field and what is wrong."""


def human_bytes(n: int) -> str:
    """``n`` bytes for people: 3.5 EiB, 23.4 GiB, 512 B; an absurd count as a power of two
    (a float cannot hold it)."""
    if n >= 2**70:
        return f"~2**{n.bit_length() - 1} B"
    for unit, size in (("EiB", 2**60), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def count(n: int) -> str:
    """An int for a message: in full, or its leading digits and length when it is huge."""
    text = str(n)
    return text if len(text) <= 24 else f"{text[:6]}...({len(text)} digits)"


@functools.cache
def byte_limit() -> tuple[int, str]:
    """The most bytes one tensor, or one graph's tensors together, may hold, and what that is:
    the larger of this machine's physical memory and ``CEILING``. A plan may be made here for
    a larger machine (a 7B graph drawn on a laptop), so the bound is what any machine could
    hold, not this one; sizes beyond it come from a broken or hostile file. Running a graph
    checks the backend's own memory before anything is allocated."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system, or not known
        total = -1
    if total > CEILING:
        return total, f"this machine's physical memory ({human_bytes(total)})"
    return CEILING, f"{human_bytes(CEILING)}, more than any one machine holds"


def one_line(text: str) -> str:
    """``text`` with line breaks written as escapes: a file name can hold one."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def check_depth(text: str, source: str, limit: int = MAX_DEPTH) -> None:
    """Refuse JSON text nested deeper than ``limit``, by one scan over its brackets (strings
    skipped), so that Python's recursive parser never sees it."""
    depth, in_string, escaped = 0, False, -1
    for m in _STRUCTURE.finditer(text):
        c, i = m[0], m.start()
        if in_string:
            if i == escaped:
                continue
            if c == "\\":
                escaped = i + 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > limit:
                raise DocumentError(
                    f"{one_line(source)} does not parse: nested deeper than {limit} levels "
                    f"(at character {i}); no document of these formats is"
                )
        elif c in "]}":
            depth -= 1


def parse(data: str | bytes, source: str) -> Any:
    """The JSON value in ``data`` (text, or bytes in UTF-8/16/32 as ``json`` detects them),
    its depth checked first; any problem is one ``DocumentError`` naming ``source``."""
    text = data
    if isinstance(data, bytes | bytearray):
        try:
            text = bytes(data).decode(json.detect_encoding(data))
        except (UnicodeDecodeError, LookupError) as e:
            raise DocumentError(f"{one_line(source)} does not parse: {e}") from None
    assert isinstance(text, str)
    check_depth(text, source)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError; an int of 4300+ digits
        raise DocumentError(f"{one_line(source)} does not parse: {e}") from None


def finite(x: Any) -> Any:
    """``x`` with NaN and infinities as None: JSON has no such numbers (``JSON.parse`` and
    ``check_dump`` refuse them)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x


def show(v: Any) -> str:
    """A value in an error message: short, on one line."""
    return _SHOW.repr(v)


def kind_of(op: Op) -> str:
    """The kind a dump gives a node of ``op`` (``graph.drawing.document``'s rule)."""
    return KIND_OF.get(op, "view" if op in VIEW_OPS else "compute")


# -- the dump document -------------------------------------------------------------------------

TOP = ("format", "title", "n_layer", "nodes", "edges", "waits", "outputs", "layers", "summary")
NODE = (
    "id", "op", "name", "label", "shape", "dtype", "bytes", "kind",
    "layer", "device", "stream", "step", "fused", "offset", "slot", "cause",
)  # fmt: skip
LAYER = ("where", "cause", "bytes", "slot")
SUMMARY_COUNTS = ("nodes", "edges", "weights", "weight_bytes", "streams", "events", "waits")
"""Counts ``graph.drawing.document`` always writes; the passes add the optional ones."""
SUMMARY_OPTIONAL_COUNTS = (
    "shown", "steps", "launches", "fused_groups", "arena_bytes", "arena_max_live_bytes",
    "streamed_bytes", "slots",
)  # fmt: skip
SUMMARY_MAPS = ("device_bytes", "peak_bytes")
SUMMARY_TEXT = ("costs", "policy")
SUMMARY_NUMBERS = ("predicted_ms",)
MAX_ID = 2**31


def check_dump(doc: Any, source: str = "dump document") -> dict[str, Any]:
    """``doc`` itself if it is a valid dump document (``graph.drawing``'s fields, as
    ``document`` and ``engine.views.annotate`` write them), else one ``DocumentError``.

    Rules: an object with exactly the fields ``document`` writes (``options`` optional);
    ``format`` this version's; nodes with every field, ids unique ints, ``op`` and ``dtype``
    known, ``kind`` the one its op has, ``device`` one of gpu/cpu/streamed/host or null,
    ``shape`` at most 32 non-negative ints, ``bytes`` within ``byte_limit``, layer tags from -1
    (the embedding) up; edges ``[reader's source, reader]`` between present nodes, the source
    first; waits ``[producer, waiter, its stream, their stream]`` between present nodes;
    outputs present; a node's ``step`` (the node that launches it: a fused group's anchor)
    present unless the document is a selection (``summary.shown``); ``layers`` keyed by layer
    tag with where, cause, bytes and slot; ``summary`` with its counts as non-negative ints;
    ``options`` flat with JSON scalars. Every int lies within ±2**53 (exact in the page's
    JavaScript), floats are finite."""
    c = _Checker(one_line(source))
    top = c.obj(doc, "document", TOP, ("options",))
    if top["format"] != DUMP_FORMAT:
        c.fail("format", f"is {show(top['format'])}, not {DUMP_FORMAT!r} (a dump document)")
    c.text(top["title"], "title")
    c.int(top["n_layer"], "n_layer", lo=-1, hi=MAX_ID, none=True)
    summary = c.obj(top["summary"], "summary", SUMMARY_COUNTS, _SUMMARY_OPTIONAL)
    nodes = c.list(top["nodes"], "nodes")
    ids: set[int] = set()
    steps: list[tuple[str, int]] = []
    for i, raw in enumerate(nodes):
        node = _node(c, raw, f"nodes[{i}]")
        if node["id"] in ids:
            c.fail(f"nodes[{i}].id", f"{node['id']} is the id of an earlier node; ids are unique")
        ids.add(node["id"])
        if node["step"] is not None:
            steps.append((f"nodes[{i}].step", node["step"]))
    if "shown" not in summary:  # a selection may leave a fused group's anchor out
        for path, step in steps:
            if step not in ids:
                c.fail(path, f"node {step} (the step that launches it) is not in the document")
    _links(c, top, ids)
    _layers(c, top["layers"])
    _summary(c, summary)
    if "options" in top:
        _options(c, top["options"])
    return top


class _Checker:
    """Field checks that name the file and the field's path in their one error."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, problem: str) -> Any:
        raise DocumentError(f"{self.source}: {path}: {problem}")

    def obj(
        self, v: Any, path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        if not isinstance(v, dict):
            return self.fail(path, f"expected an object, got {_type(v)}")
        missing = [k for k in required if k not in v]
        if missing:
            self.fail(path, f"missing {', '.join(missing)}")
        unknown = [k for k in v if k not in required and k not in optional]
        if unknown:
            known = ", ".join((*required, *optional))
            self.fail(path, f"unknown field {show(unknown[0])}; the fields are {known}")
        return v

    def list(self, v: Any, path: str, length: int | None = None) -> list[Any]:
        if not isinstance(v, list):
            return self.fail(path, f"expected a list, got {_type(v)}")
        if length is not None and len(v) != length:
            self.fail(path, f"expected {length} items, got {len(v)}")
        return v

    def int(self, v: Any, path: str, lo: int = 0, hi: int = MAX_INT, none: bool = False) -> Any:
        if v is None and none:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            want = "an int" + (" or null" if none else "")
            return self.fail(path, f"expected {want}, got {_type(v)} {show(v)}")
        if not lo <= v <= hi:
            self.fail(path, f"{show(v)} is outside {lo}..{hi}")
        return v

    def number(self, v: Any, path: str, none: bool = False) -> Any:
        if v is None and none:
            return v
        if isinstance(v, bool) or not isinstance(v, int | float):
            return self.fail(path, f"expected a number, got {_type(v)} {show(v)}")
        if not (math.isfinite(v) and -MAX_INT <= v <= MAX_INT):
            self.fail(path, f"{show(v)} is not a finite number within ±2**53")
        return v

    def text(self, v: Any, path: str, none: bool = False) -> Any:
        if not (isinstance(v, str) or (v is None and none)):
            want = "a string" + (" or null" if none else "")
            self.fail(path, f"expected {want}, got {_type(v)} {show(v)}")
        return v

    def choice(self, v: Any, path: str, known: Any, none: bool = False) -> Any:
        if v is None and none:
            return v
        if not isinstance(v, str) or v not in known:
            self.fail(path, f"{show(v)} is not one of {', '.join(known)}")
        return v


_SUMMARY_OPTIONAL = SUMMARY_OPTIONAL_COUNTS + SUMMARY_MAPS + SUMMARY_TEXT + SUMMARY_NUMBERS


def _type(v: Any) -> str:
    """A JSON value's type in words."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return "null" if v is None else names.get(type(v), type(v).__name__)


def _node(c: _Checker, raw: Any, path: str) -> dict[str, Any]:
    """One node record: every field present, of its type, from its known set."""
    n = c.obj(raw, path, NODE)
    c.int(n["id"], f"{path}.id", hi=MAX_ID)
    op = OPS.get(c.choice(n["op"], f"{path}.op", OPS))
    c.text(n["name"], f"{path}.name")
    c.text(n["label"], f"{path}.label")
    shape = c.list(n["shape"], f"{path}.shape")
    if len(shape) > MAX_DIMS:
        c.fail(f"{path}.shape", f"has {len(shape)} dims; at most {MAX_DIMS}")
    for k, d in enumerate(shape):
        c.int(d, f"{path}.shape[{k}]")
    c.choice(n["dtype"], f"{path}.dtype", DTYPES)
    limit, what = byte_limit()
    nbytes = c.int(n["bytes"], f"{path}.bytes")
    if nbytes > limit:
        label = show(n["label"])
        size = f"{count(nbytes)} bytes ({human_bytes(nbytes)})"
        c.fail(f"{path}.bytes", f"node {n['id']} ({label}) holds {size}, more than {what}")
    assert op is not None
    kind = c.choice(n["kind"], f"{path}.kind", KINDS)
    if kind != kind_of(op):
        c.fail(f"{path}.kind", f"{kind!r}, but a node of op {op.name} is of kind {kind_of(op)!r}")
    c.int(n["layer"], f"{path}.layer", lo=-1, hi=MAX_ID, none=True)
    c.choice(n["device"], f"{path}.device", DEVICES, none=True)
    c.int(n["stream"], f"{path}.stream", hi=MAX_ID, none=True)
    c.int(n["step"], f"{path}.step", hi=MAX_ID, none=True)
    c.text(n["fused"], f"{path}.fused", none=True)
    c.int(n["offset"], f"{path}.offset", none=True)
    c.int(n["slot"], f"{path}.slot", hi=MAX_ID, none=True)
    c.text(n["cause"], f"{path}.cause", none=True)
    return n


def _links(c: _Checker, doc: Mapping[str, Any], ids: set[int]) -> None:
    """Edges, event waits and outputs: between nodes the document holds."""

    def present(v: Any, path: str) -> int:
        c.int(v, path, hi=MAX_ID)
        if v not in ids:
            c.fail(path, f"node {v} is not in the document")
        return v

    for i, e in enumerate(c.list(doc["edges"], "edges")):
        src, dst = c.list(e, f"edges[{i}]", 2)
        if present(src, f"edges[{i}][0]") >= present(dst, f"edges[{i}][1]"):
            c.fail(f"edges[{i}]", f"node {dst} reads node {src}, not an earlier node")
    for i, w in enumerate(c.list(doc["waits"], "waits")):
        a, b, sa, sb = c.list(w, f"waits[{i}]", 4)
        present(a, f"waits[{i}][0]")
        present(b, f"waits[{i}][1]")
        c.int(sa, f"waits[{i}][2]", hi=MAX_ID)
        c.int(sb, f"waits[{i}][3]", hi=MAX_ID)
    for i, o in enumerate(c.list(doc["outputs"], "outputs")):
        present(o, f"outputs[{i}]")


def _layers(c: _Checker, raw: Any) -> None:
    """Per layer tag (a string: JSON's keys are), where its weights live and why."""
    layers = c.obj(raw, "layers", (), tuple(raw) if isinstance(raw, dict) else ())
    for key, info in layers.items():
        path = f"layers[{show(key)}]"
        if not re.fullmatch(r"-?\d{1,10}", key) or not -1 <= int(key) < MAX_ID:
            c.fail(path, "a layer's key is its tag: an int from -1 (the embedding) up")
        c.obj(info, path, LAYER)
        c.choice(info["where"], f"{path}.where", DEVICES)
        c.text(info["cause"], f"{path}.cause")
        c.int(info["bytes"], f"{path}.bytes")
        c.int(info["slot"], f"{path}.slot", hi=MAX_ID, none=True)


def _summary(c: _Checker, s: Mapping[str, Any]) -> None:
    """Counts are non-negative ints; per-device bytes map a name to an int."""
    for key in SUMMARY_COUNTS + SUMMARY_OPTIONAL_COUNTS:
        if key in s:
            c.int(s[key], f"summary.{key}")
    if s["streams"] < 1:
        c.fail("summary.streams", f"{s['streams']}: a pass runs on at least one stream")
    for key in SUMMARY_MAPS:
        if key in s:
            table = c.obj(s[key], f"summary.{key}", (), tuple(s[key]) if s[key] else ())
            for name, v in table.items():
                c.int(v, f"summary.{key}[{show(name)}]")
    for key in SUMMARY_TEXT:
        if key in s:
            c.text(s[key], f"summary.{key}")
    for key in SUMMARY_NUMBERS:
        if key in s:
            c.number(s[key], f"summary.{key}", none=True)


def _options(c: _Checker, raw: Any) -> None:
    """The run's settings, as ``Options.to_dict`` and ``tools.graph_dump`` write them: flat."""
    options = c.obj(raw, "options", (), tuple(raw) if isinstance(raw, dict) else ())
    for key, v in options.items():
        path = f"options[{show(key)}]"
        if isinstance(v, float):
            c.number(v, path)
        elif isinstance(v, int) and not isinstance(v, bool):
            c.int(v, path, lo=-MAX_INT)
        elif not (v is None or isinstance(v, str | bool)):
            c.fail(path, f"expected a string, number, boolean or null, got {_type(v)}")
