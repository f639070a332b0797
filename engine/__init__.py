"""The passes that decide and the executor that runs: memory planning, execution, model sessions.

import engine
out = engine.run(graph, inputs={...}, weights={...}, backend="numpy")
plan = engine.memory.plan(graph); print(plan)
"""

from engine import memory
from engine.executor import Executor, run

__all__ = ["Executor", "run", "memory"]
