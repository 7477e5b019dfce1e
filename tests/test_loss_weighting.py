"""``training.loss_weighting``: each method's formula by hand, ``fixed`` as the identity, a short
run of each method resuming exactly, DDP weights equal on every rank, one-line config errors."""

import copy
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.test_train import assert_same_params, child_env, params, small_config, train_losses
from tests.test_train_ddp import square_config, torchrun_train  # noqa: F401 (a fixture)
from unit_fast.config import load_config
from unit_fast.train import Trainer, UsageError, main
from unit_fast.training import checkpoint as ckpt
from unit_fast.training.loader import plan_update
from unit_fast.training.loss_weighting import DWA, RLW, Fixed, Uncertainty
from unit_fast.training.report import read_log

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Both tasks can come in one update (two micro-batches), so every method weighs both in 4 steps.
MIXED = ("training.tasks_per_step=2", "training.sampling_mode=ratios",
         "training.sampling={detection_coco: 0.5, glue_sst2: 0.5}", "training.dwa.window=1")


def test_fixed_is_the_identity():
    w = Fixed(["a", "b"])
    loss = torch.tensor(3.5, requires_grad=True)
    w.start(1)
    assert w.weigh("a", loss) is loss  # the very tensor: the default run is bitwise today's
    assert w.param_group() is None and w.weights() == {"a": 1.0, "b": 1.0}
    assert w.state_dict() == {"method": "fixed"}


def test_uncertainty_loss_and_gradient_by_hand():
    w = Uncertainty(["a", "b"], "cpu", lr=0.1)
    with torch.no_grad():
        w.log_vars["a"].fill_(0.3)
    loss = torch.tensor(2.0, requires_grad=True)
    w.start(1)
    out = w.weigh("a", loss)
    out.backward()
    assert out.item() == pytest.approx(math.exp(-0.3) * 2.0 + 0.3, rel=1e-6)
    assert w.log_vars["a"].grad.item() == pytest.approx(1 - math.exp(-0.3) * 2.0, rel=1e-6)  # d/ds
    assert loss.grad.item() == pytest.approx(math.exp(-0.3), rel=1e-6)  # the model's gradient factor
    assert w.log_vars["b"].grad is None  # an undrawn task's s: no gradient, AdamW leaves it alone
    assert w.weights() == pytest.approx({"a": math.exp(-0.3), "b": 1.0})
    group = w.param_group()
    assert group["weight_decay"] == 0.0 and group["lr"] == 0.1 and len(group["params"]) == 2


def test_dwa_weights_from_a_loss_history():
    w = DWA(["a", "b", "c"], temperature=2.0, window=2)
    for la, lb in [(4.0, 1.0), (4.0, 1.0), (2.0, 1.0), (2.0, 3.0)]:
        w.observe({"a": torch.tensor(la), "b": torch.tensor(lb)})
    w.start(5)
    assert w.weights() == {"a": 1.0, "b": 1.0, "c": 1.0}  # c has no two windows yet
    for lc in (1.0, 1.0, 1.0, 2.0, 5.0):  # 5 draws: only the last 2 * window are kept
        w.observe({"c": torch.tensor(lc)})
    assert w.history["c"] == [1.0, 1.0, 2.0, 5.0]
    w.start(10)
    # r = mean(last window) / mean(window before): a 2/4, b 2/1, c 3.5/1
    e = [math.exp(r / 2.0) for r in (0.5, 2.0, 3.5)]
    expected = {ds: 3 * x / sum(e) for ds, x in zip("abc", e, strict=True)}
    assert w.weights() == pytest.approx(expected, rel=1e-12)
    loss = torch.tensor(2.0)
    assert w.weigh("b", loss).item() == pytest.approx(2.0 * expected["b"], rel=1e-6)
    assert sum(w.weights().values()) == pytest.approx(3.0)


def test_rlw_is_seeded_by_seed_and_step_with_mean_weight_one():
    names = ["a", "b", "c"]
    first, again = RLW(names, seed=7), RLW(names, seed=7)
    assert first.draw(12) == again.draw(12)
    assert first.draw(12) != first.draw(13) and first.draw(12) != RLW(names, seed=8).draw(12)
    w = first.draw(12)
    z = np.random.default_rng([7, 12]).standard_normal(3)
    assert sum(w.values()) == pytest.approx(3.0)  # T * softmax
    assert math.log(w["a"] / w["b"]) == pytest.approx(z[0] - z[1], rel=1e-9)
    draws = np.array([list(first.draw(step).values()) for step in range(1, 4001)])  # (4000, 3)
    assert np.allclose(draws.mean(axis=0), 1.0, atol=0.05)  # E[w_t] = 1 for every task
    first.start(12)
    assert first.weigh("c", torch.tensor(2.0)).item() == pytest.approx(2.0 * w["c"], rel=1e-6)


@pytest.mark.parametrize("method", ["rlw", "uncertainty"])
def test_the_trainer_backpropagates_the_weighted_losses(method, train_cache, tmp_path):
    """One update of two micro-batches: the gradient the optimizer sees (after clipping) is that of
    the mean weighted micro-batch loss, computed by hand (rlw: ``w_t * L``; uncertainty:
    ``exp(-s) L + s`` at ``s = 0``, whose ``d/ds_t`` is the sum of ``(1 - L_j) / n`` over t's
    micro-batches ``j``); the logged loss stays the unweighted mean."""
    _, cfg = small_config(tmp_path, train_cache, *MIXED, f"training.loss_weighting={method}")
    run = Trainer(cfg, str(tmp_path / "run"))
    model = copy.deepcopy(run.model)
    _, plan = plan_update(copy.deepcopy(run.sampler), {k: s.fork() for k, s in run.streams.items()}, 2, 1)
    seen, seen_s = {}, {}
    run.optimizer.register_step_pre_hook(lambda *_: seen.update(
        {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}))
    if method == "uncertainty":
        run.optimizer.register_step_pre_hook(lambda *_: seen_s.update(
            {ds: p.grad.item() for ds, p in run.weighting.log_vars.items() if p.grad is not None}))
    tasks, stats = run.train_step()
    assert sorted(tasks) == ["detection_coco", "glue_sst2"]
    weights = RLW(list(run.weighting.datasets), cfg["training"]["seed"]).draw(1) if method == "rlw" else None

    model.train()
    losses, s_grad = [], {}
    for ds, epoch, idx in plan:
        batch = run.loader.collate([run.loader.items[(ds, epoch, i)] for i in idx])[1]
        batch.pop("skipped")
        loss = sum(model(batch)["losses"].values())
        weighted = loss * weights[ds] if method == "rlw" else loss  # exp(-0) L + 0 = L
        (weighted / len(plan)).backward()
        losses.append(loss.detach())
        s_grad[ds] = s_grad.get(ds, 0.0) + (1 - loss.item()) / len(plan)
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["training"]["max_grad_l2_norm"])
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert seen.keys() == expected.keys()
    assert all(torch.equal(seen[n], expected[n]) for n in seen)
    assert torch.equal(stats["loss"], (losses[0] / 2) + (losses[1] / 2))
    if method == "uncertainty":
        assert seen_s == pytest.approx(s_grad, rel=1e-5)


def _train(tmp_path, train_cache, out, *extra, resume=None, max_updates=None):
    _, cfg = small_config(tmp_path, train_cache, *MIXED, "training.max_updates=4",
                          "training.checkpoint_every=2", *extra)
    run = Trainer(cfg, str(tmp_path / out), resume=resume)
    run.train(max_updates=max_updates, progress=False)
    return run


def _weight_records(out):
    return [r["loss_weights"] for r in read_log(os.path.join(str(out), "log.jsonl")) if r["event"] == "train"]


@pytest.mark.parametrize("method", ["uncertainty", "dwa", "rlw"])
def test_a_run_resumes_exactly(method, train_cache, tmp_path):
    """4 steps straight == 2 steps, a resume from their checkpoint, 2 more: the same losses,
    logged weights, parameters and weighting state, bitwise; and the weights did move from 1."""
    option = f"training.loss_weighting={method}"
    straight = _train(tmp_path, train_cache, "a", option)
    _train(tmp_path, train_cache, "b", option, max_updates=2)
    resumed = _train(tmp_path, train_cache, "b", option, resume="latest")
    assert resumed.step == 4
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")
    weights = _weight_records(tmp_path / "a")
    assert _weight_records(tmp_path / "b") == weights
    assert any(w != {"detection_coco": 1.0, "glue_sst2": 1.0} for w in weights), weights
    assert_same_params(params(straight.model), params(resumed.model))
    a, b = straight.weighting.state_dict(), resumed.weighting.state_dict()
    if method == "uncertainty":
        assert weights[0] == {"detection_coco": 1.0, "glue_sst2": 1.0}  # s = 0 at the start
        assert a["log_vars"].keys() == b["log_vars"].keys()
        assert all(torch.equal(a["log_vars"][k], b["log_vars"][k]) for k in a["log_vars"])
        assert all(v.item() != 0 for v in a["log_vars"].values())  # the optimizer trained them
        group = resumed.optimizer.param_groups[-1]
        assert group["weight_decay"] == 0.0 and group["params"] == list(resumed.weighting.log_vars.values())
        s = resumed.weighting.log_vars["glue_sst2"]
        assert resumed.optimizer.state[s]["step"] == straight.optimizer.state[
            straight.weighting.log_vars["glue_sst2"]]["step"]
        saved = ckpt.load(str(tmp_path / "b" / "checkpoints" / "checkpoint_00000004.pt"))["loss_weighting"]
        assert torch.equal(saved["log_vars"]["glue_sst2"], s.detach())
        # Another method on resume: one line naming the key, not a state-dict traceback.
        with pytest.raises(UsageError, match="training.loss_weighting=uncertainty") as err:
            _train(tmp_path, train_cache, "b", "training.loss_weighting=fixed", resume="latest")
        assert "\n" not in str(err.value)
    else:
        assert a == b


def test_fixed_run_has_no_weighting_state_or_log_field(train_cache, tmp_path):
    run = _train(tmp_path, train_cache, "f", "training.max_updates=1")
    assert run.weighting.method == "fixed" and len(run.optimizer.param_groups) == 1
    records = [r for r in read_log(str(tmp_path / "f" / "log.jsonl")) if r["event"] == "train"]
    assert records and all("loss_weights" not in r for r in records)
    saved = ckpt.load(str(tmp_path / "f" / "checkpoints" / "checkpoint_00000001.pt"))
    assert saved["loss_weighting"] == {"method": "fixed"}


@pytest.mark.parametrize("override, message", [
    ("training.loss_weighting=magic", "training.loss_weighting must be one of fixed, uncertainty, dwa, rlw"),
    ("training.dwa.window=0", "training.dwa.window must be an integer >= 1"),
    ("training.dwa.window=2.5", "training.dwa.window must be an integer >= 1"),
    ("training.dwa.temperature=0", "training.dwa.temperature must be a number > 0"),
    ("training.uncertainty.lr=-1", "training.uncertainty.lr must be null"),
    ("training.uncertainty=null", "training.uncertainty must be a mapping"),
])
def test_bad_options_are_one_line_errors(override, message, train_cache, tmp_path, capsys):
    path, _ = small_config(tmp_path, train_cache)
    code = main(["--config", path, f"data.cache_dir={train_cache}", "--output-dir", str(tmp_path / "o"),
                 override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One gloo rank (RANK, MASTER_PORT from the environment): rank-dependent losses in, the weighting's
# gradients and history out, as JSON.  Plain processes importing only the weighting: ~2 s, not torchrun's ~10.
RANK_SCRIPT = """
import json, os, torch, torch.distributed as dist
from unit_fast.training.loss_weighting import DWA, Uncertainty
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=rank,
                        world_size=2)
unc = Uncertainty(["a", "b"], "cpu", lr=0.1, distributed=True)
unc.start(1)
unc.weigh("a", torch.tensor(1.0 + 2.0 * rank)).backward()  # losses 1 and 3
unc.sync_grads()
dwa = DWA(["a", "b"], window=1, distributed=True)
dwa.observe({"a": torch.tensor(1.0 + rank), "b": torch.tensor(4.0 * (1 + rank))})
print(json.dumps([unc.log_vars["a"].grad.item(), unc.log_vars["b"].grad is None, dwa.history]))
dist.destroy_process_group()
"""


def test_ddp_ranks_get_the_same_weights_and_gradients():
    """Two gloo ranks with different losses: uncertainty's ``d/ds`` is the mean over ranks
    (``1 - mean L``), DWA records the rank-mean task losses, so both ranks hold the same state."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**child_env(), "RANK": str(r), "MASTER_PORT": port})
             for r in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
        grad_a, no_grad_b, history = json.loads(out.strip().splitlines()[-1])
        assert grad_a == pytest.approx(1 - 2.0)  # d/ds (exp(-s) L + s) at s = 0, L averaged over ranks: 2
        assert no_grad_b
        assert history == {"a": [1.5], "b": [6.0]}


def test_torchrun_uncertainty_equals_one_process(square_config, tmp_path):  # noqa: F811 (the fixture)
    """``torchrun --nproc_per_node=2`` with ``uncertainty``: the trainer all-reduces the ``s_t``
    gradients (they are outside the DDP model), so the checkpoint's ``s_t`` and weights equal a
    1-process run's with the same global batch (``square_config``: see tests/test_train_ddp.py)."""
    overrides = ["training.max_updates=2", "training.checkpoint_every=2",
                 "training.loss_weighting=uncertainty", "training.uncertainty.lr=0.01", "training.eps=1.0e-3",
                 *MIXED]
    out = tmp_path / "ddp"
    torchrun_train(square_config, out, overrides)
    single = Trainer(load_config(square_config, overrides), str(tmp_path / "single"))
    single.train(progress=False)
    ddp = ckpt.load(str(out / "checkpoints" / "checkpoint_00000002.pt"))
    for ds, s in single.weighting.log_vars.items():
        assert s.item() != 0
        torch.testing.assert_close(ddp["loss_weighting"]["log_vars"][ds], s.detach(), rtol=1e-5, atol=1e-7)
    ref = params(single.model)
    for k in ref:
        torch.testing.assert_close(ddp["model"][k], ref[k], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=k: f"{k}: {m}")
