"""Sampling: greedy, temperature, top-k, top-p, repetition penalty and seeds, against direct
formulas; and ``Session.generate``'s stopping rules."""

from __future__ import annotations

import numpy as np
import pytest

from engine.model.sampling import Sampler, SamplerConfig
from engine.model.session import Session
from engine.model.weights import random_weights
from graph.models import preset


def _draws(cfg: SamplerConfig, logits: np.ndarray, n: int, history: list[int] = []) -> np.ndarray:  # noqa: B006
    s = Sampler(cfg)
    return np.array([s(logits, history) for _ in range(n)])


def test_greedy_is_argmax_and_ignores_seed() -> None:
    logits = np.array([0.1, 3.0, -2.0, 2.9], np.float32)
    assert _draws(SamplerConfig.greedy(), logits, 5).tolist() == [1] * 5
    assert Sampler(SamplerConfig(temperature=0.0, seed=1))(logits) == 1


def test_same_seed_same_tokens_and_different_seed_differs() -> None:
    logits = np.random.default_rng(0).standard_normal(1000)
    a = _draws(SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, seed=7), logits, 50)
    b = _draws(SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, seed=7), logits, 50)
    c = _draws(SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, seed=8), logits, 50)
    assert (a == b).all() and (a != c).any()


def test_temperature_one_matches_softmax_frequencies() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    draws = _draws(SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, seed=0), logits, 20000)
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.015)


def test_temperature_sharpens_as_power_of_probabilities() -> None:
    p = np.array([0.5, 0.3, 0.2])
    draws = _draws(SamplerConfig(temperature=0.5, top_k=0, top_p=1.0, seed=1), np.log(p), 20000)
    want = p**2 / (p**2).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / len(draws), want, atol=0.015)


def test_top_k_keeps_only_the_k_best() -> None:
    logits = np.array([5.0, 4.0, 3.0, 2.9, 2.8, 1.0])
    draws = _draws(SamplerConfig(temperature=5.0, top_k=2, top_p=1.0, seed=2), logits, 2000)
    assert set(draws.tolist()) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    p = np.array([0.6, 0.25, 0.1, 0.05])
    # cumulative 0.6, 0.85, 0.95: top_p=0.8 needs tokens 0 and 1, 0.9 needs 0, 1, 2
    d = _draws(SamplerConfig(temperature=1.0, top_k=0, top_p=0.8, seed=3), np.log(p), 3000)
    assert set(d.tolist()) == {0, 1}
    np.testing.assert_allclose(np.mean(d == 0), 0.6 / 0.85, atol=0.03)
    d = _draws(SamplerConfig(temperature=1.0, top_k=0, top_p=0.9, seed=3), np.log(p), 3000)
    assert set(d.tolist()) == {0, 1, 2}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = np.array([2.0, 1.9, -1.0, -1.1])
    greedy = SamplerConfig(temperature=0.0, top_k=0, top_p=1.0, repeat_penalty=1.5)
    assert Sampler(greedy)(logits, history=[0]) == 1  # 2.0 / 1.5 < 1.9
    assert Sampler(greedy)(logits, history=[3, 0]) == 1
    only_negative = np.array([-1.0, -1.2])
    assert Sampler(greedy)(only_negative, history=[0]) == 1  # -1.5 < -1.2
    window = SamplerConfig(temperature=0.0, top_k=0, top_p=1.0, repeat_penalty=1.5, repeat_last_n=1)
    assert Sampler(window)(logits, history=[0, 3]) == 0  # token 0 is outside the last 1


@pytest.mark.parametrize(
    ("bad", "flag"),
    [
        (dict(top_k=-1), "--top-k"),
        (dict(top_p=0.0), "--top-p"),
        (dict(top_p=1.5), "--top-p"),
        (dict(repeat_penalty=0), "--repeat-penalty"),
        (dict(temperature=-1.0), "--temp"),
        (dict(temperature=float("nan")), "--temp"),
        (dict(repeat_last_n=-2), "--repeat-last-n"),
        (dict(seed=-1), "--seed"),
        (dict(seed=2**64), "--seed"),
    ],
)
def test_bad_settings_are_refused_naming_the_flag(bad: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=f"^{flag} takes "):
        SamplerConfig(**bad)


@pytest.fixture(scope="module")
def session() -> Session:
    cfg = preset("gemma3-tiny")
    return Session(cfg, random_weights(cfg, seed=1), n_ctx=32, n_batch=8)


def test_generate_greedy_equals_manual_decode_loop(session: Session) -> None:
    session.reset()
    got = list(session.generate([1, 2, 3], 6))
    session.reset()
    logits = session.prefill([1, 2, 3])
    want = []
    for _ in range(6):
        want.append(int(np.argmax(logits)))
        logits = session.decode(want[-1])
    assert got == want
    assert session.stats.n_gen == 6 and session.stats.stopped_by == "budget"


def test_generate_stops_on_stop_token_without_yielding_it(session: Session) -> None:
    session.reset()
    first = list(session.generate([1, 2, 3], 4))
    session.reset()
    got = list(session.generate([1, 2, 3], 4, stop={first[2]}))
    cut = first.index(first[2])
    assert got == first[:cut] and session.stats.stopped_by == "eos"


def test_generate_stops_when_context_is_full(session: Session) -> None:
    session.reset()
    got = list(session.generate(list(range(1, 29)), 100))
    assert len(got) == 32 - 28 + 1 and session.stats.stopped_by == "context"
    assert session.n_past == 32
