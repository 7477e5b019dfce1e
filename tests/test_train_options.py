"""Trainer options: tasks mixed within an update, MMF's zero-grad-skipping AdamW, starting from an
MMF checkpoint, DataLoader workers with exact resume."""

import copy
import json

import pytest
import torch

from tests.test_train import assert_same_params, params, small_config
from unit_fast.models.checkpoint import save_mmf_checkpoint
from unit_fast.train import Trainer, main
from unit_fast.training import checkpoint as ckpt
from unit_fast.training.loader import plan_update
from unit_fast.training.optim import AdamWSkipParamsWithZeroGrad, build_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tasks_per_step_takes_the_mean_gradient_of_one_batch_per_task(train_cache, tmp_path):
    """``tasks_per_step=2``: one update draws two tasks and its gradient (after clipping, as the
    optimizer sees it) is that of the mean of one micro-batch loss per task, computed by hand."""
    _, cfg = small_config(tmp_path, train_cache, "training.tasks_per_step=2", "training.sampling_mode=ratios",
                          "training.sampling={detection_coco: 0.5, glue_sst2: 0.5}")
    run = Trainer(cfg, str(tmp_path / "run"))
    model = copy.deepcopy(run.model)
    _, plan = plan_update(copy.deepcopy(run.sampler), {k: s.fork() for k, s in run.streams.items()}, 2, 1)
    seen = {}
    run.optimizer.register_step_pre_hook(lambda *_: seen.update(
        {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}))
    tasks, stats = run.train_step()
    assert sorted(tasks) == ["detection_coco", "glue_sst2"] and run.sampler.draws == 2  # seed 0 draws both

    model.train()
    losses = []
    for ds, epoch, idx in plan:
        batch = run.loader.collate([run.loader.items[(ds, epoch, i)] for i in idx])[1]
        batch.pop("skipped")
        loss = sum(model(batch)["losses"].values())
        (loss / len(plan)).backward()
        losses.append(loss.detach())
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["training"]["max_grad_l2_norm"])
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert seen.keys() == expected.keys()
    assert all(torch.equal(seen[n], expected[n]) for n in seen)
    assert torch.equal(stats["loss"], (losses[0] / 2) + (losses[1] / 2))
    assert stats["task_loss"] == {plan[0][0]: losses[0], plan[1][0]: losses[1]}


def test_adam_w_skip_params_with_zero_grad():
    """A parameter whose gradient is all zeros keeps its value and state (step not advanced, no
    weight decay); the others move exactly as under torch's AdamW."""
    torch.manual_seed(0)
    init = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2)]
    grads = [[torch.randn(3, 4), torch.randn(5), torch.randn(2, 2)],
             [torch.randn(3, 4), torch.zeros(5), None],  # 2nd: zero gradient, 3rd: no gradient
             [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2)]]
    ours = [torch.nn.Parameter(p.clone()) for p in init]
    ref = [torch.nn.Parameter(p.clone()) for p in init]
    opt = AdamWSkipParamsWithZeroGrad(ours, lr=0.1, weight_decay=0.5)
    ref_opt = torch.optim.AdamW(ref, lr=0.1, weight_decay=0.5)
    for step, gs in enumerate(grads):
        for p, q, g in zip(ours, ref, gs, strict=True):
            p.grad = None if g is None else g.clone()
            # The reference is plain AdamW told the truth: no gradient for the zero-grad parameter.
            q.grad = None if g is None or not g.any() else g.clone()
        before = ours[1].detach().clone()
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref, strict=True):
            assert torch.equal(p, q), step
        if step == 1:
            assert torch.equal(ours[1], before)  # not even weight decay
            assert opt.state[ours[1]]["step"].item() == 1  # its moments and step did not advance
            assert ours[1].grad is not None and not ours[1].grad.any()  # the gradient is left as it was
    # Plain AdamW does move a parameter with a zero gradient (decay + the old momentum).
    plain = torch.nn.Parameter(init[1].clone())
    plain_opt = torch.optim.AdamW([plain], lr=0.1, weight_decay=0.5)
    for g in (torch.randn(5), torch.zeros(5)):
        plain.grad = g
        plain_opt.step()
    assert plain_opt.state[plain]["step"].item() == 2


def test_build_optimizer_names_the_bad_option():
    model = torch.nn.Linear(2, 2)
    assert type(build_optimizer(model, 1e-3, 0.0, 0.0, name="adam_w_skip_params_with_zero_grad")) is \
        AdamWSkipParamsWithZeroGrad
    with pytest.raises(ValueError, match="training.optimizer must be one of .* got 'sgd'"):
        build_optimizer(model, 1e-3, 0.0, 0.0, name="sgd")


def test_init_from_an_mmf_checkpoint(train_cache, tmp_path, capsys):
    """``training.init_from``: the weights of a checkpoint written by ``save_mmf_checkpoint``
    start a new run (step 0, fresh optimizer); a key the checkpoint lacks keeps its fresh
    initialisation, and missing / unexpected keys are logged.  A missing file is a usage error."""
    path, cfg = small_config(tmp_path, train_cache)
    source = Trainer(cfg, str(tmp_path / "source"))
    fresh = params(source.model)  # the initialisation every run of this config starts from
    with torch.no_grad():
        for p in source.model.parameters():
            p.add_(1.0)
    saved = str(tmp_path / "mmf.pth")
    save_mmf_checkpoint(source.model, saved, optimizer={}, config={"mmf": "config"})
    state = torch.load(saved, weights_only=False)
    missing = "unit_base_model.input_proj.bias"
    state["model"].pop(missing)
    state["model"]["some_old_head.weight"] = torch.zeros(1)
    torch.save(state, saved)

    _, cfg = small_config(tmp_path, train_cache, f"training.init_from={saved}")
    run = Trainer(cfg, str(tmp_path / "run"))
    expected = {k: (fresh[k] if k == missing else v) for k, v in params(source.model).items()}
    assert_same_params(params(run.model), expected)
    assert run.step == 0 and not run.optimizer.state
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert record["event"] == "init_from" and record["path"] == saved
    assert record["missing"] == [missing] and record["unexpected"] == ["some_old_head.weight"]
    assert "missing (1): unit_base_model.input_proj.bias" in capsys.readouterr().out

    rc = main(["--config", path, "--output-dir", str(tmp_path / "bad"), f"data.cache_dir={train_cache}",
               f"training.init_from={tmp_path / 'nope.pth'}"])
    assert rc == 2
    assert f"error: training.init_from: {tmp_path / 'nope.pth'} does not exist" in capsys.readouterr().err


def test_workers_load_the_same_batches_and_resume_exactly(train_cache, tmp_path):
    """``data.num_workers=2`` (2 tasks x 2 accumulated micro-batches per update): the checkpoint
    holds the consumed position of the sampler and streams, not the prefetched one, and a run
    with workers and a resume ends bitwise where a run in the main process does."""
    common = ["training.tasks_per_step=2", "training.accumulate=2", "training.max_updates=2",
              "training.checkpoint_every=1"]
    straight = Trainer(small_config(tmp_path, train_cache, *common)[1], str(tmp_path / "straight"))
    straight.train(progress=False)
    workers = [*common, "data.num_workers=2"]
    first = Trainer(small_config(tmp_path, train_cache, *workers)[1], str(tmp_path / "workers"))
    first.train(max_updates=1, progress=False)
    a = ckpt.load(str(tmp_path / "straight/checkpoints/checkpoint_00000001.pt"))
    b = ckpt.load(str(tmp_path / "workers/checkpoints/checkpoint_00000001.pt"))
    assert b["sampler"] == a["sampler"] and b["sampler"]["draws"] == 2
    assert b["streams"] == a["streams"]
    resumed = Trainer(small_config(tmp_path, train_cache, *workers)[1], str(tmp_path / "workers"), resume="latest")
    assert resumed.step == 1
    resumed.train(progress=False)
    assert_same_params(params(resumed.model), params(straight.model))
