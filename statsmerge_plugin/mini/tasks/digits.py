"""Digits: house numbers in varied fonts (SVHN analogue) and handwritten digits from scikit-learn's
8x8 digits (MNIST analogue; disjoint source images per split)."""

from __future__ import annotations

import functools
from typing import Tuple

import numpy as np
from PIL import Image

from .drawing import CANVAS, draw_text, finish, load_font, new_canvas, rotate
from .spec import TaskSpec

DIGIT_CLASSES = tuple(str(i) for i in range(10))


DIGIT_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono-Bold.ttf", "cmss10.ttf")


def draw_house_number(rng: np.random.Generator, label: int) -> Image.Image:
    """A house-number digit: random colours of contrasting luminance, sometimes a partial
    neighbouring digit at an edge (as in SVHN's cropped digits)."""
    dark = rng.random() < 0.5
    bg = rng.integers(150, 256, 3) if dark else rng.integers(0, 100, 3)
    fg = rng.integers(0, 70, 3) if dark else rng.integers(180, 256, 3)
    bg, fg = tuple(int(c) for c in bg), tuple(int(c) for c in fg)
    img, d = new_canvas(bg)
    font = load_font(DIGIT_FONTS[int(rng.integers(len(DIGIT_FONTS)))], int(rng.uniform(40, 48)))
    x, y = 32 + rng.uniform(-2, 2), 32 + rng.uniform(-2, 2)
    for dx in (-40, 40):  # partial neighbouring digits at the edges
        if rng.random() < 0.3:
            draw_text(d, (x + dx, y), str(int(rng.integers(10))), font, fg)
    draw_text(d, (x, y), str(label), font, fg)
    img = rotate(img, rng.uniform(-5, 5), bg)
    return finish(img, rng)


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def digit_source_indices(label: int, part: str) -> np.ndarray:
    """Disjoint source images per split family: ``"pretrain"``, ``"train"``, ``"val"``, ``"test"``."""
    _, targets = _sklearn_digits()
    idx = np.flatnonzero(targets == label)
    idx = np.random.default_rng(1234 + label).permutation(idx)
    n = len(idx)
    cuts = {"pretrain": (0, 0.35), "train": (0.35, 0.7), "val": (0.7, 0.78), "test": (0.78, 1.0)}
    a, b = cuts[part]
    return idx[int(a * n) : int(b * n)]


def draw_handwritten(rng: np.random.Generator, label: int, part: str = "train") -> Image.Image:
    images, _ = _sklearn_digits()
    src = images[int(rng.choice(digit_source_indices(label, part)))]
    glyph = Image.fromarray((src * 255).astype(np.uint8)).resize((48, 48), Image.BICUBIC)
    glyph = glyph.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
    img = Image.new("L", (CANVAS, CANVAS), 0)
    img.paste(glyph, (8 + int(rng.integers(-3, 4)), 8 + int(rng.integers(-3, 4))))
    return finish(img.convert("RGB"), rng, noise=4.0)


SPECS = {
    "mini_svhn": TaskSpec(
        "mini_svhn", DIGIT_CLASSES, ('a photo of the number: "{}".',), draw_house_number
    ),
    "mini_mnist": TaskSpec(
        "mini_mnist", DIGIT_CLASSES, ('a photo of the number: "{}".',), draw_handwritten
    ),
}
