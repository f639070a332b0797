"""Where streamgraph keeps what it derives once and reuses.

    cache_dir()      # $STREAMGRAPH_CACHE, else ~/.cache/streamgraph: calibrations, derived entries
    models_dir()     # $STREAMGRAPH_MODELS, else cache_dir(): packaged models assembled there
    key = file_key(path, header_digest)              # a model file's identity
    payload = load_derived("tokenizer", key)         # bytes, or None: build it, then
    store_derived("tokenizer", key, payload)         # best effort: never fails the caller

Derived entries (``cache_dir()/derived``) hold what is costly to rebuild from a model file,
today the tokenizer's serialized sentencepiece model (5 MB for a 262,144-token vocabulary,
0.2 s to build). They are:

* keyed by the file's identity: its resolved path, size, modification time and the SHA-256 of
  its header, so a file rewritten in place (even with its old size and time) is never mistaken
  for the one before it;
* written atomically (a temporary file in the same directory, then a rename), so a reader sees
  a whole entry or none;
* validated when read: a header line names the kind, the full key, the length and the
  SHA-256 of the payload, and anything that does not match (a truncated, damaged or foreign
  file) is deleted and reported as a miss, so it is rebuilt, never trusted;
* bounded: at most ``DERIVED_LIMIT`` bytes in all, the least recently used evicted first.

A cache that cannot be written (read-only home, full disk) costs only the rebuild.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

__all__ = [
    "cache_dir",
    "models_dir",
    "file_key",
    "load_derived",
    "store_derived",
    "derived_dir",
    "prune",
    "DERIVED_LIMIT",
]

DERIVED_LIMIT = 128 << 20  # bytes of derived entries kept (about 24 tokenizers of 262k tokens)
_MAGIC = b"streamgraph-derived-1"
_STALE_TMP_S = 3600  # a temporary file this old is a writer that died: removed when pruning


def cache_dir() -> Path:
    return Path(os.environ.get("STREAMGRAPH_CACHE") or Path.home() / ".cache" / "streamgraph")


def models_dir() -> Path:
    """Where packaged models are assembled: ``$STREAMGRAPH_MODELS``, else the cache directory
    (kept apart so that tests can redirect the cache and still share one assembled model)."""
    env = os.environ.get("STREAMGRAPH_MODELS")
    return Path(env) if env else cache_dir()


def derived_dir() -> Path:
    return cache_dir() / "derived"


def file_key(path: str | Path, header_digest: str) -> str:
    """A model file's identity as a hex key (see the module docstring)."""
    p = Path(path).resolve()
    st = p.stat()
    ident = f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{header_digest}"
    return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()


def _entry(kind: str, key: str) -> Path:
    return derived_dir() / f"{kind}-{key[:40]}.bin"


def _header(kind: str, key: str, payload: bytes) -> bytes:
    digest = hashlib.sha256(payload).hexdigest()
    return b" ".join(
        [_MAGIC, kind.encode(), key.encode(), str(len(payload)).encode(), digest.encode()]
    )


def load_derived(kind: str, key: str) -> bytes | None:
    """The payload stored for (``kind``, ``key``), or None when there is none or it does not
    validate (a bad entry is deleted)."""
    path = _entry(kind, key)
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    head, sep, payload = blob.partition(b"\n")
    if not sep or head != _header(kind, key, payload):
        path.unlink(missing_ok=True)
        return None
    try:
        os.utime(path)  # recently used: evicted last
    except OSError:
        pass
    return payload


def store_derived(kind: str, key: str, payload: bytes) -> Path | None:
    """Store ``payload`` atomically; the entry's path, or None where the cache is not
    writable. Then trim the cache to ``DERIVED_LIMIT``."""
    path = _entry(kind, key)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".bin", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(_header(kind, key, payload) + b"\n")
            f.write(payload)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return None
    prune(keep=path)
    return path


def prune(limit: int = DERIVED_LIMIT, keep: Path | None = None) -> None:
    """Delete the least recently used entries until the rest take at most ``limit`` bytes
    (``keep``, the entry just written, goes last), and temporary files left by dead writers."""
    now = time.time()
    entries = []
    try:
        found = list(derived_dir().iterdir())
    except OSError:
        return
    for p in found:
        try:  # (another process may be pruning too: a file may vanish under us)
            st = p.stat()
            if p.name.startswith(".tmp-"):
                if now - st.st_mtime > _STALE_TMP_S:
                    p.unlink(missing_ok=True)
            elif p.suffix == ".bin":
                entries.append((p == keep, st.st_mtime, st.st_size, p))
        except OSError:
            continue
    total = sum(e[2] for e in entries)
    for _, _, size, p in sorted(entries, key=lambda e: (e[0], e[1])):
        if total <= limit:
            break
        try:
            p.unlink()
            total -= size
        except OSError:
            pass
