"""One set of options (``engine.options``), the flags every command shares (``tools.args``),
and what ``-m`` names: the same names for the same settings in every command, each bad value
refused with the flag it came from, before anything is loaded."""

from __future__ import annotations

import math

import pytest

from engine.options import Options, OptionsError
from tools.args import RANDOM, ModelArg, options_from, sweep_from
from tools.cli import parser

COMMANDS = {
    "generate": ["generate", "-m", "x.gguf", "hi"],
    "perplexity": ["perplexity", "-m", "x.gguf", "-f", "t.txt"],
    "bench": ["bench"],
    "dump": ["dump", "-o", "x.json"],
    "graph": ["graph"],
}
FLAGS = [
    "--backend", "numpy", "--dtype", "bf16", "--graphs", "off", "--no-fusion", "--no-stack",
    "--streams", "3", "--vram", "2.5", "--cache", "0.5", "--cache-type", "f16",
    "-c", "256", "-b", "64",
]  # fmt: skip


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_takes_the_same_run_flags(command: str) -> None:
    """The same flags give the same Options in generate, perplexity, bench, dump and graph."""
    args = parser().parse_args([*COMMANDS[command], *FLAGS, "--offload", "*1+2"])
    want = Options(
        backend="numpy",
        dtype="bf16",
        mode="eager",
        fusion=False,
        stack=False,
        streams=3,
        offload="*1+2",
        vram=2.5,
        cache=0.5,
        kv_type="f16",
        n_ctx=256,
        n_batch=64,
    )
    got = sweep_from(args) if command == "bench" else [options_from(args)]
    assert got == [want]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_ngl_and_strategy_are_the_offload_flag(command: str) -> None:
    base = COMMANDS[command]
    one = options_from if command != "bench" else (lambda a: sweep_from(a)[0])
    for flags in (["-ngl", "5"], ["--n-gpu-layers", "5"], ["--strategy", "ngl=5"]):
        assert one(parser().parse_args([*base, *flags])).offload == "ngl=5"
    for flags in (["-ctk", "bf16"], ["-ctv", "bf16"], ["--cache-type-k", "bf16"]):
        assert one(parser().parse_args([*base, *flags])).kv_type == "bf16"


def test_bench_sweeps_every_combination_of_its_list_flags() -> None:
    args = parser().parse_args(
        [
            "bench",
            "--streams",
            "1,auto",
            "--offload",
            "all,*2+0",
            "--vram",
            "4,8",
            "--graphs",
            "on,off",
        ]
    )
    sweep = sweep_from(args)
    assert len(sweep) == 2 * 2 * (1 + 2)  # "all" needs no budget: one row, not two
    assert sweep[0] == Options(backend="auto", n_ctx=2048)  # no --dtype: the model's own
    assert {(o.offload, o.vram) for o in sweep} == {(None, None), ("*2+0", 4.0), ("*2+0", 8.0)}
    with pytest.raises(SystemExit):  # a list where one value is taken
        parser().parse_args(["generate", "-m", "x.gguf", "hi", "--streams", "1,2"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"streams": 0}, r"streams \(--streams\) takes a count from 1 to 8 or auto"),
        ({"streams": 999}, r"streams \(--streams\) takes a count from 1 to 8"),
        ({"streams": True}, r"streams \(--streams\)"),
        ({"vram": -1.0}, r"vram \(--vram\) takes a positive number of GiB, not -1.0"),
        ({"vram": math.inf}, r"vram \(--vram\) takes a positive number of GiB, not inf"),
        ({"vram": math.nan}, r"vram \(--vram\) takes a positive number"),
        ({"cache": 1.0}, r"cache \(--cache\) caches streamed layers: it needs offload"),
        ({"offload": "*x+y"}, r"unknown offload policy '\*x\+y'"),
        ({"offload": "ngl=-2"}, r"ngl= takes a layer count >= 0"),
        ({"n_ctx": 0}, r"n_ctx \(-c/--ctx-size\) must be a whole number >= 1, not 0"),
        ({"backend": "tpu"}, r"backend \(--backend\) takes one of auto, numpy, cupy"),
        ({"kv_type": "q8_0"}, r"kv_type \(--cache-type\) takes one of f32, f16, bf16"),
        ({"mode": "replay"}, r"mode \(--graphs\) takes one of graph, eager"),
    ],
)
def test_bad_options_name_their_flag(change: dict, message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        Options(**change)


def test_options_are_values() -> None:
    a = Options(streams="auto")
    assert a.replace(streams=2) == Options(streams=2) and a.streams == "auto"
    assert Options(offload="all") == Options() and Options(offload=" all ").offload is None
    assert str(Options(vram=4.0, offload="auto")) == "Options(offload='auto', vram=4.0)"
    with pytest.raises(OptionsError, match="unknown option"):
        a.replace(fuse=True)
    with pytest.raises(AttributeError):
        a.streams = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["graph", "--streams", "999"], "--streams takes a count from 1 to 8 or auto"),
        (["graph", "--vram", "inf"], "positive, finite number of GiB, got 'inf'"),
        (["graph", "--vram", "-1"], "positive, finite number of GiB, got '-1'"),
        (["graph", "--offload", "*x+y"], "unknown offload policy"),
        (["graph", "-c", "0"], "expected a whole number >= 1, got '0'"),
        (["bench", "--streams", "2,0"], "--streams takes a count from 1 to 8"),
    ],
)
def test_bad_flags_are_usage_errors_before_any_work(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        parser().parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_model_names_mean_the_same_in_every_command(tmp_path) -> None:  # noqa: ANN001
    """A path is a file, ``random:ARCH`` generated weights of a built-in architecture, a bare
    architecture name the same when no packaged model has it; ``gemma3-270m`` is the real file."""
    m = ModelArg.parse(f"{RANDOM}gemma3-270m")
    assert m.arch == "gemma3-270m" and m.path is None and m.name == "random:gemma3-270m"
    assert ModelArg.parse("llama-tiny").arch == "llama-tiny"
    assert ModelArg.parse("llama-tiny").config().n_layer == 2
    with pytest.raises(Exception, match="no built-in architecture 'nope'"):
        ModelArg.parse(f"{RANDOM}nope")
    with pytest.raises(Exception, match="is a directory"):
        ModelArg.parse(str(tmp_path))
    with pytest.raises(Exception, match="no such file"):
        ModelArg.parse(str(tmp_path / "missing.gguf"))
    with pytest.raises(Exception, match="generate needs a model file with its tokenizer"):
        ModelArg.parse("llama-tiny").need_file("generate")


def test_the_cache_type_defaults_to_the_devices() -> None:
    """No ``--cache-type``: a GPU plan keeps the KV cache in f16 (half the bytes a decode step
    reads), the CPU reference in f32; a type asked for is kept on either."""
    from backends import device_spec
    from backends.cuda_spec import nominal
    from engine.passes.plans import plan_model
    from graph.models import preset

    cfg = preset("llama-tiny")
    gpu, cpu = (
        plan_model(cfg, nominal(), Options()),
        plan_model(cfg, device_spec("numpy"), Options()),
    )
    assert (gpu.options.kv_type, cpu.options.kv_type) == ("f16", "f32")
    assert 2 * gpu.kv_bytes == cpu.kv_bytes
    for asked in ("f32", "bf16"):
        assert plan_model(cfg, nominal(), Options(kv_type=asked)).options.kv_type == asked
    assert options_from(parser().parse_args(["graph"])).kv_type is None


def test_bench_sweeps_cache_types_as_llama_bench_does() -> None:
    """bench's ``-ctk f32,f16`` gives one configuration per type; the other commands take one."""
    sweep = sweep_from(parser().parse_args(["bench", "-ctk", "f32,f16", "--streams", "1,2"]))
    assert [(o.kv_type, o.streams) for o in sweep] == [
        ("f32", 1),
        ("f32", 2),
        ("f16", 1),
        ("f16", 2),
    ]
    assert [o.kv_type for o in sweep_from(parser().parse_args(["bench"]))] == [None]
