"""The ``streamgraph`` command: one entry point, a subcommand per tool.

streamgraph bench [-m MODEL] [-p N,...] [-n N,...] [-r R] [--backend B] [-o md|json|csv]
streamgraph graph [-m MODEL] [-t N_TOKENS] [--plan] [--streams N] [--offload POLICY --vram GiB]
streamgraph dump [-m MODEL | --graph FILE] [--decode | --prompt-len N] [--strategy P] -o FILE
streamgraph generate -m MODEL "prompt" [-n N] [--temp T --top-k K --top-p P -s SEED]
streamgraph info -m MODEL
streamgraph perplexity -m MODEL -f FILE [-c N_CTX]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from backends import BackendError
from graph.ops import GraphError

__all__ = ["main", "parser"]


def _graph_main(args: argparse.Namespace) -> int:
    from engine.passes import memory, offload, scheduler
    from graph.dtypes import dtype_of
    from graph.models import build, kv_slots, preset
    from graph.serialize import to_json

    cfg = preset(args.model).replace(dtype=dtype_of(args.dtype))
    graph = build(cfg, args.tokens, kv_slots(cfg, args.ctx, args.tokens), logits=args.logits)
    if args.json:
        print(to_json(graph, indent=1))
        return 0
    print(graph)
    sched = None
    if args.streams != "1":
        streams = args.streams if args.streams == "auto" else int(args.streams)
        sched = scheduler.schedule(graph, streams)
        print(sched)
    if args.plan:
        print(memory.plan(graph, schedule=sched if sched and sched.n_streams > 1 else None))
    if args.offload:
        vram = None if args.vram is None else int(args.vram * 2**30)
        print(offload.place(graph, args.offload, vram))
    return 0


def parser() -> argparse.ArgumentParser:
    from graph.models import PRESETS
    from tools import bench, graph_dump, model_commands

    p = argparse.ArgumentParser(
        prog="streamgraph", description="A compute-graph engine for decoder LLMs."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = sub.add_parser("bench", help="prompt and generation tokens/s of a built-in model")
    bench.add_arguments(b)
    b.set_defaults(func=bench.main)
    g = sub.add_parser("graph", help="print a model's forward graph (and its memory plan)")
    g.add_argument("-m", "--model", default="gemma3-tiny", choices=sorted(PRESETS))
    g.add_argument(
        "-t", "--tokens", type=int, default=1, help="tokens per forward pass (1: a decode step)"
    )
    g.add_argument("-c", "--ctx", type=int, default=512, help="context length (KV cache rows)")
    g.add_argument("--logits", default="last", choices=["last", "all", "none"])
    g.add_argument("--plan", action="store_true", help="also print the memory plan")
    g.add_argument("--json", action="store_true", help="print the graph as JSON instead")
    g.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"], help="weight type")
    g.add_argument("--streams", default="1", help="also print the stream schedule (N or auto)")
    g.add_argument(
        "--offload",
        default=None,
        metavar="POLICY",
        help="also print the weight placement: all, auto, ngl=N or *N+K (e.g. *15+5)",
    )
    g.add_argument("--vram", type=float, default=None, help="device budget in GiB (for --offload)")
    g.set_defaults(func=_graph_main)
    d = sub.add_parser(
        "dump", help="draw a forward pass with its placement, streams, fusion and memory plan"
    )
    graph_dump.add_arguments(d)
    d.set_defaults(func=graph_dump.main)
    model_commands.add_generate(sub)
    model_commands.add_info(sub)
    model_commands.add_perplexity(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (GraphError, BackendError, ValueError) as e:
        print(f"streamgraph {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
