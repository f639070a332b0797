"""Shared test set-up: the ``gpu`` marker skips cleanly where CUDA or CuPy is absent."""

from __future__ import annotations

import functools

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
