"""MLP, AttributeHead (MMF's names, init and activation quirks) and PostProcess on hand-made
examples."""

import math

import pytest
import torch
import torch.nn.functional as F

from unit_fast.models.heads import MLP, AttributeHead
from unit_fast.models.postprocess import PostProcess, format_for_prediction


def test_mlp_param_names_and_activations():
    mlp = MLP(6, 5, 4, 3)
    assert [(k, tuple(v.shape)) for k, v in mlp.state_dict().items()] == [
        ("layers.0.weight", (5, 6)), ("layers.0.bias", (5,)),
        ("layers.1.weight", (5, 5)), ("layers.1.bias", (5,)),
        ("layers.2.weight", (4, 5)), ("layers.2.bias", (4,)),
    ]
    x = torch.randn(2, 7, 6)
    l0, l1, l2 = mlp.layers
    expected = l2(F.relu(l1(F.relu(l0(x)))))  # ReLU between layers, none after the last
    torch.testing.assert_close(mlp(x), expected)
    assert (mlp(x) < 0).any()  # the output is not rectified
    one = MLP(6, 5, 4, 1)
    assert list(one.state_dict()) == ["layers.0.weight", "layers.0.bias"]
    torch.testing.assert_close(one(x), one.layers[0](x))


def test_attribute_head_shapes_and_init():
    C, A, d = 30, 400, 64
    head = AttributeHead(C, A, d)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "cls_embed.weight": (C + 1, 256),
        "attr_linear1.weight": (512, d + 256), "attr_linear1.bias": (512,),
        "attr_linear2.weight": (A, 512), "attr_linear2.bias": (A,),
    }
    for name in ("cls_embed.weight", "attr_linear1.weight", "attr_linear2.weight"):
        w = head.state_dict()[name]
        assert w.mean().abs() < 1e-3 and w.std().item() == pytest.approx(0.01, rel=0.05), name
    assert head.attr_linear1.bias.abs().sum() == 0 and head.attr_linear2.bias.abs().sum() == 0
    hs, labels = torch.randn(2, 5, d), torch.randint(0, C + 1, (2, 5))  # label C = no-object
    out = head(hs, labels)
    assert out.shape == (2, 5, A) and (out >= 0).all()
    assert head(hs[0, 0], labels[0, 0]).shape == (A,)


def test_attribute_head_activation_quirks():
    head = AttributeHead(3, 6, 4)
    with torch.no_grad():  # unit-scale parameters, so pre-activations of both signs occur
        for p in head.parameters():
            p.normal_()
    hs, labels = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    x = torch.cat([hs, head.cls_embed.weight[labels]], -1)  # [8, 4 + 256]
    hidden = x @ head.attr_linear1.weight.T + head.attr_linear1.bias  # no ReLU after linear1
    assert (hidden < 0).any()  # a ReLU here would change the result
    expected = F.relu(hidden @ head.attr_linear2.weight.T + head.attr_linear2.bias)  # ReLU last
    torch.testing.assert_close(head(hs, labels), expected)
    assert (expected == 0).any() and (expected > 0).any()


def test_postprocess_hand_example():
    # Image 0 (h=100, w=200): query 0 prefers class 1; query 1 prefers no-object (index 2), so
    # its label is the best *object* class (0) with a low score.  Image 1 (h=50, w=40).
    logits = torch.tensor([[[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]],
                           [[1.0, 1.0, 1.0], [0.0, 0.5, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]],
                          [[0.5, 0.5, 1.0, 1.0], [0.1, 0.2, 0.2, 0.4]]])
    sizes = torch.tensor([[100, 200], [50, 40]])
    results = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert len(results) == 2 and all(len(r["scores"]) == 2 for r in results)  # all Q kept
    e = math.e
    exp_scores = [[e**2 / (e**2 + 2), e / (e + 1 + e**3)], [1 / 3, math.exp(0.5) / (math.exp(0.5) + 2)]]
    exp_labels = [[1, 0], [0, 1]]  # ties pick the first class; never the no-object class 2
    exp_boxes = [[[80, 30, 120, 70], [0, 50, 100, 100]], [[0, 0, 40, 50], [0, 0, 8, 20]]]
    for r, s, lab, b in zip(results, exp_scores, exp_labels, exp_boxes, strict=True):
        torch.testing.assert_close(r["scores"], torch.tensor(s))
        assert r["labels"].tolist() == lab and r["labels"].dtype == torch.int64
        torch.testing.assert_close(r["boxes"], torch.tensor(b, dtype=torch.float32))
        assert "attr_scores" not in r


def test_postprocess_attributes_and_errors():
    logits, boxes = torch.randn(2, 3, 4), torch.rand(2, 3, 4)
    attr = torch.tensor([[[0.0, 2.0, 0.0]] * 3, [[3.0, 0.0, 0.0]] * 3])  # post-ReLU scores
    results = PostProcess()({"pred_logits": logits, "pred_boxes": boxes, "attr_logits": attr},
                            torch.tensor([[10, 10], [20, 20]]))
    e = math.e
    torch.testing.assert_close(results[0]["attr_scores"], torch.full((3,), e**2 / (e**2 + 2)))
    assert results[0]["attr_labels"].tolist() == [1] * 3 and results[1]["attr_labels"].tolist() == [0] * 3
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 10]]))


def test_format_for_prediction():
    results = [{"scores": torch.tensor([0.9, 0.2]), "labels": torch.tensor([1, 18]),
                "boxes": torch.tensor([[10.0, 20.0, 40.0, 80.0], [0.0, 0.0, 5.0, 5.0]])}]
    out = format_for_prediction(results, [torch.tensor(42)])
    assert out == [
        {"image_id": 42, "category_id": 1, "bbox": [10.0, 20.0, 30.0, 60.0], "score": pytest.approx(0.9)},
        {"image_id": 42, "category_id": 18, "bbox": [0.0, 0.0, 5.0, 5.0], "score": pytest.approx(0.2)},
    ]
    mapped = format_for_prediction(results, [7], label_to_category_id={1: 101, 18: 118})
    assert [r["category_id"] for r in mapped] == [101, 118]
