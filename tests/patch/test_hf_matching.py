"""unit_fast/patch/hf/matching.py: the batched solve every patched transformers matcher uses,
against transformers' own loop (scipy per image, per query group, over the [B, Q, sum T] cost)."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from unit_fast.patch.hf.matching import BIG, blocks_to_padded, padded_targets, solve
from unit_fast.testing import devices


def _transformers_loop(flat, sizes, groups):
    """transformers' LW-DETR loop (groups=1 is DETR's): (B, Q, sum T) cost -> B index pairs."""
    B, Q, _ = flat.shape
    Qg = Q // groups
    out = [([], []) for _ in range(B)]
    for g in range(groups):
        block = flat[:, g * Qg:(g + 1) * Qg]
        for b, c in enumerate(block.split(sizes, -1)):
            i, j = linear_sum_assignment(c[b].numpy())
            out[b][0].extend((i + g * Qg).tolist())
            out[b][1].extend(j.tolist())
    return out


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("sizes", [[3, 0, 5, 2], [0, 0], [4], [7, 6]])
def test_solve_equals_the_scipy_loop(device, groups, sizes):
    g = torch.Generator().manual_seed(len(sizes) * 10 + groups)
    B, Q = len(sizes), 6 * groups
    flat = torch.rand(B, Q, sum(sizes), generator=g, dtype=torch.float64)  # tie-free
    got = solve(blocks_to_padded(flat.to(device), sizes), sizes, groups=groups)
    want = _transformers_loop(flat, sizes, groups)
    assert len(got) == B
    for (i, j), (wi, wj) in zip(got, want, strict=True):
        assert i.device.type == torch.device(device).type and i.dtype == torch.int64 and j.dtype == torch.int64
        assert i.tolist() == wi and j.tolist() == wj


def test_solve_counts_nan_and_inf_as_big():
    """transformers' nan_to_num(max): such a pair is matched only if nothing else is left."""
    cost = torch.tensor([[[0.1, float("nan")], [float("inf"), 0.2], [0.3, 0.4]]])  # (1, 3, 2)
    (i, j), = solve(cost, [2])
    assert i.tolist() == [0, 1] and j.tolist() == [0, 1]
    all_bad = torch.full((1, 2, 2), float("nan"))
    (i, j), = solve(all_bad, [2])
    assert sorted(j.tolist()) == [0, 1]  # still a complete matching
    assert BIG < torch.finfo(torch.float32).max / 1e4  # a float32 dual update stays finite


def test_solve_rejects_groups_that_do_not_divide():
    with pytest.raises(ValueError, match="group_detr=4"):
        solve(torch.rand(1, 6, 2), [2], groups=4)


def test_padded_targets_layout():
    targets = [{"class_labels": torch.tensor([3, 1]), "boxes": torch.rand(2, 4)},
               {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
               {"class_labels": torch.tensor([7]), "boxes": torch.rand(1, 4)}]
    labels, boxes, sizes = padded_targets(targets, "cpu")
    assert sizes == [2, 0, 1] and labels.shape == (3, 2) and boxes.shape == (3, 2, 4)
    assert labels.tolist() == [[3, 1], [0, 0], [7, 0]]
    torch.testing.assert_close(boxes[0], targets[0]["boxes"])
    torch.testing.assert_close(boxes[2, :1], targets[2]["boxes"])
    assert (boxes[1] == 0.5).all()


def test_blocks_to_padded_takes_each_images_own_block():
    sizes = [2, 0, 3]
    flat = torch.arange(3 * 4 * 5, dtype=torch.float32).view(3, 4, 5)
    padded = blocks_to_padded(flat, sizes)
    assert padded.shape == (3, 4, 3)
    torch.testing.assert_close(padded[0, :, :2], flat[0, :, 0:2])
    torch.testing.assert_close(padded[2, :, :3], flat[2, :, 2:5])
    assert blocks_to_padded(torch.zeros(2, 4, 0), [0, 0]).shape == (2, 4, 0)
    np.testing.assert_array_equal(padded.shape, (3, 4, 3))
