"""A sample picture like the synthetic training images, to try ``python -m unit_fast.predict`` on.

``python -m unit_fast.data.sample_image OUT.jpg [--seed 0] [--image-size 64]`` or
``write_sample_image(path, ...)`` writes one scene drawn by the synthetic generator's own code
(``synthetic._make_scene``: the same shapes, colours, noisy background and JPEG settings as the
training images; 64 px is the embedded default's ``data.synthetic.image_size``) and prints what
is in it, with a question and a hypothesis about it and their true answers. Same arguments ->
the same bytes. The scene comes from its own random stream, so the generated datasets (and any
cached copy of them) are neither read nor changed.

``OUT`` ending in ``.jpg`` / ``.jpeg`` gets the generator's JPEG bytes as they are; any other
extension Pillow knows (``.png`` ...) gets that JPEG decoded and saved in that format.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections import Counter

import numpy as np
from PIL import Image

from unit_fast.atomic import atomic_write, image_format
from unit_fast.data import synthetic as S

# The generator's streams are np.random.default_rng([seed, 0..8]) (ids, images, texts): this
# index is none of them, so the sample is not a copy of a training or val image.
SAMPLE_STREAM = 100
MIN_SHAPES = 3  # enough to make the detections, the counts and the positions worth looking at
_MAX_TRIES = 1000


def sample_scene(seed: int = 0, image_size: int = 64):
    """The first scene of the sample stream of ``seed`` that is square, has no crowd region and
    at least ``MIN_SHAPES`` shapes: a ``synthetic._Scene`` (``width``, ``height``, ``shapes``
    with ``shape``, ``color`` and tight ``box`` (x0, y0, x1, y1) px, ``jpeg`` bytes)."""
    if image_size < 48:
        raise ValueError(f"--image-size must be >= 48 (the generator's floor), got {image_size}")
    rng = np.random.default_rng([seed, SAMPLE_STREAM])
    for index in range(_MAX_TRIES):
        sc = S._make_scene(rng, index, index + 1, image_size)
        if sc.width == sc.height and sc.crowd is None and len(sc.shapes) >= MIN_SHAPES:
            return sc
    raise ValueError(f"no scene with {MIN_SHAPES} shapes in {_MAX_TRIES} draws")  # never at the defaults


def describe(sc) -> dict:
    """What a model should say about ``sc``, phrased as the synthetic templates phrase it:
    ``{"shapes": [{"shape", "color", "box"}], "question", "answer", "hypothesis", "label"}``,
    asking for the most frequent shape's count and stating a colour-shape pair that is there."""
    counts = Counter(s.shape for s in sc.shapes)
    shape = max(S.SHAPES, key=lambda name: (counts[name], -S.SHAPES.index(name)))
    first = sc.shapes[0]
    return {
        "shapes": [{"shape": s.shape, "color": s.color, "box": list(s.box)} for s in sc.shapes],
        "question": f"How many {shape}s are there?",  # synthetic._q_count_shape
        "answer": str(counts[shape]),
        "hypothesis": f"There is a {first.color} {first.shape}.",  # synthetic._h_exists, true
        "label": "entailment",
    }


def write_sample_image(path, seed: int = 0, image_size: int = 64) -> dict:
    """Write the sample scene of ``seed`` to ``path`` (format from the extension) and return
    ``describe`` of it plus ``"path"`` and ``"size": [w, h]``."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder {folder!r} does not exist")
    sc = sample_scene(seed, image_size)
    if str(path).lower().endswith((".jpg", ".jpeg")):
        atomic_write(path, sc.jpeg)
    else:
        fmt = image_format(path, "output")  # before decoding: a ValueError for an unknown extension
        with Image.open(io.BytesIO(sc.jpeg)) as im:
            im.load()
        atomic_write(path, lambda f: im.save(f, format=fmt))
    return {"path": str(path), "size": [sc.width, sc.height], **describe(sc)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m unit_fast.data.sample_image",
        description="Writes one picture like the synthetic training images (coloured shapes on a "
        "noisy background, drawn by the synthetic generator with a fixed seed) and prints its "
        "shapes, a question and a hypothesis about it, and their true answers.",
    )
    p.add_argument("out", help="the image file to write: .jpg (the generator's own bytes) or .png")
    p.add_argument("--seed", type=int, default=0, help="another seed gives another picture (default 0)")
    p.add_argument("--image-size", type=int, default=64,
                   help="side in px (default 64, the embedded default's training images)")
    a = p.parse_args(argv)
    try:
        r = write_sample_image(a.out, a.seed, a.image_size)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    w, h = r["size"]
    print(f"wrote {r['path']} ({w}x{h} px), {len(r['shapes'])} shapes (box x0 y0 x1 y1 px):")
    for s in r["shapes"]:
        print(f"  {s['color']} {s['shape']}  {' '.join(map(str, s['box']))}")
    print(f'  --question "{r["question"]}": answer {r["answer"]}')
    print(f'  --hypothesis "{r["hypothesis"]}": {r["label"]}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
