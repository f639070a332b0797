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
import os
import sys
from collections.abc import Sequence

from backends import BackendError
from engine.options import OptionsError
from engine.passes.offload import PolicyError
from graph.drawing import GraphvizMissing
from graph.ops import GraphError
from tools.args import UsageError

USAGE = (UsageError, OptionsError, PolicyError)
"""Errors in what the command line asks for (exit status 2)."""
KNOWN = (GraphError, BackendError, ValueError, OSError, MemoryError, GraphvizMissing)
"""Failures the engine reports in words (exit status 1); anything else is a bug, said so."""

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
        prog="streamgraph",
        description="A compute-graph engine for decoder LLMs. Exit status: 0 done, 1 the work "
        "failed, 2 a usage error.",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the traceback too (or set STREAMGRAPH_DEBUG=1)",
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
    for command in sub.choices.values():  # also after the command's name
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command: 0 on success; 2 for a usage error (a flag, a value, a file named that
    does not exist: found before any work); 1 when the work fails (a broken model file, no
    GPU, too little memory, a file that cannot be written). Either way one line on stderr;
    ``--debug`` (or ``STREAMGRAPH_DEBUG``) shows the traceback as well."""
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print(f"streamgraph {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug or os.environ.get("STREAMGRAPH_DEBUG", "0") not in ("", "0"):
            raise
        status = 2 if isinstance(e, USAGE) else 1
        what = "error" if isinstance(e, KNOWN) else f"internal error ({type(e).__name__})"
        print(f"streamgraph {args.command}: {what}: {_one_line(e)}", file=sys.stderr)
        return status


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (a library's may span several)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, MemoryError):
        text = f"out of memory{': ' + text if text != 'MemoryError' else ''}"
    return text


if __name__ == "__main__":
    sys.exit(main())
