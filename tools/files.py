"""Output files written whole or not at all: a command that fails half-way leaves no truncated
file behind (and never a half-written one where an older good file stood).

    with atomic_path("out.png") as tmp:   # write to tmp; renamed onto out.png at the end
        fig.savefig(tmp)
    write_atomic("out.json", text)
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "write_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A new, empty file beside ``path`` (created exclusively, with the permissions a plain
    ``open`` would give it) to write to; renamed onto ``path`` when the block ends without an
    error, removed whatever goes wrong."""
    path = Path(path)
    tmp = _create_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """``data`` (text is written as UTF-8) into ``path``, whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def _create_beside(path: Path) -> Path:
    for _ in range(8):  # a name nobody else holds
        tmp = path.with_name(f".{path.name[:200]}.{secrets.token_hex(4)}.part")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")
