"""Task samplers (``training/sampling.py``): every mode's probabilities against hand-computed ones,
round robin's order, annealing's exponent over training, exact resume, one-line errors."""

import copy

import numpy as np
import pytest

from unit_fast.training.sampling import (
    MODES,
    AnnealedSchedule,
    base_probabilities,
    build_sampler,
    task_probabilities,
)

SIZES = {"big": 20000, "mid": 1000, "small": 300}


def _t(**kw):
    return {"sampling_mode": "proportional", "sampling": {}, "temperature": 1.0, "seed": 0, "max_updates": 100,
            "tasks_per_step": 1, "anneal": {"start": 1.0, "end": 0.2}, **kw}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_a_distribution(mode):
    p = base_probabilities(SIZES, _t(sampling_mode=mode, sampling={"big": 2, "mid": 1, "small": 1}))
    assert list(p) == list(SIZES) and sum(p.values()) == pytest.approx(1.0) and min(p.values()) > 0


def test_probabilities_by_hand():
    n = np.array([20000.0, 1000.0, 300.0])
    assert list(task_probabilities(SIZES, "uniform").values()) == pytest.approx([1 / 3] * 3)
    assert list(task_probabilities(SIZES, "proportional").values()) == pytest.approx(n / n.sum())
    w = n ** 0.5
    assert list(task_probabilities(SIZES, "temperature", temperature=2.0).values()) == pytest.approx(w / w.sum())
    w = n ** 0.2
    assert list(task_probabilities(SIZES, "annealed", alpha=0.2).values()) == pytest.approx(w / w.sum())
    # MMF's fallback: ratios without ratios is proportional.
    assert base_probabilities(SIZES, _t(sampling_mode="ratios")) == task_probabilities(SIZES, "proportional")


def test_round_robin_takes_the_datasets_in_turn():
    sampler = build_sampler(SIZES, _t(sampling_mode="round_robin"))
    assert [next(sampler) for _ in range(7)] == ["big", "mid", "small"] * 2 + ["big"]


def test_annealed_exponent_falls_linearly_to_the_end_value():
    schedule = AnnealedSchedule(SIZES, 1.0, 0.2, total=100)
    assert [schedule.alpha(d) for d in (0, 50, 100, 500)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    n = np.array(list(SIZES.values()), dtype=float)
    assert schedule(0) == pytest.approx(n / n.sum())
    assert schedule(100) == pytest.approx(n ** 0.2 / (n ** 0.2).sum())
    # Drawn: the small task's share grows from ~1.4% early to ~26% late.
    sampler = build_sampler(SIZES, _t(sampling_mode="annealed", max_updates=2000))
    early = [next(sampler) for _ in range(400)].count("small")
    for _ in range(1200):
        next(sampler)
    late = [next(sampler) for _ in range(400)].count("small")
    assert early < 30 < 60 < late
    assert sampler.probabilities()["small"] == pytest.approx(schedule(2000)[2], abs=0.01)


@pytest.mark.parametrize("mode", ["uniform", "round_robin", "annealed"])
def test_resume_continues_the_same_sequence(mode):
    a = build_sampler(SIZES, _t(sampling_mode=mode))
    head = [next(a) for _ in range(13)]
    state = copy.deepcopy(a.state_dict())
    rest = [next(a) for _ in range(40)]
    b = build_sampler(SIZES, _t(sampling_mode=mode))
    b.load_state_dict(state)
    assert [next(b) for _ in range(40)] == rest
    c = build_sampler(SIZES, _t(sampling_mode=mode))
    assert [next(c) for _ in range(53)] == head + rest


@pytest.mark.parametrize("t,message", [
    (_t(sampling_mode="bandit"), "training.sampling_mode must be one of"),
    (_t(sampling_mode="annealed", anneal={"start": -1, "end": 0.2}), "training.anneal must be"),
    (_t(sampling_mode="annealed", anneal={"start": 1.0}), "training.anneal must be"),
])
def test_bad_sampling_options_name_the_key(t, message):
    with pytest.raises(ValueError, match=message):
        build_sampler(SIZES, t)
