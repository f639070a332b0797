"""The ``streamgraph`` command: one entry point, a subcommand per tool.

streamgraph bench [-m MODEL] [-p N,...] [-n N,...] [-r R] [--backend B] [-o md|json|csv]
streamgraph graph [-m MODEL] [-t N_TOKENS] [--plan] [--json]
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
    from engine import memory
    from graph.models import build, kv_slots, preset
    from graph.serialize import to_json

    cfg = preset(args.model)
    graph = build(cfg, args.tokens, kv_slots(cfg, args.ctx, args.tokens), logits=args.logits)
    if args.json:
        print(to_json(graph, indent=1))
        return 0
    print(graph)
    if args.plan:
        print(memory.plan(graph))
    return 0


def parser() -> argparse.ArgumentParser:
    from graph.models import PRESETS
    from tools import bench, model_commands

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
    g.set_defaults(func=_graph_main)
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
