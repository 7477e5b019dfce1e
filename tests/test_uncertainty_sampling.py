"""``training.sampling_mode: uncertainty`` in the trainer: the probe's scores are the task kinds'
uncertainty of the probe batches and drive the sampler (λ = 0 keeps the base distribution);
example-level selection trains on the most uncertain candidates; a run resumes exactly; DDP ranks
all-reduce the probe scores; bad options are one-line errors."""

import copy
import os

import numpy as np
import pytest
import torch

from tests.test_train import assert_same_params, params, small_config, train_losses
from tests.test_train_ddp import square_config, torchrun_train  # noqa: F401 (a fixture)
from unit_fast.config import load_config
from unit_fast.train import Trainer, main
from unit_fast.training.report import read_log
from unit_fast.training.sampling import UncertaintySampler, uncertainty_probabilities

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNCERTAINTY = ("training.sampling_mode=uncertainty", "training.uncertainty.probe_every=2")


def _probe_records(out):
    return [r for r in read_log(os.path.join(str(out), "log.jsonl")) if r["event"] == "probe"]


def _by_hand(run, model):
    """``{dataset: mean uncertainty}`` of the probe's next batch of every dataset under ``model``,
    computed here from the kinds (``TaskKind.uncertainty``) on copies of the probe streams."""
    out = {}
    for ds, stream in run.probe.streams.items():
        idx = stream.fork().next_indices()
        batch = run.probe.collators[ds]([run.data.train[ds][i] for i in idx])
        batch.pop("skipped")
        batch.pop("targets")
        model.eval()
        with torch.no_grad():
            pred = model(batch)
        kind = model.kinds[ds]
        extra = {"top_m": 10} if kind.model_task == "detection" else {}
        out[ds] = kind.uncertainty(pred, model.heads[kind.model_task][ds], **extra).double().mean().item()
    return out


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_the_probe_scores_the_kinds_uncertainty_and_sets_the_sampler(lam, train_cache, tmp_path):
    """Before the first update the probe scores one batch per dataset: the means equal the kinds'
    uncertainty computed by hand, and the sampler draws from ``r^(1-λ) u^λ`` (λ = 0: the base)."""
    _, cfg = small_config(tmp_path, train_cache, *UNCERTAINTY, f"training.uncertainty.lambda={lam}")
    run = Trainer(cfg, str(tmp_path / "run"))
    assert isinstance(run.sampler, UncertaintySampler)
    base = dict(run.sampler.base)
    expected = _by_hand(run, copy.deepcopy(run.model))
    run.train_step()
    assert run.probe.last == pytest.approx(expected, rel=1e-6)
    assert all(0.0 < u <= 1.0 for u in run.probe.last.values())
    p = run.sampler.probabilities()
    assert p == pytest.approx(uncertainty_probabilities(base, expected, lam), rel=1e-6)
    assert sum(p.values()) == pytest.approx(1.0)
    if lam == 0.0:
        assert p == pytest.approx(base, rel=1e-12)
    else:
        assert p != pytest.approx(base, rel=1e-3)
    (record,) = _probe_records(tmp_path / "run")
    assert record["step"] == 0 and record["probabilities"] == pytest.approx(p)


def test_probes_come_every_probe_every_updates_and_leave_training_draws_alone(train_cache, tmp_path):
    """Probes at steps 0 and 2 of 4 (probe_every 2); the training batches of each update are those
    of a run whose sampler had the same probabilities: the probe has its own streams."""
    _, cfg = small_config(tmp_path, train_cache, *UNCERTAINTY, "training.uncertainty.lambda=0.0")
    run = Trainer(cfg, str(tmp_path / "u"))
    run.train(max_updates=4, progress=False)
    assert [r["step"] for r in _probe_records(tmp_path / "u")] == [0, 2]
    _, base_cfg = small_config(tmp_path, train_cache)  # proportional: λ = 0's base
    plain = Trainer(base_cfg, str(tmp_path / "p"))
    plain.train(max_updates=4, progress=False)
    assert train_losses(tmp_path / "u") == train_losses(tmp_path / "p")
    assert_same_params(params(run.model), params(plain.model))


def test_example_level_trains_on_the_most_uncertain_candidates(train_cache, tmp_path):
    """``pool: 2`` on the text task: the micro-batch holds 2 batches of candidates; the rows
    trained are the ``batch_size`` with the highest uncertainty under the model before the
    update, and the detection task (not a text or VL kind) is not pooled."""
    _, cfg = small_config(tmp_path, train_cache, *UNCERTAINTY, "training.uncertainty.pool=2",
                          "training.uncertainty.base=ratios",
                          "training.sampling={detection_coco: 0.0, glue_sst2: 1.0}")
    run = Trainer(cfg, str(tmp_path / "run"))
    assert run.pools == {"glue_sst2": 2}
    model = copy.deepcopy(run.model)
    stream = run.streams["glue_sst2"].fork()
    candidates = stream.next_indices() + stream.next_indices()  # 2 x batch_size 4
    batch = run.loader.collate([run.loader.items[("glue_sst2", 0, i)] for i in candidates])[1]
    batch.pop("skipped")
    model.eval()
    with torch.no_grad():
        u = model.kinds["glue_sst2"].uncertainty(model({k: v for k, v in batch.items() if k != "targets"}),
                                                 model.heads["glue"]["glue_sst2"])
    expected = [candidates[i] for i in sorted(torch.argsort(-u, stable=True)[:4].tolist())]  # candidate order
    seen = []
    run.model.register_forward_pre_hook(lambda m, args: seen.append(list(args[0]["indices"])))
    run.train_step()
    # The forwards: the probe's (one per dataset), the scoring of the candidates, the training one.
    assert len(seen) == 4 and seen[-2] == candidates and len(candidates) == 8
    assert seen[-1] == expected


def test_a_run_resumes_exactly(train_cache, tmp_path):
    """4 updates straight == 2, a resume, 2 more, with probes every 2 updates and example
    selection: the same losses, probe records, sampler and probe state, and weights."""
    options = (*UNCERTAINTY, "training.uncertainty.pool=2", "training.max_updates=4",
               "training.checkpoint_every=2", "training.tasks_per_step=2")
    _, cfg = small_config(tmp_path, train_cache, *options)
    straight = Trainer(cfg, str(tmp_path / "a"))
    straight.train(progress=False)
    Trainer(cfg, str(tmp_path / "b")).train(max_updates=2, progress=False)
    resumed = Trainer(cfg, str(tmp_path / "b"), resume="latest")
    assert resumed.step == 2 and resumed.sampler.u is not None  # the probe of step 0, from the checkpoint
    resumed.train(progress=False)
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _probe_records(tmp_path / "a")]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in _probe_records(tmp_path / "b")] == strip
    assert resumed.sampler.state_dict()["uncertainty"] == straight.sampler.state_dict()["uncertainty"]
    assert np.array_equal(resumed.sampler.p, straight.sampler.p)
    assert resumed.probe.state_dict() == straight.probe.state_dict()
    assert_same_params(params(straight.model), params(resumed.model))


@pytest.mark.parametrize("override, message", [
    ("training.uncertainty.lambda=1.5", "training.uncertainty.lambda must be a number in [0, 1]"),
    ("training.uncertainty.base=uniform", "training.uncertainty.base must be one of ratios, proportional"),
    ("training.uncertainty.probe_every=0", "training.uncertainty.probe_every must be an integer >= 1"),
    ("training.uncertainty.pool=0", "training.uncertainty.pool must be an integer >= 1"),
    ("training.uncertainty.probe_batch_size=0", "training.uncertainty.probe_batch_size must be null"),
])
def test_bad_options_are_one_line_errors(override, message, train_cache, tmp_path, capsys):
    path, _ = small_config(tmp_path, train_cache)
    code = main(["--config", path, f"data.cache_dir={train_cache}", "--output-dir", str(tmp_path / "o"),
                 "training.sampling_mode=uncertainty", override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "o").exists()


def test_a_pool_without_uncertainty_sampling_is_an_error(train_cache, tmp_path, capsys):
    path, _ = small_config(tmp_path, train_cache)
    code = main(["--config", path, f"data.cache_dir={train_cache}", "training.uncertainty.pool=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "training.uncertainty.pool > 1" in err and "\n" not in err, err


@pytest.mark.slow
def test_torchrun_ranks_all_reduce_the_probe_scores(square_config, tmp_path):  # noqa: F811 (the fixture)
    """``torchrun --nproc_per_node=2``: each rank scores half of each probe batch; the scores are
    summed and counted over ranks before sampling, so the logged probe (rank 0) equals a
    1-process run's on the whole batch, and both ranks drew the same tasks (else the run would
    hang or diverge: the final weights equal the 1-process run's)."""
    overrides = ["training.max_updates=2", "training.checkpoint_every=2",
                 "training.sampling_mode=uncertainty",
                 "training.uncertainty.probe_every=1", "training.uncertainty.lambda=1.0"]
    out = tmp_path / "ddp"
    torchrun_train(square_config, out, overrides)
    single = Trainer(load_config(square_config, overrides), str(tmp_path / "single"))
    single.train(progress=False)
    ddp, one = _probe_records(out), _probe_records(tmp_path / "single")
    assert [r["step"] for r in ddp] == [0, 1]
    for a, b in zip(ddp, one, strict=True):
        assert a["uncertainty"] == pytest.approx(b["uncertainty"], rel=1e-5)
        assert a["probabilities"] == pytest.approx(b["probabilities"], rel=1e-5)
    assert [r["tasks"] for r in read_log(str(out / "log.jsonl")) if r["event"] == "train"] == \
        [r["tasks"] for r in read_log(str(tmp_path / "single" / "log.jsonl")) if r["event"] == "train"]
