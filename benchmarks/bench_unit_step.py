"""One UniT training step (forward, backward, gradient clipping, AdamW): MMF's reference path
against unit_fast's fast path, same parameters, same data.

Group ``unit_step:<setting>`` (shapes.py ``UNIT_STEP_SETTINGS``: COCO detection and VQAv2, DC5 and
stride 32, 800 x 1088-ish padded images):
  mmf_reference   ``implementation="reference"`` (torch MHA with weights, scipy matching per decoder
                  layer, torch box losses), float32, **one image per step** as MMF runs UniT
                  (mmf#1216)
  unit_fast       ``implementation="fast"`` (fused attention, one batched matching solve on the device,
                  fused box losses), bf16 autocast on CUDA, at the largest batch of 2, 4, ..., 64
                  that fits in memory (found before timing)
Two batch modes (``extra_info["batch_mode"]``), so the ratio means something:
  ``same``  both providers train on the very same batch of ``SAME_BATCH`` images (seeds 0, 1);
  ``max``   MMF's one image per step against unit_fast's largest batch (CUDA only).
Compare samples per second: ``extra_info["samples_per_step"] / median``; ``peak_mem_mb`` per
sample is ``peak_mem_mb / samples_per_step``; ``host_syncs`` per step are counted on CUDA.
On CPU only the tiny setting runs, to exercise this harness (its timings mean little).
"""

import functools

import pytest
import torch

import unit_fast
from benchmarks.conftest import CUDA, cuda_only, measure
from benchmarks.shapes import UNIT_STEP_SETTINGS, unit_step_batch

CPU_SETTINGS = ("tiny_cpu_det",)
MAX_GRAD_NORM = 0.1  # MMF's UniT configs: clip_gradients, max_grad_l2_norm 0.1
FAST_BATCHES = (2, 4, 8, 16, 32, 64)
SAME_BATCH = 2


def _cases():
    cases = []
    for name in UNIT_STEP_SETTINGS:
        for mode in ("same", "max"):
            for provider in ("mmf_reference", "unit_fast"):
                device = "cpu" if name in CPU_SETTINGS else "cuda"
                if device == "cpu" and mode == "max":
                    continue  # no largest batch to find on the CPU smoke shape
                marks = () if device == "cpu" else cuda_only("UniT-sized steps are timed on CUDA only")
                cases.append(pytest.param(name, provider, device, mode, marks=marks,
                                          id=f"{name}-{provider}-{device}-{mode}"))
    return cases


def _build(setting, provider, device):
    cfg = unit_fast.load_config(setting.config, list(setting.overrides))
    if provider == "unit_fast" and device == "cuda":
        cfg["model"]["autocast_dtype"] = "bfloat16"
    torch.manual_seed(0)
    model = unit_fast.build_model(cfg).to(device).train()
    model.set_implementation("reference" if provider == "mmf_reference" else "fast")
    params = [p for p in model.parameters() if p.requires_grad]
    # MMF's AdamW: lr 5e-5, eps 1e-8, weight decay 1e-4 (one group suffices for timing).
    optimizer = torch.optim.AdamW(params, lr=5e-5, eps=1e-8, weight_decay=1e-4)
    return model, params, optimizer


def _step_fn(model, params, optimizer):
    def step(sample):
        optimizer.zero_grad(set_to_none=True)
        losses = model(sample)["losses"]
        loss = sum(losses.values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)  # a device-side norm: no host sync
        optimizer.step()
        return loss.detach()

    return step


@functools.cache
def _largest_fast_batch(setting_name):
    """The largest batch of ``FAST_BATCHES`` whose fast step runs without running out of memory."""
    setting = UNIT_STEP_SETTINGS[setting_name]
    model, params, optimizer = _build(setting, "unit_fast", "cuda")
    step = _step_fn(model, params, optimizer)
    best = 1
    for bs in FAST_BATCHES:
        try:
            step(unit_step_batch(setting, bs, "cuda"))
            torch.cuda.synchronize()
            best = bs
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    del model, params, optimizer
    torch.cuda.empty_cache()
    return best


def _check_finite(sample, loss):
    assert torch.isfinite(loss), f"non-finite training loss {loss.item()}"


@pytest.mark.parametrize("setting_name,provider,device,mode", _cases())
def test_unit_step(benchmark, setting_name, provider, device, mode):
    setting = UNIT_STEP_SETTINGS[setting_name]
    if mode == "same":
        batch = SAME_BATCH
    elif provider == "mmf_reference":
        batch = 1
    else:
        batch = _largest_fast_batch(setting_name)
    benchmark.group = f"unit_step:{setting_name}:{mode}"
    benchmark.extra_info.update(
        op="unit_step", case=setting_name, provider=provider, device=device, shape=setting.as_dict(),
        dtype="bfloat16" if (provider == "unit_fast" and device == "cuda") else "float32",
        samples_per_step=batch, batch_mode=mode, role="unit_fast" if provider == "unit_fast" else "baseline",
    )
    model, params, optimizer = _build(setting, provider, device)
    inputs = [unit_step_batch(setting, batch, device, seed=s) for s in range(2)]
    measure(benchmark, _step_fn(model, params, optimizer), inputs, device, _check_finite)
    if CUDA and device == "cuda":
        benchmark.extra_info["peak_mem_mb_per_sample"] = (
            None if benchmark.extra_info.get("peak_mem_mb") is None
            else round(benchmark.extra_info["peak_mem_mb"] / batch, 1))
