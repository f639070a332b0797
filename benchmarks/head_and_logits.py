"""The two rwkv.cpp comparisons on the Gemma 3 270M shape: the head on the GPU or on the host,
and logits skipped.

    python benchmarks/head_and_logits.py [--backend cupy] [--dtype bf16] [--tokens 32]

Part 1, where the head runs: decode ms/token (median) with ``ngl=19`` (the 18 blocks and the
head, layer 18, on the device), ``ngl=18`` (the head on the host backend, the hidden state
crossing once per token) and ``ngl=0`` (everything on the host). rwkv.cpp saw 70 -> 60 ms/token
offloading a 14B model's head.

Part 2, which logits: a 128-token prompt processed in one pass and token by token (rwkv.cpp's
serial mode), asking for every row's logits, the last row's, or none. rwkv.cpp saw ~20% from
skipping them in serial mode.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from backends import best_backend, get_backend
from engine.model.session import Session
from engine.model.weights import device_weights
from graph.dtypes import dtype_of
from graph.models import preset


def median_s(fn: Callable[[], object], sync: Callable[[], None], reps: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default=None)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per timing")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    be = get_backend(args.backend or best_backend())
    print(be.describe())
    cfg = preset("gemma3-270m").replace(dtype=dtype_of(args.dtype))
    weights = device_weights(cfg, be, seed=0)
    host = {k: be.to_host(v) for k, v in weights.items()}
    n_ctx = args.prompt + args.tokens + 8

    print("\n| placement | ms/token | t/s |")
    print("|---|---:|---:|")
    for policy in ("ngl=19", "ngl=18", "ngl=0"):
        s = Session(cfg, host, be, n_ctx=n_ctx, n_batch=1, offload=policy)

        def decode(s: Session = s) -> None:
            s.reset()
            tok = s.decode_greedy(1)
            for _ in range(args.tokens - 1):
                tok = s.decode_greedy(tok)

        t = median_s(decode, be.synchronize, max(1, args.reps // 2)) / args.tokens
        print(f"| {policy} | {t * 1e3:.3f} | {1 / t:.1f} |", flush=True)
        del s

    prompt = [int(t) for t in np.random.default_rng(0).integers(0, cfg.n_vocab, args.prompt)]
    print(f"\n| {args.prompt}-token prompt | logits | ms | vs all rows |")
    print("|---|---|---:|---:|")
    for batch, label in ((args.prompt, "one pass"), (1, "token by token")):
        s = Session(cfg, weights, be, n_ctx=n_ctx, n_batch=batch)
        base = None
        for logits in ("all", "last", "none"):

            def run(s: Session = s, logits: str = logits) -> None:
                s.reset()
                s.prefill(prompt, logits)  # in chunks of n_batch, each with its rows' logits

            t = median_s(run, be.synchronize, args.reps)
            base = base or t
            print(f"| {label} | {logits} | {t * 1e3:.2f} | {t / base:.2f}x |", flush=True)
        del s


if __name__ == "__main__":
    main()
