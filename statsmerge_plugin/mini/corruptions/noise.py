"""Noise corruptions (CIFAR-10-C's noise family): additive Gaussian, salt-and-pepper impulse."""

from __future__ import annotations

import numpy as np

from .pixels import ImageLike, as_rgb_array, check_severity, to_uint8


def gaussian_noise(image: ImageLike, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise, std 0.04 .. 0.10 of the value range."""
    c = [0.04, 0.06, 0.08, 0.09, 0.10][check_severity(severity) - 1]
    x = as_rgb_array(image) / 255.0
    return to_uint8(x + rng.normal(size=x.shape, scale=c))


def impulse_noise(image: ImageLike, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper noise (scikit-image's ``random_noise(mode="s&p")``: every value, channel by
    channel, is replaced with probability ``amount``, by 0 or 1 with equal odds)."""
    amount = [0.01, 0.02, 0.03, 0.05, 0.07][check_severity(severity) - 1]
    x = as_rgb_array(image) / 255.0
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    x = np.where(hit & salt, 1.0, np.where(hit & ~salt, 0.0, x))
    return to_uint8(x)
