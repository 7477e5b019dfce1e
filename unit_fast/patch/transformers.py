"""``unit_fast.patch_transformers()``: unit_fast's matchers and box losses inside every DETR-family
loss of Hugging Face ``transformers``.

``transformers`` builds each model's loss from classes in ``transformers/loss/*.py`` at every
call (``LOSS_MAPPING``), so replacing methods on those classes reaches every model that uses them,
already built or not.  Each family file in ``unit_fast/patch/hf/`` lists its ``PATCHES``; this
module installs them, remembers the originals and puts them back (``undo`` or the ``with`` form).
A family whose module or class the installed ``transformers`` lacks is skipped with the reason.
"""

import importlib
from dataclasses import dataclass

from unit_fast.patch.report import PatchReport


@dataclass(frozen=True)
class Patch:
    """One method replaced on one ``transformers`` class.

    family: the models it serves, as the report names them ("DETR, Conditional DETR, ...").
    module: e.g. ``"transformers.loss.loss_for_object_detection"``.  owner: the class name.
    attribute: the method (``"forward"``, ``"loss_boxes"``).  replacement: the function.
    note: how the replacement differs (e.g. which cost terms run in torch), for the report.
    """

    family: str
    module: str
    owner: str
    attribute: str
    replacement: object
    note: str = ""

    @property
    def where(self):
        return f"{self.module}.{self.owner}.{self.attribute}"


def _all_patches():
    from unit_fast.patch.hf import FAMILIES

    return [p for family in FAMILIES for p in importlib.import_module(family).PATCHES]


# (class, attribute) -> original, for everything installed now: one entry however often patched.
_ORIGINALS = {}
_INHERITED = object()  # the class had no own attribute (it inherited it): undo deletes ours


class TransformersPatch(PatchReport):
    """The report of ``patch_transformers``, and the handle that undoes it (also as ``with``)."""

    def undo(self):
        """Puts back every original this call installed over (others' patches stay)."""
        for owner, attribute in getattr(self, "_installed", []):
            original = _ORIGINALS.pop((owner, attribute))
            if original is _INHERITED:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)
        self._installed = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False


def patch_transformers(families=None):
    """Replaces the Hungarian matchers and box losses of ``transformers``' DETR-family losses.

    Args:
        families: ``None`` for all, or model names to restrict to, each equal (ignoring case)
            to one of the names in a patch's ``family`` list, e.g. ``["DETR", "RT-DETR"]``
            (``"DETR"`` is DETR's loss only, not every name that contains it).

    Returns:
        a ``TransformersPatch``: the report (``print`` it), and ``undo()``; as a context manager
        it undoes at exit.  Patching twice is harmless (the second finds them installed).
    """
    wanted = None if families is None else [f.lower() for f in families]
    entries, skipped, installed = [], [], []
    for patch in _all_patches():
        names = [n.strip().lower() for n in patch.family.split(",")]
        if wanted is not None and not any(w in names for w in wanted):
            continue
        try:
            module = importlib.import_module(patch.module)
        except ImportError as exc:
            skipped.append((patch.where, f"{patch.family}: not in the installed transformers ({exc})"))
            continue
        owner = getattr(module, patch.owner, None)
        if owner is None or not hasattr(owner, patch.attribute):
            skipped.append((patch.where, f"{patch.family}: the installed transformers has no "
                                         f"{patch.owner}.{patch.attribute}"))
            continue
        if (owner, patch.attribute) in _ORIGINALS:
            skipped.append((patch.where, "already patched"))
            continue
        _ORIGINALS[(owner, patch.attribute)] = owner.__dict__.get(patch.attribute, _INHERITED)
        setattr(owner, patch.attribute, patch.replacement)
        installed.append((owner, patch.attribute))
        after = f"{patch.replacement.__module__}.{patch.replacement.__qualname__}"
        entries.append((patch.where, f"{patch.family}", after + (f" ({patch.note})" if patch.note else "")))
    report = TransformersPatch(entries=entries, skipped=skipped)
    report._installed = installed
    return report
