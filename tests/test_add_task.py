"""``unit_fast.add_task``: a new dataset on a trained UniT, trained alone under ``training.freeze:
[shared]``, leaves every output of the old tasks and every old state-dict tensor bitwise as it was
(issue 14 section 3)."""

import pytest
import torch

import unit_fast
from unit_fast.training.freeze import freeze
from unit_fast.training.optim import build_optimizer

# One intra-op thread (tests/test_train.py says why: a busy 2-core machine makes more ~50x slower).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

OLD_TASKS = ("detection_coco", "detection_visual_genome", "vqa2", "visual_entailment", "glue_sst2",
             "glue_qnli")


def _images(gen, n=2):
    return [torch.randn(3, 48 + 16 * i, 64, generator=gen) for i in range(n)]


def _boxes(gen, num_classes, attributes=False):
    targets = []
    for n in (2, 1):
        t = {"labels": torch.randint(0, num_classes, (n,), generator=gen),
             "boxes": torch.rand(n, 4, generator=gen) * 0.4 + 0.3}  # normalised cxcywh, inside the image
        if attributes:
            t["attributes"] = torch.full((n, 16), -1)
            t["attributes"][:, 0] = 2
        targets.append(t)
    return targets


def _text(gen, B=2, L=7):
    ids = torch.randint(1, 100, (B, L), generator=gen)  # tiny's BERT has 100 tokens
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": ids, "input_mask": mask, "segment_ids": torch.zeros_like(ids)}


def _batch(ds, seed, split="train", kind=None, labels=None):
    """A random batch of dataset ``ds`` (tiny config sizes), with targets."""
    gen = torch.Generator().manual_seed(seed)
    kind = kind or {"detection_coco": "detection", "detection_visual_genome": "detection_vg", "vqa2": "vqa",
                    "visual_entailment": "image_text", "glue_sst2": "text", "glue_qnli": "text"}[ds]
    out = {"dataset_name": ds, "dataset_type": split}
    if kind.startswith("detection"):
        vg = kind == "detection_vg"
        out.update(image=_images(gen), targets=_boxes(gen, labels or (5 if vg else 7), attributes=vg))
    elif kind == "vqa":
        out.update(image=_images(gen), **_text(gen), targets=torch.rand(2, 11, generator=gen))
    elif kind == "image_text":
        out.update(image=_images(gen), **_text(gen), targets=torch.randint(0, 3, (2,), generator=gen))
    else:
        out.update(**_text(gen), targets=torch.randint(0, labels or 2, (2,), generator=gen))
    return out


def _train(model, optimizer, batches):
    model.train()
    for batch in batches:
        loss = sum(model(batch)["losses"].values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _tensors(out):
    """Every tensor of a forward output, flattened to ``{path: tensor}``."""
    if isinstance(out, torch.Tensor):
        return {"": out.detach().clone()}
    items = out.items() if isinstance(out, dict) else enumerate(out)
    return {f"{k}/{p}": t for k, v in items for p, t in _tensors(v).items()}


@torch.no_grad()
def _outputs(model):
    """The full forward outputs (val split: predictions, aux outputs and losses) of every old task
    on fixed batches, in eval mode."""
    model.eval()
    return {ds: _tensors(model(_batch(ds, seed=100 + i, split="val"))) for i, ds in enumerate(OLD_TASKS)}


@pytest.mark.parametrize("kind,head", [("text_classification", {"num_labels": 3}),
                                       ("detection", {"num_classes": 4, "num_queries": 5})])
def test_added_task_trains_alone_and_old_tasks_stay_bitwise(kind, head):
    torch.manual_seed(0)
    model = unit_fast.build_model(unit_fast.load_config("tiny"))
    # A briefly trained model: a few steps on every old task, so nothing is at its initialisation.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, opt, [_batch(ds, seed=i) for i, ds in enumerate(OLD_TASKS)])
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_out = _outputs(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    new = unit_fast.add_task(model, "my_task", kind, **head)
    assert new and all("my_task" in n for n in new)
    report = freeze(model, ["shared"], ["my_task"])
    assert not report.masked  # the task token is its own (task_token: own): no shared table row trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(new)
    optimizer = build_optimizer(model, 1e-3, 1e-3, weight_decay=0.1, no_decay=report.no_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for g in optimizer.param_groups for p in g["params"]) == sorted(new)

    labels = head.get("num_labels") or head["num_classes"]
    short = "text" if kind == "text_classification" else "detection"
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in new}
    _train(model, optimizer, [_batch("my_task", seed=50 + i, kind=short, labels=labels) for i in range(3)])
    assert all(not torch.equal(start[n], p) for n, p in model.named_parameters() if n in new and
               not n.startswith("det_losses"))  # the new task trained

    after_state = model.state_dict()
    assert set(after_state) > set(before_state)  # keys are only gained
    changed = [k for k in before_state if not torch.equal(before_state[k], after_state[k])]
    assert not changed, changed[:5]
    # The old outputs are compared with the old requires_grad flags (a model loaded from the state
    # dict has them): torch's matmul folds a non-contiguous 3-D input differently when the weight
    # needs no gradient, so a frozen Linear's output can differ from its trainable self by an ulp.
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    after_out = _outputs(model)
    for ds in OLD_TASKS:
        assert before_out[ds].keys() == after_out[ds].keys()
        different = [k for k in before_out[ds] if not torch.equal(before_out[ds][k], after_out[ds][k])]
        assert not different, (ds, different[:5])
    assert torch.isfinite(sum(model(_batch("my_task", 9, "val", short, labels))["losses"].values()))


def test_add_task_exports_and_errors():
    import unit_fast.tasks
    from unit_fast.models.add_task import add_task

    assert unit_fast.add_task is add_task
    model = unit_fast.build_model(unit_fast.load_config("tiny"))
    with pytest.raises(ValueError, match="add_task kind: unknown task kind 'segmentation'"):
        unit_fast.add_task(model, "x", "segmentation")
    with pytest.raises(ValueError, match="add_task 'x': kind text_classification needs num_labels"):
        unit_fast.add_task(model, "x", "text_classification")
    with pytest.raises(ValueError, match=r"unknown head argument\(s\) \['num_classes'\]"):
        unit_fast.add_task(model, "x", "vqa", num_classes=3)
    with pytest.raises(ValueError, match="num_queries must be an integer >= 1"):
        unit_fast.add_task(model, "x", "vqa", num_labels=3, num_queries=0)
    with pytest.raises(ValueError, match="already serves 'glue_sst2'"):
        unit_fast.add_task(model, "glue_sst2", "text_classification", num_labels=2)
    new = unit_fast.add_task(model, "x", unit_fast.tasks.task_kind("vqa"), num_labels=4, num_queries=2)
    assert "classifiers.vl.x.1.weight" in new and "task_tokens_lang.x.weight" in new
    assert model.unit_base_model.num_queries["vl"]["x"] == 2 and model.heads["vl"]["x"]["task_token"] == "own"
