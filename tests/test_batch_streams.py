"""``BatchStream``: plain and aspect-ratio-grouped index batches, deterministic by seed, one global
batch shared out over ranks, exact resume (old ``{epoch, position}`` states too) and ``fork``."""

import zlib

import numpy as np
import pytest

import unit_fast
from unit_fast.training.streams import BatchStream, check_aspect_ratio_bins


class Images:
    """A dataset with image sizes: only what the stream asks of one."""

    def __init__(self, ratios):
        self.ratios = [float(r) for r in ratios]
        self.epochs = []

    def __len__(self):
        return len(self.ratios)

    def aspect_ratios(self):
        return self.ratios

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


class Texts:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def _plain(n, bs, name, seed, epoch):
    """The stream as it cut every dataset before grouping: slices of the seeded permutation."""
    perm = np.random.default_rng([seed, zlib.crc32(name.encode()), epoch]).permutation(n)
    return [perm[i:i + bs].tolist() for i in range(0, n - bs + 1, bs)]


def _draw(stream, k):
    return [stream.next_indices() for _ in range(k)]


def _mixed(n=101, seed=0):
    """Portrait (0.75), square, landscape (1.33) and panorama (2.5) images, shuffled."""
    return np.random.default_rng(seed).choice([0.75, 1.0, 1.33, 2.5], size=n, p=[0.3, 0.3, 0.3, 0.1])


@pytest.mark.parametrize("bins", [[], [1.0], [0.5, 1.0, 3.0]])
@pytest.mark.parametrize("square", [True, False])
def test_one_bin_streams_the_plain_batches(bins, square):
    """Every image in one bin (the default [1.0] on square images, or no bins at all), and text
    datasets: the very batches the stream cut before grouping existed, epoch after epoch."""
    n, bs, name = 53, 8, "detection_coco"
    dataset = Images([1.0] * n) if square else Texts(n)
    stream = BatchStream(dataset, name, bs, seed=3, aspect_ratio_bins=bins)
    expected = [b for epoch in range(3) for b in _plain(n, bs, name, 3, epoch)]
    assert _draw(stream, len(expected)) == expected


def test_grouped_epoch_is_one_bin_batches_then_the_pooled_leftovers():
    ratios, bs, bins = _mixed(), 6, [0.9, 1.1, 2.0]
    stream = BatchStream(Images(ratios), "detection_coco", bs, seed=1, aspect_ratio_bins=bins)
    groups = np.searchsorted(bins, ratios, side="right")
    counts = np.bincount(groups, minlength=len(bins) + 1)
    homogeneous, per_epoch = int((counts // bs).sum()), len(ratios) // bs  # as many as the plain cut
    assert 0 < per_epoch - homogeneous <= len(bins)
    for epoch in range(3):
        batches = _draw(stream, per_epoch)
        assert stream.epoch == epoch
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat)) == per_epoch * bs  # each index at most once, all batches full
        assert all(len({int(groups[i]) for i in b}) == 1 for b in batches[:homogeneous])
        seen = np.bincount(groups[flat[:homogeneous * bs]], minlength=len(bins) + 1)
        assert (seen == counts // bs * bs).all()  # each bin gives its full batches first
        # Dealt from the epoch's permutation: a batch comes when its bin's buffer fills, so the
        # bins interleave and each batch keeps the permutation's order; the leftovers follow it.
        perm = np.random.default_rng([1, zlib.crc32(b"detection_coco"), epoch]).permutation(len(ratios))
        where = np.argsort(perm)  # (N,) position of each index in the permutation
        assert all(list(where[b]) == sorted(where[b]) for b in batches)
        filled = [int(where[b].max()) for b in batches[:homogeneous]]
        assert filled == sorted(filled)
        rest = flat[homogeneous * bs:]
        assert rest == sorted(rest, key=lambda i: where[i])
    assert stream.next_indices() and stream.epoch == 3


def test_grouped_batches_are_deterministic_by_seed_and_differ_by_epoch():
    ratios = _mixed()
    a, b, c = (BatchStream(Images(ratios), "detection_coco", 4, seed=s, aspect_ratio_bins=[1.0])
               for s in (5, 5, 6))
    first = _draw(a, 40)
    assert first == _draw(b, 40)
    assert first != _draw(c, 40)
    per_epoch = int((np.bincount(np.asarray(ratios) >= 1.0) // 4).sum())
    assert first[:per_epoch] != first[per_epoch:2 * per_epoch]  # epoch 1 is a new shuffle


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_takes_its_rows_of_the_same_global_batch(world):
    ratios, bs = _mixed(), 6
    whole = _draw(BatchStream(Images(ratios), "detection_coco", bs, seed=2, aspect_ratio_bins=[1.0]), 30)
    shares = [_draw(BatchStream(Images(ratios), "detection_coco", bs, seed=2, rank=r, world_size=world,
                                aspect_ratio_bins=[1.0]), 30) for r in range(world)]
    for step, batch in enumerate(whole):
        assert [shares[r][step] for r in range(world)] == [batch[r::world] for r in range(world)]


@pytest.mark.parametrize("bins", [[], [1.0], [0.9, 1.1, 2.0]])
def test_resume_from_state_continues_with_the_next_batch_and_fork_reads_ahead(bins):
    ratios, bs = _mixed(), 5
    make = lambda: BatchStream(Images(ratios), "detection_coco", bs, seed=4, aspect_ratio_bins=bins)  # noqa: E731
    straight = make()
    expected = _draw(straight, 70)  # several epochs
    for cut in (0, 1, 17, 19, 20, 21, 45):
        first = make()
        _draw(first, cut)
        ahead = first.fork()
        assert _draw(ahead, 70 - cut) == expected[cut:]  # the fork reads ahead ...
        state = first.state_dict()
        assert set(state) == {"epoch", "position", "aspect_ratio_bins"}
        resumed = make()
        resumed.load_state_dict(state)
        assert _draw(resumed, 70 - cut) == expected[cut:]  # ... and the original did not move


def test_old_state_finishes_its_epoch_plain_then_groups():
    """A checkpoint written before grouping (``{epoch, position}``) was cut plain: the resumed
    stream ends that epoch with the plain batches it would have drawn, then groups."""
    n, bs, name = 60, 6, "detection_coco"
    ratios = _mixed(n)
    stream = BatchStream(Images(ratios), name, bs, seed=0, aspect_ratio_bins=[1.0])
    stream.load_state_dict({"epoch": 2, "position": 4 * bs})
    plain = _plain(n, bs, name, 0, 2)
    assert _draw(stream, len(plain) - 4) == plain[4:]
    fresh = BatchStream(Images(ratios), name, bs, seed=0, aspect_ratio_bins=[1.0])
    fresh.load_state_dict({"epoch": 3, "position": 0, "aspect_ratio_bins": [1.0]})
    assert stream.next_indices() == fresh.next_indices() and stream.epoch == 3
    groups = np.asarray(ratios) >= 1.0
    homogeneous = int((np.bincount(groups) // bs).sum()) - 1  # the first was drawn above
    assert all(len({bool(groups[i]) for i in b}) == 1 for b in _draw(stream, homogeneous))


def test_resume_with_other_bins_finishes_the_epoch_with_the_state_bins():
    ratios, bs = _mixed(), 4
    before = BatchStream(Images(ratios), "detection_coco", bs, seed=0, aspect_ratio_bins=[1.0])
    expected = _draw(before, 20)
    resumed = BatchStream(Images(ratios), "detection_coco", bs, seed=0, aspect_ratio_bins=[0.9, 1.1])
    first = BatchStream(Images(ratios), "detection_coco", bs, seed=0, aspect_ratio_bins=[1.0])
    _draw(first, 5)
    resumed.load_state_dict(first.state_dict())
    assert _draw(resumed, 15) == expected[5:]
    while resumed.epoch == 0:
        resumed.next_indices()
    assert resumed.state_dict()["aspect_ratio_bins"] == [0.9, 1.1]


def test_the_dataset_epoch_is_set_as_each_epoch_starts():
    dataset = Images([1.0] * 10)
    stream = BatchStream(dataset, "d", 4, aspect_ratio_bins=[1.0])
    _draw(stream, 5)  # two batches per epoch
    assert dataset.epochs == [0, 1, 2]


@pytest.mark.parametrize("bad", [[1.5, 1.0], [0.0], [-1.0], [float("inf")], ["wide"], [True], 1.0, "1.0"])
def test_bad_bins_are_a_one_line_error_naming_the_key(bad):
    with pytest.raises(ValueError, match=r"^data\.aspect_ratio_bins must be a sorted list") as info:
        BatchStream(Texts(10), "glue_sst2", 2, aspect_ratio_bins=bad)  # checked for every dataset
    assert "\n" not in str(info.value)


def test_default_bins_split_portrait_from_square_and_landscape():
    # Every config groups by default (defaults.yaml), but the embedded default run keeps the plain
    # batches its targets were measured with.
    bins = unit_fast.load_config("coco_single_task")["data"]["aspect_ratio_bins"]
    assert check_aspect_ratio_bins(bins) == (1.0,)
    assert check_aspect_ratio_bins(unit_fast.load_config("default")["data"]["aspect_ratio_bins"]) == ()
    assert check_aspect_ratio_bins(None) == check_aspect_ratio_bins([]) == ()


def test_bins_too_small_for_a_batch_still_give_every_image():
    tiny, bs = [0.75] * 3 + [1.33] * 3, 4  # no bin fills a batch: the plain cut
    stream = BatchStream(Images(tiny), "detection_coco", bs, aspect_ratio_bins=[1.0])
    assert _draw(stream, 3) == [b for e in range(3) for b in _plain(len(tiny), bs, "detection_coco", 0, e)]
    short = BatchStream(Images([0.75] * 3 + [1.33] * 9), "detection_coco", bs, aspect_ratio_bins=[1.0])
    drawn = {i for b in _draw(short, 30) for i in b}
    assert {0, 1, 2} <= drawn  # the portrait images, too few for a batch of their own
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        BatchStream(Texts(5), "glue_sst2", 8)


def test_a_grouped_state_does_not_load_into_a_text_stream():
    grouped = BatchStream(Images([1.0] * 8), "d", 2, aspect_ratio_bins=[1.0]).state_dict()
    with pytest.raises(ValueError, match="no aspect_ratios"):
        BatchStream(Texts(8), "d", 2, aspect_ratio_bins=[1.0]).load_state_dict(grouped)
