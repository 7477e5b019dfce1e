"""Normalised uncertainty per task kind (``TaskKind.uncertainty``, CA-MTL's task sampling) and the
mixing ``p_t ∝ r_t^(1-λ) u_t^λ`` (``sampling.uncertainty_probabilities``), against values
computed by hand."""

import math

import pytest
import torch

from unit_fast.tasks import KINDS
from unit_fast.training.sampling import uncertainty_probabilities


def test_classification_entropy_over_log_c():
    kind = KINDS["text_classification"]
    scores = torch.tensor([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    u = kind.uncertainty({"scores": scores}, {"loss_type": "ce"})
    p = torch.tensor([0.5, 0.25, 0.25])
    want = float(-(p * p.log()).sum() / math.log(3))
    assert u.tolist() == pytest.approx([1.0, 0.0, want], abs=1e-6)
    # BCE heads: the mean binary entropy of the labels / log 2.
    u = kind.uncertainty({"scores": torch.tensor([[0.0, 100.0]])}, {"loss_type": "bce"})
    assert u.tolist() == pytest.approx([0.5], abs=1e-6)
    assert KINDS["image_text_classification"].uncertainty({"scores": scores}, {})[0] == pytest.approx(1.0)


def test_vqa_entropy_of_the_normalised_answer_scores():
    kind = KINDS["vqa"]
    A = 4
    alike = torch.zeros(1, A)
    one = torch.tensor([[30.0, -30.0, -30.0, -30.0]])
    two = torch.tensor([[30.0, 30.0, -30.0, -30.0]])
    u = kind.uncertainty({"scores": torch.cat([alike, one, two])}, {})
    assert u.tolist() == pytest.approx([1.0, 0.0, math.log(2) / math.log(A)], abs=1e-5)
    # Independent (sigmoid) answer scores, normalised: not a softmax over the logits.
    s = torch.tensor([2.0, 0.0]).sigmoid()
    q = s / s.sum()
    want = float(-(q * q.log()).sum() / math.log(A))
    assert kind.uncertainty({"scores": torch.tensor([[2.0, 0.0, -40.0, -40.0]])}, {}).item() == pytest.approx(
        want, abs=1e-5)


def test_detection_uses_the_top_queries_by_object_score():
    kind = KINDS["detection"]
    C = 3  # + no-object
    confident_noobj = torch.tensor([-20.0, -20.0, -20.0, 20.0])  # no-object, certain: entropy ~0
    unsure_object = torch.tensor([0.0, 0.0, 0.0, -20.0])  # an object of unknown class: log 3 / log 4
    logits = torch.stack([unsure_object] + [confident_noobj] * 9).unsqueeze(0)  # (1, Q=10, C+1)
    u = kind.uncertainty({"pred_logits": logits}, {}, top_m=1)
    assert u.tolist() == pytest.approx([math.log(3) / math.log(C + 1)], abs=1e-4)
    # Over all queries the confident no-object ones would swamp it.
    u_all = kind.uncertainty({"pred_logits": logits}, {}, top_m=10)
    assert u_all.item() < u.item() / 5


def test_mixing_gives_the_ratios_back_at_lambda_zero_and_sums_to_one():
    base = {"a": 0.7, "b": 0.2, "c": 0.1}
    u = {"a": 0.1, "b": 0.5, "c": 0.9}
    assert uncertainty_probabilities(base, u, 0.0) == pytest.approx(base)
    p1 = uncertainty_probabilities(base, u, 1.0)
    assert list(p1.values()) == pytest.approx([0.1 / 1.5, 0.5 / 1.5, 0.9 / 1.5])
    half = uncertainty_probabilities(base, u, 0.5)
    w = {k: base[k] ** 0.5 * u[k] ** 0.5 for k in base}
    assert half == pytest.approx({k: v / sum(w.values()) for k, v in w.items()})
    for lam in (0.0, 0.3, 1.0):
        assert sum(uncertainty_probabilities(base, u, lam).values()) == pytest.approx(1.0)
    assert uncertainty_probabilities(base, dict.fromkeys(base, 0.0), 1.0) == pytest.approx(base)
    with pytest.raises(ValueError, match=r"training.uncertainty.lambda must be in \[0, 1\]"):
        uncertainty_probabilities(base, u, 1.5)
