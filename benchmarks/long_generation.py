"""A long generation from a fresh session, first uses included, under fine and coarse buckets.

    python benchmarks/long_generation.py -m 7b-q4k.gguf [-p 512] [-n 1024]

``streamgraph bench`` times steps whose executors it has already built and captured (its
warm-up run), which is right for a kernel's speed and hides what a user's first long
generation pays: every cache-length bucket a step reaches for the first time costs a plan, a
binding, an eager run and a capture. This runs what ``generate`` does from a fresh session (a
``-p``-token prompt, then ``-n`` greedy tokens) with the cache-length buckets of the GPU
(``kv_bucket(coarse=True)``: its attention reads only the filled rows) and with the 64-row
buckets the CPU reference uses, and prints the prompt's seconds, the generation's tokens/s
and the executors each made. The steps at a new bucket are printed too: their milliseconds
are what the bucket cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="a GGUF file")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=1024)
    args = ap.parse_args()

    from backends import get_backend
    from engine.model.gguf import config_for, open_gguf
    from engine.model.session import Session
    from engine.options import Options
    from engine.passes.plans import plan_model

    be = get_backend("cupy")
    options = Options(backend="cupy", n_ctx=args.n_prompt + args.n_gen + 8, n_batch=512)
    file = open_gguf(args.model)
    cfg = config_for(file, options)
    weights = file.weights_as(cfg, stack=options.stack)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, cfg.n_vocab, args.n_prompt)]
    own = be.spec
    warm = Session(cfg, weights, be, options=options)  # every kernel compiled before timing
    tok = int(np.argmax(warm.prefill(prompt)))
    for _ in range(4):
        tok = warm.decode_greedy(tok)
    del warm
    print("| buckets | prompt s | tg t/s | executors | slowest step ms | median step ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for coarse in (True, False):
        spec = dataclasses.replace(own, prefix_attention=coarse)
        be._spec = spec  # noqa: SLF001 - the plan and the session agree on it
        sess = Session(cfg, weights, be, plan=plan_model(cfg, spec, options))
        t0 = time.perf_counter()
        tok = int(np.argmax(sess.prefill(prompt)))
        prompt_s = time.perf_counter() - t0
        steps, firsts = [], []
        for _ in range(args.n_gen):
            before = len(sess._executors)  # noqa: SLF001
            t = time.perf_counter()
            tok = sess.decode_greedy(tok)
            steps.append(time.perf_counter() - t)
            if len(sess._executors) > before:  # noqa: SLF001
                firsts.append((sess.n_past, steps[-1]))
        rate = args.n_gen / sum(steps)
        name = "coarse (GPU)" if coarse else "64 rows"
        print(
            f"| {name} | {prompt_s:.2f} | {rate:.1f} | {len(sess._executors)} | "  # noqa: SLF001
            f"{max(steps) * 1e3:.1f} | {statistics.median(steps) * 1e3:.2f} |",
            flush=True,
        )
        print(
            "  first steps at a new bucket (position: ms): "
            + ", ".join(f"{p}: {s * 1e3:.0f}" for p, s in firsts[:12]),
            flush=True,
        )
        del sess
    be._spec = own  # noqa: SLF001
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
