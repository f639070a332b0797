"""The GGUF container read by hand: header, key/value metadata and tensor table, memory-mapped.

    f = GGUFFile("gemma-3-270m-q4_k_m.gguf")    # any structural problem: one GGUFError
    f.fields["general.name"].text()            # "Gemma 3 270m"
    f.fields["tokenizer.ggml.tokens"].value    # StringArray: 262,144 strings, decoded on demand
    f.fields["tokenizer.ggml.scores"].value    # numpy array, a view of the file
    f.tensors["token_embd.weight"]             # TensorEntry: shape, type, offset, bytes
    f.data                                     # the whole file as read-only uint8 (the map)

Why by hand: ``gguf.GGUFReader`` builds several NumPy views for every value, one string at a
time, which took 12 s for the 262,144-token vocabulary of Gemma 3 270M on a 2-core machine;
this walk locates the same strings (it decodes none until asked) in about 0.1 s. The ``gguf``
package still supplies what it does well: the type tables (``GGUFValueType``,
``GGMLQuantizationType``, ``GGML_QUANT_SIZES``) and dequantization (``engine.model.dequant``).

The format (versions 2 and 3, little-endian): magic ``GGUF``, u32 version, u64 tensor count,
u64 key count; each key a string (u64 length, UTF-8 bytes), a u32 value type and the value
(an array: u32 item type, u64 count, the items); then each tensor's name, u32 dimension count,
u64 size per dimension (innermost first), u32 GGML type and u64 offset into the data, which
starts at the first multiple of ``general.alignment`` (u32, default 32) after the table.

A crafted file cannot make the walk hang or allocate: every count and length is checked
against the bytes left in the file before it is used, and values are views of the map.
Problems are ``GGUFError``s that start with the file's path and say "not a readable GGUF file".
Strings a file supplies go through ``printable`` before they reach a message or a terminal.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUFError", "GGUFFile", "Field", "StringArray", "TensorEntry", "printable"]

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses more
MAX_NAME = 1 << 16  # bytes of a key or tensor name (llama.cpp allows 63 for a tensor name)
DEFAULT_ALIGNMENT = 32
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
# GGUFValueType numbers -> struct format (scalars) and NumPy dtype (arrays); 8 string, 9 array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALAR |= {10: "<Q", 11: "<q", 12: "<d"}
_STRUCTS = {k: struct.Struct(f) for k, f in _SCALAR.items()}
_NUMPY = {k: np.dtype(f.replace("?", "u1")) for k, f in _SCALAR.items()}
STRING, ARRAY, BOOL = 8, 9, 7


class GGUFError(ValueError):
    """A GGUF file that cannot be used; the message names the file and what is wrong."""


def printable(text: str | bytes, limit: int = 200) -> str:
    """``text`` safe to show on a terminal, at most ``limit`` characters of it.

    A model file is untrusted input: a name holding ESC (CSI and OSC sequences), BEL, C1
    controls or bidi overrides could rewrite what a terminal shows. Every character Python's
    ``repr`` would escape (controls, format characters such as U+202E, separators, surrogates,
    unassigned code points) becomes a visible escape (``\\x1b``, ``\\u202e``); bytes that are
    not UTF-8 show as ``\\xNN``; text longer than ``limit`` ends in ``...``.
    """
    more = False
    if isinstance(text, bytes | bytearray | memoryview):
        raw = bytes(text[: limit * 4 + 1])  # (a character takes at most 4 bytes)
        more = len(raw) > limit * 4
        text = raw[: limit * 4].decode("utf-8", "backslashreplace")
    cut = text[:limit]
    if not cut.isprintable():
        cut = "".join(c if c.isprintable() else _escape(c) for c in cut)
    return cut + "..." if more or len(text) > limit else cut


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


class StringArray(Sequence[bytes]):
    """The strings of an array value: located in the map by the walk, decoded when asked for
    (a vocabulary is only decoded by the tokenizer, never by ``info``)."""

    def __init__(self, buf: Any, starts: list[int], end: int) -> None:
        self._buf, self._starts, self._end = buf, starts, end

    def __len__(self) -> int:
        return len(self._starts)

    def _span(self, i: int) -> tuple[int, int]:
        stop = self._starts[i + 1] - 8 if i + 1 < len(self._starts) else self._end
        return self._starts[i], stop

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"string {i} of {len(self)}")
        a, b = self._span(i % len(self))
        return self._buf[a:b]

    def __iter__(self) -> Iterator[bytes]:
        buf, starts = self._buf, self._starts
        ends = [s - 8 for s in starts[1:]] + [self._end] if starts else []
        return (buf[a:b] for a, b in zip(starts, ends, strict=True))

    def decode(self) -> list[str]:
        """Every string as ``str``; ``UnicodeDecodeError`` names the first one that is not
        UTF-8 in its ``reason`` (``string 17: ...``)."""
        try:
            return [s.decode("utf-8") for s in self]
        except UnicodeDecodeError:
            for i, s in enumerate(self):
                try:
                    s.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UnicodeDecodeError(
                        e.encoding, e.object, e.start, e.end, f"string {i}: {e.reason}"
                    ) from None
            raise  # pragma: no cover - the loop finds it


@dataclass(frozen=True, slots=True)
class Field:
    """One metadata value: ``kind`` is its GGUF type name (``UINT32``, ``STRING``, ``ARRAY``),
    ``item_kind`` an array's item type name. ``value``: a Python scalar; for a string its
    bytes as a ``memoryview`` of the map (``text()`` decodes it; ``bytes()`` copies it); a
    read-only NumPy view for a numeric array; a ``StringArray`` for an array of strings."""

    key: str
    kind: str
    item_kind: str | None
    value: Any

    @property
    def is_array(self) -> bool:
        return self.kind == "ARRAY"

    @property
    def type_name(self) -> str:
        """``UINT32``, ``STRING``, ``array of STRING``: as messages name it."""
        return f"array of {self.item_kind}" if self.is_array else self.kind

    def text(self, errors: str = "strict") -> str:
        """A string value decoded as UTF-8 (``errors`` as for ``bytes.decode``)."""
        return str(self.value, "utf-8", errors)

    def __len__(self) -> int:
        return len(self.value) if self.is_array else 1


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # NumPy order: GGUF's sizes reversed, so matrices are (out, in)
    ggml_type: Any  # gguf.GGMLQuantizationType
    offset: int  # bytes from the start of the file
    n_bytes: int


def _type_names() -> dict[int, str]:
    import gguf

    return {int(v): v.name for v in gguf.GGUFValueType}


class GGUFFile:
    """A GGUF file's header, read and checked; tensor data stays in the map until asked for.

    ``fields``: key -> ``Field``; ``tensors``: name -> ``TensorEntry`` in file order;
    ``data``: the whole file, read-only uint8; ``header_end``: where the tensor table ends
    (the bytes ``header_digest`` hashes); ``data_offset``: where tensor data starts.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.size, self._map = self._open()
        self.data = np.frombuffer(self._map, np.uint8)
        self._view = memoryview(self._map)
        self._pos = 0
        self._walk()

    def error(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def corrupt(self, what: str) -> GGUFError:
        return self.error(f"not a readable GGUF file: {what}")

    def header_digest(self) -> str:
        """SHA-256 of the header (metadata and tensor table): what a derived cache entry
        is keyed by, so a rewritten file is never mistaken for the one it replaced."""
        return hashlib.sha256(self._map[: self.header_end]).hexdigest()

    def tensor_bytes(self, t: TensorEntry) -> np.ndarray:
        """The tensor's bytes, a read-only view of the map."""
        return self.data[t.offset : t.offset + t.n_bytes]

    # -- the walk --------------------------------------------------------------------------------
    def _open(self) -> tuple[int, Any]:
        try:
            with self.path.open("rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self.error(f"file is {len(head)} bytes: too short to be GGUF")
                if head[:4] != MAGIC:
                    raise self.error(
                        f"wrong magic {head[:4]!r}, expected {MAGIC!r}: not a GGUF file"
                    )
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                return len(mapped), mapped
        except OSError as e:
            raise self.error(f"cannot open ({e.strerror or e})") from None

    def _take(self, n: int, what: str) -> int:
        """Start of the next ``n`` bytes, which must be in the file."""
        start = self._pos
        if n > self.size - start:
            raise self.corrupt(
                f"truncated: {what} at byte {start} needs {n} bytes, the file ends at {self.size}"
            )
        self._pos = start + n
        return start

    def _u32(self, what: str) -> int:
        return _U32.unpack_from(self._map, self._take(4, what))[0]

    def _u64(self, what: str) -> int:
        return _U64.unpack_from(self._map, self._take(8, what))[0]

    def _string(self, what: str, limit: int | None = None) -> memoryview:
        """The next string's bytes, a view of the map: a long value is not copied until used."""
        n = self._u64(f"the length of {what}")
        if limit is not None and n > limit:
            raise self.corrupt(f"{what} at byte {self._pos - 8} is {n} bytes long (limit {limit})")
        start = self._take(n, f"{what} ({n} bytes)")
        return self._view[start : start + n]

    def _name(self, what: str) -> str:
        raw = self._string(what, MAX_NAME)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.corrupt(f"{what} {printable(raw, 80)} is not UTF-8") from None

    def _walk(self) -> None:
        self._take(4, "the magic")
        version = self._u32("the version")
        if version & 0xFFFF == 0 and version:
            raise self.corrupt("big-endian GGUF files are not supported")
        if version not in VERSIONS:
            raise self.corrupt(f"version {version}; this reader knows versions 2 and 3")
        self.version = version
        n_tensors, n_kv = self._u64("the tensor count"), self._u64("the key count")
        left = self.size - self._pos
        if n_kv * 13 + n_tensors * 24 > left:  # the fewest bytes a key / a tensor entry takes
            raise self.corrupt(
                f"the header counts {n_kv} keys and {n_tensors} tensors, more than the "
                f"{left} bytes after it can hold"
            )
        names = _type_names()
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            field = self._field(names)
            if field.key in self.fields:
                raise self.corrupt(f"metadata key {printable(field.key, 100)} appears twice")
            self.fields[field.key] = field
        entries = [self._tensor_entry() for _ in range(n_tensors)]
        self.header_end = self._pos
        self.alignment = self._alignment()
        self.data_offset = -(-self._pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorEntry] = {}
        for name, ne, ggml_type, offset in entries:
            if name in self.tensors:
                raise self.corrupt(f"tensor {printable(name, 100)} appears twice")
            self.tensors[name] = self._sized(name, ne, ggml_type, offset)

    def _field(self, names: dict[int, str]) -> Field:
        key = self._name("a metadata key")
        kind = self._u32(f"the type of {key}")
        if kind not in names:
            raise self.corrupt(
                f"metadata {printable(key, 100)} has value type {kind}, no GGUF type"
            )
        if kind != ARRAY:
            return Field(key, names[kind], None, self._scalar(kind, key))
        item = self._u32(f"the item type of {key}")
        count = self._u64(f"the item count of {key}")
        if item == ARRAY:
            raise self.corrupt(
                f"metadata {printable(key, 100)}: arrays of arrays are not supported"
            )
        if item not in names:
            raise self.corrupt(f"metadata {printable(key, 100)} has item type {item}, no GGUF type")
        if item == STRING:
            return Field(key, "ARRAY", "STRING", self._strings(count, key))
        dtype = _NUMPY[item]
        start = self._take(count * dtype.itemsize, f"the {count} items of {key}")
        arr = np.frombuffer(self._map, dtype, count, start)
        return Field(key, "ARRAY", names[item], arr.astype(bool) if item == BOOL else arr)

    def _scalar(self, kind: int, key: str) -> Any:
        if kind == STRING:
            return self._string(f"the value of {key}")
        s = _STRUCTS[kind]
        return s.unpack_from(self._map, self._take(s.size, f"the value of {key}"))[0]

    def _strings(self, count: int, key: str) -> StringArray:
        """Locate ``count`` strings: the one loop a vocabulary costs, kept tight. A length
        that runs past the end makes the next ``unpack_from`` fail, or leaves ``pos`` past it."""
        self._take(count * 8, f"the {count} strings of {key}")  # their lengths at least
        buf, pos = self._map, self._pos - count * 8
        unpack = _U64.unpack_from
        starts: list[int] = []
        append = starts.append
        try:
            for _ in range(count):
                n = unpack(buf, pos)[0]
                pos += 8
                append(pos)
                pos += n
        except (struct.error, OverflowError):  # an offset past the end, or past 2**63
            pos = self.size + 1
        if pos > self.size:
            at = starts[-1] - 8 if starts else self._pos
            raise self.corrupt(
                f"truncated: string {max(len(starts) - 1, 0)} of {printable(key, 100)} at byte "
                f"{at} runs past the end of the file ({self.size} bytes)"
            )
        self._pos = pos
        return StringArray(buf, starts, pos)

    def _tensor_entry(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._name("a tensor name")
        shown = printable(name, 100)
        n_dims = self._u32(f"the dimension count of tensor {shown}")
        if n_dims > MAX_DIMS:
            raise self.corrupt(f"tensor {shown} has {n_dims} dimensions; GGML allows {MAX_DIMS}")
        start = self._take(8 * n_dims, f"the sizes of tensor {shown}")
        ne = struct.unpack_from(f"<{n_dims}Q", self._map, start)
        ggml_type = self._u32(f"the type of tensor {shown}")
        return name, ne, ggml_type, self._u64(f"the offset of tensor {shown}")

    def _alignment(self) -> int:
        f = self.fields.get("general.alignment")
        if f is None:
            return DEFAULT_ALIGNMENT
        if f.kind != "UINT32" or f.value < 1 or f.value & (f.value - 1):
            raise self.corrupt(
                f"general.alignment must be a UINT32 power of two, not {f.type_name} "
                f"{printable(str(f.value), 40)}"
            )
        return int(f.value)

    def _sized(self, name: str, ne: tuple[int, ...], type_id: int, offset: int) -> TensorEntry:
        """The entry with its byte size, checked to lie inside the file's data."""
        import gguf

        shown = printable(name, 100)
        try:
            ggml_type = gguf.GGMLQuantizationType(type_id)
            block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise self.corrupt(f"tensor {shown} has type id {type_id}, no GGML type") from None
        if ne and ne[0] % block:
            raise self.corrupt(
                f"tensor {shown} rows of {ne[0]} are not whole {ggml_type.name} blocks of {block}"
            )
        n_bytes = math.prod(ne) // block * type_size
        if offset % self.alignment:
            raise self.corrupt(
                f"tensor {shown} starts at data offset {offset}, "
                f"not a multiple of the alignment {self.alignment}"
            )
        at = self.data_offset + offset
        if at + n_bytes > self.size:
            raise self.corrupt(
                f"truncated: tensor {shown} {tuple(reversed(ne))} {ggml_type.name} needs "
                f"{n_bytes} bytes at byte {at}, the file ends at {self.size}"
            )
        return TensorEntry(name, tuple(int(d) for d in reversed(ne)), ggml_type, at, n_bytes)
