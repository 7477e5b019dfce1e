"""``model.conditioning`` (CA-MTL's task-conditioned modules, ``unit_fast/models/conditioning.py``):
identity with UniT at initialisation on the whole model, gradients into the generators, the
analytic parameter count, one task embedding per batch's dataset, ``training.freeze: shared``, the
default building nothing, and config errors (tiny config, CPU)."""

import copy

import pytest
import torch

import unit_fast
from tests.models.test_unit import _samples
from unit_fast.models.conditioning import TaskConditioning, conditioning_options, parameter_count
from unit_fast.training.freeze import freeze

IMPLEMENTATIONS = ("reference", "fast")
TINY = {"d_model": 48, "num_layers": 2, "nhead": 2, "bert_hidden": 32}  # tiny.yaml's sizes
ALL_ON = ["model.conditioning.layer_norm=hypernetwork", "model.conditioning.bert_layers=1",
          "model.conditioning.attention_bias=true", "model.conditioning.alignment=both",
          "model.conditioning.adapters=true", "model.conditioning.adapter_activation=relu"]


def _build(overrides=(), implementation="reference", seed=0):
    torch.manual_seed(seed)
    cfg = unit_fast.load_config("tiny", [f"model.implementation={implementation}", *overrides])
    return unit_fast.build_model(cfg)


def _cond(**options):
    def text(v):  # a config override's YAML value
        return str(v).lower() if isinstance(v, bool) else v

    return [f"model.conditioning.{k}={text(v)}" for k, v in options.items()]


def _tensors(out, prefix=""):
    """``{path: tensor}`` of a (nested) model output."""
    if isinstance(out, torch.Tensor):
        return {prefix: out}
    items = out.items() if isinstance(out, dict) else enumerate(out)
    found = {}
    for k, v in items:
        found.update(_tensors(v, f"{prefix}/{k}"))
    return found


def _outputs(model, datasets=("glue_sst2", "vqa2", "detection_coco")):
    samples = _samples()
    model.eval()
    with torch.no_grad():
        return {ds: _tensors(model({**samples[ds], "dataset_type": "val"})) for ds in datasets}


def _generators(model):
    """The conditioning's shared parameters (everything but the per-dataset embeddings and tables)."""
    return {n: p for n, p in model.conditioning.named_parameters()
            if not n.startswith(("task_embeddings.", "norm_tables."))}


def _perturb(model, seed=5):
    """Random values in every generator, adapter and table: a conditioning that has trained."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.conditioning.named_parameters():
            if not n.startswith("task_embeddings."):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


# ---------------------------------------------------------------------------------------------
# 1. identity at initialisation, on the whole model

BITWISE = {
    "layer_norm_table": _cond(layer_norm="table"),
    "layer_norm_hypernetwork": _cond(layer_norm="hypernetwork"),
    "bert_layers_hypernetwork": _cond(layer_norm="hypernetwork", bert_layers=2),
    "bert_layers_table": _cond(layer_norm="table", bert_layers=1),
    "alignment_text": _cond(alignment="text"),
    "alignment_memory": _cond(alignment="memory"),
    "alignment_both": _cond(alignment="both"),
    "adapters": _cond(adapters=True),
    "adapters_gelu": _cond(adapters=True, adapter_activation="gelu", adapter_ratio=0.1),
    "all_but_attention_bias_separate_decoders": [
        *_cond(layer_norm="table", bert_layers=2, alignment="both", adapters=True),
        "model.base_args.share_decoders=false"],
}


def _plain_and_conditioned(overrides, implementation):
    plain_overrides = [o for o in overrides if not o.startswith("model.conditioning.")]
    plain = _build(plain_overrides, implementation)
    cond = _build(overrides, implementation, seed=1)  # other weights: they must come from the state dict
    missing, unexpected = cond.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    cond_keys = {k for k in cond.state_dict() if k.startswith("conditioning.")}
    assert cond_keys and set(missing) == cond_keys
    return plain, cond


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(BITWISE))
def test_zero_init_is_bitwise_unit(name, implementation):
    """Every option but the attention bias reproduces UniT bitwise at step 0 (eval mode), on a glue,
    a vl and a detection dataset: outputs, auxiliary outputs and losses."""
    plain, cond = _plain_and_conditioned(BITWISE[name], implementation)
    expected, got = _outputs(plain), _outputs(cond)
    for ds in expected:
        assert expected[ds].keys() == got[ds].keys()
        different = [k for k in expected[ds] if not torch.equal(expected[ds][k], got[ds][k])]
        assert not different, (ds, different[:5])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_zero_init_attention_bias_matches_unit_to_fp32_rounding(implementation):
    """The attention bias is zero at init but always added to the logits (checking it for zero
    would be a host sync), so the attention kernels see a bias input and agree with the plain
    model only to fp32 rounding: atol 1e-6 on every output (the Hungarian matching sees the same
    costs to rounding, so the losses agree as well).  On CPU both paths happen to agree bitwise;
    the tolerance is for kernels (GPU) that reorder the sum."""
    plain, cond = _plain_and_conditioned([*ALL_ON, "model.conditioning.attention_block=2"], implementation)
    expected, got = _outputs(plain), _outputs(cond)
    for ds in expected:
        assert expected[ds].keys() == got[ds].keys()
        for k in expected[ds]:
            torch.testing.assert_close(got[ds][k], expected[ds][k], rtol=0, atol=1e-6, msg=f"{ds} {k}")


def test_attention_bias_is_block_diagonal():
    """``self_attn_bias``: the layer's ``(k, k)`` block on the diagonal, ``ceil(Q / k)`` times, cut to Q."""
    cond = TaskConditioning({"attention_bias": True, "attention_block": 3}, d_model=8, nhead=2, num_layers=2,
                            datasets=["a"])
    with torch.no_grad():
        cond.attention_bias_generator.bias.copy_(torch.arange(18.0) + 1)
    bias = cond.context("a").self_attn_bias(1, 7)
    assert bias.shape == (7, 7)
    block = torch.arange(10.0, 19.0).view(3, 3)  # layer 1's 9 values
    expected = torch.zeros(9, 9)
    for i in range(3):
        expected[3 * i:3 * i + 3, 3 * i:3 * i + 3] = block
    assert torch.equal(bias, expected[:7, :7])
    assert cond.context("a").self_attn_bias(0, 2).tolist() == [[1.0, 2.0], [4.0, 5.0]]


# ---------------------------------------------------------------------------------------------
# 2. gradients reach the generators


def _backward(model, datasets=("glue_sst2", "vqa2", "detection_coco")):
    samples = _samples()
    model.train()
    model.zero_grad(set_to_none=True)
    loss = sum(sum(model(samples[ds])["losses"].values()) for ds in datasets)
    loss.backward()
    return {n: p.grad for n, p in model.conditioning.named_parameters()}


def _nonzero(grad):
    return grad is not None and bool(grad.abs().sum() > 0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradients_reach_every_zero_initialised_generator(implementation):
    """At step 0 every zero-initialised generator layer gets ``dL/d(offset) z^T`` (z starts N(0, 1)),
    and the adapters' zero ``up`` gets ``act(FiLM(down(x)))``.  What sits behind a zero layer gets an
    exactly zero gradient then: every ``z`` (all generators are zero) and the adapters' ``down`` and
    FiLM generator (``up`` is zero).  Once the generators are nonzero (after a step), those get
    gradients too.  The fast implementation runs the trainable bias through torch's attention."""
    model = _build(ALL_ON, implementation)
    grads = _backward(model)
    batched = ("glue_sst2", "vqa2", "detection_coco")
    first = ("norm_generator.", "bert_norm_generator.", "attention_bias_generator.", "text_film_generator.",
             "memory_film_generator.", "adapters.0.up.", "adapters.1.up.")
    behind = ("task_embeddings.", "adapters.0.down.", "adapters.1.down.", "adapter_film_generator.")
    assert {n for n in grads if n.startswith(first + behind)} == set(grads)  # every parameter is listed
    for n, g in grads.items():
        if n.startswith(first):
            assert _nonzero(g), n
        elif n.startswith("task_embeddings.") and n.split(".")[1] not in batched:
            assert g is None, n  # a dataset with no batch here
        else:
            assert g is not None and not _nonzero(g), n
    _perturb(model)
    grads = _backward(model)
    for ds in batched:
        assert _nonzero(grads[f"task_embeddings.{ds}.weight"]), ds
    for n in grads:
        if n.startswith(("adapters.", "adapter_film_generator.")):
            assert _nonzero(grads[n]), n


def test_gradients_reach_the_norm_tables():
    """``layer_norm: table``: the batch's dataset's offsets (decoder and BERT) get a gradient at
    step 0; another dataset's get none."""
    model = _build(_cond(layer_norm="table", bert_layers=2))
    grads = _backward(model, ("glue_sst2",))
    assert _nonzero(grads["norm_tables.glue_sst2.decoder"]) and _nonzero(grads["norm_tables.glue_sst2.bert"])
    assert grads["norm_tables.glue_qnli.decoder"] is None and grads["norm_tables.vqa2.bert"] is None


# ---------------------------------------------------------------------------------------------
# 3. parameter counts

COUNTED = [
    {"layer_norm": "table"},
    {"layer_norm": "hypernetwork", "task_dim": 16},
    {"layer_norm": "table", "bert_layers": 2, "task_dim": 8},
    {"layer_norm": "hypernetwork", "bert_layers": 1, "attention_bias": True, "attention_block": 3},
    {"alignment": "both", "adapters": True, "adapter_ratio": 0.3},
    {"alignment": "text", "adapters": True, "adapter_ratio": 0.01, "attention_bias": True},
]


@pytest.mark.parametrize("options", COUNTED)
def test_parameter_count_formula(options):
    """The analytic count equals the module's, for odd sizes (a standalone module) and for the
    tiny UniT, before and after ``add_dataset``."""
    datasets = ["a", "b", "c"]
    cond = TaskConditioning(options, 20, 4, 3, datasets, bert_hidden=12)
    real = sum(p.numel() for p in cond.parameters())
    assert parameter_count(options, 20, 3, 3, nhead=4, bert_hidden=12) == real
    cond.add_dataset("d")
    real = sum(p.numel() for p in cond.parameters())
    assert parameter_count(options, 20, 3, 4, nhead=4, bert_hidden=12) == real

    model = _build(_cond(**options))
    n = len(model.conditioning.task_embeddings)
    real = sum(p.numel() for p in model.conditioning.parameters())
    assert parameter_count(options, num_datasets=n, **TINY) == real
    # Everything the option adds lives under conditioning. (BERT's hooks add none).
    assert sum(p.numel() for p in model.parameters()) == (sum(p.numel() for p in _build().parameters())
                                                          + parameter_count(options, num_datasets=n, **TINY))


# ---------------------------------------------------------------------------------------------
# 4. one z per batch's dataset


def _capture(module):
    """Record ``module``'s call (args, kwargs, output) in a list."""
    calls = []
    module.register_forward_hook(lambda m, a, kw, out: calls.append((a, kw, out)), with_kwargs=True)
    return calls


def test_each_batch_uses_its_datasets_context():
    """With trained (random) generators, the decoder of a detection batch and BERT of a glue batch
    compute exactly what they compute with that dataset's context, and another dataset's of the same
    task type gives other outputs; outside a forward BERT's hooks are the identity."""
    model = _build(ALL_ON)
    _perturb(model)
    model.eval()
    samples = _samples()
    decoder = model.unit_base_model.transformer.decoder
    bert = model.bert_model.module
    dec_calls, bert_calls = _capture(decoder), _capture(bert.encoder)
    with torch.no_grad():
        model(samples["detection_coco"])
        model(samples["glue_sst2"])
        args, kwargs, out = dec_calls[0]  # the shared decoder: detection_coco's call, then glue_sst2's
        assert kwargs["conditioning"].dataset == "detection_coco"
        ctx = model.conditioning.context
        assert torch.equal(decoder(*args, **{**kwargs, "conditioning": ctx("detection_coco")}), out)
        other = decoder(*args, **{**kwargs, "conditioning": ctx("detection_visual_genome")})
        assert not torch.allclose(other, out)

        (args, kwargs, out), = bert_calls[-1:]
        out = out[0]
        with model.conditioning.bert_context(ctx("glue_sst2")):
            assert torch.equal(bert.encoder(*args, **kwargs)[0], out)
        with model.conditioning.bert_context(ctx("glue_qnli")):
            assert not torch.allclose(bert.encoder(*args, **kwargs)[0], out)
        outside = bert.encoder(*args, **kwargs)[0]
        plain = _build().bert_model.module.encoder(*args, **kwargs)[0]  # same seed: the same BERT weights
        assert torch.equal(outside, plain)

        # Switching the dataset's z changes the model's output.
        before = model(samples["glue_sst2"])["scores"]
        model.conditioning.task_embeddings["glue_sst2"].weight.copy_(
            model.conditioning.task_embeddings["glue_qnli"].weight)
        assert not torch.allclose(model(samples["glue_sst2"])["scores"], before)


def test_deep_copy_hooks_its_own_conditioning():
    """BERT's norm hooks are bound methods: a deep copy's hooks read the copy's conditioning."""
    model = _build(ALL_ON)
    clone = copy.deepcopy(model)
    hooks = list(clone.bert_model.module.encoder.layer[-1].output.LayerNorm._forward_hooks.values())
    assert len(hooks) == 1 and hooks[0].__self__ is clone.conditioning


def test_tasks_per_step_micro_batches_each_use_their_z():
    """Two tasks' micro-batches (training.tasks_per_step 2): backward of the summed losses equals
    the two backwards accumulated, and a micro-batch gives no gradient to the other task's z."""
    model = _build(ALL_ON)
    _perturb(model)
    model.train()
    samples = _samples()
    a, b = samples["glue_sst2"], samples["vqa2"]

    def loss(sample):
        return sum(model(sample)["losses"].values())

    model.zero_grad(set_to_none=True)
    (loss(a) + loss(b)).backward()
    together = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss(a).backward()
    z = model.conditioning.task_embeddings
    assert _nonzero(z["glue_sst2"].weight.grad) and z["vqa2"].weight.grad is None
    loss(b).backward()
    apart = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert together.keys() == apart.keys()
    for n in together:
        torch.testing.assert_close(apart[n], together[n], rtol=1e-5, atol=1e-7, msg=n)


# ---------------------------------------------------------------------------------------------
# 5. training.freeze: shared


@pytest.mark.parametrize("layer_norm", ["table", "hypernetwork"])
def test_freeze_shared_trains_a_new_datasets_z_only(layer_norm):
    """After ``add_task``, ``freeze: [shared]`` leaves exactly the new dataset's parameters
    trainable: its z (and norm table), never a generator; with trained generators the new z gets
    a gradient, and a step leaves the old tasks' outputs bitwise as they were."""
    model = _build([*_cond(layer_norm=layer_norm, bert_layers=1, attention_bias=True, adapters=True,
                           alignment="text"), "model.base_args.share_decoders=false"])
    _perturb(model)
    own = {n for n, _ in model.dataset_parameters()["glue_sst2"] if n.startswith("conditioning.")}
    assert own == {"conditioning.task_embeddings.glue_sst2.weight"} | (
        {"conditioning.norm_tables.glue_sst2.decoder", "conditioning.norm_tables.glue_sst2.bert"}
        if layer_norm == "table" else set())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _outputs(model, ("glue_sst2", "detection_coco"))
    new = unit_fast.add_task(model, "my_task", "text_classification", num_labels=3)
    expected = {"conditioning.task_embeddings.my_task.weight"}
    if layer_norm == "table":
        expected |= {"conditioning.norm_tables.my_task.decoder", "conditioning.norm_tables.my_task.bert"}
    assert expected <= set(new)
    freeze(model, ["shared"], ["my_task"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(new)
    assert not any(p.requires_grad for p in _generators(model).values())

    sample = {**_samples()["glue_sst2"], "dataset_name": "my_task", "targets": torch.tensor([2, 0])}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    sum(model(sample)["losses"].values()).backward()
    assert _nonzero(model.conditioning.task_embeddings["my_task"].weight.grad)
    z = model.conditioning.task_embeddings["my_task"].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(z, model.conditioning.task_embeddings["my_task"].weight)
    # As tests/test_add_task.py: compare with the old requires_grad flags (a frozen Linear's matmul
    # may fold a 3-D input differently, an ulp off).
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    after = _outputs(model, ("glue_sst2", "detection_coco"))
    for ds in before:
        assert all(torch.equal(before[ds][k], after[ds][k]) for k in before[ds]), ds


# ---------------------------------------------------------------------------------------------
# 6. off by default


def test_default_builds_no_conditioning():
    """All options off (the default; task_dim alone turns nothing on): no module, no key, no hook,
    and the keys are UniT's.  On, the other weights are the same seed's (it is built last)."""
    plain = _build()
    assert plain.conditioning is None
    assert not any(k.startswith("conditioning") for k in plain.state_dict())
    other = _build(_cond(task_dim=8, adapter_ratio=0.5))
    assert other.conditioning is None and other.state_dict().keys() == plain.state_dict().keys()
    assert not any(m._forward_hooks for m in plain.modules())
    on = _build(ALL_ON).state_dict()
    assert all(torch.equal(on[k], v) for k, v in plain.state_dict().items())


# ---------------------------------------------------------------------------------------------
# 7. config errors


@pytest.mark.parametrize("key,value,message", [
    ("layer_norm", "foo",
     "^model.conditioning.layer_norm must be one of none, table, hypernetwork; got 'foo'$"),
    ("alignment", "image", "model.conditioning.alignment must be one of"),
    ("adapter_activation", "tanh", "model.conditioning.adapter_activation must be one of"),
    ("task_dim", 0, "model.conditioning.task_dim must be an integer >= 1"),
    ("attention_block", 0, "model.conditioning.attention_block must be an integer >= 1"),
    ("attention_bias", "maybe", "model.conditioning.attention_bias must be true or false"),
    ("adapter_ratio", 0, "model.conditioning.adapter_ratio must be a number > 0"),
    ("bert_layers", 1, "model.conditioning.bert_layers conditions BERT's layer norms as layer_norm does"),
])
def test_bad_value_names_its_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        _build(_cond(**{key: value}))


def test_bad_bert_layers_and_unknown_key():
    with pytest.raises(ValueError, match="model.conditioning.bert_layers is 3, but BERT has 2 layers"):
        _build(_cond(layer_norm="table", bert_layers=3))
    with pytest.raises(ValueError, match=r"model.conditioning: unknown key\(s\) \['foo'\]"):
        conditioning_options({"foo": 1})
