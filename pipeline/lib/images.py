"""Image decoding and preprocessing (CPU), with every failure turned into a reason string."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from .models import Preprocess

# A decompression bomb raises instead of allocating gigabytes.
Image.MAX_IMAGE_PIXELS = 64_000_000
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def decode(data: bytes, min_side: int = 0) -> Image.Image:
    """Decode image bytes to RGB; JPEGs decode at reduced size (draft) when much larger than needed."""
    if not data:
        raise ValueError("empty image (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        if min_side and img.format == "JPEG":
            img.draft("RGB", (min_side, min_side))
        img.load()
    if img.mode != "RGB":
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            hi = arr.max() or 1.0
            img = Image.fromarray((arr * (255.0 / hi)).astype(np.uint8))
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA", "PA") else img.convert("RGB")
    return img


def to_uint8(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """Resize the short side to size/crop_pct and centre-crop size x size -> HWC uint8. Only the
    region the crop keeps is resampled (resize with a source box), the same pixels for less work."""
    scale = pp.size / pp.crop_pct / min(img.size)
    w, h = max(pp.size, round(img.size[0] * scale)), max(pp.size, round(img.size[1] * scale))
    left, top = (w - pp.size) // 2, (h - pp.size) // 2
    sx, sy = img.size[0] / w, img.size[1] / h
    box = (left * sx, top * sy, (left + pp.size) * sx, (top + pp.size) * sy)
    img = img.resize((pp.size, pp.size), _RESAMPLE.get(pp.interpolation, Image.BICUBIC), box=box)
    return np.asarray(img, dtype=np.uint8)


def normalize(pixels: np.ndarray, pp: Preprocess) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 with the model's mean and std."""
    arr = np.asarray(pixels, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def to_pixels(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """One image -> the model's CHW float32 input."""
    return normalize(to_uint8(img, pp)[None], pp)[0]


def crop_bytes(data: bytes, pp: Preprocess) -> np.ndarray:
    """Image bytes -> HWC uint8 at the model's size (what decode workers send to the model: a
    quarter of the float32 bytes; the model side normalises)."""
    return to_uint8(decode(data, min_side=int(pp.size / pp.crop_pct)), pp)


def preprocess_bytes(data: bytes, pp: Preprocess) -> np.ndarray:
    return normalize(crop_bytes(data, pp)[None], pp)[0]
