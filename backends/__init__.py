"""Backends by name: ``get_backend("numpy")``. Concrete modules load lazily, so importing this
package never imports a GPU library.

    from backends import get_backend, device_spec
    be = get_backend("numpy")
    spec = device_spec("cupy")     # the CUDA backend's facts, with no GPU or CuPy needed
"""

from __future__ import annotations

import importlib

from backends.base import COMPUTE_OPS, Backend, BackendError
from backends.spec import Costs, DeviceSpec

__all__ = [
    "get_backend",
    "device_spec",
    "DeviceSpec",
    "Costs",
    "available_backends",
    "best_backend",
    "Backend",
    "BackendError",
    "COMPUTE_OPS",
]

# name -> (module, class, how to get it)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "numpy": ("backends.numpy_backend", "NumpyBackend", "pip install streamgraph"),
    "cupy": (
        "backends.cupy_backend",
        "CupyBackend",
        "install CuPy for your CUDA: pip install 'streamgraph[cuda13]' (or [cuda12])",
    ),
}
_CACHE: dict[str, Backend] = {}


def get_backend(name: str | Backend) -> Backend:
    """The backend called ``name`` (one instance per process), or a clear ``BackendError``.

    ``"auto"`` is the best backend present: CuPy where a CUDA device works, else NumPy.
    """
    if isinstance(name, Backend):
        return name
    if name == "auto":
        return get_backend(best_backend())
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r}; known: auto, {', '.join(_REGISTRY)}")
    if name not in _CACHE:
        module, cls, how = _REGISTRY[name]
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise BackendError(f"backend {name!r} is not available here: {e}; {how}") from None
        _CACHE[name] = getattr(mod, cls)()
    return _CACHE[name]


def available_backends() -> list[str]:
    """Names of the backends that load on this machine, best first."""
    out = []
    for name in reversed(list(_REGISTRY)):
        try:
            get_backend(name)
        except BackendError:
            continue
        out.append(name)
    return out


def best_backend() -> str:
    """The GPU backend where one works, else ``numpy``."""
    return available_backends()[0]


def device_spec(backend: str | Backend) -> DeviceSpec:
    """What a planner knows of ``backend``'s device: the backend's own ``spec`` where it loads
    here (so a tool plans with the facts a session will run with), else the nominal spec (no
    hardware, no CUDA library needed: a machine without a GPU plans for one). ``auto`` is the
    best backend here."""
    if isinstance(backend, Backend):
        return backend.spec
    try:
        return get_backend(backend).spec
    except BackendError:
        if backend != "cupy":
            raise
    from backends.cuda_spec import nominal

    return nominal()
