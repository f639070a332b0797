"""Every setting a run takes, as one frozen, validated value.

    opts = Options(backend="cupy", offload="auto", vram=8, n_ctx=4096)
    opts.replace(streams="auto")           # a new value; Options never change
    print(opts)                            # the settings that differ from the defaults

A ``Session`` runs with one; ``engine.passes.plans.plan_model`` plans with one; the command line
builds one from the flags every command shares (``tools.args``), so ``generate``, ``perplexity``,
``bench``, ``dump`` and ``graph`` take the same names for the same things. Bad values are refused
here, each naming its setting and the flag that sets it, before anything is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from graph.dtypes import dtype_of
from graph.ops import GraphError

__all__ = ["Options", "OptionsError", "BACKENDS", "MODES", "FLOAT_TYPES", "MAX_STREAMS"]

BACKENDS = ("auto", "numpy", "cupy")
MODES = ("graph", "eager")
"""graph: each forward pass captured once and replayed; eager: one launch per node per run."""
FLOAT_TYPES = ("f32", "f16", "bf16")
MAX_STREAMS = 8
"""More compute streams than this never helped (the scheduler's ``auto`` tops out here too)."""


class OptionsError(GraphError):
    """A setting with a value it cannot take; the message names the flag."""


@dataclass(frozen=True)
class Options:
    """The settings of a run (see the module doc). Each field's flag is in ``FLAGS``."""

    backend: str = "numpy"  # numpy, cupy, or auto: CuPy where a GPU works
    dtype: str | None = None  # weight storage after loading; None: the model's own (f32 here)
    mode: str = "graph"  # graph: each step captured once and replayed; eager: launched each time
    fusion: bool = True  # run the fusion pass's groups as one kernel each where a backend can
    stack: bool = True  # Q/K/V and gate/up projections stacked into one matrix product each
    streams: int | str = 1  # compute streams per forward pass, or "auto"
    offload: str | None = None  # weight placement policy: auto, ngl=N, *N+K (all: None)
    vram: float | None = None  # GiB of device memory for weights and their ring
    cache: float = 0.0  # GiB of device memory for a parameter cache of streamed layers
    kv_type: str | None = (
        None  # storage of the KV cache; None: the device's (DeviceSpec.cache_type)
    )
    n_ctx: int = 2048  # positions the context holds
    n_batch: int = 512  # the longest chunk one forward pass takes

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        if self.dtype is not None:
            _check_choice("dtype", self.dtype, FLOAT_TYPES)
        _check_choice("mode", self.mode, MODES)
        if self.kv_type is not None:
            _check_choice("kv_type", self.kv_type, FLOAT_TYPES)
        if isinstance(self.streams, bool) or not (
            self.streams == "auto"
            or (isinstance(self.streams, int) and 1 <= self.streams <= MAX_STREAMS)
        ):
            raise OptionsError(
                f"{_what('streams')} takes a count from 1 to {MAX_STREAMS} or auto, "
                f"not {self.streams!r}"
            )
        if self.offload is not None:
            from engine.passes.offload import check_policy_syntax

            try:
                check_policy_syntax(self.offload)
            except GraphError as e:
                raise OptionsError(f"{_what('offload')}: {e}") from None
            if self.offload.strip() == "all":  # everything resident: no placement to make
                object.__setattr__(self, "offload", None)
        if self.vram is not None:
            _check_gib("vram", self.vram, positive=True)
        _check_gib("cache", self.cache, positive=False)
        for name in ("n_ctx", "n_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionsError(f"{_what(name)} must be a whole number >= 1, not {value!r}")
        if self.offload == "auto" and self.vram is None:
            raise OptionsError(
                f"{_what('offload')} auto picks a placement within a budget: give {_what('vram')}"
            )
        if self.offload is None and self.cache:
            raise OptionsError(
                f"{_what('cache')} caches streamed layers: it needs {_what('offload')} "
                "with a policy that streams (*N+K or auto)"
            )

    def replace(self, **changes: Any) -> Options:
        """A copy with ``changes`` applied (and checked)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise OptionsError(
                f"unknown option(s) {', '.join(unknown)}; options are "
                f"{', '.join(f.name for f in fields(self))}"
            )
        return replace(self, **changes)

    @property
    def budget_bytes(self) -> int | None:
        """``vram`` in bytes."""
        return None if self.vram is None else int(self.vram * 2**30)

    @property
    def cache_bytes(self) -> int:
        return int(self.cache * 2**30)

    @property
    def weight_dtype(self) -> Any:
        """``dtype`` as a ``graph.dtypes.DType`` (f32 when none is asked for)."""
        return dtype_of(self.dtype or "f32")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __str__(self) -> str:
        default = Options()
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        ]
        return f"Options({', '.join(changed)})"


FLAGS = {
    "backend": "--backend",
    "dtype": "--dtype",
    "mode": "--graphs",
    "fusion": "--no-fusion",
    "stack": "--no-stack",
    "streams": "--streams",
    "offload": "--offload",
    "vram": "--vram",
    "cache": "--cache",
    "kv_type": "--cache-type",
    "n_ctx": "-c/--ctx-size",
    "n_batch": "-b/--batch-size",
}
"""The command-line flag of each option (``tools.args``), named in every error."""


def _what(name: str) -> str:
    """An option as errors name it: the setting and its command-line flag."""
    return f"{name} ({FLAGS[name]})"


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionsError(f"{_what(name)} takes one of {', '.join(choices)}, not {value!r}")


def _check_gib(name: str, value: object, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > 0 if positive else value >= 0) and value <= 2**20:  # type: ignore[operator]
        return
    need = "a positive" if positive else "a non-negative"
    raise OptionsError(f"{_what(name)} takes {need} number of GiB, not {value!r}")
