"""The seven corruptions by FusionBench's split names, their severities, and :func:`corrupt`."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np

from .blur import motion_blur
from .digital import contrast, jpeg_compression, pixelate
from .noise import gaussian_noise, impulse_noise
from .pixels import DEFAULT_SEVERITY, SEVERITIES, ImageLike, check_severity  # noqa: F401
from .weather import spatter

# FusionBench's split names (the values of its `corruption` config key), in the order of the
# robustness table in FusionBench's docs (docs/modelpool/clip_vit.md).
CORRUPTIONS = (
    "motion_blur",
    "impulse_noise",
    "gaussian_noise",
    "pixelate",
    "spatter",
    "contrast",
    "jpeg_compression",
)
# Bump when what a corruption function produces for the same (image, severity, seed) changes: the
# corrupted splits live under v<CORRUPTED_VERSION>/, so stale ones are never reused.
CORRUPTED_VERSION = 1
SEPARATOR = (
    "__"  # task pool key of a corrupted split: "<task>__<corruption>", e.g. mini_gtsrb__spatter
)


def check_corruption(name: str) -> str:
    """``name`` if it is one of :data:`CORRUPTIONS`, else a ValueError naming it."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    return name


FUNCTIONS: Dict[str, Callable[..., np.ndarray]] = {
    "motion_blur": motion_blur,
    "impulse_noise": impulse_noise,
    "gaussian_noise": gaussian_noise,
    "pixelate": pixelate,
    "spatter": spatter,
    "contrast": contrast,
    "jpeg_compression": jpeg_compression,
}


def corrupt(
    image: ImageLike,
    name: str,
    severity: int = DEFAULT_SEVERITY,
    rng: Optional[np.random.Generator] = None,
) -> np.ndarray:
    """``image`` under corruption ``name`` at ``severity``; a uint8 array of the same shape.

    Args:
        image: a PIL image or a uint8 array (H, W, 3).
        name: one of :data:`CORRUPTIONS` (FusionBench's split names).
        severity: 1 (mild) .. 5 (severe), FusionBench's parameter tables.
        rng: the only source of randomness (default: ``np.random.default_rng(0)``).
    """
    fn = FUNCTIONS[check_corruption(name)]
    severity = check_severity(severity)
    return fn(image, severity, rng if rng is not None else np.random.default_rng(0))
