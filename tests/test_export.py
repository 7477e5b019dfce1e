"""``python -m unit_fast.export --format onnx|torch.export`` and ``export_model``: the exported
graphs hold no ``unit_fast`` custom op, run in onnxruntime / ``torch.export.load`` and match
PyTorch on a batch size other than the traced one; bad input is one ``error:`` line, exit 2.

Tolerance (fp32): rtol 1e-4, atol 1e-5.  The exported graph is the reference path while the eager
model runs each op's CPU default (torch's SDPA kernel for attention), and onnxruntime fuses and
reorders the matmuls and reductions: agreement to float32 round-off accumulated over ~10 layers,
not bitwise."""

import os

import numpy as np
import pytest
import torch
from torch import nn

import unit_fast
from tests.test_evaluate_predict import TINY_RUN
from unit_fast import export
from unit_fast.config import load_config
from unit_fast.export_graph import custom_ops_in, export_model
from unit_fast.predictor import Predictor
from unit_fast.task_graph import example_inputs, task_graph
from unit_fast.train import Trainer

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The smoke run of tests/test_evaluate_predict.py (all four task kinds, 2 steps)."""
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("run")
    trainer = Trainer(load_config("default", [f"data.cache_dir={cache}", *TINY_RUN]), str(out))
    trainer.train(progress=False)
    return out


@pytest.fixture(scope="module")
def predictor(run):
    return Predictor.from_checkpoint(str(run))


def _ort(path, names, inputs):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(names)
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs, strict=True)})


def _batch_of(graph, predictor, ds, batch):
    return example_inputs(graph, predictor.metadata(ds)["datasets"][ds], batch=batch)


def _eager(graph, inputs):
    with torch.no_grad():
        return graph(*inputs)


@pytest.mark.parametrize("ds", ["detection_coco", "glue_qnli"])
def test_onnx_cli_runs_in_onnxruntime_and_matches(run, predictor, ds, tmp_path, capsys):
    out = str(tmp_path / f"{ds}.onnx")
    assert export.main(["--checkpoint", str(run), "--format", "onnx", "--task", ds, "--out", out]) == 0
    printed = capsys.readouterr().out
    graph = task_graph(predictor.model, ds)
    text = ("input_ids", "input_mask", "segment_ids")
    names = ("image", "image_mask") if ds.startswith("detection") else text
    assert f"inputs:  {names[0]} (B, " in printed, printed
    outputs = ("pred_logits", "pred_boxes") if ds.startswith("detection") else ("scores",)
    assert all(f"{n} (B, " in printed.split("outputs:")[1] for n in outputs), printed
    assert not os.path.exists(out + ".data")  # one self-contained file
    inputs = _batch_of(graph, predictor, ds, batch=3)  # traced on 2: the batch dim is dynamic
    got = _ort(out, names, inputs)
    want = _eager(graph, inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=RTOL, atol=ATOL)


def test_torch_export_cli_loads_and_matches(run, predictor, tmp_path, capsys):
    out = str(tmp_path / "vqa2.pt2")
    # --output (the safetensors command's name) is the same option; the suffix picks the format.
    assert export.main(["--checkpoint", str(run), "--task", "vqa2", "--output", out]) == 0
    assert "outputs: scores (B, " in capsys.readouterr().out
    program = torch.export.load(out)
    assert custom_ops_in(program) == []
    graph = task_graph(predictor.model, "vqa2")
    inputs = _batch_of(graph, predictor, "vqa2", batch=3)
    (got,), (want,) = program.module()(*inputs), _eager(graph, inputs)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


class _Encoder(nn.Module):
    """A few DETR-like post-norm layers over ``torch.nn.MultiheadAttention`` (batch-first)."""

    def __init__(self, d=16, heads=2, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d, heads, 32, dropout=0.0, batch_first=True)
                                    for _ in range(layers))
        self.head = nn.Linear(d, 3)

    def forward(self, x, padding_mask):
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding_mask)
        return self.head(x)


def _encoder_inputs(batch):
    x = torch.randn(batch, 7, 16)
    mask = torch.zeros(batch, 7, dtype=torch.bool)
    mask[0, 5:] = True
    return x, mask


def test_a_patched_module_exports_to_onnx_and_matches(tmp_path):
    """``patch_attention(drop_weights=True)`` makes every attention call take unit_fast's fused
    path; the export still holds no custom op, even with the Triton backend forced on the modules
    (the export routes them to the reference)."""
    model = unit_fast.patch_attention(_Encoder().eval(), drop_weights=True, backend="triton")
    assert all(type(m.self_attn) is unit_fast.MultiheadAttention for m in model.layers)
    out = str(tmp_path / "encoder.onnx")
    program = export_model(model, _encoder_inputs(2), "onnx", out, input_names=["x", "padding_mask"],
                           output_names=["y"])
    assert custom_ops_in(program) == []
    assert all(m.self_attn.backend == "triton" for m in model.layers)  # restored after the export
    inputs = _encoder_inputs(4)
    (got,) = _ort(out, ["x", "padding_mask"], inputs)
    unit_fast.patch_attention(model, drop_weights=True)  # the CPU default, not the interpreter, for eager
    np.testing.assert_allclose(got, _eager(model, inputs).numpy(), rtol=RTOL, atol=ATOL)


class _CallsTheOp(nn.Module):
    """Calls ``torch.ops.unit_fast.attention`` itself: only the decomposition step can remove it."""

    def forward(self, q, k, v):
        seed = torch.zeros((), dtype=torch.int64)
        return torch.ops.unit_fast.attention(q, k, v, None, None, 0.0, q.shape[-1] ** -0.5, seed)[0]


def test_a_direct_custom_op_call_is_decomposed_into_its_reference(tmp_path):
    from unit_fast.ops.attention.reference import attention_ref

    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    out = str(tmp_path / "op.pt2")
    program = export_model(_CallsTheOp(), (q, k, v), "torch.export", out)
    assert custom_ops_in(program) == [] and custom_ops_in(torch.export.load(out)) == []
    q, k, v = (torch.randn(3, 2, 5, 8) for _ in range(3))
    torch.testing.assert_close(torch.export.load(out).module()(q, k, v), attention_ref(q, k, v),
                               rtol=RTOL, atol=ATOL)


class _CallsBoxLoss(nn.Module):
    def forward(self, a, b):
        return torch.ops.unit_fast.box_loss(a, b)[0]


def test_a_custom_op_without_a_reference_decomposition_is_refused(tmp_path):
    import unit_fast.ops.box_loss.op  # noqa: F401  (registers unit_fast::box_loss)

    boxes = torch.rand(2, 4) * 0.5 + torch.tensor([0.0, 0.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="still calls unit_fast.box_loss"):
        export_model(_CallsBoxLoss(), (boxes, boxes), "onnx", str(tmp_path / "b.onnx"))
    assert not os.path.exists(tmp_path / "b.onnx")


def _one_line_error(capsys, message):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[torch.onnx]")]
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], err
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("args,message", [
    (["--format", "onnx", "--out", "{tmp}/m.pt2"], "--out: '{tmp}/m.pt2' must end in .onnx (--format onnx)"),
    (["--out", "{tmp}/m.onnx"], "--task: this model serves detection_coco, vqa2"),
    (["--task", "glue_cola", "--out", "{tmp}/m.onnx"], "--task 'glue_cola': this model serves"),
    (["--task", "glue_sst2", "--out", "/nonexistent/m.onnx"], "--out: folder '/nonexistent' does not exist"),
    (["--task", "glue_sst2", "--out", "{tmp}/m.safetensors"], "--task, --config and overrides shape a graph"),
    (["--task", "glue_sst2", "--out", "{tmp}/m.onnx", "model.bert.pretrainedd=x"],
     "unknown config key 'model.bert.pretrainedd'"),
])
def test_export_bad_input(run, args, message, tmp_path, capsys):
    args = [a.format(tmp=tmp_path) for a in args]
    assert export.main(["--checkpoint", str(run), *args]) == 2
    _one_line_error(capsys, message.format(tmp=tmp_path))


def test_graph_export_refuses_a_payload_unless_trusted(run, tmp_path, capsys):
    from tests.test_checkpoint_trust import Payload

    state = torch.load(os.path.join(run, "checkpoints", "checkpoint_00000002.pt"), weights_only=True)
    marker = tmp_path / "PAYLOAD_RAN"
    state["extra"] = Payload(marker)
    path = str(tmp_path / "payload.pt")
    torch.save(state, path)
    out = str(tmp_path / "g.pt2")
    assert export.main(["--checkpoint", path, "--task", "glue_sst2", "--out", out]) == 2
    _one_line_error(capsys, "--trust-checkpoint")
    assert not marker.exists() and not os.path.exists(out)
    assert export.main(["--checkpoint", path, "--trust-checkpoint", "--task", "glue_sst2", "--out", out]) == 0
    assert marker.exists() and os.path.isfile(out)


MOE = ["model.moe.layers=[1]", "model.moe.encoder_layers=[0]", "model.moe.num_experts=3", "model.moe.k=2"]


@pytest.mark.parametrize("ds", ["detection_visual_genome", "vqa2"])
def test_moe_model_and_attribute_head_export_to_onnx_and_match(ds, tmp_path):
    """A tiny UniT with MoE layers in the encoder and decoder and Visual Genome's attribute head:
    the graph has ``attr_logits`` for VG, no custom op, and onnxruntime matches eager."""
    torch.manual_seed(0)
    cfg = unit_fast.load_config("tiny", ["model.predict_attributes=true", *MOE])
    model = unit_fast.build_model(cfg).eval()
    graph = task_graph(model, ds)
    want_names = {"detection_visual_genome": ("pred_logits", "pred_boxes", "attr_logits"),
                  "vqa2": ("scores",)}[ds]
    assert graph.output_names == want_names
    entry = {"image_sizes": {"test_size": 48}, "max_length": 9}
    out = str(tmp_path / f"{ds}.onnx")
    names = ("image", "image_mask") + (("input_ids", "input_mask", "segment_ids") if ds == "vqa2" else ())
    program = export_model(graph, example_inputs(graph, entry), "onnx", out, input_names=list(names),
                           output_names=list(want_names))
    assert custom_ops_in(program) == []
    inputs = example_inputs(graph, entry, batch=3)
    got, want = _ort(out, names, inputs), _eager(graph, inputs)
    assert len(got) == len(want) == len(want_names)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=RTOL, atol=ATOL)


def test_export_leaves_every_module_in_its_own_mode(tmp_path):
    """An eval-mode model inside a fresh (training-mode) wrapper, as ``task_graph`` makes it:
    after the export each module has its own flag back, not the wrapper's."""
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _Encoder().eval()

        def forward(self, x, padding_mask):
            return self.inner(x, padding_mask)

    outer = Wrapper()
    outer.inner.eval()
    outer.inner.layers[0].train()
    before = [m.training for m in outer.modules()]
    assert len(set(before)) == 2
    export_model(outer, _encoder_inputs(2), "torch.export", str(tmp_path / "e.pt2"))
    assert [m.training for m in outer.modules()] == before


def test_a_patch_detr_patched_detr_exports_to_onnx_and_matches(tmp_path):
    """A DETR in facebookresearch/detr's layout (tests/peers/detr_peer.py) after ``patch_detr``:
    ``export_model`` writes an ONNX graph with no custom op, and onnxruntime matches eager."""
    from tests.peers import detr_peer

    torch.manual_seed(0)
    model, crit = detr_peer.build(aux_loss=False)
    report = unit_fast.patch_detr(model.eval(), crit)
    assert report.replaced > 0

    def inputs(batch):
        images = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
        mask = torch.zeros(batch, 16, 16, dtype=torch.bool)
        mask[-1, :, 12:] = True
        return images, mask

    class Boxes(nn.Module):  # DETR returns a dict: the graph returns its two tensors
        def __init__(self):
            super().__init__()
            self.detr = model

        def forward(self, images, mask):
            out = self.detr(images, mask)
            return out["pred_logits"], out["pred_boxes"]

    out = str(tmp_path / "detr.onnx")
    program = export_model(Boxes(), inputs(2), "onnx", out, input_names=["images", "mask"],
                           output_names=["pred_logits", "pred_boxes"])
    assert custom_ops_in(program) == []
    got = _ort(out, ["images", "mask"], inputs(3))
    want = _eager(Boxes(), inputs(3))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=RTOL, atol=ATOL)
