"""DETR's ``models/detr.py::PostProcess`` path: the post-processing lives in
``unit_fast/postprocess.py``, below the models (evaluation and the task kinds use it too)."""

from unit_fast.postprocess import PostProcess, format_for_prediction

__all__ = ["PostProcess", "format_for_prediction"]
