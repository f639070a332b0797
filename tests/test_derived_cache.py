"""The derived cache (``engine.cache``) and what uses it: the tokenizer's serialized model.

An entry is found again for the same file, never for a rewritten one (even with the old size
and modification time), rebuilt when damaged, written atomically, bounded in size, and a cache
that cannot be written only costs the rebuild.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import engine.cache as cache
import engine.model.tokenizer as tokenizer
from engine.model.tokenizer import CACHE_KIND, Tokenizer
from tests.gguf_fixtures import gguf_string
from tests.test_tokenizer import TOKENS, T, write_vocab


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STREAMGRAPH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def entries() -> list[Path]:
    d = cache.derived_dir()
    return sorted(p for p in d.iterdir() if p.suffix == ".bin") if d.exists() else []


def test_store_load_and_validation() -> None:
    assert cache.load_derived("k", "a" * 64) is None
    path = cache.store_derived("k", "a" * 64, b"payload")
    assert path is not None and cache.load_derived("k", "a" * 64) == b"payload"
    assert cache.load_derived("k", "b" * 64) is None and cache.load_derived("j", "a" * 64) is None
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    blob = path.read_bytes()
    for damaged in (blob[:-1], blob[:10], blob[:-1] + b"X", b"", b"garbage\n" + blob):
        path.write_bytes(damaged)
        assert cache.load_derived("k", "a" * 64) is None  # never trusted ...
        assert not path.exists()  # ... and removed, to be rebuilt


def test_entries_are_bounded_least_recently_used_first() -> None:
    keys = [str(i) * 64 for i in range(5)]
    for i, key in enumerate(keys):
        path = cache.store_derived("k", key, bytes(1000))
        assert path is not None
        os.utime(path, (1000 + i, 1000 + i))  # stored in order, oldest first
    assert cache.load_derived("k", keys[0]) is not None  # used now: kept
    cache.prune(limit=3 * path.stat().st_size)
    kept = [cache.load_derived("k", key) is not None for key in keys]
    assert kept == [True, False, False, True, True] and len(entries()) == 3


def test_unwritable_cache_costs_only_the_rebuild(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("STREAMGRAPH_CACHE", str(blocker))
    assert cache.store_derived("k", "a" * 64, b"x") is None
    assert cache.load_derived("k", "a" * 64) is None
    tok = Tokenizer.from_gguf(write_vocab(tmp_path / "v.gguf"))
    assert tok.n_vocab == len(TOKENS)


def count_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    builds: list[int] = []
    real = tokenizer._model_proto

    def counted(v: tokenizer._Vocab) -> bytes:
        builds.append(1)
        return real(v)

    monkeypatch.setattr(tokenizer, "_model_proto", counted)
    return builds


def test_tokenizer_model_is_built_once_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = count_builds(monkeypatch)
    path = write_vocab(tmp_path / "v.gguf")
    first = Tokenizer.from_gguf(path)
    assert len(builds) == 1 and len(entries()) == 1
    assert entries()[0].name.startswith(CACHE_KIND + "-")
    again = Tokenizer.from_gguf(path)
    assert len(builds) == 1  # from the cache
    for text in ("hello world", "<start_of_turn>é 日本", ""):
        assert again.encode(text) == first.encode(text)


def test_a_rewritten_file_is_never_mistaken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same path, same size, same modification time, another vocabulary: another entry."""
    builds = count_builds(monkeypatch)
    path = write_vocab(tmp_path / "v.gguf")
    before = Tokenizer.from_gguf(path).encode("hello", add_bos=False)
    st = path.stat()
    data = path.read_bytes()
    swapped = data.replace(gguf_string("▁hello"), gguf_string("▁hellp"))
    assert swapped != data and len(swapped) == len(data)
    path.write_bytes(swapped)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    after = Tokenizer.from_gguf(path)
    assert len(builds) == 2 and len(entries()) == 2
    assert after.encode("hello", add_bos=False) != before
    assert "▁hellp" in [after.piece(i) for i in range(after.n_vocab)]


def test_a_damaged_entry_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = count_builds(monkeypatch)
    path = write_vocab(tmp_path / "v.gguf")
    want = Tokenizer.from_gguf(path).encode("hello world")
    (entry,) = entries()
    entry.write_bytes(entry.read_bytes()[:-7])  # truncated, as by a full disk
    assert Tokenizer.from_gguf(path).encode("hello world") == want
    assert len(builds) == 2 and entries() == [entry]  # rebuilt and stored again
    assert Tokenizer.from_gguf(path).encode("hello world") == want and len(builds) == 2


def test_gguf_reader_and_model_are_accepted(tmp_path: Path) -> None:
    import gguf

    path = write_vocab(tmp_path / "v.gguf", add_bos_token=(T.BOOL, False))
    from engine.model.gguf_file import GGUFFile

    for source in (path, str(path), GGUFFile(path), gguf.GGUFReader(path)):
        tok = Tokenizer.from_gguf(source)
        assert tok.source == str(path) and tok.encode("hello") == [TOKENS.index("▁hello")]
    with pytest.raises(TypeError, match="a path or an open GGUF file"):
        Tokenizer.from_gguf(42)
