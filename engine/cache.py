"""Where streamgraph keeps what it derives once and reuses: ``$STREAMGRAPH_CACHE``, else
``~/.cache/streamgraph`` (the device's calibration, assembled packaged models)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    return Path(os.environ.get("STREAMGRAPH_CACHE") or Path.home() / ".cache" / "streamgraph")
