"""The flags every command shares, and the model a ``-m`` names.

    p = argparse.ArgumentParser(parents=[run_flags(ctx=4096)])
    opts = options_from(p.parse_args(...))          # one engine.options.Options
    sweep = sweep_from(args)                        # bench: one Options per combination
    model = ModelArg.parse("gemma3-270m")          # a file, a packaged model, or random:ARCH

``generate``, ``perplexity``, ``bench``, ``dump`` and ``graph`` take the same names for the same
settings: ``--backend``, ``--dtype``, ``--graphs on|off``, ``--no-fusion``, ``--no-stack``,
``--streams``, ``--offload POLICY`` (``--strategy`` is the same flag; ``-ngl N`` is llama.cpp's
``--offload ngl=N``), ``--vram``, ``--cache``, ``--cache-type`` (llama.cpp's ``-ctk``/``-ctv``),
``-c/--ctx-size``, ``-b/--batch-size``. ``bench`` alone takes comma-separated lists of
``--graphs``, ``--streams``, ``--offload``/``-ngl`` and ``--vram`` and runs every combination.

Model names (``-m``), the same in every command:

* a path: that GGUF file;
* ``gemma3-270m``: the real packaged model (the ``model`` extra), its own weights;
* ``random:ARCH``: a built-in architecture (``gemma3-270m``, ``gemma3-tiny``, ``llama-7b``,
  ``llama-tiny``) with generated weights (vLLM's "dummy" load format);
* a bare architecture name with no packaged model of that name (``llama-7b``): the same as
  ``random:llama-7b``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.options import FLOAT_TYPES, MAX_STREAMS, Options
from graph.ops import GraphError

__all__ = ["run_flags", "options_from", "sweep_from", "ModelArg", "RANDOM", "UsageError"]

RANDOM = "random:"


class UsageError(GraphError):
    """The command line asks for something that cannot be: a usage error (exit status 2),
    found before any work is done."""


def _streams_value(text: str) -> int | str:
    t = text.strip()
    if t == "auto":
        return t
    if t.isdigit() and 1 <= int(t) <= MAX_STREAMS:
        return int(t)
    raise argparse.ArgumentTypeError(
        f"--streams takes a count from 1 to {MAX_STREAMS} or auto, not {text!r}"
    )


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, got {text!r}") from None
    if not (0 < value <= 2**20):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of GiB, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _list(item: Any) -> Any:
    """A comma-separated list of ``item`` values (bench sweeps them)."""

    def parse(text: str) -> list[Any]:
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"an empty value in {text!r}")
        return [item(p) for p in parts]

    return parse


def _float_type(text: str) -> str:
    if text not in FLOAT_TYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(FLOAT_TYPES)}, got {text!r}")
    return text


def _on_off(text: str) -> str:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text


def _policy(text: str) -> str:
    from engine.passes.offload import check_policy_syntax

    try:
        check_policy_syntax(text)
    except GraphError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def _ngl(text: str) -> str:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"-ngl takes a layer count, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"-ngl takes a layer count >= 0, got {text!r}")
    return f"ngl={n}"


# Long by design: a table of flags, one add_argument each, that every command shares.
def run_flags(ctx: int | None = 2048, sweep: bool = False) -> argparse.ArgumentParser:
    """A parent parser with the flags every command shares (see the module doc); ``ctx``: the
    command's default ``-c`` (None: the command works it out); ``sweep``: lists where bench
    sweeps."""
    many = _list if sweep else (lambda item: item)
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("run options (the same in every command)")
    g.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "numpy", "cupy"],
        help="auto: CuPy where a CUDA device works, else NumPy (default auto)",
    )
    g.add_argument(
        "--dtype",
        default=None,
        choices=FLOAT_TYPES,
        help="weight storage after loading or generating (default: a GGUF on the GPU keeps its "
        "own block types, anything else f32)",
    )
    g.add_argument(
        "--graphs",
        type=many(_on_off),
        default=["on"] if sweep else "on",
        metavar="on|off" + (",..." if sweep else ""),
        help="replay each forward pass as a captured CUDA graph (default on)",
    )
    g.add_argument("--no-fusion", action="store_true", help="one launch per node (no fused groups)")
    g.add_argument(
        "--no-stack",
        action="store_true",
        help="separate Q/K/V and gate/up projections (what several streams can overlap)",
    )
    g.add_argument(
        "--streams",
        type=many(_streams_value),
        default=[1] if sweep else 1,
        metavar="N|auto" + (",..." if sweep else ""),
        help=f"compute streams per forward pass, 1 to {MAX_STREAMS} or auto (default 1)",
    )
    g.add_argument(
        "--offload",
        "--strategy",
        dest="offload",
        type=many(_policy),
        default=None,
        metavar="POLICY" + (",..." if sweep else ""),
        help="weight placement: all, auto, ngl=N (layers 0..N-1 on the device, the head is "
        "layer n_layer) or *N+K (N resident, the rest streamed K ahead); default: all, the "
        "embedding on the device too",
    )
    g.add_argument(
        "-ngl",
        "--n-gpu-layers",
        dest="ngl",
        type=many(_ngl),
        metavar="N" + (",..." if sweep else ""),
        help="llama.cpp's layer count on the GPU: the same as --offload ngl=N",
    )
    g.add_argument(
        "--vram",
        type=many(_gib),
        default=[None] if sweep else None,
        metavar="GiB" + (",..." if sweep else ""),
        help="device memory for the weights and their ring (with --offload auto or *N+K)",
    )
    g.add_argument(
        "--cache",
        type=float,
        default=0.0,
        metavar="GiB",
        help="device memory, beyond --vram, for a cache of the first streamed layers",
    )
    g.add_argument(
        "--cache-type",
        "-ctk",
        "--cache-type-k",
        "-ctv",
        "--cache-type-v",
        dest="kv_type",
        type=many(_float_type),
        default=None,
        metavar="{" + ",".join(FLOAT_TYPES) + "}" + (",..." if sweep else ""),
        help="KV cache storage (K and V share it; default f16 on a GPU, f32 on the CPU)",
    )
    g.add_argument(
        "-c",
        "--ctx-size",
        type=_count,
        default=ctx,
        help="context length in tokens"
        + (f" (default {ctx})" if ctx else " (default: what the tests need)"),
    )
    g.add_argument(
        "-b",
        "--batch-size",
        type=_count,
        default=512,
        help="the longest chunk one forward pass takes (default 512)",
    )
    return p


def _placement(args: argparse.Namespace) -> Any:
    """``--offload`` or ``-ngl`` (its shorthand), not both."""
    if args.offload is not None and args.ngl is not None:
        raise UsageError("--offload and -ngl both set the weight placement: give one of them")
    return args.ngl if args.ngl is not None else args.offload


def options_from(args: argparse.Namespace, **override: Any) -> Options:
    """The ``Options`` of a single-valued command's flags (``override`` wins)."""
    args.offload, args.ngl = _placement(args), None
    values = dict(
        backend=args.backend,
        dtype=args.dtype,
        mode="graph" if args.graphs == "on" else "eager",
        fusion=not args.no_fusion,
        stack=not args.no_stack,
        streams=args.streams,
        offload=args.offload,
        vram=args.vram,
        cache=args.cache,
        kv_type=args.kv_type,
        n_ctx=args.ctx_size or 2048,
        n_batch=args.batch_size,
    )
    values.update(override)
    return Options(**values)


def sweep_from(args: argparse.Namespace, **override: Any) -> list[Options]:
    """Every combination of bench's list flags, as ``Options``: cache type, graphs, then
    streams, then placement, then budget (a budget only where a placement uses one)."""
    policies = _placement(args) or [None]
    out = []
    for kv_type in args.kv_type or [None]:
        for graphs in args.graphs:
            for streams in args.streams:
                for policy in policies:
                    budgets = args.vram if policy not in (None, "all") else [None]
                    for vram in budgets:
                        one = argparse.Namespace(**vars(args))
                        one.graphs, one.streams, one.vram = graphs, streams, vram
                        one.offload, one.ngl, one.kv_type = policy, None, kv_type
                        out.append(options_from(one, **override))
    return out


@dataclass(frozen=True)
class ModelArg:
    """What ``-m`` names (see the module doc): a GGUF file, or an architecture to generate."""

    text: str
    path: Path | None  # the GGUF file
    arch: str | None  # the built-in architecture whose weights are generated

    @classmethod
    def parse(cls, text: str) -> ModelArg:
        """Resolve ``text`` (a packaged model is assembled into the cache on first use)."""
        from engine.model.packaged import PACKAGED, ModelNotFound, resolve_model
        from graph.models import PRESETS

        archs = ", ".join(sorted(PRESETS))
        if text.startswith(RANDOM):
            arch = text[len(RANDOM) :]
            if arch not in PRESETS:
                raise UsageError(f"-m {text}: no built-in architecture {arch!r}; built in: {archs}")
            return cls(text, None, arch)
        path = Path(text)
        if path.is_dir():
            raise UsageError(f"-m {text} is a directory; give a .gguf file inside it")
        if path.exists() or text.endswith(".gguf"):
            if not path.is_file():
                raise UsageError(f"-m {text}: no such file")
            return cls(text, path, None)
        if text in PACKAGED:
            try:
                return cls(text, resolve_model(text), None)
            except ModelNotFound as e:
                raise UsageError(
                    f"{e}; or use -m {RANDOM}{text} for generated weights of its shape"
                ) from None
        if text in PRESETS:
            return cls(text, None, text)
        raise UsageError(
            f"-m {text}: no such file, packaged model ({', '.join(sorted(PACKAGED))}) or "
            f"built-in architecture ({archs}; {RANDOM}NAME for generated weights)"
        )

    @property
    def name(self) -> str:
        """How tables and titles name it: the file's name, or random:ARCH."""
        return self.path.name if self.path is not None else f"{RANDOM}{self.arch}"

    def config(self, options: Any = None) -> Any:
        """The model's config (a file's from its header alone); with ``options``, a file's
        in the types a run with them stores its matrices in (``engine.model.gguf.config_for``).
        """
        if self.arch is not None:
            from graph.models import preset

            return preset(self.arch)
        from engine.model.gguf import config_for, open_gguf

        assert self.path is not None
        model = open_gguf(self.path)
        return config_for(model, options) if options is not None else model.config

    def need_file(self, command: str) -> Path:
        """The GGUF path, or the error a command that needs real weights gives."""
        if self.path is None:
            raise UsageError(
                f"{command} needs a model file with its tokenizer (a .gguf path or a packaged "
                f"model: gemma3-270m), not the generated {self.name}"
            )
        return self.path
