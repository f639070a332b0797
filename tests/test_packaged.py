"""``resolve_model``: packaged models assembled once into the models directory, checked by
SHA-256 and moved into place atomically; with a fake package, so no model is needed."""

from __future__ import annotations

import hashlib
import os
import sys
import types
from pathlib import Path

import pytest

from engine.cache import cache_dir, models_dir
from engine.model import packaged
from engine.model.packaged import ModelNotFound, resolve_model


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """A package as ``resolve_model`` sees one: a name, a checksum and its chunks."""
    chunks = [tmp_path / "part0", tmp_path / "part1"]
    chunks[0].write_bytes(b"GGUF" + bytes(100))
    chunks[1].write_bytes(b"tail")
    mod = types.SimpleNamespace(
        __name__="fake_model_pkg",
        MODEL_NAME="fake.gguf",
        EXPECTED_SHA256=hashlib.sha256(b"GGUF" + bytes(100) + b"tail").hexdigest(),
        chunk_paths=lambda: chunks,
    )
    monkeypatch.setitem(sys.modules, "fake_model_pkg", mod)
    monkeypatch.setitem(packaged.PACKAGED, "fake", ("fake_model_pkg", "pip install fake"))
    monkeypatch.setenv("STREAMGRAPH_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("STREAMGRAPH_CACHE", str(tmp_path / "cache"))
    return mod


def test_assembled_once_into_the_models_directory(
    fake: types.SimpleNamespace, tmp_path: Path
) -> None:
    path = resolve_model("fake")
    assert path == models_dir() / "fake.gguf" and path.parent != cache_dir()
    assert path.read_bytes() == b"GGUF" + bytes(100) + b"tail"
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no .part left
    fake.chunk_paths = lambda: []
    assert resolve_model("fake") == path  # found, not assembled again
    assert resolve_model(str(path)) == path  # a path is itself


def test_directory_argument(fake: types.SimpleNamespace, tmp_path: Path) -> None:
    path = resolve_model("fake", tmp_path / "elsewhere")
    assert path == tmp_path / "elsewhere" / "fake.gguf" and path.is_file()


def test_models_directory_defaults_to_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STREAMGRAPH_MODELS", raising=False)
    monkeypatch.setenv("STREAMGRAPH_CACHE", str(tmp_path))
    assert models_dir() == tmp_path == cache_dir()


def test_wrong_checksum_leaves_nothing(fake: types.SimpleNamespace) -> None:
    fake.EXPECTED_SHA256 = "0" * 64
    with pytest.raises(ModelNotFound, match="fake.gguf has the wrong SHA-256; reinstall"):
        resolve_model("fake")
    assert list(models_dir().iterdir()) == []


def test_missing_chunks_and_unknown_names(fake: types.SimpleNamespace, tmp_path: Path) -> None:
    fake.chunk_paths = lambda: [tmp_path / "gone"]
    with pytest.raises(ModelNotFound, match="lacks chunks"):
        resolve_model("fake")
    with pytest.raises(ModelNotFound, match="no packaged model of that name"):
        resolve_model("nope")


def test_test_runs_share_models_but_not_the_cache() -> None:
    """conftest: what tests derive goes to the run's temporary cache, while packaged models
    resolve to the user's models directory, assembled once for every run."""
    assert os.environ["STREAMGRAPH_MODELS"] == str(models_dir())
    assert not models_dir().resolve().is_relative_to(cache_dir().resolve())
