"""Shared test set-up: the ``gpu`` marker skips cleanly where CUDA or CuPy is absent; the ``gpu``
fixture is the CuPy backend, and ``close`` the GPU tests' comparison with the NumPy reference.
The cache directory (``$STREAMGRAPH_CACHE``) is a temporary one for the whole run; packaged
models (``$STREAMGRAPH_MODELS``) stay where the user's own runs find them, so a 253 MB model is
assembled once, not once per test run."""

from __future__ import annotations

import functools

import numpy as np
import pytest


@functools.cache
def cuda_available() -> str | None:
    """None if a CUDA device is usable through CuPy, else the reason it is not."""
    try:
        import cupy  # noqa: F401

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as e:  # ImportError, or a CUDA driver error
        return f"CuPy/CUDA unavailable: {type(e).__name__}: {e}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "gpu" in item.keywords:
            reason = cuda_available()
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def _cache_in_a_temporary_directory(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN202
    """Calibrations and derived entries the tests cause land in a directory of the test run,
    never in the user's cache (a test may override it with its own). Packaged models are the
    exception: they resolve to the models directory the user's runs use (read before the
    redirect), where the first run assembles them and every later one finds them; assembly is
    checked against the package's SHA-256 and atomic, so sharing it is safe."""
    from engine.cache import models_dir

    mp = pytest.MonkeyPatch()
    mp.setenv("STREAMGRAPH_MODELS", str(models_dir()))
    mp.setenv("STREAMGRAPH_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def gpu():  # noqa: ANN201
    from backends import get_backend

    return get_backend("cupy")


def close(got: np.ndarray, want: np.ndarray, tol: float, what: str = "") -> None:
    """Equal within ``tol`` relative to each value and to the largest magnitude (at least 1),
    with the same entries finite."""
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert g.shape == w.shape, what
    assert np.isfinite(g).all() == np.isfinite(w).all(), what
    scale = max(1.0, float(np.abs(w).max(initial=0.0)))
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * scale, err_msg=what)
