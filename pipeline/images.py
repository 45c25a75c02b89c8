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


def to_pixels(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """Resize the short side to size/crop_pct, centre-crop size x size, normalise -> CHW float32."""
    scale = pp.size / pp.crop_pct / min(img.size)
    w, h = max(pp.size, round(img.size[0] * scale)), max(pp.size, round(img.size[1] * scale))
    img = img.resize((w, h), _RESAMPLE.get(pp.interpolation, Image.BICUBIC))
    left, top = (w - pp.size) // 2, (h - pp.size) // 2
    img = img.crop((left, top, left + pp.size, top + pp.size))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    return arr.transpose(2, 0, 1)


def preprocess_bytes(data: bytes, pp: Preprocess) -> np.ndarray:
    return to_pixels(decode(data, min_side=int(pp.size / pp.crop_pct)), pp)
