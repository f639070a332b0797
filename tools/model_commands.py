"""The commands that run a real model file: ``generate``, ``info`` and ``perplexity``.

    streamgraph generate -m gemma3-270m "The capital of France is" -n 32
    streamgraph generate -m gemma3-270m "The capital of France is" -n 8 --trace gen.json
    streamgraph info -m path/to/model.gguf
    streamgraph perplexity -m gemma3-270m -f text.txt -c 512

``-m`` takes a GGUF path or a packaged model's name (``gemma3-270m`` is assembled into the cache
directory on first use). Text goes to stdout as it is produced; load times, speeds and progress
go to stderr, so ``> out.txt`` captures the text alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_generate", "add_info", "add_perplexity"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m", "--model", required=True, help="GGUF file, or a packaged model: gemma3-270m"
    )


def _open(args: argparse.Namespace, command: str, **override: Any) -> tuple[Any, Any, Any]:
    """The run options (checked first), the model file's header and its tokenizer: what a
    command needs before it decides whether its inputs fit, and before any weight is read."""
    from engine.model.gguf import open_gguf
    from engine.model.tokenizer import Tokenizer
    from tools.args import ModelArg, options_from

    options = options_from(args, **override)  # checked before anything is loaded
    path = ModelArg.parse(args.model).need_file(command)
    model = open_gguf(path)
    return options, model, Tokenizer.from_gguf(model.reader)


def _session(options: Any, model: Any, t0: float) -> Any:
    """A session of ``model`` with ``options``: its weights read (in the file's own types on
    a GPU, else dequantized: ``config_for``) and placed; the log line times it from ``t0``
    (the command's start of loading)."""
    from backends import get_backend
    from engine.model.gguf import config_for
    from engine.model.session import Session, check_memory, plan_for

    cfg = config_for(model, options)
    check_memory(plan_for(cfg, options), get_backend(options.backend))  # before any weight
    sess = Session(cfg, model.weights_as(cfg, stack=options.stack), options=options)
    where = sess.backend.name
    if sess.placement is not None:
        where += f", {options.offload}" + (f" in {options.vram:g} GiB" if options.vram else "")
    _log(f"loaded {cfg.name} ({model.path.name}) on {where} in {time.perf_counter() - t0:.1f} s")
    return sess


# -- generate ------------------------------------------------------------------------------------
def add_generate(sub: Any) -> None:
    from tools.args import run_flags

    p = sub.add_parser(
        "generate",
        help="generate text from a prompt, streamed as it is produced",
        parents=[run_flags(ctx=4096)],
    )
    _model_arg(p)
    p.add_argument("prompt", help="the prompt text")
    p.add_argument(
        "-n", "--n-predict", type=int, default=64, help="tokens to generate (default 64)"
    )
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k, 0 off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p, 1.0 off (default 0.95)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1.0 off (default 1.0)")
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens the penalty looks back")
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS to the prompt")
    p.add_argument(
        "--trace",
        default=None,
        metavar="OUT.json",
        help="write an execution timeline of the run (Chrome trace JSON for Perfetto; a PNG "
        "beside it with matplotlib); traced runs launch kernel by kernel, so they run slower",
    )
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from engine.model.sampling import Sampler, SamplerConfig
    from tools.args import UsageError

    if args.n_predict < 0:
        raise UsageError(f"-n takes a count >= 0, not {args.n_predict}")
    _utf8(args.prompt, "the prompt")
    if args.trace:
        from tools.timeline import check_path

        check_path(args.trace)  # before loading the model, not after the run
    try:
        config = SamplerConfig(
            args.temp, args.top_k, args.top_p, args.repeat_penalty, args.repeat_last_n, args.seed
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    t0 = time.perf_counter()
    options, model, tok = _open(args, "generate")
    ids = tok.encode(args.prompt, add_bos=False if args.no_bos else None)
    if not ids:
        raise UsageError("the prompt is empty and the model adds no BOS: nothing to start from")
    if len(ids) + args.n_predict > options.n_ctx:
        raise UsageError(
            f"prompt ({len(ids)} tokens) + -n {args.n_predict} exceed the context "
            f"{options.n_ctx}; raise -c"
        )
    sess = _session(options, model, t0)
    sampler = Sampler(config)
    if args.trace:
        from engine.views.trace import Trace

        sess.trace = Trace("generate")  # the whole run: prefill, then every decode step
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    stream = tok.stream()
    for token in sess.generate(ids, args.n_predict, sampler, stop=tok.eot_ids):
        text = stream.push(token)
        if text:
            out.write(text.translate(_CONTROLS))
            out.flush()
    out.write(stream.flush().translate(_CONTROLS) + "\n")
    out.flush()
    s = sess.stats
    _log(
        f"prompt: {s.n_prompt} tokens in {s.t_prompt:.2f} s ({s.prompt_tps:.1f} t/s) | "
        f"generation: {s.n_gen} tokens in {s.t_gen:.2f} s ({s.gen_tps:.1f} t/s) | "
        f"stopped: {s.stopped_by}" + (" (traced: eager launches)" if args.trace else "")
    )
    if args.trace:
        from tools.timeline import save

        save(sess.trace, args.trace, _log)
    return 0


# -- info ----------------------------------------------------------------------------------------
def add_info(sub: Any) -> None:
    p = sub.add_parser("info", help="architecture, hyper-parameters, tensors and bytes per type")
    _model_arg(p)
    p.add_argument("--metadata", action="store_true", help="also list every metadata key")
    p.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    from engine.model.gguf import open_gguf
    from tools.args import ModelArg

    model = open_gguf(ModelArg.parse(args.model).need_file("info"))
    print(model.describe())
    if args.metadata:
        for k, v in model.metadata().items():
            print(f"  {k} = {v}")
    return 0


# -- perplexity ----------------------------------------------------------------------------------
def add_perplexity(sub: Any) -> None:
    from tools.args import run_flags

    p = sub.add_parser(
        "perplexity",
        help="perplexity of a text file, scored as llama.cpp does",
        parents=[run_flags(ctx=512)],
    )
    _model_arg(p)
    p.add_argument("-f", "--file", required=True, help="text file to score")
    p.add_argument(
        "--chunks",
        type=int,
        default=-1,
        help="score at most this many windows (default -1: all, as llama-perplexity)",
    )
    p.set_defaults(func=_perplexity)


def _perplexity(args: argparse.Namespace) -> int:
    """llama-perplexity's protocol: the text is tokenized as one stream with BOS at its start
    (where the model adds one), cut into windows of ``-c`` tokens, each window's first token
    replaced by BOS, and the second half of each window scored."""
    from engine.model.perplexity import perplexity
    from tools.args import UsageError

    if args.chunks == 0 or args.chunks < -1:
        raise UsageError(f"--chunks takes a window count >= 1, or -1 for all; got {args.chunks}")
    text = _read_text(args.file, "-f")
    t0 = time.perf_counter()
    options, model, tok = _open(args, "perplexity", n_batch=args.ctx_size)
    ids = tok.encode(text)  # BOS first where the model adds one, as llama.cpp tokenizes
    bos = tok.bos_id if tok.add_bos else None
    n_ctx = args.ctx_size
    if n_ctx < 4 or len(ids) < 2 * n_ctx:  # (before the weights are read)
        raise UsageError(
            f"-f {args.file} holds {len(ids)} tokens; perplexity with -c {n_ctx} needs at "
            f"least {max(2 * n_ctx, 8)} (as llama.cpp) and -c >= 4: more text or a smaller -c"
        )
    sess = _session(options, model, t0)
    _log(f"{len(ids)} tokens, windows of {n_ctx}, scoring the second half of each")
    if args.chunks > 0:
        ids = ids[: max(args.chunks, 2) * n_ctx]
    t0 = time.perf_counter()
    last = None
    for step in perplexity(sess, ids, n_ctx, bos):
        if args.chunks > 0 and step.window > args.chunks:
            break
        print(f"[{step.window}]{step.ppl:.4f}", end=" ", flush=True)
        last = step
    print()
    if last is not None:
        secs = time.perf_counter() - t0
        print(f"Final estimate: PPL = {last.ppl:.4f} over {last.n_scored} tokens ({secs:.1f} s)")
    return 0


_CONTROLS = {
    c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if chr(c) not in "\n\t"
}
"""Control characters (ESC starts terminal escape sequences) in text the model writes, which
a crafted vocabulary could hold: written as visible escapes; newlines and tabs pass."""


def _utf8(text: str, what: str) -> None:
    """Refuse text with bytes that are not UTF-8 (they reach Python as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        from tools.args import UsageError

        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise UsageError(
            f"{what} is not valid UTF-8 (byte 0x{bad.hex()} at character {e.start}); "
            "give UTF-8 text"
        ) from None


def _read_text(path: str, flag: str) -> str:
    """A UTF-8 text file's contents; a missing file is a usage error, an unreadable or
    undecodable one a failure, each naming the file."""
    from tools.args import UsageError

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {path}: no such file")
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a text file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise OSError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None
