"""cuDNN's fused attention beside ours, on the same device memory.

    python benchmarks/cudnn_attention.py [--tokens 512,2048] [--decode 4096,16384]

cuDNN's fused scaled-dot-product attention is reached through PyTorch
(``scaled_dot_product_attention`` restricted to ``SDPBackend.CUDNN_ATTENTION``, which builds
its graphs with the cuDNN frontend), on tensors that are DLPack views of CuPy arrays: no copy,
the same bytes our kernels read. PyTorch's own flash kernel (``FLASH_ATTENTION``) runs beside
as a second reference. For each shape (the 7B's 32 heads of 128; the Gemma 3 270M's 4 query
heads of 256 over one key head):

- prompts: a causal prompt of ``--tokens`` over an empty cache, f16, ``k_flash_attn`` against
  cuDNN and PyTorch's flash: ms and TFLOP/s (the causal half of the score matrix), each the
  median of CUDA-graph replays (ours captured on CuPy's stream, theirs with
  ``torch.cuda.graph``), and the largest difference of their outputs from ours;
- decode: one query over ``--decode`` cached keys, ``k_attn_decode`` against cuDNN: the
  replayed graph's time and, for cuDNN, the wall time of one eager call (what it costs a step
  that is not captured);
- whether cuDNN's call captures into a CUDA graph at all (a failure is printed, not raised).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from shapes_7b import timed  # noqa: E402

from backends import get_backend  # noqa: E402
from engine.options import Options  # noqa: E402
from engine.runtime.executor import Executor  # noqa: E402
from graph import GraphBuilder, f32  # noqa: E402

SHAPES = {"7b": (32, 32, 128), "270m": (4, 1, 256)}


def _torch_replay_ms(torch: Any, fn: Callable[[], Any], reps: int = 20) -> float | str:
    """Median ms of ``fn`` captured with ``torch.cuda.graph`` and replayed; the error's text if
    it does not capture."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm: plans built, workspace allocated
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"no capture: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _eager_us(torch: Any, fn: Callable[[], Any], reps: int = 50) -> float:
    """Median wall microseconds of one eager call, synchronized (host overhead included)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _sdpa_call(backend: Any, views: dict, causal: bool, scale: float, gqa: bool) -> Any:
    """PyTorch's scaled-dot-product attention restricted to ``backend``, as a closure."""
    import torch
    from torch.nn.attention import sdpa_kernel

    q, k, v = views["q"], views["k"], views["v"]

    def call() -> Any:
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa
            )

    return call


def _ours(be: Any, n: int, m: int, h: int, hk: int, d: int, data: dict) -> tuple[float, Any]:
    """ms of our attention launch(es) replayed, and its output (n, h, d) on the device."""
    g = GraphBuilder()
    q = g.input("q", (n, h, d), f32)
    k, v = g.input("k", (m, hk, d), "f16"), g.input("v", (m, hk, d), "f16")
    qp, kp = g.input("qpos", (n,), "i32"), g.input("kpos", (m,), "i32")
    graph = g.build([g.attention(q, k, v, qp, kp, scale=d**-0.5)])
    ex = Executor(graph, {}, be, options=Options(mode="eager"))
    (out,) = ex.run(data)
    steps = [op.fn for op in ex.ops if op.kind == "launch"]
    return timed(be, lambda: [s() for s in steps], 20), out


def main() -> None:
    import cupy as cp
    import torch
    from torch.nn.attention import SDPBackend

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="512,2048")
    ap.add_argument("--decode", default="4096,16384")
    args = ap.parse_args()
    be = get_backend("cupy")
    print(be.describe(), f"| torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print("\n| shape | case | kernel | ms | TFLOP/s | max diff from ours | eager call µs |")
    print("|---|---|---|---:|---:|---:|---:|")
    cases = [("prompt", int(t), int(t)) for t in args.tokens.split(",")]
    cases += [("decode", 1, int(m)) for m in args.decode.split(",")]
    for name, (h, hk, d) in SHAPES.items():
        for kind, n, m in cases:
            rng = np.random.default_rng(0)
            data = {
                "q": rng.standard_normal((n, h, d)).astype(np.float32),
                "k": rng.standard_normal((m, hk, d)).astype(np.float32),
                "v": rng.standard_normal((m, hk, d)).astype(np.float32),
                "qpos": np.arange(m - n, m, dtype=np.int32),
                "kpos": np.arange(m, dtype=np.int32),
            }
            causal = kind == "prompt"
            pairs = n * (m / 2 if causal else m)
            flop = 4 * h * d * pairs
            ms, out = _ours(be, n, m, h, hk, d, data)
            label = f"| {name} | {kind} {n} x {m} |"
            print(f"{label} ours | {ms:.4f} | {flop / ms / 1e9:.1f} | - | - |", flush=True)
            ref = torch.from_dlpack(cp.asarray(out)).float()  # (n, h, d)
            # (1, heads, tokens, d) views of CuPy memory: no copy
            dev = {x: cp.asarray(data[x]).astype(cp.float16) for x in ("q", "k", "v")}
            views = {x: torch.from_dlpack(a).permute(1, 0, 2).unsqueeze(0) for x, a in dev.items()}
            assert views["k"].data_ptr() == dev["k"].data.ptr  # the same bytes
            for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
                call = _sdpa_call(backend, views, causal, d**-0.5, h != hk)
                tag = "cuDNN" if backend == SDPBackend.CUDNN_ATTENTION else "torch flash"
                try:
                    got = call()
                except RuntimeError as e:
                    print(f"{label} {tag} | unsupported: {str(e).splitlines()[0][:90]} |||||")
                    continue
                diff = float((got[0].permute(1, 0, 2).float() - ref).abs().max())
                replay = _torch_replay_ms(torch, call)
                eager = _eager_us(torch, call) if kind == "decode" else None
                cells = (
                    f"{replay:.4f} | {flop / replay / 1e9:.1f}"
                    if isinstance(replay, float)
                    else f"{replay} | -"
                )
                tail = f"{eager:.1f}" if eager is not None else "-"
                print(f"{label} {tag} | {cells} | {diff:.2e} | {tail} |", flush=True)


if __name__ == "__main__":
    main()
