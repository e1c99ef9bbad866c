"""Digital corruptions (CIFAR-10-C's digital family): pixelate, contrast, JPEG compression."""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image

from .pixels import ImageLike, as_rgb_array, check_severity, to_uint8


def pixelate(image: ImageLike, severity: int, rng: Optional[np.random.Generator] = None):
    """Box-downsample to ``size * c`` then box-upsample back, c = 0.95 .. 0.65."""
    c = [0.95, 0.9, 0.85, 0.75, 0.65][check_severity(severity) - 1]
    img = Image.fromarray(as_rgb_array(image))
    w, h = img.size
    small = img.resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BOX), dtype=np.uint8)


def contrast(image: ImageLike, severity: int, rng: Optional[np.random.Generator] = None):
    """Contrast reduction towards each channel's mean, factor 0.75 .. 0.15."""
    c = [0.75, 0.5, 0.4, 0.3, 0.15][check_severity(severity) - 1]
    x = as_rgb_array(image) / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    return to_uint8((x - means) * c + means)


def jpeg_compression(image: ImageLike, severity: int, rng: Optional[np.random.Generator] = None):
    """A JPEG round trip at quality 80 .. 40 (Pillow's encoder)."""
    quality = [80, 65, 58, 50, 40][check_severity(severity) - 1]
    buffer = io.BytesIO()
    Image.fromarray(as_rgb_array(image)).save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.uint8)
