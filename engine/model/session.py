"""A model session: a model plan, weights loaded once, KV caches, and an executor per step shape.

    sess = Session(preset("gemma3-tiny"), random_weights(preset("gemma3-tiny")), n_ctx=128)
    logits = sess.prefill([2, 17, 99])     # (vocab,) for the last prompt token
    logits = sess.decode(int(logits.argmax()))
    print(sess.plan)                       # the ModelPlan: placement, split, ring, costs used

A session is a ``ModelPlan`` (``engine.passes.plans.plan_model``, made by ``plan_for`` with the
costs ``engine.runtime.calibration.costs_for`` gives: what ``streamgraph dump``, ``graph`` and
``bench`` show for the same options), the weights placed as it says, KV bookkeeping, and a cache
of executors, one per ``StepKey`` (``plan_step`` makes each one's step plan).

The caches are STATE tensors shared by every executor (one per distinct chunk length and
attended length), so a decode step reuses the same executor, arrays and plan. The session is
the only place that knows which cache row holds which position:

* full-attention layers: row = position (``n_ctx`` rows);
* sliding-window layers: a ring of ``window + n_batch - 1`` rows, row = position mod size, so a
  chunk's queries never lose a key they can still see.

It turns that bookkeeping into the ``kv_idx.*`` / ``kv_pos.*`` inputs of ``graph.models.common``.
Layers attend to the first ``n_kv`` rows only (the filled ones, until a ring wraps), rounded up
(``engine.passes.plans.kv_bucket``), so the attended length - and the executor - changes only
at bucket edges. On the CPU reference the buckets are ``KV_PAD`` (64) rows, as llama.cpp pads:
it computes every attended row. On the GPU, whose attention kernels stop reading at each
query's row (the caches are filled in position order: ``AttentionParams.prefix_rows``), padding
rows cost nothing and the buckets grow with the context (64-row steps to 256, then 512, 768,
1024, 1536, 2048, 3072, ...): a 16,384-token context needs 15 executors instead of 256, and
each one is a plan, a binding and a capture the first time a generation or a prompt reaches it
(on an H100 a 7B's 512-token chunk took 0.19-0.51 s the first time, 0.02-0.05 s replayed).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends import Backend, get_backend
from backends.base import Quantized, on_host
from engine.model.sampling import Sampler, SamplerConfig
from engine.model.weights import concat_rows, tie_output, widened
from engine.options import Options
from engine.passes.plans import KV_PAD, ModelPlan, StepKey, plan_model, plan_step
from engine.runtime.calibration import costs_for
from engine.runtime.executor import Executor
from engine.runtime.streaming import WeightRing
from engine.views.trace import CPU, Trace
from graph.dtypes import dtype_of
from graph.models import FULL, STACKED, ModelConfig, weight_shapes
from graph.ops import GraphError

__all__ = ["Session", "GenerationStats", "KV_PAD", "plan_for", "check_memory"]


def plan_for(cfg: ModelConfig, options: Options, backend: str | Backend | None = None) -> ModelPlan:
    """The plan a ``Session(cfg, weights, options)`` runs on ``backend`` (``options.backend``
    by default): the same device spec and the same costs, so a tool that prints or draws it
    shows what the session does. A backend this machine cannot load is planned for with its
    nominal spec and costs (the plan says so)."""
    from backends import device_spec

    target = backend if backend is not None else options.backend
    spec = device_spec(target)
    costs, source = costs_for(options, target if isinstance(target, Backend) else spec.backend)
    return plan_model(cfg, spec, options, costs, source)


def check_memory(plan: ModelPlan, backend: Backend, there: int = 0) -> None:
    """Refuse, before anything is allocated or read, a plan whose weights and KV caches the
    backend's memory cannot hold (a ``-c`` of a billion tokens fails here, in a second, not
    after the weights are loaded). ``there``: weight bytes already in that memory."""
    from engine.passes.offload import human

    if plan.split is not None:  # (a split's caches live on two backends; each part is small)
        return
    kv, weights = plan.kv_bytes, max(0, plan.device_weight_bytes - there)
    what = (
        f"{human(weights)} of weights and {human(kv)} of KV cache ({plan.options.n_ctx} positions)"
    )
    backend.check_fits(weights + kv, what)


class Session:
    """Runs one model on one backend, keeping its KV cache between calls.

    ``options`` (``engine.options.Options``), or the same settings as keywords: ``n_ctx``
    positions, chunks of at most ``n_batch``, ``kv_type`` cache storage, ``mode`` (``graph``
    replays each forward pass as a captured CUDA graph after its first runs, the same as eager
    on the CPU), ``stack`` (Q/K/V and gate/up projections as one product each), ``fusion``,
    ``streams``, ``offload`` under ``vram`` GiB (streamed layers stay in host memory and reach
    the device through a ring of slots), ``cache`` GiB of parameter cache. ``backend`` (a name
    or a ``Backend``) overrides ``options.backend``; ``plan``: a ``ModelPlan`` made for it by
    ``plan_for`` (instead of options). ``trace``: an ``engine.views.trace.Trace``
    every executor and the weight ring record into (settable later; runs are eager while set).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        weights: Mapping[str, Any],
        backend: str | Backend | None = None,
        options: Options | None = None,
        *,
        plan: ModelPlan | None = None,
        trace: Trace | None = None,
        **settings: Any,
    ) -> None:
        if plan is not None:
            if options is not None or settings:
                raise GraphError("a session from a plan takes its options from the plan")
            options = plan.options
        options = (options or Options()).replace(**settings)
        if backend is not None:
            name = backend.name if isinstance(backend, Backend) else backend
            options = options.replace(backend=name)
        self.backend = get_backend(backend if isinstance(backend, Backend) else options.backend)
        if options.backend == "auto":
            options = options.replace(backend=self.backend.name)
        self.options = options
        if plan is not None and plan.spec != self.backend.spec:
            raise GraphError(
                f"the plan was made for {plan.spec}, not this backend's {self.backend.spec}"
            )
        self.plan = mp = plan if plan is not None else plan_for(cfg, options, self.backend)
        on_device = {id(w): w.nbytes for w in weights.values() if not on_host(w)}
        check_memory(mp, self.backend, sum(on_device.values()))
        self.cfg, self.n_ctx, self.n_batch = mp.config, options.n_ctx, mp.n_batch
        self.placement = mp.placement
        self.split = mp.split
        self.mode, self.stack, self.fusion = options.mode, options.stack, options.fusion
        self.streams = options.streams
        self.host_backend = get_backend("numpy")
        self.weights = self._upload(tie_output(self.cfg, dict(weights)))
        self.ring: WeightRing | None = None  # one ring of slots for every executor
        if mp.ring is not None:
            self.ring = WeightRing(self.backend, mp.ring, self.weights)
        self.slots = dict(mp.kv_rows)
        self.cache_dtype = dtype_of(mp.options.kv_type)  # the plan's: the device's default resolved
        self.states: dict[str, Any] = {}
        for il, kind in enumerate(self.cfg.layer_kinds):
            shape = (self.slots[kind], self.cfg.n_head_kv, self.cfg.head_dim)
            be = self.host_backend if self.split is not None and il >= self.split else self.backend
            for kv in ("k", "v"):
                buf = be.alloc(self.cache_dtype.nbytes(shape))
                self.states[f"cache_{kv}.{il}"] = be.view(
                    buf, 0, shape, self.cache_dtype, (shape[1] * shape[2], shape[2], 1)
                )
        self._executors: dict[StepKey, Executor | _Chain] = {}
        self._trace: Trace | None = None
        self.trace = trace
        self.stats = GenerationStats()
        self.reset()

    def _upload(self, weights: dict[str, Any]) -> dict[str, Any]:
        """Weights where the plan puts them, once, shared by every executor: on the device,
        or host arrays (streamed layers, host tables, the CPU backend's layers). With
        ``stack`` the stacked projections are made here from their GGUF parts."""
        mp, stack = self.plan, self.options.stack
        shapes = weight_shapes(self.cfg, stack)
        if stack:
            weights = self._stack(weights, shapes)
        missing = sorted(set(shapes) - set(weights))
        if missing:
            raise GraphError(f"missing {len(missing)} weight(s): {', '.join(missing[:6])}")
        widen = any(s.on_host and s.dtype != self.cfg.storage for s in mp.segments)
        out: dict[str, Any] = {}
        uploaded: dict[int, Any] = {}  # id(host array) -> backend array: tied weights upload once
        for name, shape in shapes.items():
            w = weights[name]
            stored = self.cfg.weight_dtype(name)
            if tuple(w.shape) != shape:
                raise GraphError(
                    f"weight {name} has shape {tuple(w.shape)}, the graph expects {shape}"
                )
            self._check_kind(name, w)
            if name in mp.streamed or name in mp.host_tables or name in mp.host_weights:
                out[name] = self.backend.weight_to_host(w)
                if name in mp.host_weights and widen and len(shape) == 2:
                    # the CPU backend widens half-precision matrices to f32 for every product,
                    # which costs more than the product: widen the host's layers once instead
                    out[name] = widened(out[name])
                continue
            if id(w) not in uploaded:
                if isinstance(w, Quantized):
                    uploaded[id(w)] = self.backend.weight_from_host(w)
                elif isinstance(w, np.ndarray):
                    host = np.ascontiguousarray(w.astype(stored.numpy, copy=False))
                    uploaded[id(w)] = self.backend.from_host(host)
                elif w.dtype != stored.numpy:  # already on the device (generated there): as is
                    raise GraphError(
                        f"weight {name} is {w.dtype} on the device, expected {stored.name}"
                    )
                else:
                    uploaded[id(w)] = w
            out[name] = uploaded[id(w)]
        return out

    def _check_kind(self, name: str, w: Any) -> None:
        """A block-typed weight where the config stores that block type, an array elsewhere
        (its exact float type is cast to the stored one on upload)."""
        stored = self.cfg.weight_dtype(name)
        if isinstance(w, Quantized) != stored.is_quantized or (
            isinstance(w, Quantized) and w.dtype != stored
        ):
            have = w.dtype.name if isinstance(w, Quantized) else str(w.dtype)
            raise GraphError(
                f"weight {name} is {have}, the model stores it as {stored.name}: load the "
                "weights for this config (GGUFModel.weights_as(config))"
            )

    def _stack(self, weights: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        out = dict(weights)
        separate = weight_shapes(self.cfg)
        for name in shapes:
            if name in weights:
                continue
            blk, layer, stacked, _ = name.split(".")
            if blk != "blk" or stacked not in STACKED:
                continue
            names = [f"blk.{layer}.{m}.weight" for m in STACKED[stacked]]
            absent = [n for n in names if n not in weights]
            if absent:
                raise GraphError(f"missing {len(absent)} weight(s): {', '.join(absent)}")
            parts = [weights[n] for n in names]
            for n, w in zip(names, parts, strict=True):
                del out[n]
                self._check_kind(n, w)  # before concatenating: name the part, not the group
                if tuple(w.shape) != separate[n]:
                    raise GraphError(
                        f"weight {n} has shape {tuple(w.shape)}, the graph expects {separate[n]}"
                    )
            if any(isinstance(w, Quantized) for w in parts):
                out[name] = concat_rows([self.backend.weight_to_host(w) for w in parts])
            elif all(isinstance(w, np.ndarray) for w in parts):
                want = self.cfg.weight_dtype(name).numpy
                out[name] = np.concatenate([w.astype(want, copy=False) for w in parts])
            else:
                out[name] = self.backend.concat_rows(parts)
        return out

    # -- cache bookkeeping -----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the context (the cache rows are marked empty, not cleared)."""
        self.n_past = 0
        self.row_pos = {kind: np.full(n, -1, np.int32) for kind, n in self.slots.items()}

    def _rows(self, kind: str, pos: np.ndarray) -> np.ndarray:
        return pos if kind == FULL else pos % self.slots[kind]

    def n_kv_for(self, n_end: int) -> dict[str, int]:
        """Rows each attention kind attends to once ``n_end`` positions are filled (the plan's
        ``n_kv_for``: the filled prefix rounded up to a bucket, ``kv_bucket``)."""
        return self.plan.n_kv_for(n_end)

    def step_key(self, n_tokens: int, n_end: int, logits: Any = "last") -> StepKey:
        """The key of the forward pass over ``n_tokens`` that fills positions up to ``n_end``."""
        return self.plan.step_key(n_tokens, n_end, logits)

    # -- running ---------------------------------------------------------------------------------
    def executor(self, key: StepKey) -> Executor | _Chain:
        """The executor of ``key``'s forward pass, planned and bound on first use and kept."""
        ex = self._executors.get(key)
        if ex is None:
            parts = []
            for seg, sp in zip(self.plan.segments, plan_step(self.plan, key), strict=True):
                on_host = seg.on_host
                parts.append(
                    Executor(
                        sp,
                        self.weights,
                        self.host_backend if on_host else self.backend,
                        self.states,
                        ring=self.ring if sp.ring is not None else None,
                        trace=self._trace,
                        trace_label=CPU if on_host else None,
                    )
                )
            ex = self._executors[key] = parts[0] if self.split is None else _Chain(parts)
        return ex

    @property
    def trace(self) -> Trace | None:
        """The trace the session's runs record into (``engine.views.trace``), or None."""
        return self._trace

    @trace.setter
    def trace(self, trace: Trace | None) -> None:
        self._trace = trace
        if self.ring is not None:
            self.ring.trace = trace
        for ex in self._executors.values():
            for part in ex.parts if isinstance(ex, _Chain) else [ex]:
                part.trace = trace

    def _check(self, ids: np.ndarray) -> None:
        """Refuse tokens that would overflow the context or are not in the vocabulary."""
        n = len(ids)
        if self.n_past + n > self.n_ctx:
            raise ValueError(
                f"context full: {self.n_past} + {n} tokens exceed n_ctx={self.n_ctx}; "
                "reset() or create the session with a larger n_ctx"
            )
        lo, hi = (int(ids[0]), int(ids[0])) if n == 1 else (int(ids.min()), int(ids.max()))
        if lo < 0 or hi >= self.cfg.n_vocab:
            raise ValueError(f"token ids must be in 0..{self.cfg.n_vocab - 1}")

    def forward(
        self, tokens: Sequence[int], logits: Any = "last", copy: bool = True
    ) -> np.ndarray | None:
        """Process one chunk of at most ``n_batch`` tokens at the current position."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        n = len(ids)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"a chunk holds 1..{self.n_batch} tokens, got {n}")
        self._check(ids)
        pos = np.arange(self.n_past, self.n_past + n, dtype=np.int32)
        key = self.step_key(n, self.n_past + n, logits)
        n_kv = dict(key.n_kv)
        inputs: dict[str, np.ndarray] = {"tokens": ids.astype(np.int32), "pos": pos}
        saved = {k: v.copy() for k, v in self.row_pos.items()}
        for kind in self.slots:
            rows = self._rows(kind, pos)
            self.row_pos[kind][rows] = pos
            inputs[f"kv_idx.{kind}"] = rows.astype(np.int32)
            inputs[f"kv_pos.{kind}"] = self.row_pos[kind][: n_kv[kind]]
        ex = self.executor(key)
        try:
            names = ex.input_names
            outs = ex.run({k: v for k, v in inputs.items() if k in names}, copy)
        except Exception:
            self.row_pos = saved
            raise
        self.n_past += n
        return outs[0] if outs else None

    def prefill(self, tokens: Sequence[int], logits: Any = "last") -> np.ndarray | None:
        """Feed a prompt in chunks of ``n_batch``; each chunk computes only the logits asked for.

        ``logits``: ``"last"`` returns the last token's row (vocab,); ``"all"`` every row
        (n, vocab); a sequence of prompt positions those rows, in the order asked; ``"none"``
        returns None. Chunks with no requested row skip the head entirely.
        """
        ids = list(tokens)
        n = len(ids)
        if not ids:
            raise ValueError("prefill needs at least one token")
        self._check(np.asarray(ids, dtype=np.int64))  # the whole prompt, before any chunk runs
        rows: list[int] | None = None
        if not isinstance(logits, str):
            rows = [int(r) for r in logits]
            if not rows or any(not 0 <= r < n for r in rows):
                raise ValueError(f"logits rows {rows} must be non-empty and within 0..{n - 1}")
        elif logits not in ("last", "all", "none"):
            raise ValueError(f"logits must be 'last', 'all', 'none' or row numbers, not {logits!r}")
        wanted = sorted(set(rows)) if rows is not None else []
        outs = []
        for start in range(0, n, self.n_batch):
            chunk = ids[start : start + self.n_batch]
            end = start + len(chunk)
            if rows is not None:
                local = tuple(r - start for r in wanted if start <= r < end)
                request: Any = local if local else "none"
            elif logits == "last":
                request = "last" if end == n else "none"
            else:
                request = logits
            out = self.forward(chunk, request)
            if out is not None:
                outs.append(out)
        if logits == "none":
            return None
        if logits == "last":
            return outs[-1][0]
        stacked = np.concatenate(outs)
        if rows is None:
            return stacked
        order = {r: i for i, r in enumerate(wanted)}
        return stacked[[order[r] for r in rows]]

    def prepare(self) -> None:
        """Start fetching the streamed layers the next forward pass reads first, before its
        tokens are known (ChatRWKV's wish in #152). After a pass this is already under way:
        each pass ends by fetching the next one's first layers. Without streaming, nothing."""
        if self.ring is not None:
            self.ring.prime()

    def decode_greedy(self, token: int) -> int:
        """One token in, the most likely next token out. The argmax runs on the backend after
        the head, so only one id comes back instead of the vocabulary's logits."""
        out = self.forward([token], "argmax", copy=False)
        assert out is not None
        return int(out[0])

    def decode(self, token: int, copy: bool = True) -> np.ndarray:
        """One token in, the next token's logits (vocab,) out (``copy=False``: valid until the
        next call, no host copy)."""
        out = self.forward([token], "last", copy)
        assert out is not None
        return out[0]

    def generate(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        sampler: Sampler | None = None,
        stop: Collection[int] = (),
    ) -> Iterator[int]:
        """Prefill ``prompt`` then yield up to ``max_tokens`` sampled tokens, one per decode step.

        Ends early on a token in ``stop`` (not yielded) or when the context is full. No decode
        is run for the last token (its logits would be unused). Timings land in ``self.stats``.
        """
        sampler = sampler or Sampler(SamplerConfig.greedy())
        stats = self.stats = GenerationStats(n_prompt=len(prompt))
        t0 = time.perf_counter()
        logits = self.prefill(prompt)
        stats.t_prompt = time.perf_counter() - t0
        history = list(prompt)
        t0 = time.perf_counter()
        on_device = sampler.is_argmax  # greedy: the argmax runs with the step, one id comes back
        token = -1
        for i in range(max_tokens):
            if not on_device or i == 0:
                token = sampler(logits, history)
            if token in stop:
                stats.stopped_by = "eos"
                break
            stats.n_gen += 1
            stats.t_gen = time.perf_counter() - t0
            yield token
            history.append(token)
            if i + 1 == max_tokens:
                break
            if self.n_past >= self.n_ctx:
                stats.stopped_by = "context"
                break
            if on_device:
                token = self.decode_greedy(token)
            else:
                logits = self.decode(token, copy=False)  # read by the sampler before the next
        stats.t_gen = time.perf_counter() - t0


class _Chain:
    """Executors run in turn, each feeding the next its hidden states (a split model)."""

    def __init__(self, parts: list[Executor]) -> None:
        self.parts = parts
        self.input_names = frozenset().union(*(p.input_names for p in parts)) - {"hidden"}
        self.n_launches = sum(p.n_launches for p in parts)

    def run(self, inputs: Mapping[str, Any], copy: bool = True) -> list[np.ndarray]:
        outs: list[np.ndarray] = []
        for i, part in enumerate(self.parts):
            feed = {k: v for k, v in inputs.items() if k in part.input_names}
            if i:
                feed["hidden"] = outs[0]
            outs = part.run(feed, copy=True if i + 1 < len(self.parts) else copy)
        return outs


@dataclass
class GenerationStats:
    """Counts and seconds of the last ``generate`` (prompt and generation separately)."""

    n_prompt: int = 0
    t_prompt: float = 0.0
    n_gen: int = 0
    t_gen: float = 0.0
    stopped_by: str = "budget"

    @property
    def prompt_tps(self) -> float:
        return self.n_prompt / self.t_prompt if self.t_prompt else 0.0

    @property
    def gen_tps(self) -> float:
        return self.n_gen / self.t_gen if self.t_gen else 0.0
