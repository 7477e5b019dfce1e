"""Images/s of JPEG decode + DETR test resize (shorter 800, max 1333) + ImageNet normalisation.

Group ``decode:<shape>`` (shapes.py ``DECODE_SHAPES``: 640 x 480 and 1333 x 800 JPEGs generated
in memory, so no provider waits on a disk); each timed call turns ``images_per_step`` encoded
images into ``(3, h, w)`` float32 tensors on the provider's device:
  dali_cpu          ``ImageLoader("dali", "cpu")``: one DALI pipeline, ``WORKERS`` CPU threads
  dali_gpu          ``ImageLoader("dali", "cuda")``: nvJPEG ("mixed") decode, GPU resize
  torchvision_gpu   ``ImageLoader("torchvision", "cuda")``: ``decode_jpeg`` on a list, GPU ops
  torchvision_cpu   ``ImageLoader("torchvision", "cpu")``: in-process, one image at a time
  pil_dataloader    the baseline: DETR's PIL path in a torch DataLoader with ``WORKERS``
                    persistent worker processes (batch size 1, so every worker is busy)

``WORKERS`` is the number of cores this process may use, the same for DALI threads and
DataLoader workers.  ``images_per_step`` (and ``samples_per_step``, which ``benchmarks.results``
carries) is in ``extra_info``: images/s = images_per_step / median.  Before timing, every
provider's first image is compared with PIL's (mean absolute difference in 8-bit levels).

The DALI wheel (~200 MB) cannot be brought to the lent GPU machines, so there the dali cases
skip and the torchvision GPU path is what gets measured.
"""

import functools
import os

import pytest
import torch

from benchmarks.conftest import cuda_only, measure
from benchmarks.shapes import DECODE_SHAPES, decode_jpegs
from unit_fast.data.decode import ImageLoader, decoder_unavailable_reason, pil_load_one
from unit_fast.data.transforms import IMAGENET_STD, plan_detr_test

WORKERS = len(os.sched_getaffinity(0))
DISTINCT_IMAGES = 16  # encoding is slow; larger steps repeat these (decode cost is per image)
NUM_SETS = 2
# Mean |difference| from PIL's output in 8-bit levels: CPU decoders agree to < 0.3 here;
# nvJPEG differs more (torchvision's own nvJPEG-vs-libjpeg test allows a mean of 2).
CHECK_MEAN_LEVELS = 2.0

_DALI_MISSING = decoder_unavailable_reason("dali")


def _dali_marks(device):
    marks = cuda_only("dali_gpu decodes on a CUDA device; none here") if device == "cuda" else []
    missing = pytest.mark.skipif(_DALI_MISSING is not None, reason=f"DALI unavailable: {_DALI_MISSING}")
    return [*marks, missing]


PROVIDERS = [
    pytest.param("dali_cpu", "cpu", id="dali_cpu", marks=_dali_marks("cpu")),
    pytest.param("dali_gpu", "cuda", id="dali_gpu", marks=_dali_marks("cuda")),
    pytest.param("torchvision_gpu", "cuda", id="torchvision_gpu",
                 marks=cuda_only("torchvision_gpu decodes with nvJPEG; no CUDA device here")),
    pytest.param("torchvision_cpu", "cpu", id="torchvision_cpu"),
    pytest.param("pil_dataloader", "cpu", id="pil_dataloader"),
]


@functools.cache
def _image_sets(shape_name, images_per_step):
    """``NUM_SETS`` lists of ``images_per_step`` JPEG bytes (distinct within a set when small)."""
    shape = DECODE_SHAPES[shape_name]
    distinct = decode_jpegs(shape, min(DISTINCT_IMAGES, NUM_SETS * images_per_step))
    flat = [distinct[i % len(distinct)] for i in range(NUM_SETS * images_per_step)]
    return [tuple(flat[k * images_per_step : (k + 1) * images_per_step]) for k in range(NUM_SETS)]


class _PilDataset(torch.utils.data.Dataset):
    """Encoded images and their plans; ``__getitem__`` is DETR's PIL path (in a worker)."""

    def __init__(self, datas, plan):
        self.datas, self.plan = datas, plan

    def __len__(self):
        return len(self.datas)

    def __getitem__(self, i):
        return pil_load_one(self.datas[i], self.plan, f"image {i}")


def _first(batch):  # batch_size 1: the image itself (module level: picklable)
    return batch[0]


def _call_for(provider, device, plan):
    """``call(input) -> list of (3, h, w) float32``, and the inputs to cycle (per image set)."""
    if provider == "pil_dataloader":

        def make_loader(datas):
            return torch.utils.data.DataLoader(
                _PilDataset(datas, plan), batch_size=1, num_workers=WORKERS, collate_fn=_first,
                persistent_workers=True, prefetch_factor=2)

        return (lambda loader: list(loader)), make_loader
    decoder = provider.split("_")[0]
    loader = ImageLoader(decoder, device, num_threads=WORKERS)
    return (lambda datas: loader(list(datas), [plan] * len(datas))), (lambda datas: datas)


@pytest.mark.parametrize("shape", list(DECODE_SHAPES.values()), ids=list(DECODE_SHAPES))
@pytest.mark.parametrize("provider,device", PROVIDERS)
def test_decode(benchmark, provider, device, shape):
    n = shape.images_per_step_cuda if device == "cuda" else shape.images_per_step
    benchmark.group = f"decode:{shape.name}"
    benchmark.extra_info.update(
        op="decode", case=shape.name, provider=provider, device=device, shape=shape.as_dict(),
        dtype="float32", role="baseline" if provider == "pil_dataloader" else "unit_fast",
        images_per_step=n, samples_per_step=n, workers=WORKERS,
    )
    if provider == "pil_dataloader":
        benchmark.extra_info["note"] = f"torch DataLoader, {WORKERS} workers, PIL decode + resize"
    plan = plan_detr_test(shape.H, shape.W)
    call, make_input = _call_for(provider, device, plan)
    sets = _image_sets(shape.name, n)
    inputs = [make_input(datas) for datas in sets]
    want = pil_load_one(sets[0][0], plan)  # (3, h, w)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255  # normalised difference -> 8-bit levels
    first_input = inputs[0]

    def check(x, out):
        assert len(out) == n and all(tuple(o.shape) == (3, *plan.size) for o in out), provider
        if x is first_input:
            levels = ((out[0].cpu() - want) * std).abs().mean().item()
            assert levels <= CHECK_MEAN_LEVELS, f"{provider}: mean |diff| from PIL {levels:.2f} levels"

    measure(benchmark, call, inputs, device, check)
