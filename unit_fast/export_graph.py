"""``export_model``: any ``nn.Module`` as an ONNX file or a ``torch.export`` program, with no
``unit_fast`` custom op left in the graph.

Why the graph holds no ``torch.ops.unit_fast.*``: an ONNX runtime, or a machine without this
package, cannot run them.  Two steps make sure of it, because neither is enough alone:

1. *Trace on the reference path.*  While the module is traced, ``UNIT_FAST_BACKEND=reference``
   (read at every op call, ``unit_fast/_backend.py``) and every ``unit_fast.MultiheadAttention``'s
   own ``backend`` is ``"reference"``, so each op runs its ``ops/<op>/reference.py`` spec:
   plain aten ops, which every exporter translates.  The CPU defaults are not enough: attention's
   ``torch`` backend is plain SDPA, but ``moe_dispatch``'s ``torch`` backend is itself a custom op,
   and a module patched with ``backend="triton"`` would need a GPU (or the interpreter) to trace.
2. *Decompose what is left.*  A module that calls ``torch.ops.unit_fast.attention`` itself still
   records the op; ``ExportedProgram.run_decompositions`` replaces it by its reference
   (``_reference_decompositions``), and a ``unit_fast`` op with no reference decomposition is a
   ValueError naming it, rather than a file that fails later in a runtime.

ONNX goes through the same ``ExportedProgram`` (``torch.onnx.export`` takes one), so both formats
hold the same graph.  Export runs on the CPU: it never needs a GPU.
"""

import contextlib
import os

import torch

FORMATS = ("onnx", "torch.export")
SUFFIXES = {"onnx": ".onnx", "torch.export": ".pt2", "safetensors": ".safetensors"}


def _attention_decomposition(q, k, v, bias, key_padding_mask, dropout_p, scale, seed):
    """``unit_fast::attention`` as its reference: ``(out, lse)``.  Dropout is off: an exported
    graph is for inference (``torch.export`` traces in eval mode)."""
    from unit_fast.ops.attention.reference import attention_ref

    return attention_ref(q, k, v, key_padding_mask, bias, 0.0, scale, return_lse=True)


def _reference_decompositions():
    """``{custom op overload: reference function}`` of the forward ops (importing the ops
    registers them)."""
    import unit_fast.ops.attention.op  # noqa: F401  (registers unit_fast::attention)

    return {torch.ops.unit_fast.attention.default: _attention_decomposition}


@contextlib.contextmanager
def reference_kernels(module):
    """Run every ``unit_fast`` op inside ``module`` on its reference (pure PyTorch) backend
    until the context exits; the environment and each module's ``backend`` are restored."""
    from unit_fast.nn.multihead_attention import MultiheadAttention

    patched = [(m, m.backend) for m in module.modules() if isinstance(m, MultiheadAttention)]
    before = os.environ.get("UNIT_FAST_BACKEND")
    os.environ["UNIT_FAST_BACKEND"] = "reference"
    try:
        for m, _ in patched:
            m.backend = "reference"
        yield module
    finally:
        for m, backend in patched:
            m.backend = backend
        if before is None:
            os.environ.pop("UNIT_FAST_BACKEND", None)
        else:
            os.environ["UNIT_FAST_BACKEND"] = before


def custom_ops_in(program):
    """The ``unit_fast`` ops called in ``program`` (an ``ExportedProgram``), sorted names."""
    return sorted({str(n.target) for n in program.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("unit_fast.")})


def _batch_dynamic_shapes(example_inputs):
    """Dim 0 of every tensor input dynamic (one shared ``batch`` dim), others static."""
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() >= 1 else None for x in example_inputs)


def trace(model, example_inputs, dynamic_batch=True, dynamic_shapes=None):
    """``torch.export.export`` of ``model`` (in eval mode, on its device) on ``example_inputs``,
    on the reference kernels, with the remaining ``unit_fast`` ops decomposed.

    With ``dynamic_batch`` (and no explicit ``dynamic_shapes``), dim 0 of every tensor input is
    one dynamic ``batch`` dim.  A batch of 1 is repeated to 2 for tracing only: ``torch.export``
    specialises size-1 dims, so a graph traced on batch 1 would take batch 1 only."""
    example_inputs = tuple(example_inputs)
    if dynamic_shapes is None and dynamic_batch:
        tensors = [x for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() >= 1]
        if tensors and all(x.shape[0] == 1 for x in tensors):
            example_inputs = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() >= 1 else x
                                   for x in example_inputs)
        dynamic_shapes = _batch_dynamic_shapes(example_inputs)
    # Each module's own flag back afterwards: ``model.train(was_training)`` would set every
    # submodule to the top module's flag (an eval-mode model inside a fresh wrapper would come
    # back training, e.g. with its MoE router's noise on).
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with reference_kernels(model), torch.no_grad():
            program = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)
    finally:
        for m, training in modes:
            m.training = training
    if custom_ops_in(program):
        program = program.run_decompositions(_reference_decompositions())
    left = custom_ops_in(program)
    if left:
        raise ValueError(f"export: the graph still calls {', '.join(left)}, which has no reference "
                         "decomposition (unit_fast.export_graph._reference_decompositions)")
    return program


def _names(names, count, what):
    if names is None:
        return None
    names = list(names)
    if len(names) != count:
        raise ValueError(f"export: {len(names)} {what}_names for {count} {what}s")
    return names


def export_model(model, example_inputs, format, out, input_names=None, output_names=None, dynamic_batch=True,
                 dynamic_shapes=None):
    """Export ``model`` (any ``nn.Module``; a ``unit_fast``-patched DETR or UniT included) to ``out``.

    Args:
        model: called as ``model(*example_inputs)``; returns a tensor or a tuple/list of tensors.
            Traced in eval mode (restored after) on its own device; put it on the CPU to export
            without a GPU.
        example_inputs: a tuple of tensors (e.g. ``(images (B, 3, H, W) float32, mask (B, H, W)
            bool)``); their shapes are the graph's, except the dynamic ones.
        format: ``"onnx"`` (an ``.onnx`` file, weights inside, opset of ``torch.onnx``'s default)
            or ``"torch.export"`` (a ``.pt2`` file of ``torch.export.save``; read it back with
            ``torch.export.load(out).module()``).
        out: the file to write (atomically); its folder must exist.
        input_names / output_names: names of the graph's inputs / outputs (ONNX); default the
            forward's argument names / ``output_0 ...``.
        dynamic_batch: dim 0 of every tensor input is one dynamic ``batch`` dim (for
            sequence-first inputs pass ``dynamic_shapes`` instead).
        dynamic_shapes: ``torch.export``'s ``dynamic_shapes`` (overrides ``dynamic_batch``).

    Returns:
        The ``torch.export.ExportedProgram`` written (ONNX: the one translated).  Raises
        ValueError on an unknown format, a wrong suffix, or a ``unit_fast`` op left in the graph.
    """
    from unit_fast.atomic import atomic_write

    if format not in FORMATS:
        raise ValueError(f"export: format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not str(out).endswith(SUFFIXES[format]):
        raise ValueError(f"export: {format} output {str(out)!r} must end in {SUFFIXES[format]}")
    example_inputs = tuple(example_inputs)
    input_names = _names(input_names, len(example_inputs), "input")
    program = trace(model, example_inputs, dynamic_batch, dynamic_shapes)
    if format == "torch.export":
        atomic_write(out, lambda f: torch.export.save(program, f))
        return program
    import onnx

    onnx_program = torch.onnx.export(program, example_inputs, input_names=input_names,
                                     output_names=output_names, dynamo=True, verbose=False)
    # One self-contained file (weights inside, no ``.data`` side file): UniT is far below
    # protobuf's 2 GiB limit, and one file is what atomic_write can replace atomically.
    atomic_write(out, lambda f: onnx.save_model(onnx_program.model_proto, f))
    return program
