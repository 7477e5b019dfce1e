"""What a newcomer meets first: the sample picture (``python -m unit_fast.data.sample_image``),
``predict --save-image`` drawn to the image's scale, and the ``--help`` texts of the CLIs. No
model is trained here (``tests/test_evaluate_predict.py`` runs the README's examples on one)."""

import numpy as np
import pytest
from PIL import Image

from unit_fast import evaluate, predict, train
from unit_fast.config import config_names, config_summary, packaged_configs_epilog
from unit_fast.data import sample_image
from unit_fast.data.synthetic import COLORS, SHAPE_IDS, SHAPES

# -- the sample picture ----------------------------------------------------------------------------


def test_sample_image_is_fixed_and_like_the_training_images(tmp_path, capsys):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    assert sample_image.main([str(a)]) == 0
    out = capsys.readouterr().out
    r = sample_image.write_sample_image(b)
    assert a.read_bytes() == b.read_bytes()  # a fixed seed: the same picture every time
    with Image.open(a) as im:
        assert im.format == "JPEG" and im.size == (64, 64)  # the embedded default's image size
        pixels = np.asarray(im.convert("RGB")).astype(int)
    assert len(r["shapes"]) >= sample_image.MIN_SHAPES
    # The generator's colours: each shape's box centre is saturated and near its nominal colour,
    # the background near-grey (synthetic.py's "saturation > 70" rule).
    sat = pixels.max(-1) - pixels.min(-1)  # (64, 64)
    inside = np.zeros((64, 64), bool)
    for s in r["shapes"]:
        x0, y0, x1, y1 = s["box"]
        inside[y0:y1, x0:x1] = True
        centre = pixels[(y0 + y1) // 2, (x0 + x1) // 2]
        assert s["shape"] in SHAPES and np.abs(centre - COLORS[s["color"]]).max() < 40, s
    assert (sat[~inside] < 70).mean() > 0.99
    # What it prints is what is there, in the templates' words, ready to paste.
    assert f'--question "{r["question"]}": answer {r["answer"]}' in out
    assert f'--hypothesis "{r["hypothesis"]}": entailment' in out
    counted = r["question"].split()[2][:-1]  # "How many squares are there?" -> "square"
    assert int(r["answer"]) == sum(s["shape"] == counted for s in r["shapes"])
    first = r["shapes"][0]
    assert r["hypothesis"] == f"There is a {first['color']} {first['shape']}."
    # Another seed, another picture; a PNG holds the same pixels.
    assert sample_image.write_sample_image(tmp_path / "c.jpg", seed=1)["shapes"] != r["shapes"]
    sample_image.write_sample_image(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert im.format == "PNG" and np.array_equal(np.asarray(im.convert("RGB")), pixels)


def test_sample_image_bad_output_is_one_error_line(tmp_path, capsys):
    assert sample_image.main([str(tmp_path / "missing" / "x.jpg")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "does not exist" in err


# -- predict --save-image --------------------------------------------------------------------------


def _changed(before, path):
    """The (H, W) bool mask of the pixels of image ``path`` that differ from array ``before``."""
    with Image.open(path) as im:
        return np.abs(np.asarray(im.convert("RGB")).astype(int) - before).sum(-1) > 0


def test_drawing_on_a_small_image_leaves_most_of_it_visible(tmp_path):
    src = tmp_path / "shapes.png"
    r = sample_image.write_sample_image(src)  # 64 x 64, four shapes
    with Image.open(src) as im:
        before = np.asarray(im.convert("RGB")).astype(int)
    dets = [{"label": SHAPE_IDS[s["shape"]], "name": s["shape"], "score": 0.87,
             "box": [float(v) for v in s["box"]]} for s in r["shapes"]]
    assert len(dets) == 4
    out = tmp_path / "boxes.png"
    for d in dets:
        predict.draw_detections(src, [d], out)
        changed = _changed(before, out)
        # One box and its caption: at most a tenth of the picture (a 10 px font took a sixth).
        assert changed.mean() <= 0.10, (d["name"], changed.mean())
        with Image.open(out) as im:
            # White text on a saturated fill: every caption colour has a channel below 80.
            text = (np.asarray(im.convert("RGB")) >= 140).all(-1) & changed
        assert text.sum() >= 10, d["name"]  # the caption's text is there
    predict.draw_detections(src, dets, out)
    assert _changed(before, out).mean() <= 0.30  # all four: most of the picture still shows


def test_captions_on_a_large_image_are_readable(tmp_path):
    src, out = tmp_path / "photo.png", tmp_path / "boxes.png"
    Image.new("RGB", (1024, 768), (128, 128, 128)).save(src)
    before = np.full((768, 1024, 3), 128)
    circle = {"label": 1, "name": "circle", "score": 0.87, "box": [300.0, 300.0, 500.0, 450.0]}
    predict.draw_detections(src, [circle], out)
    above = _changed(before, out)[:300]  # the caption sits above the box
    rows, cols = np.nonzero(above.any(1))[0], np.nonzero(above.any(0))[0]
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert 768 / 40 <= height <= 768 / 12, height  # grown with the image (it was 10 px)
    assert width >= 3 * height  # "circle 0.87" whole, not clipped
    line, size, _ = predict.drawing_scale(1024, 768)
    assert line >= 3 and size >= 768 / 30
    box = _changed(before, out)[300:451, 300:501]  # the outline grows too
    assert box[:, :line].all() and not box[line + 1:-line - 1, line + 1:-line - 1].any()


# -- --help ----------------------------------------------------------------------------------------


def help_parts(parse_args, capsys):
    """``(text, usage, description, rest)`` of ``parse_args(["--help"])``'s output: the usage
    block, the paragraphs before the argument list, and the argument list with the epilog."""
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    usage, _, body = text.partition("\n\n")
    cut = min(body.index(h) for h in ("positional arguments:", "options:") if h in body)
    return text, usage, body[:cut].strip(), body[cut:]


@pytest.mark.parametrize("module", [train, evaluate, predict], ids=["train", "evaluate", "predict"])
def test_help_describes_the_command_and_lists_the_configs(module, capsys):
    text, usage, description, rest = help_parts(module.parse_args, capsys)
    prog = f"python -m unit_fast.{module.__name__.rsplit('.', 1)[1]}"
    assert usage.startswith(f"usage: {prog} ")
    assert text.count("usage:") == 1 and text.count(prog) == 1, text  # the usage line once
    assert description.endswith(".") and len(description.split()) >= 30, description  # not cut off
    lines = rest.splitlines()
    for name in config_names():
        assert f"  {name}" in lines, name
    assert packaged_configs_epilog() in rest


def test_predict_help_names_every_input_and_the_sample_picture(capsys):
    _, _, description, _ = help_parts(predict.parse_args, capsys)
    for option in ("--image", "--question", "--hypothesis", "--text", "--text-pair", "--task"):
        assert option in description
    assert "python -m unit_fast.data.sample_image shapes.jpg" in description


def test_packaged_configs_epilog_describes_each_config():
    epilog = packaged_configs_epilog()
    for name in config_names():
        summary = config_summary(name)
        assert summary.endswith(".") and " ".join(summary.split()) == summary, name  # one sentence
        assert summary.split()[-1] in epilog
    assert config_summary("default").startswith("The embedded default: a small UniT")
    # The first sentence, across comment lines; not the file's first line cut off.
    assert config_summary("default").endswith("in about 7.5 minutes on 2 CPU cores.")
    assert "defaults" not in epilog.split()  # the base of every config, not one to pick
