"""Task samplers (``training/sampling.py``): every mode's probabilities against hand-computed ones,
round robin's order, annealing's exponent over training, exact resume, one-line errors."""

import copy

import numpy as np
import pytest
import torch

from unit_fast.training.sampling import (
    MODES,
    AnnealedSchedule,
    UncertaintySampler,
    base_probabilities,
    build_sampler,
    select_most_uncertain,
    task_probabilities,
)

SIZES = {"big": 20000, "mid": 1000, "small": 300}


def _t(**kw):
    return {"sampling_mode": "proportional", "sampling": {}, "temperature": 1.0, "seed": 0, "max_updates": 100,
            "tasks_per_step": 1, "anneal": {"start": 1.0, "end": 0.2},
            "uncertainty": {"base": "temperature", "lambda": 0.5}, **kw}


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


def test_uncertainty_sampler_mixes_the_latest_probe_and_resumes():
    """Before a probe: the base; after ``update``: ``r^(1-λ) u^λ`` normalised (λ = 0.5 here, by
    hand); its state carries ``u``, so a restored sampler draws what the original draws."""
    base = {"big": 0.6, "mid": 0.3, "small": 0.1}
    s = UncertaintySampler(base, 0.5, seed=3)
    assert s.probabilities() == pytest.approx(base)
    s.update({"big": 0.1, "mid": 0.4, "small": 0.9})
    w = np.sqrt(np.array([0.6 * 0.1, 0.3 * 0.4, 0.1 * 0.9]))
    assert list(s.probabilities().values()) == pytest.approx(w / w.sum())
    [next(s) for _ in range(5)]
    restored = UncertaintySampler(base, 0.5, seed=3)
    restored.load_state_dict(copy.deepcopy(s.state_dict()))
    assert restored.probabilities() == s.probabilities()
    assert [next(restored) for _ in range(50)] == [next(s) for _ in range(50)]
    with pytest.raises(ValueError, match="no uncertainty for"):
        s.update({"big": 0.5})
    with pytest.raises(ValueError, match="lambda must be in"):
        UncertaintySampler(base, 1.5)


def test_select_most_uncertain_keeps_the_top_b_in_candidate_order():
    u = torch.tensor([0.2, 0.9, 0.5, 0.9, 0.1])
    assert select_most_uncertain(u, 3).tolist() == [1, 2, 3]
    assert select_most_uncertain(u, 1).tolist() == [1]  # a tie: the earlier candidate
    with pytest.raises(ValueError, match="keep b=6 of 5"):
        select_most_uncertain(u, 6)


def test_select_rows_indexes_every_row_field():
    from unit_fast.structures import NestedTensor
    from unit_fast.training.batches import select_rows

    batch = {"dataset_name": "d", "dataset_type": "train", "indices": [10, 11, 12],
             "input_ids": torch.arange(6).view(3, 2), "targets": [{"a": 0}, {"a": 1}, {"a": 2}],
             "image": NestedTensor(torch.arange(3.0).view(3, 1, 1, 1),
                                   torch.tensor([[[False]], [[True]], [[False]]]))}
    out = select_rows(batch, torch.tensor([0, 2]))
    assert out["indices"] == [10, 12] and out["targets"] == [{"a": 0}, {"a": 2}]
    assert out["input_ids"].tolist() == [[0, 1], [4, 5]] and out["dataset_name"] == "d"
    assert out["image"].tensors.flatten().tolist() == [0.0, 2.0] and not out["image"].mask.any()
