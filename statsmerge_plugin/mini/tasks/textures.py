"""Textures (DTD analogue): ten procedural texture patterns."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

from .drawing import CANVAS, finish, new_canvas, rotate
from .spec import TaskSpec

DTD_CLASSES = (
    "banded",
    "lined",
    "chequered",
    "grid",
    "dotted",
    "polka-dotted",
    "zigzagged",
    "crosshatched",
    "blotchy",
    "honeycombed",
)


def draw_texture(rng: np.random.Generator, label: int) -> Image.Image:
    bg = tuple(int(c) for c in rng.integers(0, 256, 3))
    fg = tuple(int((c + rng.integers(90, 166)) % 256) for c in bg)
    img, d = new_canvas(bg)
    p = int(rng.integers(10, 14))
    if label == 0:
        for y in range(0, CANVAS * 2, 2 * p):
            d.rectangle([-32, y - 32, 96, y - 32 + p], fill=fg)
    elif label == 1:
        for y in range(0, CANVAS * 2, p // 2 + 3):
            d.line([-32, y - 32, 96, y - 32], fill=fg, width=2)
    elif label in (2, 3):
        for y in range(-32, 96, p):
            for x in range(-32, 96, p):
                if label == 2 and ((x + y) // p) % 2 == 0:
                    d.rectangle([x, y, x + p - 1, y + p - 1], fill=fg)
        if label == 3:
            for v in range(-32, 96, p):
                d.line([v, -32, v, 96], fill=fg, width=2)
                d.line([-32, v, 96, v], fill=fg, width=2)
    elif label in (4, 5):
        r = 2.5 if label == 4 else 4.5
        for y in range(-32, 96, p):
            for x in range(-32, 96, p):
                d.ellipse([x - r, y - r, x + r, y + r], fill=fg)
    elif label == 6:
        for y in range(-32, 96, p + 2):
            pts = [(x, y + (0.7 * p if (x // 8) % 2 else 0)) for x in range(-32, 104, 8)]
            d.line(pts, fill=fg, width=2)
    elif label == 7:
        for v in range(-64, 128, p):
            d.line([v, -32, v + 96, 96], fill=fg, width=2)
            d.line([v + 96, -32, v, 96], fill=fg, width=2)
    elif label == 8:
        for _ in range(12):
            x, y, r = rng.uniform(-8, 72), rng.uniform(-8, 72), rng.uniform(5, 12)
            d.ellipse([x - r, y - r, x + r, y + r], fill=fg)
        img = img.filter(ImageFilter.GaussianBlur(2))
    else:
        r = p * 0.8
        for j, y in enumerate(np.arange(-32, 96, r * 1.5)):
            for x in np.arange(-32 + (j % 2) * r * 0.866, 96, r * 1.732):
                pts = [
                    (
                        x + r * math.cos(math.pi / 6 + k * math.pi / 3),
                        y + r * math.sin(math.pi / 6 + k * math.pi / 3),
                    )
                    for k in range(6)
                ]
                d.polygon(pts, outline=fg, width=2)
    img = rotate(img, rng.uniform(0, 180) if label not in (2, 3, 9) else rng.uniform(-20, 20), bg)
    return finish(img, rng)


SPECS = {
    "mini_dtd": TaskSpec(
        "mini_dtd",
        DTD_CLASSES,
        (
            "a photo of a {} texture.",
            "a photo of a {} pattern.",
            "a photo of the {} texture.",
            "a photo of the {} pattern.",
        ),
        draw_texture,
    ),
}
