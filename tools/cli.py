"""The ``streamgraph`` command: one entry point, a subcommand per tool.

streamgraph bench [-m MODEL] [-p N,...] [-n N,...] [-r R] [RUN FLAGS, lists sweep] [-o md|json|csv]
streamgraph graph [-m MODEL] [-t N_TOKENS] [--plan] [--json] [RUN FLAGS]
streamgraph dump [-m MODEL | --graph FILE] [--decode | --prompt-len N] [RUN FLAGS] -o FILE
streamgraph generate -m MODEL "prompt" [-n N] [--temp T --top-k K --top-p P -s SEED] [RUN FLAGS]
streamgraph info -m MODEL
streamgraph perplexity -m MODEL -f FILE [RUN FLAGS]

RUN FLAGS are the same in every command (``tools.args``): --backend, --dtype, --graphs,
--no-fusion, --no-stack, --streams, --offload/--strategy, -ngl, --vram, --cache, --cache-type,
-c/--ctx-size, -b/--batch-size. MODEL is a GGUF path, a packaged model (gemma3-270m, real
weights) or random:ARCH (a built-in architecture with generated weights).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from backends import BackendError
from graph.ops import GraphError

__all__ = ["main", "parser"]


def _graph_main(args: argparse.Namespace) -> int:
    """The graph of one forward pass as a session would run it, with what ``--plan``,
    ``--streams`` and ``--offload`` add: the step plan, the schedule, the model plan."""
    from tools.args import options_from
    from tools.graph_dump import plans

    options = options_from(args, n_ctx=args.ctx_size or 512)
    mp, steps = plans(args.model, options, args.tokens, args.logits)
    if args.json:
        from graph.serialize import to_json

        for sp in steps:
            print(to_json(sp.graph, indent=1))
        return 0
    for sp in steps:
        print(sp.graph)
        if sp.decisions.schedule is not None:
            print(sp.decisions.schedule)
        if args.plan:
            print(sp.decisions.plan)
            print(sp)
    if options.offload or args.plan:
        print(mp)
    return 0


def parser() -> argparse.ArgumentParser:
    from tools import bench, graph_dump, model_commands
    from tools.args import run_flags

    p = argparse.ArgumentParser(
        prog="streamgraph", description="A compute-graph engine for decoder LLMs."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = sub.add_parser(
        "bench",
        help="prompt and generation tokens/s, as llama-bench measures them",
        parents=[run_flags(ctx=None, sweep=True)],
    )
    bench.add_arguments(b)
    b.set_defaults(func=bench.main)
    g = sub.add_parser(
        "graph",
        help="print a forward pass's graph (and its step plan, schedule and placement)",
        parents=[run_flags(ctx=512)],
    )
    g.add_argument(
        "-m",
        "--model",
        default="random:gemma3-tiny",
        help="a GGUF path, a packaged model, or random:ARCH (default random:gemma3-tiny)",
    )
    g.add_argument(
        "-t", "--tokens", type=int, default=1, help="tokens per forward pass (1: a decode step)"
    )
    g.add_argument("--logits", default="last", choices=["last", "all", "none"])
    g.add_argument(
        "--plan", action="store_true", help="also print the memory plan, step plan and model plan"
    )
    g.add_argument("--json", action="store_true", help="print the graph as JSON instead")
    g.set_defaults(func=_graph_main)
    d = sub.add_parser(
        "dump",
        help="draw a forward pass with its placement, streams, fusion and memory plan",
        parents=[run_flags(ctx=512)],
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
