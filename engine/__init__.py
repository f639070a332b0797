"""The engine: passes that decide, a runtime that runs, and model sessions.

    import engine
    out = engine.run(graph, inputs={...}, weights={...}, backend="numpy")
    plan = engine.passes.memory.plan(graph); print(plan)

engine.passes   pure planning (fusion, streams, memory, placement)
engine.runtime  the executor, the weight ring, calibration
engine.model    model files, tokenizer, sampling, sessions
engine.views    decisions as documents, runs as timelines
"""

from engine import passes
from engine.passes import memory
from engine.runtime.executor import Executor, run

__all__ = ["Executor", "run", "memory", "passes"]
