"""Shared helpers of the corruption functions: RGB arrays in, uint8 out, and the two filters
(scikit-image's Gaussian, OpenCV's 3x3 box) several corruptions are built from."""

from __future__ import annotations

from typing import Union

import numpy as np
from PIL import Image

ImageLike = Union[np.ndarray, Image.Image]
SEVERITIES = (1, 2, 3, 4, 5)
DEFAULT_SEVERITY = 1


def check_severity(severity) -> int:
    """``severity`` as an int in 1..5, else a ValueError naming it."""
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)):
        try:
            value = int(str(severity))
        except ValueError:
            raise ValueError(f"corruption severity must be an integer in 1..5, got {severity!r}")
    else:
        value = int(severity)
    if value not in SEVERITIES:
        raise ValueError(f"corruption severity must be an integer in 1..5, got {severity!r}")
    return value


def as_rgb_array(image: ImageLike) -> np.ndarray:
    """``image`` as a ``uint8`` array ``(H, W, 3)`` (PIL images are converted to RGB)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"expected an RGB image: a PIL image or a uint8 array (H, W, 3), got an array of shape "
            f"{array.shape} and dtype {array.dtype}"
        )
    return array


def to_uint8(x01: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8, truncating like CIFAR-10-C's ``np.uint8(corruption(x))``."""
    return (np.clip(x01, 0.0, 1.0) * 255.0).astype(np.uint8)


def gaussian_filter(x: np.ndarray, sigma: float) -> np.ndarray:
    """scikit-image's ``filters.gaussian`` defaults (mode "nearest", truncate 4)."""
    from scipy import ndimage

    return ndimage.gaussian_filter(x, sigma=sigma, mode="nearest", truncate=4.0)


def box3(x: np.ndarray) -> np.ndarray:
    """OpenCV's ``blur(x, (3, 3))`` (border reflect-101 = scipy's "mirror")."""
    from scipy import ndimage

    return ndimage.uniform_filter(x.astype(np.float64), size=3, mode="mirror")
