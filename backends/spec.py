"""What a planner needs to know about a device, without the device: each backend's facts as one
frozen value, so that a machine without a GPU can plan for one.

    spec = backends.device_spec("cupy")     # the nominal H200; imports no CUDA library
    spec.alignment, spec.matvec_max_rows, spec.sm_count, spec.fused_patterns
    spec.scratch_bytes(node, srcs)          # kernel scratch this device's kernel needs for a node
    spec.costs                              # nominal Costs; engine.runtime.calibration measures

A live backend has ``backend.spec``: the same facts, with what the hardware says (its SM count,
its name). A plan records the spec it was made for, and an executor refuses to bind a plan made
for other facts (its arena would hold the wrong scratch sizes).

``Costs`` is the one cost model every pass times with: the offload pass's placements and
``predict``, the stream pass's ``auto`` (``engine.passes.scheduler.step_cost``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

from graph.ir import Node
from graph.ops import Op

__all__ = ["Costs", "DeviceSpec", "ALIGN"]

ALIGN = 256
"""Bytes every arena offset, ring slot offset and kernel scratch is aligned to: what CUDA's
vector loads and cuBLAS want; the NumPy backend plans the same way (it is the reference)."""


@dataclass(frozen=True)
class Costs:
    """What work costs on a device: the numbers the passes time with.

    ``link_bytes_per_s``, ``device_bytes_per_s``, ``host_bytes_per_s``, ``launch_s``,
    ``copy_overhead_s`` and ``device_rates`` are measured by ``engine.runtime.calibration``; the
    others stay nominal. The defaults are an H200's (measured there, 2026-11).

    ``device_rates``: (storage type, bytes per second) pairs, sorted by type: what a forward
    pass of decode products reads per second with weights of that type. A type's kernels read at
    their own rate (on an H100 the calibration measured Q4_K at 1.08 TB/s of block bytes, Q8_0
    at 1.44, bf16 at 1.77, where the f32 product read 1.92), so a layer is charged by its
    matrices' types (``layer_s``); a type without a rate is charged ``device_bytes_per_s``."""

    link_bytes_per_s: float = 50e9  # pinned host->device (~55 GB/s measured)
    device_bytes_per_s: float = 3.5e12  # what a decode product reads per second on the device
    host_bytes_per_s: float = 20e9  # NumPy's matrix-vector product on the host
    launch_s: float = 20e-6  # the fixed cost of computing one layer (its launches)
    copy_overhead_s: float = 5e-6  # what each copy costs beyond its bytes (setup, DMA latency)
    kernel_latency_s: float = 2e-6  # any one launch: launch and DRAM latency
    device_flops_per_s: float = 300e12  # 16-bit matrix work on tensor cores
    device_rates: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        # one order whatever the source (measured, read back, a dict): equal costs compare equal
        rates = tuple(sorted((str(t), float(r)) for t, r in dict(self.device_rates).items()))
        object.__setattr__(self, "device_rates", rates)

    def device_s(self, nbytes: int) -> float:
        """One layer of ``nbytes`` of weights computed on the device (decode)."""
        return self.launch_s + nbytes / self.device_bytes_per_s

    def rate(self, dtype: str) -> float:
        """Bytes per second a decode product reads of ``dtype`` weights: the type's calibrated
        rate, else ``device_bytes_per_s``."""
        return dict(self.device_rates).get(dtype, self.device_bytes_per_s)

    def layer_s(self, type_bytes: Mapping[str, int]) -> float:
        """One layer computed on the device (decode), its matrices' bytes by storage type:
        its launches plus each type's bytes at that type's rate."""
        return self.launch_s + sum(n / self.rate(t) for t, n in type_bytes.items())

    def host_s(self, nbytes: int) -> float:
        """One layer of ``nbytes`` of weights computed by the CPU backend."""
        return nbytes / self.host_bytes_per_s

    def copy_s(self, nbytes: int, copies: int = 1) -> float:
        """A layer's fetch: its bytes at link speed plus the overhead of each of its copies
        (one per weight matrix)."""
        return copies * self.copy_overhead_s + nbytes / self.link_bytes_per_s

    def kernel_s(self, nbytes: int, flops: int) -> float:
        """One launch that moves ``nbytes`` and does ``flops``: its latency plus the larger of
        its bytes at memory speed and its matrix work at tensor-core speed."""
        return self.kernel_latency_s + max(
            nbytes / self.device_bytes_per_s, flops / self.device_flops_per_s
        )

    def describe(self, types: Sequence[str] = ()) -> str:
        """The numbers a placement is timed with, in words (``types``: the storage types whose
        rates to show)."""
        rates = ", ".join(f"{t} {self.rate(t) / 1e12:.2f}" for t in types)
        device = f"{self.device_bytes_per_s / 1e12:.2f} TB/s" + (
            f" ({rates} TB/s)" if rates else ""
        )
        return (
            f"link {self.link_bytes_per_s / 1e9:.1f} GB/s, device {device}, "
            f"{self.launch_s * 1e6:.0f} µs a layer's launches, "
            f"host {self.host_bytes_per_s / 1e9:.1f} GB/s"
        )

    def to_dict(self) -> dict[str, object]:
        """The costs as JSON takes them (``device_rates`` as an object: type -> rate)."""
        out: dict[str, object] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["device_rates"] = dict(self.device_rates)
        return out


@dataclass(frozen=True)
class DeviceSpec:
    """A backend's device facts (see the module doc). Compared whole: two specs plan alike
    exactly when they are equal, so ``name`` (the device's description) is left out."""

    backend: str  # the backend's registry name: numpy, cupy
    device: str  # what a drawing calls it: cpu, gpu
    ops: frozenset[Op]  # the compute ops it has kernels for
    fused_patterns: frozenset[str]  # engine.passes.fusion patterns it runs as one launch
    matvec_max_rows: int  # products with at most this many rows are matrix-vector ones
    sm_count: int  # multiprocessors: attention splits its keys to fill them (its scratch)
    alignment: int = ALIGN
    # GGUF block types (graph.dtypes names) its matrix products and row gathers read as stored
    block_types: frozenset[str] = frozenset()
    # whether a GGUF runs in its own types here unless --dtype asks otherwise: on a GPU, the
    # block kernels move a third of the bytes; the CPU reference dequantizes once at load
    keeps_block_types: bool = False
    # the KV cache's storage unless --cache-type says otherwise: f16 on a GPU (half the bytes
    # each decode step reads, and what the tensor-core prompt attention reads), f32 on the CPU
    # reference
    cache_type: str = "f32"
    # whether its attention kernels stop reading keys at each query's row where the node
    # promises prefix_rows (a session's caches): then a step may attend to more rows than are
    # filled at no cost, and steps are keyed by coarse buckets of the cache length
    # (engine.passes.plans.kv_bucket), so a long context needs few executors
    prefix_attention: bool = False
    costs: Costs = field(default_factory=Costs, compare=False)
    name: str = field(default="", compare=False)  # "NVIDIA H200 (nominal)", from describe()

    def scratch_bytes(self, node: Node, srcs: Sequence[Node]) -> int:
        """Bytes of temporary memory ``node``'s kernel needs on this device (planned in the
        arena); none by default."""
        return 0

    def to_dict(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "device": self.device,
            "name": self.name,
            "fused_patterns": sorted(self.fused_patterns),
            "alignment": self.alignment,
            "matvec_max_rows": self.matvec_max_rows,
            "sm_count": self.sm_count,
            "block_types": sorted(self.block_types),
            "prefix_attention": self.prefix_attention,
        }

    def __str__(self) -> str:
        fused = ", ".join(sorted(self.fused_patterns)) or "none (groups run member by member)"
        return (
            f"{self.backend} ({self.name or self.device}): {len(self.ops)} ops, fused kernels: "
            f"{fused}; alignment {self.alignment} B, matrix-vector up to "
            f"{self.matvec_max_rows} rows, {self.sm_count} SMs"
        )
