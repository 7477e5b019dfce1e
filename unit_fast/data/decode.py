"""Decode JPEG/PNG images and execute transform plans on them: DALI, torchvision or PIL.

Every decoder takes encoded bytes and one ``transforms.Plan`` per image and returns, per image,
``(3, h_i, w_i)`` float32 RGB normalised with ImageNet mean/std, where ``(h_i, w_i) =
plan.size``: crop the plan's window, resize it (bilinear, antialiased), mirror if asked,
normalise.  Decoders, in default order:

  ``dali``         NVIDIA DALI: one pipeline run per batch; decodes only the crop window
                   (``decoders.image_slice``), on the GPU ("mixed") for CUDA devices and on CPU
                   threads otherwise.  Optional: unavailable, with the import error as reason,
                   when ``nvidia-dali`` is not installed (import is lazy).
  ``torchvision``  ``torchvision.io.decode_jpeg`` (a list per call, on the GPU for CUDA devices,
                   house style 5; CPU decoding where nvJPEG is missing) + ``transforms.v2``.
                   (torchvision 0.29 deprecates its decoders in favour of TorchCodec and warns
                   on import; they still work, and house style names them.)
  ``pil``          PIL decode + ``Image.resize`` (what DETR does): the slow baseline.

The decoders agree up to JPEG-decoder (IDCT, chroma upsampling) and resize-filter rounding: a
mean absolute difference near one 8-bit level (``tests/data/test_images.py`` bounds it).  None
applies EXIF orientation, as DETR's ``PIL.Image.open`` does not.

Bad input never reaches a decoder unnamed: the bytes are read and checked in Python first
(magic number, JPEG markers up to the scan, end-of-image marker, size against the plan), and a
decoder error is re-raised as ``ImageDecodeError`` (a ValueError) naming the file.  A missing
file raises FileNotFoundError naming it.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from unit_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Plan, normalize_uint8

DECODERS = ("dali", "torchvision", "pil")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (they carry the size): C0..CF except DHT C4, JPG C8, DAC CC.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RSTn: no length field


class ImageDecodeError(ValueError):
    """An image that cannot be decoded; the message names the file."""


def read_image_bytes(item, name: str | None = None) -> tuple[bytes, str]:
    """``(bytes, name)`` of a path (read now) or of bytes-like data (named ``name``)."""
    if isinstance(item, (bytes, bytearray, memoryview, np.ndarray)):
        return bytes(item), name or "<bytes>"
    path = os.fspath(item)
    try:
        with open(path, "rb") as f:
            return f.read(), name or path
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image file not found: {path}") from e
    except OSError as e:
        raise ImageDecodeError(f"cannot read image file {path}: {e}") from e


def image_size(data: bytes, name: str = "<bytes>") -> tuple[int, int]:
    """``(h, w)`` from a JPEG or PNG header, after checking the file is not cut short.

    Raises ``ImageDecodeError`` naming ``name`` for anything else: other formats, headers that
    do not parse, a JPEG with no end-of-image marker after its scan (truncated), a PNG without
    its IEND chunk.
    """
    if data.startswith(_PNG_MAGIC):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageDecodeError(f"{name}: corrupt PNG header")
        if b"IEND" not in data[-64:]:
            raise ImageDecodeError(f"{name}: PNG has no IEND chunk (truncated file?)")
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    if not data.startswith(b"\xff\xd8\xff"):
        what = f"starts with {data[:8].hex()}" if data else "empty file"
        raise ImageDecodeError(f"{name}: not a JPEG or PNG image ({what})")
    size, pos, n = None, 2, len(data)
    # Walk the marker segments up to the first scan; APPn segments (EXIF thumbnails hold a
    # whole JPEG) are skipped by length, so the SOF found is the main image's.
    while True:
        if pos + 4 > n:
            raise ImageDecodeError(f"{name}: JPEG ends inside its header (truncated file?)")
        if data[pos] != 0xFF:
            raise ImageDecodeError(f"{name}: corrupt JPEG (no marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xD9 or length < 2:
            raise ImageDecodeError(f"{name}: corrupt JPEG (bad segment at byte {pos})")
        if marker in _SOF and pos + 9 <= n:
            size = (int.from_bytes(data[pos + 5 : pos + 7], "big"),  # height
                    int.from_bytes(data[pos + 7 : pos + 9], "big"))  # width
        pos += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
    if size is None or min(size) == 0:
        raise ImageDecodeError(f"{name}: corrupt JPEG (no frame header with a size before the scan)")
    # Entropy-coded data stuffs every 0xFF with 0x00, so FF D9 after the scan header is the EOI.
    if data.rfind(b"\xff\xd9") < pos:
        raise ImageDecodeError(f"{name}: JPEG has no end-of-image marker (truncated file?)")
    return size


# ---------------------------------------------------------------------------------------------
# Availability


@functools.cache
def _dali_import_error() -> str | None:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
    except Exception as e:  # ImportError, or a broken install failing at load
        return f"nvidia-dali is not installed or fails to import ({e!r}); pip install nvidia-dali-cuda130"
    return None


@functools.cache
def _torchvision_cuda_decode_error(device_index: int) -> str | None:
    """Why ``decode_jpeg(device="cuda")`` does not work here (None when it does)."""
    import PIL.Image
    from torchvision.io import decode_jpeg

    buf = io.BytesIO()
    PIL.Image.new("RGB", (16, 16)).save(buf, "JPEG")
    try:
        decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)],
                    device=torch.device("cuda", device_index))
    except Exception as e:  # torchvision built without nvJPEG, or no usable GPU
        return repr(e)
    return None


def decoder_unavailable_reason(decoder: str, device="cpu") -> str | None:
    """Why ``decoder`` cannot run on ``device``; None when it can."""
    if decoder not in DECODERS:
        return f"unknown image decoder {decoder!r}; expected one of {DECODERS}"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if decoder == "dali":
        return _dali_import_error()
    return None  # torchvision and Pillow are dependencies of the package


def available_decoders(device="cpu") -> list[str]:
    """Decoders that run on ``device``, in default order (a subset of ``DECODERS``)."""
    return [b for b in DECODERS if decoder_unavailable_reason(b, device) is None]


def default_decoder(device="cpu") -> str:
    """``dali`` when installed, else ``torchvision``, else ``pil``."""
    available = available_decoders(device)
    if not available:
        raise RuntimeError(f"no image decoder runs on {device}: {decoder_unavailable_reason('pil', device)}")
    return available[0]


# ---------------------------------------------------------------------------------------------
# PIL and torchvision


def pil_load_one(data: bytes, plan: Plan, name: str = "<bytes>") -> Tensor:
    """One image through PIL (DETR's own path): ``(3, h, w)`` float32 normalised, on CPU.

    The bytes must have passed ``image_size``.  Picklable and self-contained, so DataLoader
    workers can run it.
    """
    import PIL.Image

    try:
        with PIL.Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"{name}: PIL cannot decode it: {e}") from e
    top, left, ch, cw = plan.crop
    oh, ow = plan.size
    if plan.cropped:
        # Crop first: ``resize(box=...)`` would let the filter read pixels outside the window,
        # where DALI and torchvision (and DETR) see only the window, edge pixels repeated.
        im = im.crop((left, top, left + cw, top + ch))
    # PIL's BILINEAR widens its support when downscaling (antialiasing), like DALI and
    # torchvision's antialias=True.
    im = im.resize((ow, oh), PIL.Image.BILINEAR)
    if plan.flip:
        im = im.transpose(PIL.Image.FLIP_LEFT_RIGHT)
    # np.array copies: asarray would be a read-only view, which torch warns about.
    return normalize_uint8(torch.from_numpy(np.array(im)).permute(2, 0, 1))  # (3, oh, ow)


def _pil_load(datas, plans, names, device):
    return [pil_load_one(d, p, n).to(device) for d, p, n in zip(datas, plans, names, strict=True)]


def _torchvision_decode(datas, names, device) -> list[Tensor]:
    """``(3, H, W)`` uint8 per image on ``device``: JPEGs in one ``decode_jpeg`` list call."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    on_gpu = device.type == "cuda" and _torchvision_cuda_decode_error(
        device.index if device.index is not None else torch.cuda.current_device()) is None
    jpegs = [i for i, d in enumerate(datas) if not d.startswith(_PNG_MAGIC)]
    out: list[Tensor | None] = [None] * len(datas)
    try:
        decoded = decode_jpeg([raw[i] for i in jpegs], mode=ImageReadMode.RGB,
                              device=device if on_gpu else "cpu") if jpegs else []
        for i, img in zip(jpegs, decoded, strict=True):
            out[i] = img
    except RuntimeError:
        pass  # a bad image in the list: decode one by one below to name it
    for i, img in enumerate(out):
        if img is None:
            try:
                out[i] = decode_image(raw[i], mode=ImageReadMode.RGB)
            except RuntimeError as e:
                raise ImageDecodeError(f"{names[i]}: torchvision cannot decode it: {e}") from e
    return [img.to(device) for img in out]


def _torchvision_load(datas, plans, names, device):
    import torchvision.transforms.v2.functional as F

    out = []
    for img, plan in zip(_torchvision_decode(datas, names, device), plans, strict=True):
        top, left, ch, cw = plan.crop
        img = F.resize(img[:, top : top + ch, left : left + cw], list(plan.size), antialias=True)
        out.append(normalize_uint8(img.flip(-1) if plan.flip else img))  # (3, oh, ow)
    return out


# ---------------------------------------------------------------------------------------------
# DALI


@functools.cache
def _dali_pipeline_fn():
    """The DALI graph, defined once DALI is imported (``pipeline_def`` needs it)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=True)
    def plan_pipeline(decoder_device):
        data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)  # (x, y)
        shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)  # (w, h)
        out_w = fn.external_source(name="out_w", dtype=types.FLOAT, ndim=0)
        out_h = fn.external_source(name="out_h", dtype=types.FLOAT, ndim=0)
        resize = fn.external_source(name="resize", dtype=types.BOOL, ndim=0)
        mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
        img = fn.decoders.image_slice(
            data, anchor, shape, device=decoder_device, output_type=types.RGB, axis_names="WH",
            normalized_anchor=False, normalized_shape=False, adjust_orientation=False)  # (h, w, 3) uint8
        # Per-sample branch (DALI splits the batch): DALI's resize resamples even when the size
        # is unchanged, which costs a full pass on CPU (images already 800 on the short side).
        if resize:
            img = fn.resize(img, resize_x=out_w, resize_y=out_h, interp_type=types.INTERP_LINEAR,
                            antialias=True)
        return fn.crop_mirror_normalize(
            img, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
            mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD])  # (3, h, w)

    return plan_pipeline


class _DaliPipeline:
    """A DALI pipeline fed per call through ``external_source``: bytes, crop window, output size
    and mirror flag per sample; outputs ``(3, h, w)`` float32 per sample.

    Runs synchronously (no prefetching) because every call brings its own batch and plans.
    """

    def __init__(self, max_batch_size: int, num_threads: int, device_id: int | None):
        self.max_batch_size = max_batch_size
        self.pipe = _dali_pipeline_fn()(
            "cpu" if device_id is None else "mixed", batch_size=max_batch_size,
            num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1, exec_async=False,
            exec_pipelined=False)
        self.pipe.build()

    def run(self, datas, plans):
        """The pipeline's output TensorList for one batch (valid until the next run)."""
        f32 = np.float32
        feeds = {
            "data": [np.frombuffer(d, dtype=np.uint8) for d in datas],
            "anchor": [np.array([p.crop[1], p.crop[0]], f32) for p in plans],
            "shape": [np.array([p.crop[3], p.crop[2]], f32) for p in plans],
            "out_w": [np.array(p.size[1], f32) for p in plans],
            "out_h": [np.array(p.size[0], f32) for p in plans],
            "resize": [np.array(p.size != p.crop[2:]) for p in plans],  # skip identity resizes
            "mirror": [np.array(int(p.flip), np.int32) for p in plans],
        }
        for key, value in feeds.items():
            self.pipe.feed_input(key, value)
        (out,) = self.pipe.run()
        return out


def _dali_to_torch(out, device: torch.device) -> Tensor:
    """Copies one DALI tensor out of its buffers (reused by the next run) into torch."""
    if device.type == "cpu":
        return torch.from_numpy(np.array(out))
    from nvidia.dali.plugin.pytorch import feed_ndarray

    t = torch.empty(out.shape(), dtype=torch.float32, device=device)
    feed_ndarray(out, t, cuda_stream=torch.cuda.current_stream(device))  # on torch's stream: no host sync
    return t


# ---------------------------------------------------------------------------------------------
# Public API


class ImageLoader:
    """Decodes batches of images and executes their plans with one decoder on one device.

    Args:
        decoder: one of ``DECODERS``; None picks ``default_decoder(device)``.  A named decoder
            that cannot run raises RuntimeError with the reason.
        device: where the outputs live (and, for ``dali`` / ``torchvision``, where decoding
            runs when it is CUDA).
        num_threads: DALI CPU worker threads (default: the cores this process may use).

    Not thread-safe: a DALI pipeline runs one batch at a time.
    """

    def __init__(self, decoder: str | None = None, device="cpu", num_threads: int | None = None):
        self.device = torch.device(device)
        self.decoder = decoder or default_decoder(self.device)
        reason = decoder_unavailable_reason(self.decoder, self.device)
        if reason is not None:
            raise RuntimeError(f"image decoder {self.decoder!r} is unavailable on {self.device}: {reason}")
        self.num_threads = num_threads or len(os.sched_getaffinity(0))
        self._dali: _DaliPipeline | None = None  # built on first use, rebuilt when too small

    def __call__(self, items: Sequence, plans: Sequence[Plan],
                 names: Sequence[str] | None = None) -> list[Tensor]:
        """Decodes ``items`` (paths, or bytes named by ``names``) and executes ``plans``.

        Returns:
            list of ``(3, plan.size[0], plan.size[1])`` float32 tensors on ``self.device``,
            ImageNet-normalised RGB.

        Raises:
            FileNotFoundError: a missing file (named).
            ImageDecodeError (ValueError): unreadable, corrupt or truncated data, or an image
                whose size differs from its plan's ``orig_size`` (named).
        """
        datas, names = self._read(items, plans, names)
        if not datas:
            return []
        if self.decoder == "pil":
            return _pil_load(datas, plans, names, self.device)
        if self.decoder == "torchvision":
            return _torchvision_load(datas, plans, names, self.device)
        out = self._dali_run(datas, plans, names)
        return [_dali_to_torch(out[i], self.device) for i in range(len(out))]

    def _read(self, items, plans, names):
        """Reads and checks every image before any decoder sees it: ``(datas, names)``."""
        if len(items) != len(plans) or (names is not None and len(names) != len(items)):
            raise ValueError(f"got {len(items)} images, {len(plans)} plans"
                             + ("" if names is None else f" and {len(names)} names"))
        datas, checked_names = [], []
        for i, item in enumerate(items):
            data, name = read_image_bytes(item, None if names is None else names[i])
            h, w = image_size(data, name)
            if (h, w) != tuple(plans[i].orig_size):
                raise ImageDecodeError(f"{name}: the image is {h}x{w} but its plan (annotation) "
                                       f"says {plans[i].orig_size[0]}x{plans[i].orig_size[1]}")
            datas.append(data)
            checked_names.append(name)
        return datas, checked_names

    def _dali_pipeline(self, batch_size: int) -> _DaliPipeline:
        pipe = self._dali
        if pipe is None or pipe.max_batch_size < batch_size:
            device_id = None
            if self.device.type == "cuda":
                device_id = torch.cuda.current_device() if self.device.index is None else self.device.index
            pipe = _DaliPipeline(max(batch_size, 8), self.num_threads, device_id)
            self._dali = pipe
        return pipe

    def _dali_run(self, datas, plans, names):
        """DALI's output TensorList for the batch, or ImageDecodeError naming the culprit."""
        try:
            return self._dali_pipeline(len(datas)).run(datas, plans)
        except RuntimeError as e:
            self._dali = None  # DALI: "Current pipeline object is no longer valid"
            error = e
        # DALI's message gives the failing sample's index only for some failures; otherwise run
        # the samples one at a time to find it (an error path: speed does not matter here).
        m = re.search(r"sample #(\d+)", str(error))
        culprit = int(m.group(1)) if m and int(m.group(1)) < len(names) else None
        if culprit is None and len(datas) > 1:
            for i in range(len(datas)):
                try:
                    self._dali_pipeline(1).run(datas[i : i + 1], plans[i : i + 1])
                except RuntimeError as single_error:
                    self._dali = None
                    culprit, error = i, single_error
                    break
        what = f"{names[culprit]}: DALI cannot decode it" if culprit is not None else \
            f"DALI failed on the batch {list(names)}"
        raise ImageDecodeError(f"{what}: {_dali_message(error)}") from error


def _dali_message(error: Exception) -> str:
    """The useful part of a DALI pipeline error (it also prints the pipeline's definition)."""
    text = str(error)
    text = text.split("encountered:", 1)[-1].replace("Current pipeline object is no longer valid.", "")
    return " ".join(text.split())


@functools.cache
def _cached_loader(decoder: str | None, device: str) -> ImageLoader:
    return ImageLoader(decoder, device)


def load_batch(items: Sequence, plans: Sequence[Plan], decoder: str | None = None, device="cpu",
               names: Sequence[str] | None = None) -> list[Tensor]:
    """``ImageLoader(decoder, device)(items, plans, names)`` with a loader cached per
    ``(decoder, device)``: a list of ``(3, H_i, W_i)`` float32 normalised tensors."""
    return _cached_loader(decoder, str(torch.device(device)))(items, plans, names)
