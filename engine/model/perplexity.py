"""Perplexity the way llama.cpp's ``llama-perplexity`` scores it.

The text is tokenized as one stream, BOS first when the model adds one (as llama.cpp
tokenizes it), and cut into non-overlapping windows of ``n_ctx``; each window is evaluated
from an empty cache, its first token replaced by BOS when the model adds one, and only the
second half is scored: for positions ``j`` in ``n_ctx/2 .. n_ctx-2`` the negative
log-likelihood of token ``j+1`` under the logits at ``j``. Scoring only tokens with at least
``n_ctx/2`` of context makes windows comparable. The running estimate after each window is
``exp(mean NLL so far)``, what llama.cpp prints as ``[i]ppl``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from engine.model.session import Session

__all__ = ["perplexity", "PerplexityStep"]


@dataclass(frozen=True, slots=True)
class PerplexityStep:
    window: int  # 1-based
    n_windows: int
    ppl: float  # running estimate over the windows so far
    nll: float  # this window's mean negative log-likelihood
    n_scored: int  # tokens scored so far


def perplexity(
    session: Session, tokens: Sequence[int], n_ctx: int, bos_id: int | None = None
) -> Iterator[PerplexityStep]:
    """Yield the running perplexity after each window (see the module doc)."""
    if n_ctx < 4:
        raise ValueError(f"context {n_ctx} is too short to score (need >= 4)")
    if session.n_ctx < n_ctx or session.n_batch < n_ctx:
        raise ValueError(
            f"the session holds {session.n_ctx} tokens in batches of {session.n_batch}; "
            f"perplexity over windows of {n_ctx} needs both >= {n_ctx}"
        )
    n_windows = len(tokens) // n_ctx
    if len(tokens) < 2 * n_ctx:
        raise ValueError(
            f"the text has {len(tokens)} tokens; perplexity with a context of {n_ctx} needs "
            f"at least {2 * n_ctx} (as llama.cpp): use more text or a smaller -c"
        )
    first = n_ctx // 2
    total, count = 0.0, 0
    for w in range(n_windows):
        window = list(tokens[w * n_ctx : (w + 1) * n_ctx])
        if bos_id is not None:
            window[0] = bos_id
        session.reset()
        logits = session.forward(window, logits=tuple(range(first, n_ctx - 1)))
        assert logits is not None
        targets = np.asarray(window[first + 1 :], dtype=np.int64)
        x = logits.astype(np.float64)
        top = x.max(axis=1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
        nll = logz - x[np.arange(len(targets)), targets]
        total += float(nll.sum())
        count += len(targets)
        yield PerplexityStep(w + 1, n_windows, math.exp(total / count), float(nll.mean()), count)
