"""The plans a model runs by: values all the way down.

    mp = plan_model(cfg, spec, options, costs)      # placement, split, ring, KV rows
    print(mp)                                       # every decision with its cause
    (sp,) = plan_step(mp, StepKey(1, (("full", 64),), "argmax"))
    print(sp)                                       # the flat list of steps an Executor runs
    sp = plan_graph(graph, spec, options)           # a bare graph's step plan

Each is a pure function of its arguments: a model config (``graph.models``), a device spec
(``backends.device_spec``: facts a machine without the device can read), the options of a run
(``engine.options``) and the costs the placement is timed with (nominal, or calibrated by
``engine.runtime.calibration``). A session runs what these return; ``streamgraph dump``,
``graph`` and ``bench`` call the same functions with the same costs, so what a tool shows is
what a session runs (tests check it). An ``Executor`` binds a ``StepPlan`` to arrays and runs
its steps in one loop. The step plan of a bare graph is ``engine.passes.steps`` (re-exported).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from backends import device_spec
from backends.spec import Costs, DeviceSpec
from engine.options import Options
from engine.passes.offload import HOST, STREAMED, Placement, place
from engine.passes.ring import RingPlan, ring_plan
from engine.passes.steps import Decisions, Step, StepPlan, host_gathers, plan_graph
from graph.dtypes import f32
from graph.ir import Graph
from graph.models import ModelConfig, build, kv_slots
from graph.ops import GraphError

__all__ = [
    "Decisions",
    "Step",
    "StepPlan",
    "StepKey",
    "Segment",
    "ModelPlan",
    "plan_graph",
    "plan_model",
    "plan_step",
    "host_gathers",
    "KV_PAD",
    "kv_bucket",
]

KV_PAD = 64
"""Attended cache rows are the filled prefix rounded up to this (as llama.cpp pads), so the
step's graph, and its executor, change only every KV_PAD positions (``ModelPlan.step_key``);
coarser beyond ``4 * KV_PAD`` where the device's attention reads only the filled rows
(``kv_bucket``)."""


def kv_bucket(n_end: int, coarse: bool = False) -> int:
    """The rows a step attends to once ``n_end`` positions are filled: ``n_end`` rounded up to
    ``KV_PAD``; with ``coarse`` (``DeviceSpec.prefix_attention``: the kernels stop reading at
    each query's row, so padding rows cost nothing) rounded up beyond ``4 * KV_PAD`` to a
    quarter of the power of two at or above it, two buckets per doubling past 1,024 (512, 768,
    1024, 1536, 2048, 3072, 4096, ...): 15 executors over a 16,384-token context instead of
    256, each of which costs a plan, a binding and a capture on first use."""
    fine = -(-n_end // KV_PAD) * KV_PAD
    if not coarse or fine <= 4 * KV_PAD:
        return fine
    step = max(4 * KV_PAD, 1 << ((fine - 1).bit_length() - 2))
    return -(-n_end // step) * step


@dataclass(frozen=True)
class Segment:
    """Layers ``first..end-1`` of a model (the head is layer ``n_layer``) on one backend."""

    first: int
    end: int
    backend: str
    dtype: str  # the weight matrices' storage there
    on_host: bool = False  # the CPU backend computing a split model's later layers


@dataclass(frozen=True)
class StepKey:
    """Which forward pass: ``n_tokens`` at once, attending to ``n_kv`` rows of each kind of
    cache, computing ``logits`` ("last", "all", "none", "argmax" or row numbers). A session
    keeps one executor per key (``Session.step_key`` makes them)."""

    n_tokens: int
    n_kv: tuple[tuple[str, int], ...]
    logits: str | tuple[int, ...] = "last"


@dataclass(frozen=True)
class ModelPlan:
    """How a session runs a model: the options, the device and the costs it plans with, where
    each weight lives (``placement``; the embedding's rows gathered on the host, streamed layers
    in a ``ring``) and how the model is split between backends (``segments``, ``ngl=N``)."""

    config: ModelConfig  # with the options' weight type applied
    options: Options
    spec: DeviceSpec
    costs: Costs
    costs_source: str  # "nominal ..." or "calibrated ... (cached in ...)"
    placement: Placement | None
    segments: tuple[Segment, ...]
    streamed: frozenset[str]  # weights that live in host memory and stream through the ring
    host_tables: frozenset[str]  # weights kept in host memory, only rows gathered
    host_weights: frozenset[str]  # weights of the layers the CPU backend computes
    ring: RingPlan | None
    kv_rows: Mapping[str, int]  # cache rows per attention kind
    n_batch: int

    def n_kv_for(self, n_end: int) -> dict[str, int]:
        """Rows each attention kind attends to once ``n_end`` positions are filled: the filled
        prefix rounded up (``kv_bucket``: coarsely where the device's attention reads only the
        filled rows). A sliding ring fills rows 0, 1, ... too until it wraps, so early in a
        context its layers also skip the empty rows."""
        # coarse only where every layer runs on the device: the CPU segment of a split model
        # computes every row it is given (up to twice the attention a fine bucket asks)
        coarse = self.spec.prefix_attention and not any(s.on_host for s in self.segments)
        pad = kv_bucket(n_end, coarse)
        return {kind: min(n, pad) for kind, n in self.kv_rows.items()}

    def step_key(self, n_tokens: int, n_end: int, logits: str | Sequence[int] = "last") -> StepKey:
        """The forward pass over ``n_tokens`` that fills positions up to ``n_end``."""
        rows = logits if isinstance(logits, str) else tuple(int(r) for r in logits)
        return StepKey(n_tokens, tuple(sorted(self.n_kv_for(n_end).items())), rows)

    @property
    def split(self) -> int | None:
        """The first layer the CPU backend computes, if the model is split."""
        return next((s.first for s in self.segments if s.on_host), None)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV caches (every layer's K and V, wherever its segment runs)."""
        cfg = self.config
        item = {"f32": 4, "f16": 2, "bf16": 2}[self.options.kv_type]
        per_row = 2 * cfg.n_head_kv * cfg.head_dim * item
        return sum(self.kv_rows[kind] * per_row for kind in cfg.layer_kinds)

    @property
    def device_weight_bytes(self) -> int:
        """Weights the device holds: resident layers plus the ring (all of them unplaced)."""
        if self.placement is None:
            return self.config.n_bytes(self.options.stack)
        extra = self.ring.cache_bytes if self.ring is not None else 0
        return self.placement.device_bytes + extra

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.config.name or self.config.arch,
            "options": self.options.to_dict(),
            "device": self.spec.to_dict(),
            "costs": self.costs.to_dict(),
            "costs_source": self.costs_source,
            "placement": self.placement.to_dict() if self.placement is not None else None,
            "segments": [vars(s) for s in self.segments],
            "ring": self.ring.to_dict() if self.ring is not None else None,
            "kv_rows": dict(self.kv_rows),
            "n_batch": self.n_batch,
        }

    def __str__(self) -> str:
        cfg = self.config
        lines = [
            f"ModelPlan: {cfg.name or cfg.arch} {cfg.storage} on {self.spec.backend} "
            f"({self.spec.name or self.spec.device}); {self.options}",
            f"  costs: {self.costs_source}",
        ]
        for s in self.segments:
            last = "head" if s.end > cfg.n_layer else f"layer {s.end - 1}"
            lines.append(f"  segment: layers {s.first}..{last} on {s.backend} ({s.dtype} weights)")
        if self.placement is not None:
            lines.append(f"  timed with: {self.costs.describe(cfg.storage.split('+'))}")
            lines.append(str(self.placement))
        if self.ring is not None:
            lines.append(str(self.ring))
        return "\n".join(lines)


def plan_model(
    cfg: ModelConfig,
    spec: DeviceSpec,
    options: Options,
    costs: Costs | None = None,
    costs_source: str | None = None,
) -> ModelPlan:
    """How a session runs ``cfg`` on ``spec``'s device with ``options`` (see ``ModelPlan``);
    placements are timed with ``costs`` (the spec's nominal ones by default)."""
    if costs is None:
        costs = spec.costs
        costs_source = costs_source or f"nominal for {spec.name or spec.backend}"
    if options.dtype is not None:
        cfg = cfg.dequantized(options.weight_dtype)
    if options.kv_type is None:
        options = options.replace(kv_type=spec.cache_type)
    n_batch = min(options.n_batch, options.n_ctx)
    plan = dict(
        config=cfg,
        options=options,
        spec=spec,
        costs=costs,
        costs_source=costs_source or "given",
        kv_rows=kv_slots(cfg, options.n_ctx, n_batch),
        n_batch=n_batch,
    )
    whole = Segment(0, cfg.n_layer + 1, spec.backend, cfg.storage)
    if options.offload is None:
        return ModelPlan(
            **plan,  # type: ignore[arg-type]
            placement=None,
            segments=(whole,),
            streamed=frozenset(),
            host_tables=frozenset(),
            host_weights=frozenset(),
            ring=None,
        )
    probe = build(cfg, 1, kv_slots(cfg, options.n_ctx, 1), None, "last", f32, options.stack)
    placement = place(probe, options.offload, options.budget_bytes, costs)
    segments, host_weights = _split(cfg, spec, placement, probe, options.offload)
    split = next((s.first for s in segments if s.on_host), None)
    layers = {p.layer for p in placement.layers if p.where == STREAMED}
    streamed = frozenset(n.name for n in probe.weights if n.layer in layers and len(n.shape) >= 2)
    # the embedding stays in host memory: only the rows of a step's tokens move
    tables = frozenset(
        n.name
        for n in probe.weights
        if n.layer == -1 and placement.where(-1) == HOST and split != 0
    )
    return ModelPlan(
        **plan,  # type: ignore[arg-type]
        placement=placement,
        segments=segments,
        streamed=streamed,
        host_tables=tables,
        host_weights=host_weights,
        ring=ring_plan(probe, placement, options.cache_bytes),
    )


def _split(
    cfg: ModelConfig, spec: DeviceSpec, placement: Placement, probe: Graph, policy: str
) -> tuple[tuple[Segment, ...], frozenset[str]]:
    """The segments ``placement`` splits the model into (layers from the first host one on,
    the head among them, run on the CPU backend) and the weights the host computes with."""
    host = sorted(p.layer for p in placement.layers if p.where == HOST and p.layer >= 0)
    whole = Segment(0, cfg.n_layer + 1, spec.backend, cfg.storage)
    if not host:
        return (whole,), frozenset()
    if host != list(range(host[0], cfg.n_layer + 1)):
        raise GraphError(
            f"offload policy {policy!r} puts layers {host} on the host; a session splits a "
            "model once: every layer from the first host one on, the head too"
        )
    split = host[0]
    # the CPU backend widens half-precision matrices to f32 for every product, which costs
    # more than the product, and decodes block types: the host's layers are widened once, at load
    wide = cfg.storage != "f32"
    on_host = Segment(split, cfg.n_layer + 1, "numpy", "f32" if wide else cfg.storage, True)
    device = Segment(0, split, spec.backend, cfg.storage)
    names = frozenset(
        n.name for n in probe.weights if n.layer >= split or (split == 0 and n.layer == -1)
    )
    return ((on_host,) if split == 0 else (device, on_host)), names


def plan_step(mp: ModelPlan, key: StepKey) -> tuple[StepPlan, ...]:
    """The step plans of one forward pass: one, or one per segment of a split model (each
    feeding the next its hidden states; the CPU backend's runs eagerly)."""
    cfg, opts = mp.config, mp.options
    n_kv = dict(key.n_kv)
    logits = key.logits
    out = []
    for seg in mp.segments:
        whole = seg.first == 0 and seg.end == cfg.n_layer + 1
        seg_cfg = cfg if seg.dtype == cfg.storage else cfg.dequantized(f32, keep_stacking=True)
        graph = build(
            seg_cfg,
            key.n_tokens,
            dict(mp.kv_rows),
            n_kv,
            logits,
            opts.kv_type,
            opts.stack,
            None if whole and not seg.on_host else (seg.first, seg.end),
        )
        if seg.on_host:
            spec = device_spec("numpy")
            out.append(plan_graph(graph, spec, opts.replace(mode="eager", streams=1)))
        elif len(mp.segments) > 1:  # a split model's device part: one stream, no ring
            out.append(
                plan_graph(
                    graph,
                    mp.spec,
                    opts.replace(streams=1),
                    host_tables=mp.host_tables,
                    costs=mp.costs,
                )
            )
        else:
            ring = mp.ring
            out.append(
                plan_graph(
                    graph, mp.spec, opts, ring=ring, host_tables=mp.host_tables, costs=mp.costs
                )
            )
    return tuple(out)
