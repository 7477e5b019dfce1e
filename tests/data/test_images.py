"""Image pipeline: DETR transform plans, boxes vs pixels, decoder agreement, bad input, batching.

Images are small JPEGs drawn here: solid coloured rectangles on grey (so a box can be found
again in the decoded pixels) and a textured image (gradients + noise, where decoders differ
most).  Plans use small scales so every case stays fast.
"""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from unit_fast.data.collate import AspectRatioBatchSampler, collate_images
from unit_fast.data.decode import (
    DECODERS,
    ImageDecodeError,
    ImageLoader,
    available_decoders,
    decoder_unavailable_reason,
    default_decoder,
    image_size,
    load_batch,
)
from unit_fast.data.transforms import (
    DETR_TRAIN_SCALES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Plan,
    apply_plan_to_target,
    plan_detr_test,
    plan_detr_train,
    resized_shape,
)
from unit_fast.testing import devices

H, W = 150, 200
BACKGROUND = (128, 128, 128)
# label -> (colour, absolute xyxy box, x1/y1 exclusive); far apart, none symmetric under a flip.
RECTS = {
    1: ((220, 30, 30), (20, 15, 70, 60)),
    2: ((30, 200, 40), (120, 20, 180, 70)),
    3: ((30, 40, 220), (40, 90, 100, 135)),
    4: ((230, 220, 30), (140, 95, 185, 140)),
}
SMALL = dict(scales=(120, 136, 152), max_size=240, crop_scales=(150, 170), crop_size=(90, 140))

# Decoder agreement, in 8-bit levels of the de-normalised output, against PIL (DETR's path).
# CPU decoders here are all libjpeg-turbo and the resizes are antialiased bilinear: observed
# mean < 0.25 and max 1 level (rounding); the bounds leave room for other libjpeg-turbo builds.
# nvJPEG on CUDA differs more: torchvision's own test allows a mean of 2 levels vs libjpeg-turbo
# and bounds no maximum (chroma upsampling differs at colour edges).
AGREEMENT = {"cpu": {"mean": 1.0, "max": 4.0}, "cuda": {"mean": 2.0, "max": None}}


def _backend_params():
    return [pytest.param(b, marks=pytest.mark.skipif(
        decoder_unavailable_reason(b) is not None, reason=f"{b}: {decoder_unavailable_reason(b)}"))
        for b in DECODERS]


def _jpeg(image, quality=95):
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def rect_jpeg():
    image = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for colour, (x0, y0, x1, y1) in RECTS.values():
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)  # PIL's x1, y1 are inclusive
    return _jpeg(image)


def textured_jpeg(h=H, w=W, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 90 * np.sin(x / (9 + 4 * c) + c) * np.cos(y / (13 - 3 * c)) for c in range(3)], -1)
    image = Image.fromarray((base + rng.normal(0, 15, base.shape)).clip(0, 255).astype(np.uint8))
    ImageDraw.Draw(image).rectangle([w // 4, h // 4, w // 2, h // 2], fill=(200, 20, 60))
    return _jpeg(image, quality=85)


def rect_target():
    labels = sorted(RECTS)
    boxes = torch.tensor([RECTS[k][1] for k in labels], dtype=torch.float32)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return {"boxes": boxes, "labels": torch.tensor(labels), "area": area, "image_id": 7}


def to_levels(image):
    """(3, h, w) normalised float -> (h, w, 3) float64 RGB in 8-bit levels."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image.cpu() * std + mean) * 255).permute(1, 2, 0).double()


# Hand-made plans covering each geometric case; random ones are added in the tests.
HAND_PLANS = {
    "downscale": Plan((H, W), (0, 0, H, W), (120, 160), False, "resize"),
    "upscale_flip": Plan((H, W), (0, 0, H, W), (180, 240), True, "resize"),
    "crop_drops_three": Plan((H, W), (0, 0, 85, 110), (150, 194), False, "resize_crop_resize"),
    "crop_clips_flip": Plan((H, W), (30, 50, 100, 120), (136, 163), True, "resize_crop_resize"),
}


# --------------------------------------------------------------------------------------------
# Plans


def test_plans_are_deterministic_per_rng():
    draw = lambda seed: [plan_detr_train(random.Random(seed), 480, 640) for _ in range(3)]  # noqa: E731
    assert draw(3) == draw(3)
    assert plan_detr_train(5, 480, 640) == plan_detr_train(random.Random(5), 480, 640)
    many = [plan_detr_train(random.Random(s), 480, 640) for s in range(60)]
    assert len(set(many)) > 30
    assert {p.branch for p in many} == {"resize", "resize_crop_resize"}
    assert {p.flip for p in many} == {True, False}


@pytest.mark.parametrize("orig", [(480, 640), (427, 640), (640, 360), (100, 1000), (1000, 120)])
def test_train_plan_sizes(orig):
    rng = random.Random(0)
    for _ in range(40):
        p = plan_detr_train(rng, *orig)
        top, left, ch, cw = p.crop
        assert 0 <= top and 0 <= left and top + ch <= orig[0] and left + cw <= orig[1]
        assert max(p.size) <= 1333
        # shorter side one of the scales unless the 1333 cap made it smaller
        assert min(p.size) in DETR_TRAIN_SCALES or max(p.size) >= 1333 - 20
        if p.branch == "resize":
            assert p.crop == (0, 0, *orig) and not p.cropped


@pytest.mark.parametrize(
    "orig,size",
    [((480, 640), (800, 1066)), ((500, 333), (1201, 800)), ((800, 1333), (800, 1333)),
     ((100, 1000), (133, 1330)), ((1000, 100), (1330, 133)), ((480, 640), (800, 1066))],
)
def test_test_plan_sizes(orig, size):
    p = plan_detr_test(*orig)
    assert p.size == size and not p.flip and not p.cropped and p.branch == "test"
    assert min(p.size) == 800 or max(p.size) <= 1333


def test_resized_shape_small_scales():
    assert resized_shape(150, 200, 120) == (120, 160)
    assert resized_shape(150, 200, 150) == (150, 200)  # already there: unchanged
    assert resized_shape(150, 600, 120, max_size=240) == (60, 240)  # capped by the longer side


def test_plan_rejects_bad_windows():
    with pytest.raises(ValueError, match="outside"):
        Plan((10, 10), (5, 5, 6, 5), (10, 10))
    with pytest.raises(ValueError, match="branch"):
        Plan((10, 10), (0, 0, 10, 10), (10, 10), branch="mosaic")


def test_apply_plan_to_target_by_hand():
    plan = Plan((100, 200), (10, 20, 60, 100), (120, 200), True, "resize_crop_resize")  # 2x, flipped
    target = {
        "boxes": np.array([[30, 20, 70, 60], [0, 0, 15, 5], [100, 40, 150, 90]], np.float32),
        "labels": np.array([5, 6, 7]),
        "area": np.array([1600.0, 75.0, 2500.0], np.float32),
        "image_id": 3,
    }
    out = apply_plan_to_target(plan, target)
    # box 0: -(20, 10) -> (10, 10, 50, 50), x2 -> (20, 20, 100, 100), flip in 200 -> (100, 20, 180, 100)
    # box 1 lies left of the window: dropped.  box 2: -> (80, 30, 130, 80), clipped to (80, 30, 100, 60),
    # x2 -> (160, 60, 200, 120), flip -> (0, 60, 40, 120).
    want_xyxy = torch.tensor([[100, 20, 180, 100], [0, 60, 40, 120]], dtype=torch.float64)
    x0, y0, x1, y1 = want_xyxy.unbind(1)
    want = torch.stack([(x0 + x1) / 2 / 200, (y0 + y1) / 2 / 120, (x1 - x0) / 200, (y1 - y0) / 120], 1)
    torch.testing.assert_close(out["boxes"], want.float())
    assert out["labels"].tolist() == [5, 7]
    torch.testing.assert_close(out["area"], torch.tensor([6400.0, 2400.0]))  # clipped areas, x4
    assert out["orig_size"].tolist() == [100, 200] and out["size"].tolist() == [120, 200]
    assert out["image_id"] == 3 and out["boxes"].dtype == torch.float32


def test_apply_plan_without_crop_keeps_every_box():
    plan = plan_detr_test(100, 200, size=50, max_size=1000)  # x0.5
    target = {"boxes": torch.tensor([[0.0, 0, 0, 0], [10, 10, 210, 90]]), "area": torch.tensor([0.0, 9.0])}
    out = apply_plan_to_target(plan, target)
    assert out["boxes"].shape == (2, 4)  # DETR drops degenerate boxes only when it crops
    torch.testing.assert_close(out["area"], torch.tensor([0.0, 2.25]))


# --------------------------------------------------------------------------------------------
# Boxes against pixels


def _found_box(levels, colour):
    """xyxy bounding box of the pixels nearer ``colour`` than the background, or None."""
    px = levels.float().numpy()  # (h, w, 3)
    near = ((px - np.float32(colour)) ** 2).sum(-1) < ((px - np.float32(BACKGROUND)) ** 2).sum(-1)  # (h, w)
    if not near.any():
        return None
    ys, xs = near.nonzero()
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float64)


@pytest.mark.parametrize("decoder", _backend_params())
def test_boxes_follow_the_drawn_rectangles(decoder):
    data = rect_jpeg()
    rng = random.Random(11)
    plans = dict(HAND_PLANS, **{f"random{i}": plan_detr_train(rng, H, W, **SMALL) for i in range(6)})
    images = load_batch([data] * len(plans), list(plans.values()), decoder=decoder)
    for (name, plan), image in zip(plans.items(), images, strict=True):
        assert tuple(image.shape) == (3, *plan.size), name
        target = apply_plan_to_target(plan, rect_target())
        levels = to_levels(image)
        oh, ow = plan.size
        scale = max(ow / plan.crop[3], oh / plan.crop[2])
        # JPEG's 2x chroma subsampling and the resize filter blur each edge by ~1 source pixel,
        # plus rounding to whole output pixels (observed: at most 1 pixel off).
        tol = 1 + scale
        kept = set(target["labels"].tolist())
        for label, box in zip(target["labels"].tolist(), target["boxes"], strict=True):
            cx, cy, bw, bh = (box.double() * torch.tensor([ow, oh, ow, oh])).tolist()
            want = torch.tensor([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dtype=torch.float64)
            if min(bw, bh) < 2 * tol:
                continue  # a sliver at the window's edge: too thin to locate by colour
            found = _found_box(levels, RECTS[label][0])
            assert found is not None, f"{decoder} {name}: label {label} not in the image"
            err = (found - want).abs().max().item()
            assert err <= tol, f"{decoder} {name}: {label} at {found.tolist()}, box says {want.tolist()}"
        for label in set(RECTS) - kept:
            assert _found_box(levels, RECTS[label][0]) is None, f"{decoder} {name}: dropped {label} visible"
    assert HAND_PLANS["crop_drops_three"] in plans.values()


# --------------------------------------------------------------------------------------------
# Decoders agree


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("decoder", _backend_params())
def test_backends_agree_with_pil(decoder, device):
    if decoder_unavailable_reason(decoder, device):
        pytest.skip(f"{decoder} on {device}: {decoder_unavailable_reason(decoder, device)}")
    datas = [textured_jpeg(seed=0), rect_jpeg(), textured_jpeg(333, 251, seed=1)]
    rng = random.Random(4)
    cases = [(datas[0], plan_detr_test(H, W, size=300, max_size=500)),
             (datas[1], HAND_PLANS["crop_clips_flip"]),
             (datas[2], plan_detr_test(333, 251, size=100, max_size=500))]
    cases += [(datas[0], plan_detr_train(rng, H, W, **SMALL)) for _ in range(4)]
    items, plans = [c[0] for c in cases], [c[1] for c in cases]
    got = load_batch(items, plans, decoder=decoder, device=device)
    want = load_batch(items, plans, decoder="pil")
    bound = AGREEMENT[device]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.device.type == device and g.dtype == torch.float32 and g.shape == w.shape
        diff = (to_levels(g) - to_levels(w)).abs()
        assert diff.mean() <= bound["mean"], f"{decoder} case {i} ({plans[i]}): mean {diff.mean():.3f} levels"
        if bound["max"] is not None:
            assert diff.max() <= bound["max"], f"{decoder} case {i} ({plans[i]}): max {diff.max():.1f} levels"


def test_backend_selection():
    assert available_decoders()[-1] == "pil" and "torchvision" in available_decoders()
    assert default_decoder() == available_decoders()[0]
    if decoder_unavailable_reason("dali") is None:
        assert default_decoder() == "dali"
    with pytest.raises(RuntimeError, match="unknown image decoder"):
        ImageLoader("opencv")


def test_png_and_grayscale_inputs():
    gray = _jpeg(Image.new("L", (W, H), 90))
    buf = io.BytesIO()
    Image.open(io.BytesIO(rect_jpeg())).save(buf, "PNG")
    plans = [plan_detr_test(H, W, size=120, max_size=500)] * 2
    for decoder in available_decoders():
        out = load_batch([gray, buf.getvalue()], plans, decoder=decoder, names=["gray.jpg", "rects.png"])
        assert all(o.shape == (3, 120, 160) for o in out)
        assert (to_levels(out[0]) - 90).abs().max() <= 2


# --------------------------------------------------------------------------------------------
# Bad input


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _corrupt_huffman_table(data):
    """A JPEG whose headers parse (so only the decoder can notice) but whose DHT is bogus."""
    out = bytearray(data)
    at = out.find(b"\xff\xc4")
    out[at + 5 : at + 21] = b"\xff" * 16  # code-length counts that overflow the table
    return bytes(out)


@pytest.mark.parametrize("decoder", _backend_params())
def test_bad_input_names_the_file(tmp_path, decoder):
    good = _write(tmp_path, "good.jpg", rect_jpeg())
    plan = plan_detr_test(H, W, size=60, max_size=500)
    data = rect_jpeg()
    bad = {
        "truncated.jpg": (data[: len(data) // 2], "truncated"),
        "text.jpg": (b"this is not an image at all", "not a JPEG or PNG"),
        "empty.jpg": (b"", "not a JPEG or PNG"),
        "garbled_header.jpg": (data[:3] + bytes(range(200)) + data[203:], "corrupt JPEG"),
        "bad_huffman.jpg": (_corrupt_huffman_table(data), "cannot decode"),
    }
    for name, (content, match) in bad.items():
        path = _write(tmp_path, name, content)
        with pytest.raises(ValueError, match=match) as info:
            load_batch([good, path, good], [plan] * 3, decoder=decoder)
        assert name in str(info.value), f"{decoder}: {info.value}"
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_batch([good, str(tmp_path / "missing.jpg")], [plan] * 2, decoder=decoder)
    with pytest.raises(ImageDecodeError, match=r"good.jpg.*150x200.*100x200"):
        load_batch([good], [plan_detr_test(100, 200)], decoder=decoder)  # annotation disagrees
    # the loader still works after an error (DALI rebuilds its pipeline)
    assert load_batch([good], [plan], decoder=decoder)[0].shape == (3, 60, 80)


def test_image_size_reads_headers():
    assert image_size(rect_jpeg()) == (H, W)
    buf = io.BytesIO()
    Image.new("RGB", (31, 17)).save(buf, "PNG")
    assert image_size(buf.getvalue()) == (17, 31)
    with pytest.raises(ImageDecodeError, match="IEND"):
        image_size(buf.getvalue()[:-20], "cut.png")


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="2 images, 1 plans"):
        load_batch([b"", b""], [plan_detr_test(H, W)], decoder="pil")
    assert load_batch([], [], decoder="pil") == []


# --------------------------------------------------------------------------------------------
# Batching


def test_collate_images_pads_and_masks():
    images = [torch.rand(3, 5, 7), torch.rand(3, 6, 4)]
    batch = collate_images(images)
    assert batch.tensors.shape == (2, 3, 6, 7) and batch.mask.shape == (2, 6, 7)
    assert torch.equal(batch.tensors[0, :, :5, :7], images[0]) and not batch.mask[0, :5, :7].any()
    assert batch.mask[0, 5:].all() and batch.mask[1, :, 4:].all() and batch.tensors[1, :, :, 4:].eq(0).all()
    assert collate_images(images, size_divisibility=4).tensors.shape == (2, 3, 8, 8)


def _ratios(n=103, seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice([0.5, 0.75, 1.0, 1.33, 1.5, 1.78], size=n)


@pytest.mark.parametrize("drop_last", [False, True])
def test_aspect_sampler_covers_each_index_once(drop_last):
    ratios = _ratios()
    sampler = AspectRatioBatchSampler(ratios, batch_size=4, drop_last=drop_last, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    if drop_last:
        assert all(len(b) == 4 for b in batches)
        assert len(flat) == sum(int(n) // 4 * 4 for n in np.bincount((ratios >= 1).astype(int)))
    else:
        assert sorted(flat) == list(range(len(ratios)))
    for b in batches:  # homogeneous: all portrait or all landscape
        assert len({bool(ratios[i] >= 1) for i in b}) == 1


def test_aspect_sampler_is_deterministic_per_seed_and_epoch():
    ratios = _ratios()
    a = AspectRatioBatchSampler(ratios, 4, seed=3)
    b = AspectRatioBatchSampler(ratios, 4, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(AspectRatioBatchSampler(ratios, 4, seed=4)) != first
    ordered = list(AspectRatioBatchSampler(ratios, 4, shuffle=False))
    portrait = [i for i in range(len(ratios)) if ratios[i] < 1]
    assert [i for batch in ordered for i in batch if ratios[i] < 1] == portrait  # dataset order


def test_aspect_sampler_finer_bins_and_off_switch():
    ratios = _ratios()
    fine = AspectRatioBatchSampler(ratios, 3, bins=(0.8, 1.2, 1.6))
    bins = np.searchsorted([0.8, 1.2, 1.6], ratios, side="right")
    assert all(len({int(bins[i]) for i in b}) == 1 for b in fine)
    assert sorted(i for b in fine for i in b) == list(range(len(ratios)))
    off = list(AspectRatioBatchSampler(ratios, 8, group_by_aspect=False, seed=0))
    assert [len(b) for b in off] == [8] * (len(ratios) // 8) + [len(ratios) % 8]
    assert any(len({bool(ratios[i] >= 1) for i in b}) == 2 for b in off)  # mixed shapes
    with pytest.raises(ValueError, match="positive"):
        AspectRatioBatchSampler([1.0, -2.0], 2)
