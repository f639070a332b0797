"""Plans as values on the GPU: what a tool shows is what a session runs, a machine without a
GPU plans as the GPU's own backend does, and ``--vram`` bounds what the device really holds."""

from __future__ import annotations

import pytest

from backends.cuda_spec import nominal
from engine.model.session import Session, plan_for
from engine.model.weights import random_weights
from engine.options import Options
from engine.passes.plans import plan_model, plan_step
from graph.models import preset
from graph.serialize import to_json
from tools import bench, graph_dump

pytestmark = pytest.mark.gpu

CASES = [
    {},
    {"streams": 3, "stack": False},
    {"offload": "*1+1"},
    {"offload": "ngl=1", "dtype": "bf16"},
    {"mode": "eager", "fusion": False},
]


@pytest.mark.parametrize("opts", CASES)
def test_dump_and_graph_plan_what_the_session_runs_on_the_gpu(gpu, opts: dict) -> None:  # noqa: ANN001
    options = Options(backend="cupy", n_ctx=128, n_batch=16, **opts)
    cfg = preset("gemma3-tiny")
    mp, steps = graph_dump.plans("gemma3-tiny", options, prompt_len=4)
    sess = Session(cfg, random_weights(cfg, seed=2), gpu, options)
    assert mp.to_dict() == sess.plan.to_dict()
    sess.prefill([1, 2, 3, 4])
    ex = sess.executor(sess.step_key(4, 4))
    for sp, part in zip(steps, getattr(ex, "parts", [ex]), strict=True):
        assert sp.to_dict() == part.plan.to_dict() and to_json(sp.graph) == to_json(part.plan.graph)


@pytest.mark.parametrize("opts", [o for o in CASES if "offload" not in o or "ngl" in o["offload"]])
def test_a_machine_without_a_gpu_plans_what_the_gpu_runs(gpu, opts: dict) -> None:  # noqa: ANN001
    """The nominal CUDA spec (what ``device_spec("cupy")`` gives where CuPy does not load) plans
    the same steps as the H200's own backend: its facts are the device's."""
    options = Options(backend="cupy", n_ctx=128, n_batch=16, **opts)
    cfg = preset("gemma3-270m")
    here = plan_for(cfg, options, gpu)
    away = plan_model(cfg, nominal(), options)
    assert here.spec == away.spec  # (the name differs: compare=False)
    for key in (here.step_key(1, 100, "argmax"), here.step_key(16, 16)):
        for a, b in zip(plan_step(here, key), plan_step(away, key), strict=True):
            assert a.to_dict() == b.to_dict()


def test_vram_bounds_what_the_device_really_holds(gpu) -> None:  # noqa: ANN001
    """bench generates weights where the plan keeps them: streaming layers are made on the host
    (drawn on the device one at a time), so the VRAM column of a streamed row is smaller than
    the resident row's by about the bytes that stream."""
    sweep = [
        Options(backend="cupy", dtype="bf16"),
        Options(backend="cupy", dtype="bf16", offload="*0+0", vram=0.5),
    ]
    rows = bench.run_bench("random:gemma3-270m", [8], [2], 1, sweep, log=lambda s: None)
    resident, streamed = rows[1], rows[3]  # the tg rows of each configuration
    assert streamed.streamed_mb > 150 and resident.vram_mib > 500
    saved = resident.vram_mib - streamed.vram_mib  # measured on the device
    planned = resident.weights_mib - streamed.weights_mib  # what the plans keep there
    print(resident, streamed, sep="\n")
    assert saved > planned * 0.9, (resident, streamed)
    assert streamed.vram_mib < 0.5 * 1024 + 128  # the budget, plus arena, caches, workspaces
    assert resident.vram_mib >= resident.weights_mib
