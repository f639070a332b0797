"""One prefill chunk and one decode step of the Gemma 3 270M shape on several streams, eager:
small enough to run under ``compute-sanitizer`` (memcheck, racecheck, synccheck).

    compute-sanitizer --tool memcheck python benchmarks/one_step.py --streams 4
"""

from __future__ import annotations

import argparse

from backends import get_backend
from engine.model.session import Session
from engine.model.weights import device_weights
from graph.dtypes import bf16
from graph.models import preset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", default="4")
    args = ap.parse_args()
    streams = args.streams if args.streams == "auto" else int(args.streams)
    be = get_backend("cupy")
    cfg = preset("gemma3-270m").replace(dtype=bf16)
    s = Session(
        cfg,
        device_weights(cfg, be, seed=0),
        be,
        n_ctx=64,
        n_batch=8,
        mode="eager",
        stack=False,
        streams=streams,
    )
    s.prefill(list(range(2, 10)))
    token = s.decode_greedy(5)
    ex = s.executor(s.step_key(1, s.n_past, "argmax"))
    n = ex.schedule.n_streams if ex.schedule is not None else 1
    print(f"decode step on {n} streams: next token {token}")


if __name__ == "__main__":
    main()
