"""Choosing the next token from logits, with llama.cpp's knobs and defaults.

    sampler = Sampler(SamplerConfig(temperature=0.8, top_k=40, top_p=0.95, seed=1))
    token = sampler(logits, history)

Order, as llama.cpp's default chain: repetition penalty over the last ``repeat_last_n`` tokens
(a positive logit is divided by the penalty, a negative one multiplied), top-k, top-p (nucleus,
on the untempered distribution), temperature, then a draw. ``temperature <= 0`` is greedy
(argmax after the penalty), which makes runs reproducible without a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SamplerConfig", "Sampler"]


@dataclass(frozen=True, slots=True)
class SamplerConfig:
    temperature: float = 0.8
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64
    seed: int | None = None  # None: a fresh random seed

    def __post_init__(self) -> None:
        """Each setting checked, the error naming its command-line flag (a negative
        temperature, say, would otherwise quietly mean greedy)."""
        checks = [
            ("--temp", self.temperature, _finite(self.temperature) and self.temperature >= 0,
             "a number >= 0 (0 is greedy)"),
            ("--top-k", self.top_k, _int(self.top_k) and self.top_k >= 0, "a count >= 0 (0: off)"),
            ("--top-p", self.top_p, _finite(self.top_p) and 0.0 < self.top_p <= 1.0,
             "a number in (0, 1] (1: off)"),
            ("--repeat-penalty", self.repeat_penalty,
             _finite(self.repeat_penalty) and self.repeat_penalty > 0, "a number > 0 (1: off)"),
            ("--repeat-last-n", self.repeat_last_n,
             _int(self.repeat_last_n) and self.repeat_last_n >= 0, "a count >= 0"),
            ("--seed", self.seed, self.seed is None or (_int(self.seed) and 0 <= self.seed < 2**63),
             "a whole number from 0 to 2**63 - 1"),
        ]  # fmt: skip
        for flag, value, ok, need in checks:
            if not ok:
                raise ValueError(f"{flag} takes {need}, not {value!r}")

    @classmethod
    def greedy(cls) -> SamplerConfig:
        return cls(temperature=0.0, top_k=0, top_p=1.0)


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class Sampler:
    """Stateful only in its random generator: the same seed gives the same tokens."""

    def __init__(self, cfg: SamplerConfig | None = None) -> None:
        self.cfg = cfg or SamplerConfig()
        self.rng = np.random.default_rng(self.cfg.seed)

    @property
    def is_argmax(self) -> bool:
        """Plain argmax of the logits (greedy, no repetition penalty): the device can do it."""
        return self.cfg.temperature <= 0 and (
            self.cfg.repeat_penalty == 1.0 or not self.cfg.repeat_last_n
        )

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        c = self.cfg
        x = np.asarray(logits, dtype=np.float64).reshape(-1)
        if c.repeat_penalty != 1.0 and c.repeat_last_n and len(history):
            recent = np.unique(np.asarray(history[-c.repeat_last_n :], dtype=np.int64))
            x = x.copy()
            vals = x[recent]
            x[recent] = np.where(vals > 0, vals / c.repeat_penalty, vals * c.repeat_penalty)
        if c.temperature <= 0:
            return int(np.argmax(x))
        if 0 < c.top_k < len(x):
            idx = np.argpartition(-x, c.top_k - 1)[: c.top_k]
        else:
            idx = np.arange(len(x))
        idx = idx[np.argsort(-x[idx], kind="stable")]
        cand = x[idx]
        if c.top_p < 1.0:
            p = np.exp(cand - cand[0])
            p /= p.sum()
            keep = int(np.searchsorted(np.cumsum(p), c.top_p) + 1)
            idx, cand = idx[:keep], cand[:keep]
        p = np.exp((cand - cand[0]) / c.temperature)
        p /= p.sum()
        return int(idx[self.rng.choice(len(idx), p=p)])
