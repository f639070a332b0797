"""``streamgraph bench``'s own flags: the tests (``-p``, ``-n``, ``-pg`` with llama-bench's
ranges), repetitions, output, and the seed presets. The run flags, lists where bench sweeps,
come from ``tools.args.run_flags``.
"""

from __future__ import annotations

import argparse
import re

from graph.models import PRESETS

__all__ = ["SEED_PRESETS", "add_arguments"]


SEED_PRESETS: dict[str, tuple[str, dict[str, object]]] = {
    "seed-prefetch": (
        "ChatRWKV #152's *N+K table on a 7B Llama shape",
        {
            "model": "random:llama-7b",
            "dtype": "bf16",
            "n_prompt": [2048],
            "n_gen": [16],
            "offload": ["all", "*10+0", "*15+0", "*10+10", "*15+5", "*20+0", "auto"],
            "vram": [6.0, 8.0, 10.0],
        },
    ),
    "seed-streams": (
        "llama.cpp #4719's 1 vs N streams, eager and in graphs, separate projections",
        {
            "model": "random:gemma3-270m",
            "dtype": "bf16",
            "n_prompt": [512],
            "n_gen": [128],
            "streams": [1, 2, 4, "auto"],
            "graphs": ["on", "off"],
            "no_stack": True,
            "interleave": True,
        },
    ),
    "seed-head": (
        "rwkv.cpp #106's head on the GPU (ngl=19) or the CPU (ngl=18), Gemma 3 270M",
        {
            "model": "random:gemma3-270m",
            "dtype": "bf16",
            "n_prompt": [128],
            "n_gen": [32],
            "offload": ["ngl=19", "ngl=18"],
        },
    ),
}
"""What ``--preset`` sets: the model and the sweep (``-r``, ``-o``, ``--backend``, ``--plot``
and ``--trace`` still apply)."""


def _ints(text: str) -> list[int]:
    """Comma-separated counts, each a value or a range as llama-bench writes them: ``a-b``
    (step 1), ``a-b+s`` (step s), ``a-b*m`` (times m): ``-p 128-1024*2`` is 128,256,512,1024."""
    vals: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?:([+*])(\d+))?)?", part)
        if m is None:
            raise argparse.ArgumentTypeError(
                f"expected counts or ranges (64, 64-256+64, 128-1024*2), got {part!r}"
            )
        first = int(m[1])
        if m[2] is None:
            vals.append(first)
            continue
        last, op, step = int(m[2]), m[3] or "+", int(m[4] or 1)
        if last < first or (op == "+" and step < 1) or (op == "*" and (step < 2 or first < 1)):
            raise argparse.ArgumentTypeError(f"range {part!r} never reaches its end")
        v = first
        while v <= last:
            vals.append(v)
            v = v + step if op == "+" else v * step
    return vals


def _pairs(text: str) -> list[tuple[int, int]]:
    """``-pg 512,128``: a prompt and a generation run as one test (several: 512,128;64,16)."""
    out = []
    for part in text.split(";"):
        nums = _ints(part)
        if len(nums) != 2 or nums[0] < 1 or nums[1] < 1:
            raise argparse.ArgumentTypeError(f"-pg takes PROMPT,GEN pairs (512,128), got {part!r}")
        out.append((nums[0], nums[1]))
    return out


DEFAULT_MODEL = "random:gemma3-270m"  # what bench times when no -m is given


def add_arguments(p: argparse.ArgumentParser) -> None:
    """bench's own flags (the run flags, lists where bench sweeps, come from ``tools.args``)."""
    p.add_argument(
        "-m",
        "--model",
        action="append",
        default=None,
        help="a GGUF path, a packaged model (gemma3-270m: the real file), or random:ARCH, a "
        f"built-in architecture with generated weights ({', '.join(sorted(PRESETS))}; "
        f"default {DEFAULT_MODEL}); repeat it, or give a comma-separated list as llama-bench "
        "takes, to time several models one after another in one table",
    )
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(SEED_PRESETS),
        help="redo a seed thread's table: "
        + "; ".join(f"{k}: {v[0]}" for k, v in sorted(SEED_PRESETS.items())),
    )
    p.add_argument(
        "-p", "--n-prompt", type=_ints, default=[64], help="prompt lengths, e.g. 64,512 (0: none)"
    )
    p.add_argument(
        "-n", "--n-gen", type=_ints, default=[16], help="tokens to generate, e.g. 16,128 (0: none)"
    )
    p.add_argument(
        "-pg",
        "--prompt-gen",
        type=_pairs,
        default=[],
        metavar="PP,TG",
        help="a prompt then a generation as one test, llama-bench's pp+tg (e.g. 512,128)",
    )
    p.add_argument(
        "-d",
        "--n-depth",
        type=_ints,
        default=[0],
        help="tokens already in the cache before each test, e.g. 0,4096,16384 (llama-bench's "
        "depth: each repetition fills the cache untimed, then times the test on top)",
    )
    p.add_argument(
        "-r", "--repetitions", type=int, default=3, help="timed repetitions per test (default 3)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated weights")
    p.add_argument(
        "-o", "--output", default="md", choices=["md", "json", "jsonl", "csv"], help="output format"
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="build every configuration's session first, then time the repetitions round by "
        "round across all of them, so the machine's drift falls on every row alike (holds "
        "every session's memory at once)",
    )
    p.add_argument("--plot", default=None, metavar="OUT.png", help="draw the sweep's t/s")
    p.add_argument(
        "--trace",
        default=None,
        metavar="OUT.json",
        help="write an execution timeline of one extra, untimed run of each test (Chrome trace "
        "JSON for Perfetto; a PNG beside it with matplotlib)",
    )
