"""``unit_fast.Predictor``: a trained UniT's predictions on batches of inputs.

    predictor = Predictor.from_checkpoint("runs", device="cpu")
    predictor(images=["a.jpg", "b.jpg"])                          # detection: one dict per image
    predictor(images=["a.jpg"], questions=["How many circles?"])  # vqa
    predictor(texts=["a fine film"], task="glue_sst2")            # text classification

Each result is the dict ``python -m unit_fast.predict --json`` prints (``TaskKind.predict_result``):
``dataset``, ``kind``, ``task`` and, by kind, ``detections`` (``label`` raw category id,
``name``, ``score``, ``box [x0, y0, x1, y1]`` in the original image's pixels), ``answer`` /
``top``, or ``label`` / ``probabilities``.  The task follows from the inputs given, by the one
served dataset whose kind takes exactly them (``predict_inputs``), or ``task=``.

Inputs become batches by the evaluation path itself: each input is its kind's one-record val
dataset (test-time resize, MMF's token layout, the run's max length), and ``BatchCollator``
pads ``batch_size`` of them into one batch.  Tokens are always padded to the max length, so a
text's result does not depend on its batch; images of different sizes are padded to the largest
in their batch (with a mask), which changes the backbone's border features slightly, as in
DETR's own batched evaluation.
"""

import os
import tempfile

import torch

from unit_fast.training import restore

INPUTS = ("image", "question", "hypothesis", "text", "text_pair")
KEYWORDS = {"image": "images", "question": "questions", "hypothesis": "hypotheses", "text": "texts",
            "text_pair": "text_pairs"}


def python_name(name):
    """How the Predictor's errors name an input (its ``__call__`` keyword) or ``task``."""
    return KEYWORDS.get(name, name)


def served_kinds(cfg):
    """``{dataset: TaskKind}`` of the datasets the configured model serves."""
    from unit_fast.tasks import model_kind

    return {ds: model_kind(ds, task, cfg["model"]["heads"].get(task, {}).get(ds))
            for ds, task in restore.model_datasets(cfg).items()}


def _takes(kind, given):
    required, optional = kind.predict_inputs
    return set(required) <= given <= set(required) | set(optional)


def choose_dataset(given, task, served, name=python_name):
    """The dataset to predict for: ``task``, else the one dataset of ``served`` (``{dataset:
    TaskKind}``) whose kind takes exactly the inputs ``given`` (a set of ``INPUTS`` names).
    ``name(input or "task")`` is how a message names them (``--image`` on the command line)."""
    texts = [name(n) for n in ("question", "hypothesis", "text") if n in given]
    if len(texts) > 1:
        raise ValueError(f"give one of {name('question')}, {name('hypothesis')}, {name('text')}; "
                         f"got {' and '.join(texts)}")
    if task is not None:
        if task not in served:
            raise ValueError(f"{name('task')} {task!r}: this model serves {', '.join(served)}")
        ds = task
    else:
        if not given:
            raise ValueError(f"nothing to predict: give {name('image')} (detection), {name('image')} with "
                             f"{name('question')} (vqa) or {name('hypothesis')} (image-text classification), "
                             f"or {name('text')} (text classification)")
        from unit_fast.tasks import KINDS

        wanted = [k for k in KINDS.values() if _takes(k, given)]
        options = [d for d, k in served.items() if k in wanted]
        flags = " ".join(name(n) for n in INPUTS if n in given)
        if not options:
            if not wanted:
                raise ValueError(f"no task kind takes {flags}")
            kinds = ", ".join(k.name for k in wanted)
            raise ValueError(f"{flags} asks for a {kinds} task, which this model does not serve; "
                             f"it has: {', '.join(served)}")
        if len(options) > 1:
            raise ValueError(f"this model has several {', '.join(k.name for k in wanted)} datasets "
                             f"({', '.join(options)}): choose one with {name('task')}")
        ds = options[0]
    required, optional = served[ds].predict_inputs
    missing = [name(n) for n in required if n not in given]
    extra = [name(n) for n in INPUTS if n in given and n not in required and n not in optional]
    if missing or extra:
        problems = ([f"needs {', '.join(missing)}"] if missing else []) + \
                   ([f"takes no {', '.join(extra)}"] if extra else [])
        raise ValueError(f"{ds}: {'; '.join(problems)}")
    return ds


def _columns(inputs):
    """``(n, {input: [value] * n})``: lists kept, a single value (a str, or one image) repeated
    to the lists' length (e.g. one question for many images)."""
    lists = {k: list(v) for k, v in inputs.items() if isinstance(v, (list, tuple))}
    lengths = {len(v) for v in lists.values()}
    if len(lengths) > 1:
        raise ValueError("inputs of different lengths: " +
                         ", ".join(f"{python_name(k)} {len(v)}" for k, v in lists.items()))
    n = lengths.pop() if lengths else 1
    return n, {k: lists[k] if k in lists else [v] * n for k, v in inputs.items()}


def _image_file(image, folder, index, name):
    """A path to ``image``: a path as is (checked); a PIL image or a ``(3, H, W)`` tensor (uint8,
    or float in [0, 1], quantised to 8 bits as a decoded file is) written losslessly as PNG."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name} {path!r} does not exist")
        return path
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{name}: an image tensor must be (3, H, W), got {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        image = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name}: expected a path, a PIL image or a (3, H, W) tensor, "
                        f"got {type(image).__name__}")
    path = os.path.join(folder, f"image_{index}.png")
    image.convert("RGB").save(path, format="PNG")
    return path


def _image_size(path, name):
    """``(h, w)`` of the image file ``path`` (its header only)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except OSError as exc:  # PIL's UnidentifiedImageError
        raise ValueError(f"{name}: {exc}") from None
    return h, w


def _item(out, i):
    """Item ``i`` of a batched model output, with batch 1: ``hidden_states`` is
    ``(dec_layers, B, Q, d)``; every other tensor is batch-first."""
    return {k: (v[:, i:i + 1] if k == "hidden_states" else v[i:i + 1]) if isinstance(v, torch.Tensor) else v
            for k, v in out.items()}


class Predictor:
    """A trained ``UniT`` with what predicting needs: its config, the run metadata
    (tokenizer, answers, label and category names, image sizes, text lengths) and a device.

    Args:
        model: the ``UniT``, in eval mode, on ``device``; or None: restored from ``checkpoint`` on
            first use (``model``).
        cfg: the config it was built from (``restore.checkpoint_config``).
        checkpoint: the ``restore.Checkpoint`` it came from (its ``meta``; without it the
            metadata is rebuilt from the configured data).
        device: where the model runs.
    """

    def __init__(self, model, cfg, checkpoint, device="cpu"):
        self._model, self.cfg, self.checkpoint = model, cfg, checkpoint
        self.device = torch.device(device)
        self.served = served_kinds(cfg)
        self._meta = checkpoint.meta
        self._tokenizer = None

    @property
    def model(self):
        """The ``UniT`` (eval mode, on ``device``).  Without run metadata in the checkpoint it is
        built on first use, after ``metadata`` has fitted the config to the data (vocabulary
        size, VQA answers), as evaluation builds it."""
        if self._model is None:
            self._model = restore.restore_model(self.checkpoint, self.cfg, self.device)
        return self._model

    @classmethod
    def from_checkpoint(cls, path, device="cpu", trust=False, config=None, overrides=()):
        """The model of ``path`` (a checkpoint file or a run folder, as ``--checkpoint`` takes),
        on ``device`` (``"cpu"``, ``"cuda"`` or ``"auto"``, or a ``torch.device``).  The file is
        read weights-only unless ``trust`` (which fully unpickles it: files you trust only).
        ``config`` / ``overrides``: as ``--config`` and the ``key=value`` arguments of predict."""
        from unit_fast.training.batches import resolve_device

        device = resolve_device(device, "device") if isinstance(device, str) else torch.device(device)
        checkpoint = restore.read_checkpoint(path, trust=trust)
        cfg = restore.checkpoint_config(checkpoint, config, overrides)
        predictor = cls(None, cfg, checkpoint, device)
        if checkpoint.meta is not None:  # else built once the metadata is rebuilt (``model``)
            predictor.model  # noqa: B018  (a checkpoint that does not fit fails here, not later)
        return predictor

    def metadata(self, ds):
        """The run metadata, with an entry for ``ds``: the checkpoint's, else rebuilt from the
        configured data of ``ds`` (an MMF checkpoint, or an older trainer's)."""
        if self._meta is None or ds not in self._meta.get("datasets", {}):
            if self.checkpoint.meta is not None:
                raise ValueError(f"checkpoint {self.checkpoint.path!r}: its metadata has no entry for {ds}")
            from unit_fast.training.metadata import run_metadata

            try:
                data = restore.build_eval_data(self.cfg, [ds])
            except (ValueError, OSError) as exc:
                raise ValueError(f"checkpoint {self.checkpoint.path!r} has no run metadata (not written by "
                                 "unit_fast.train), and the configured data to rebuild it cannot be read: "
                                 f"{restore.one_line(exc)}") from None
            self._meta = run_metadata(self.cfg, data)
            if ds not in self._meta.get("datasets", {}):
                raise ValueError(f"checkpoint {self.checkpoint.path!r}: its metadata has no entry for {ds}")
        return self._meta

    def _tokenizer_for(self, kind, meta):
        if kind.text_length is None:
            return None
        if self._tokenizer is None:
            from unit_fast.training.metadata import tokenizer_from_metadata

            self._tokenizer = tokenizer_from_metadata(meta)
        return self._tokenizer

    def choose(self, inputs, task=None, name=python_name):
        """The dataset for ``inputs`` (``{input: value}``, the given ones) and ``task``."""
        return choose_dataset(set(inputs), task, self.served, name)

    def __call__(self, images=None, questions=None, hypotheses=None, texts=None, text_pairs=None, *,
                 task=None, threshold=0.5, top_k=5, batch_size=8, progress=False, name=python_name):
        """Predict on ``N`` inputs; returns ``N`` result dicts, in input order.

        Args:
            images: image paths, PIL images or ``(3, H, W)`` tensors (uint8, or float in
                [0, 1]; written to a temporary PNG and read back as a file is).
            questions / hypotheses / texts / text_pairs: strings.  Each argument is a list of
                ``N`` values, or one value used for every input (one question for many images).
            task: the dataset, where the model serves several of the inputs' kind.
            threshold: detection: the lowest score kept.  top_k: vqa: answers listed.
            batch_size: inputs per forward.  progress: a tqdm bar on stderr.
            name: how errors name the inputs (the CLI passes its flags).

        Raises ValueError / FileNotFoundError with a one-line message naming the input.
        """
        given = {n: v for n, v in zip(INPUTS, (images, questions, hypotheses, texts, text_pairs), strict=True)
                 if v is not None}
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"{name('threshold')} must be in [0, 1], got {threshold}")
        if top_k < 1:
            raise ValueError(f"{name('top_k')} must be >= 1, got {top_k}")
        if batch_size < 1:
            raise ValueError(f"{name('batch_size')} must be >= 1, got {batch_size}")
        ds = self.choose(given, task, name)
        n, columns = _columns(given)
        kind, meta = self.served[ds], self.metadata(ds)
        with tempfile.TemporaryDirectory(prefix="unit_fast-predict-") as folder:
            if "image" in columns:
                columns["image"] = [_image_file(im, folder, i, name("image"))
                                    for i, im in enumerate(columns["image"])]
            rows = [{k: v[i] for k, v in columns.items()} for i in range(n)]
            return self._predict(ds, kind, meta, rows, threshold, top_k, batch_size, progress, name)

    @torch.no_grad()
    def _predict(self, ds, kind, meta, rows, threshold, top_k, batch_size, progress, name):
        from tqdm import tqdm

        from unit_fast.data import datasets as D
        from unit_fast.training.batches import to_device
        from unit_fast.training.metadata import image_sizes_from_metadata

        entry = meta["datasets"][ds]
        sizes = image_sizes_from_metadata(entry) if "image" in kind.predict_inputs[0] else None
        tokenizer = self._tokenizer_for(kind, meta)
        head = self.cfg["model"]["heads"][kind.model_task][ds]
        options = {"threshold": threshold, "top_k": top_k}
        collate = D.BatchCollator(ds, decoder=self.cfg["data"]["decoder"], dataset_type="test")
        results = []
        with tqdm(total=len(rows), desc=ds, unit="input", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, len(rows), batch_size):
                chunk, items, image_sizes = rows[start:start + batch_size], [], []
                for inputs in chunk:
                    size = _image_size(inputs["image"], name("image")) if "image" in inputs else None
                    inputs = {**inputs, "size": size} if size is not None else inputs
                    items.append(kind.predict_dataset(ds, entry, inputs, tokenizer, sizes)[0])
                    image_sizes.append(size)
                batch = collate(items)
                batch["targets"] = None  # a prediction: no loss
                out = self.model(to_device(batch, self.device))
                results += [kind.predict_result(ds, _item(out, i), entry, head, size, options)
                            for i, size in enumerate(image_sizes)]
                bar.update(len(chunk))
        return results
