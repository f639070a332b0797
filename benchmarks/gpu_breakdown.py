"""Where a forward pass's time goes on the GPU.

    python benchmarks/gpu_breakdown.py [--dtype bf16] [--ctx 1024] [--prompt 512]

For a decode step and a prompt of ``--prompt`` tokens it prints: the median time of a whole
``Session`` call per mode, the CUDA-graph replay alone (device events), and device time per op
kind (events around each launch of an eager run), so the parts that add up to what
``streamgraph bench`` reports can be read off one table.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from typing import Any

import numpy as np

from backends import get_backend
from engine.model.session import Session
from engine.model.weights import device_weights
from engine.options import Options
from engine.passes.plans import plan_graph
from engine.runtime.executor import Executor
from graph.dtypes import dtype_of
from graph.models import preset


def spy(ex: Executor) -> dict[str, Any]:
    """Record the inputs the session feeds ``ex`` (they live in the arena only until used)."""
    fed: dict[str, Any] = {}
    set_inputs = ex.set_inputs

    def recording(inputs: dict[str, Any], _set: Any = set_inputs) -> None:
        fed.update(inputs)
        _set(inputs)

    ex.set_inputs = recording  # type: ignore[method-assign]
    return fed


def per_op(
    sess: Session, ex: Executor, fed: dict[str, Any], cp: Any
) -> list[tuple[str, float, int]]:
    """Device milliseconds per op kind inside CUDA graphs: the same graph, planned without
    memory reuse so every value stays valid, run once eagerly, then the launches of each op
    kind captured on their own and replayed."""
    be = sess.backend
    plan = plan_graph(ex.graph, be.spec, Options(fusion=sess.fusion), reuse=False)
    full = Executor(plan, sess.weights, be, sess.states)
    Executor.set_inputs(full, fed)
    full.launch()
    be.synchronize()
    fused = {f.anchor: f.pattern for f in full.fused}
    kinds: dict[str, list[Any]] = collections.defaultdict(list)
    for op in full.ops:
        if op.kind == "launch":
            kinds[fused.get(op.node.id, op.node.op.name)].append(op.fn)
    rows = []
    for op, steps in kinds.items():

        def launch(steps: list[Any] = steps) -> None:
            for step in steps:
                step()

        replay = be.capture(launch)
        replay()
        a, b = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(20):
            a.record(be.compute_stream)
            replay()
            b.record(be.compute_stream)
            b.synchronize()
            times.append(cp.cuda.get_elapsed_time(a, b))
        rows.append((op, statistics.median(times), len(steps)))
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--kv", default="f32", help="KV cache type (--cache-type)")
    ap.add_argument("--only-graph", action="store_true", help="the fused graph mode alone")
    args = ap.parse_args()
    import cupy as cp

    be = get_backend("cupy")
    cfg = preset(args.model).replace(dtype=dtype_of(args.dtype))
    w = device_weights(cfg, be, seed=0)
    wbytes = sum(v.nbytes for v in {id(a): a for a in w.values()}.values())
    print(be.describe())
    print(f"{args.model} {args.dtype}: {wbytes / 1e6:.1f} MB of weights")
    prompt = list(range(2, 2 + args.prompt))
    modes = [("graph", True, True), ("graph", True, False), ("graph", False, True)]
    modes.append(("eager", True, True))
    for mode, fusion, pdl in modes[:1] if args.only_graph else modes:
        be.pdl = pdl and be._driver is not None
        sess = Session(
            cfg,
            w,
            be,
            n_ctx=args.ctx,
            n_batch=args.prompt,
            mode=mode,
            fusion=fusion,
            kv_type=args.kv,
        )
        pp = []
        for _ in range(5):
            sess.reset()
            t0 = time.perf_counter()
            logits = sess.prefill(prompt)
            pp.append(time.perf_counter() - t0)
        pex = sess.executor(sess.step_key(args.prompt, args.prompt))
        pfed = spy(pex)
        sess.reset()
        sess.prefill(prompt)
        tok = int(np.argmax(logits))
        for _ in range(3):
            tok = int(np.argmax(sess.decode(tok)))
        ex = sess.executor(sess.step_key(1, sess.n_past + 1))
        fed = spy(ex)
        step = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            out = sess.decode(tok, copy=False)
            step.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(50):
            int(np.argmax(out))
        argmax = (time.perf_counter() - t0) / 50
        label = mode + ("" if fusion else " (no fusion)") + ("" if pdl else " (no PDL)")
        print(
            f"{label}: prefill {args.prompt} {statistics.median(pp[2:]) * 1e3:.2f} ms "
            f"({args.prompt / statistics.median(pp[2:]):.0f} t/s); decode() "
            f"{statistics.median(step) * 1e3:.3f} ms ({1 / statistics.median(step):.0f} t/s), "
            f"launches {ex.n_launches}, host argmax {argmax * 1e3:.3f} ms"
        )
        if mode == "graph" and ex._replay is not None:
            start, end = cp.cuda.Event(), cp.cuda.Event()
            times = []
            for _ in range(args.steps):
                Executor.set_inputs(ex, fed)
                start.record(be.compute_stream)
                ex._replay()
                end.record(be.compute_stream)
                end.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, end))
            replay = statistics.median(times)
            gbs = wbytes / replay / 1e6
            print(f"  decode replay alone {replay:.3f} ms ({gbs:.0f} GB/s of weights)")
        if mode == "graph" and fusion and pdl:
            for name, ex_, feed in (("decode", ex, fed), (f"prefill {args.prompt}", pex, pfed)):
                rows = per_op(sess, ex_, feed, cp)
                total = sum(ms for _, ms, _ in rows)
                print(f"  {name}: device time by op, each kind replayed alone (sum {total:.3f} ms)")
                for op, ms, n in rows:
                    print(
                        f"    {op:12s} {ms:8.3f} ms  {n:4d} launches  {ms / n * 1e3:7.1f} us each"
                    )


if __name__ == "__main__":
    main()
