"""Blur corruptions (CIFAR-10-C's blur family): ImageMagick's motion blur, from its definition."""

from __future__ import annotations

import math

import numpy as np

from .pixels import ImageLike, as_rgb_array, check_severity, to_uint8


def motion_kernel(radius: int, sigma: float, angle_degrees: float):
    """ImageMagick's ``MotionBlurImage`` kernel: weights ``exp(-i^2 / 2 sigma^2)`` (normalised) for
    ``i = 0 .. 2 * radius``, at pixel offsets ``(ceil(i cos a - 0.5), ceil(i sin a - 0.5))`` (x, y).
    """
    width = 2 * int(math.ceil(radius)) + 1
    i = np.arange(width, dtype=np.float64)
    weights = np.exp(-(i**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    angle = math.radians(angle_degrees)
    dx = np.ceil(i * math.cos(angle) - 0.5).astype(int)
    dy = np.ceil(i * math.sin(angle) - 0.5).astype(int)
    return weights, dx, dy


def motion_blur(image: ImageLike, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Motion blur along a random angle in [-45, 45] degrees (edge pixels repeated)."""
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][check_severity(severity) - 1]
    x = as_rgb_array(image).astype(np.float64)
    weights, dx, dy = motion_kernel(radius, sigma, rng.uniform(-45, 45))
    h, w = x.shape[:2]
    rows, cols = np.arange(h), np.arange(w)
    out = np.zeros_like(x)
    for weight, ox, oy in zip(weights, dx, dy):
        shifted = x[np.clip(rows + oy, 0, h - 1)][:, np.clip(cols + ox, 0, w - 1)]
        out += weight * shifted
    return to_uint8(out / 255.0)
