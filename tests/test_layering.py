"""Layering rules of the package (CONTRIBUTING.md, "Layout"):

- drop-in modules are defined in ``unit_fast.nn``; their old ``ops`` paths give the same objects;
- ``ops`` and ``nn`` import each other without a cycle, whichever is imported first;
- ``unit_fast.data`` imports nothing from ``unit_fast.models`` (``NestedTensor`` is in
  ``unit_fast.structures``);
- the box math (conversions, area, IoU, GIoU) is written once, in ``unit_fast/ops/boxes.py``.
"""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import unit_fast

PACKAGE = Path(unit_fast.__file__).resolve().parent


def _run(code):
    """Runs ``code`` in a fresh interpreter (imports must not be cached by this process)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# (old path, name, where the object is defined)
MOVED = [
    ("unit_fast.ops.hungarian_match", "HungarianMatcher", "unit_fast.nn.hungarian_matcher"),
    ("unit_fast.ops.hungarian_match.matcher", "HungarianMatcher", "unit_fast.nn.hungarian_matcher"),
    ("unit_fast.ops", "HungarianMatcher", "unit_fast.nn.hungarian_matcher"),
    ("unit_fast.nn", "HungarianMatcher", "unit_fast.nn.hungarian_matcher"),
    ("unit_fast", "HungarianMatcher", "unit_fast.nn.hungarian_matcher"),
    ("unit_fast.ops.box_loss", "BoxLoss", "unit_fast.nn.box_loss"),
    ("unit_fast.ops", "BoxLoss", "unit_fast.nn.box_loss"),
    ("unit_fast.nn", "BoxLoss", "unit_fast.nn.box_loss"),
    ("unit_fast", "BoxLoss", "unit_fast.nn.box_loss"),
    ("unit_fast.nn", "MultiheadAttention", "unit_fast.nn.multihead_attention"),
    ("unit_fast.models.misc", "NestedTensor", "unit_fast.structures"),
    ("unit_fast.box_ops", "box_cxcywh_to_xyxy", "unit_fast.ops.boxes"),
    ("unit_fast.box_ops", "box_xyxy_to_cxcywh", "unit_fast.ops.boxes"),
    ("unit_fast.box_ops", "box_area", "unit_fast.ops.boxes"),
    ("unit_fast.box_ops", "box_iou", "unit_fast.ops.boxes"),
]


@pytest.mark.parametrize("old,name,home", MOVED, ids=[f"{o}.{n}" for o, n, _ in MOVED])
def test_old_import_paths_give_the_defined_object(old, name, home):
    obj = getattr(importlib.import_module(old), name)
    assert obj is getattr(importlib.import_module(home), name)
    assert obj.__module__ == home  # defined there, not re-exported from the old place


def test_old_matcher_module_is_the_nn_module():
    """Patching the old module's globals (tests/test_implementation_defaults.py spies on its
    ``matching_cost``) must reach the matcher's code: the old path is the module itself."""
    old = importlib.import_module("unit_fast.ops.hungarian_match.matcher")
    assert old is importlib.import_module("unit_fast.nn.hungarian_matcher")


# Importing a submodule first, with the package root stubbed so that unit_fast/__init__.py
# (which imports ops, then nn) does not decide the order.
FIRST = ["unit_fast.nn", "unit_fast.nn.box_loss", "unit_fast.nn.hungarian_matcher", "unit_fast.ops.box_loss",
         "unit_fast.ops.hungarian_match", "unit_fast.ops.hungarian_match.matcher", "unit_fast.box_ops"]


@pytest.mark.parametrize("first", FIRST)
def test_no_import_cycle_whichever_layer_loads_first(first):
    _run(f"""
import importlib, sys, types
root = types.ModuleType("unit_fast")
root.__path__ = [{str(PACKAGE)!r}]
sys.modules["unit_fast"] = root
importlib.import_module({first!r})
import unit_fast.nn
from unit_fast.ops.box_loss import BoxLoss
from unit_fast.ops.hungarian_match import HungarianMatcher
assert BoxLoss is unit_fast.nn.BoxLoss and HungarianMatcher is unit_fast.nn.HungarianMatcher
""")


def test_data_imports_nothing_from_models():
    out = _run("""
import importlib, pkgutil, sys
import unit_fast.data
names = ["unit_fast.data.collate", "unit_fast.data.decode", "unit_fast.data.datasets"]
names += [m.name for m in pkgutil.walk_packages(unit_fast.data.__path__, "unit_fast.data.")]
for name in names:
    importlib.import_module(name)
print(" ".join(sorted(m for m in sys.modules if m.startswith("unit_fast.models"))))
""")
    assert out.split() == [], f"unit_fast.data imported {out.split()}"


# DETR util/box_ops.py names (and torchvision's box_area), each the one definition in ops/boxes.py.
BOX_HELPERS = {"box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "box_area", "box_iou", "generalized_box_iou",
               "paired_generalized_box_iou"}
# Other spellings that copies have used (leading underscores are stripped before the lookup).
ALIASES = {"cxcywh_to_xyxy": "box_cxcywh_to_xyxy", "xyxy_to_cxcywh": "box_xyxy_to_cxcywh",
           "pairwise_generalized_box_iou": "generalized_box_iou"}
# unit_fast.box_ops.generalized_box_iou is the public checking drop-in: it validates the boxes and
# calls the pairwise_giou op, and holds no box math of its own.
ALLOWED_WRAPPERS = {("box_ops.py", "generalized_box_iou")}


def test_box_helpers_are_defined_once_in_ops_boxes():
    found = {name: [] for name in BOX_HELPERS}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            name = ALIASES.get(node.name.lstrip("_"), node.name.lstrip("_"))
            if name in BOX_HELPERS and (rel, node.name) not in ALLOWED_WRAPPERS:
                found[name].append(f"{rel}:{node.lineno}")
    for name, places in sorted(found.items()):
        assert len(places) == 1 and places[0].startswith("ops/boxes.py:"), f"{name} defined at {places}"
