"""Simple, label-preserving augmentations on pixel tensors (random flips and translated crops).

Teacher and student may use different processors (resolution, normalisation), so one set of random
parameters is drawn per batch and applied to both views: flips are shared, crop offsets are
  fractions
of the image size and are scaled to each view's resolution. Padding replicates the border.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "flip", "crop", "flip_crop")


@dataclass
class AugmentParams:
    """Per-image parameters: ``flip`` (bool ``[N]``), offsets ``dx``/``dy`` (fractions, ``[N]``)."""

    flip: torch.Tensor
    dx: torch.Tensor
    dy: torch.Tensor


def sample_augmentation(
    n: int, kind: str, crop_fraction: float, generator: torch.Generator
) -> Optional[AugmentParams]:
    """Random parameters for ``n`` images, or ``None`` for ``kind="none"``."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"invalid augmentation {kind!r}: expected one of {AUGMENTATIONS}")
    if kind == "none":
        return None
    flip = torch.zeros(n, dtype=torch.bool)
    dx = torch.zeros(n)
    dy = torch.zeros(n)
    if "flip" in kind:
        flip = torch.rand(n, generator=generator) < 0.5
    if "crop" in kind:
        dx = (2 * torch.rand(n, generator=generator) - 1) * crop_fraction
        dy = (2 * torch.rand(n, generator=generator) - 1) * crop_fraction
    return AugmentParams(flip, dx, dy)


def apply_augmentation(pixels: torch.Tensor, params: Optional[AugmentParams]) -> torch.Tensor:
    """Apply ``params`` to ``pixels`` of shape ``[N, C, H, W]`` (any resolution)."""
    if params is None:
        return pixels
    n, _, h, w = pixels.shape
    out = torch.where(params.flip.view(n, 1, 1, 1).to(pixels.device), pixels.flip(-1), pixels)
    sx = torch.round(params.dx * w).long().tolist()
    sy = torch.round(params.dy * h).long().tolist()
    pad_x, pad_y = max(abs(s) for s in sx), max(abs(s) for s in sy)
    if pad_x == 0 and pad_y == 0:
        return out
    padded = F.pad(out, (pad_x, pad_x, pad_y, pad_y), mode="replicate")
    crops = [
        padded[i, :, pad_y + sy[i] : pad_y + sy[i] + h, pad_x + sx[i] : pad_x + sx[i] + w]
        for i in range(n)
    ]
    return torch.stack(crops)
