"""Perplexity scored as llama.cpp scores it, checked against a direct computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.model.perplexity import perplexity
from engine.model.session import Session
from engine.model.weights import random_weights
from graph.models import preset


@pytest.fixture(scope="module")
def session() -> Session:
    cfg = preset("llama-tiny")
    return Session(cfg, random_weights(cfg, seed=3), n_ctx=16, n_batch=16)


def _direct(session: Session, tokens: list[int], n_ctx: int, bos: int | None) -> list[float]:
    """Running perplexities from full-window logits and a plain log-softmax."""
    nll, count, out = 0.0, 0, []
    for w in range(len(tokens) // n_ctx):
        window = tokens[w * n_ctx : (w + 1) * n_ctx]
        if bos is not None:
            window = [bos] + window[1:]
        session.reset()
        logits = session.prefill(window, logits="all").astype(np.float64)
        for j in range(n_ctx // 2, n_ctx - 1):
            row = logits[j]
            logz = math.log(np.exp(row - row.max()).sum()) + row.max()
            nll += logz - row[window[j + 1]]
            count += 1
        out.append(math.exp(nll / count))
    return out


@pytest.mark.parametrize("bos", [None, 1])
def test_running_estimates_equal_direct_computation(session: Session, bos: int | None) -> None:
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, 512, 16 * 3 + 5)]
    steps = list(perplexity(session, tokens, 16, bos))
    assert [s.window for s in steps] == [1, 2, 3] and all(s.n_windows == 3 for s in steps)
    assert [s.n_scored for s in steps] == [7, 14, 21]  # n_ctx - n_ctx/2 - 1 per window
    np.testing.assert_allclose([s.ppl for s in steps], _direct(session, tokens, 16, bos), rtol=1e-5)


def test_random_weights_score_near_vocab_size(session: Session) -> None:
    # an untrained model is close to uniform: perplexity in the vocabulary's order of magnitude
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, 512, 64)]
    last = list(perplexity(session, tokens, 16))[-1]
    assert 100 < last.ppl < 5000


def test_too_little_text_and_too_small_session_are_clear_errors(session: Session) -> None:
    with pytest.raises(ValueError, match="needs at least 32"):
        list(perplexity(session, list(range(20)), 16))
    with pytest.raises(ValueError, match="windows of 32"):
        list(perplexity(session, list(range(100)), 32))
