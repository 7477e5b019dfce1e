"""``training.aggregator`` (TorchJD's aggregators over the per-task gradients of an update): the
aggregators against TorchJD's own on known matrices, ``mean`` as the trainer's plain mean, the
trainer's shared-parameter gradient against one built by hand, the one-line error without the
extra, and the option checks."""

import copy
import sys

import pytest
import torch
from torchjd.aggregation import MGDA, UPGrad

from tests.test_train import assert_same_params, params, small_config, train_losses
from tests.test_train_ddp import square_config, torchrun_train  # noqa: F401 (a fixture)
from unit_fast.config import load_config
from unit_fast.train import Trainer, main
from unit_fast.training import checkpoint as ckpt
from unit_fast.training.aggregation import Aggregator
from unit_fast.training.loader import plan_update

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Two different tasks in every update (round robin), so every update has two rows to aggregate.
TWO_TASKS = ("training.tasks_per_step=2", "training.sampling_mode=round_robin")


def test_aggregators_on_known_matrices():
    """Orthogonal rows: the mean halves each; UPGrad and MGDA are TorchJD's; PCGrad (no conflict)
    is the sum, divided by the row count here; one row comes back as it is; identical rows give
    that row (all but CAGrad, which gives (1 + c) times it)."""
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.equal(Aggregator("mean").aggregate(J), torch.tensor([0.5, 0.5]))
    conflict = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])
    assert torch.allclose(Aggregator("upgrad").aggregate(conflict), UPGrad()(conflict))
    assert torch.allclose(Aggregator("mgda").aggregate(conflict), MGDA()(conflict))
    assert torch.allclose(Aggregator("pcgrad").aggregate(J), torch.tensor([0.5, 0.5]))
    row = torch.tensor([[3.0, -1.0]])
    assert all(torch.equal(Aggregator(n).aggregate(row), row[0]) for n in ("mean", "upgrad", "pcgrad"))
    same = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    for name in ("mean", "upgrad", "mgda", "pcgrad"):
        assert torch.allclose(Aggregator(name).aggregate(same), same[0], atol=1e-5), name
    assert torch.allclose(Aggregator("cagrad", cagrad_c=0.5).aggregate(same), 1.5 * same[0], atol=1e-4)
    # UPGrad's vector never conflicts with a row (the property it is built for).
    assert (conflict @ Aggregator("upgrad").aggregate(conflict) >= -1e-6).all()


def test_mean_equals_the_plain_trainer(train_cache, tmp_path):
    """With two different tasks per update, ``aggregator: mean`` is the trainer's own mean of
    the micro-batch losses: the same losses and weights after 3 updates."""
    runs = {}
    for name in ("none", "mean"):
        _, cfg = small_config(tmp_path, train_cache, *TWO_TASKS, f"training.aggregator={name}")
        runs[name] = Trainer(cfg, str(tmp_path / name))
        runs[name].train(max_updates=3, progress=False)
    assert train_losses(tmp_path / "none") == pytest.approx(train_losses(tmp_path / "mean"), rel=1e-6)
    a, b = params(runs["none"].model), params(runs["mean"].model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_upgrad_gradient_by_hand(train_cache, tmp_path):
    """One update of two tasks with UPGrad: the shared parameters' gradient (before clipping) is
    UPGrad of the two tasks' own gradients, each computed here by a separate backward; the
    per-task parameters (heads, queries) keep the mean loss's gradient."""
    _, cfg = small_config(tmp_path, train_cache, *TWO_TASKS, "training.aggregator=upgrad",
                          "training.max_grad_l2_norm=1.0e9")
    run = Trainer(cfg, str(tmp_path / "run"))
    model = copy.deepcopy(run.model)
    _, plan = plan_update(copy.deepcopy(run.sampler), {k: s.fork() for k, s in run.streams.items()}, 2, 1)
    seen = {}
    run.optimizer.register_step_pre_hook(lambda *_: seen.update(
        {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}))
    run.train_step()

    names = [n for n, p in run.model.named_parameters() if any(p is q for q in run.shared_params)]
    model.train()
    rows, own = [], {}
    for ds, epoch, idx in plan:
        batch = run.loader.collate([run.loader.items[(ds, epoch, i)] for i in idx])[1]
        batch.pop("skipped")
        model.zero_grad(set_to_none=True)
        sum(model(batch)["losses"].values()).backward()
        grads = dict(model.named_parameters())
        rows.append(torch.cat([(grads[n].grad if grads[n].grad is not None else torch.zeros_like(grads[n]))
                               .flatten() for n in names]))
        own.update({n: p.grad / len(plan) for n, p in model.named_parameters()
                    if p.grad is not None and n not in names})
    expected = UPGrad()(torch.stack(rows))
    current = dict(run.model.named_parameters())
    got = torch.cat([seen.get(n, torch.zeros_like(current[n])).flatten() for n in names])
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got, torch.stack(rows).mean(0), rtol=1e-3)  # the aggregator did change it
    for n, g in own.items():
        assert torch.allclose(seen[n], g, rtol=1e-5, atol=1e-7), n


def test_a_run_with_an_aggregator_resumes_exactly(train_cache, tmp_path):
    options = (*TWO_TASKS, "training.aggregator=mgda", "training.max_updates=4",
               "training.checkpoint_every=2")
    _, cfg = small_config(tmp_path, train_cache, *options)
    straight = Trainer(cfg, str(tmp_path / "a"))
    straight.train(progress=False)
    Trainer(cfg, str(tmp_path / "b")).train(max_updates=2, progress=False)
    resumed = Trainer(cfg, str(tmp_path / "b"), resume="latest")
    resumed.train(progress=False)
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")
    assert_same_params(params(straight.model), params(resumed.model))


def test_without_torchjd_asking_for_an_aggregator_is_one_line_naming_the_extra(train_cache, tmp_path, capsys,
                                                                                monkeypatch):
    for mod in [m for m in sys.modules if m == "torchjd" or m.startswith("torchjd.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "torchjd", None)  # import torchjd raises ImportError
    monkeypatch.setitem(sys.modules, "torchjd.aggregation", None)
    path, _ = small_config(tmp_path, train_cache)
    code = main(["--config", path, f"data.cache_dir={train_cache}", "--output-dir", str(tmp_path / "o"),
                 *TWO_TASKS, "training.aggregator=upgrad"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "pip install 'unit_fast[mtl]'" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("override, message", [
    ("training.aggregator=magic", "training.aggregator must be one of none, mean, upgrad"),
    ("training.tasks_per_step=1", "it needs training.tasks_per_step >= 2"),
])
def test_bad_options_are_one_line_errors(override, message, train_cache, tmp_path, capsys):
    path, _ = small_config(tmp_path, train_cache)
    code = main(["--config", path, f"data.cache_dir={train_cache}", "--output-dir", str(tmp_path / "o"),
                 "training.aggregator=upgrad", override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and message in err, err


@pytest.mark.slow
def test_torchrun_aggregates_the_global_per_task_gradients(square_config, tmp_path):  # noqa: F811 (the fixture)
    """``torchrun --nproc_per_node=2`` with UPGrad: the backwards run under ``no_sync`` and the
    trainer averages each task's gradient over ranks before aggregating (UPGrad is not linear:
    aggregating each rank's half and averaging would differ), so the weights equal a 1-process
    run's with the same global batch (``square_config``: see tests/test_train_ddp.py)."""
    overrides = ["training.max_updates=2", "training.checkpoint_every=2", *TWO_TASKS,
                 "training.aggregator=upgrad"]
    out = tmp_path / "ddp"
    torchrun_train(square_config, out, overrides)
    single = Trainer(load_config(square_config, overrides), str(tmp_path / "single"))
    single.train(progress=False)
    ddp = ckpt.load(str(out / "checkpoints" / "checkpoint_00000002.pt"))["model"]
    one = single.model.state_dict()
    far = [k for k in one if not torch.allclose(ddp[k], one[k], rtol=1e-4, atol=1e-5)]
    assert not far, far[:5]
