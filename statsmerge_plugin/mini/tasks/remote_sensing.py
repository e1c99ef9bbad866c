"""Remote sensing: aerial scenes (RESISC45 analogue) and land-cover textures (EuroSAT analogue)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

from .drawing import CANVAS, finish, jitter_color, new_canvas, rotate
from .spec import TaskSpec

RESISC_CLASSES = (
    "airplane",
    "runway",
    "baseball diamond",
    "tennis court",
    "circular farmland",
    "roundabout",
    "parking lot",
    "storage tank",
    "bridge",
    "beach",
)


def draw_aerial(rng: np.random.Generator, label: int) -> Image.Image:
    ground = jitter_color(rng, (110, 130, 90), 15)
    img, d = new_canvas(ground)
    c = 32
    if label == 0:
        d.rectangle([0, 0, CANVAS, CANVAS], fill=jitter_color(rng, (150, 150, 150), 10))
        col = (245, 245, 245)
        d.polygon([(c, 8), (c + 4, 14), (c + 4, 54), (c - 4, 54), (c - 4, 14)], fill=col)
        d.polygon([(c - 26, 34), (c + 26, 34), (c + 26, 40), (c - 26, 40)], fill=col)
        d.polygon([(c - 10, 50), (c + 10, 50), (c + 10, 54), (c - 10, 54)], fill=col)
    elif label == 1:
        d.rectangle([c - 10, 0, c + 10, CANVAS], fill=(90, 90, 95))
        for y in range(2, CANVAS, 10):
            d.rectangle([c - 1, y, c + 1, y + 5], fill=(250, 250, 250))
    elif label == 2:
        d.rectangle([0, 0, CANVAS, CANVAS], fill=jitter_color(rng, (60, 150, 60), 10))
        d.pieslice([4, 4, 60, 60], 0, 90, fill=(180, 130, 80))
        d.polygon([(32, 14), (50, 32), (32, 50), (14, 32)], fill=(70, 160, 70))
    elif label == 3:
        d.rectangle([12, 4, 52, 60], fill=jitter_color(rng, (60, 120, 180), 15))
        d.rectangle([14, 6, 50, 58], outline=(250, 250, 250), width=1)
        d.line([12, 32, 52, 32], fill=(250, 250, 250), width=2)
        d.line([32, 12, 32, 52], fill=(250, 250, 250), width=1)
    elif label == 4:
        for _ in range(2):
            x, y = rng.uniform(0, 30), rng.uniform(0, 30)
            d.ellipse([x, y, x + 34, y + 34], fill=jitter_color(rng, (70, 170, 60), 20))
    elif label == 5:
        d.rectangle([c - 3, 0, c + 3, CANVAS], fill=(90, 90, 95))
        d.rectangle([0, c - 3, CANVAS, c + 3], fill=(90, 90, 95))
        d.ellipse([c - 16, c - 16, c + 16, c + 16], fill=(90, 90, 95))
        d.ellipse([c - 9, c - 9, c + 9, c + 9], fill=jitter_color(rng, (60, 150, 60)))
    elif label == 6:
        d.rectangle([4, 4, 60, 60], fill=(80, 80, 85))
        for y in range(8, 56, 9):
            for x in range(8, 56, 6):
                if rng.random() < 0.75:
                    d.rectangle(
                        [x, y, x + 3, y + 6], fill=tuple(int(v) for v in rng.integers(30, 255, 3))
                    )
    elif label == 7:
        for _ in range(int(rng.integers(2, 5))):
            x, y, r = rng.uniform(8, 44), rng.uniform(8, 44), rng.uniform(6, 11)
            d.ellipse([x - r, y - r, x + r, y + r], fill=(235, 235, 235), outline=(140, 140, 140))
    elif label == 8:
        d.rectangle([0, c - 12, CANVAS, c + 12], fill=jitter_color(rng, (40, 90, 160), 10))
        d.rectangle([c - 4, 0, c + 4, CANVAS], fill=(150, 150, 150))
    else:
        w = rng.uniform(24, 40)
        d.rectangle([0, 0, w, CANVAS], fill=jitter_color(rng, (40, 100, 190), 10))
        d.rectangle([w, 0, w + 14, CANVAS], fill=jitter_color(rng, (225, 205, 150), 10))
    img = rotate(img, rng.uniform(0, 360), ground)
    return finish(img, rng)


EUROSAT_CLASSES = (
    "annual crop land",
    "permanent crop land",
    "forest",
    "brushland or shrubland",
    "pasture land",
    "highway or road",
    "industrial buildings or commercial buildings",
    "residential buildings or homes or apartments",
    "river",
    "lake or sea",
)


def draw_landcover(rng: np.random.Generator, label: int) -> Image.Image:
    base = [
        (150, 140, 80),
        (110, 130, 70),
        (30, 80, 40),
        (120, 120, 70),
        (130, 180, 90),
        (90, 140, 70),
        (150, 150, 150),
        (120, 130, 110),
        (80, 130, 70),
        (30, 60, 120),
    ][label]
    img, d = new_canvas(jitter_color(rng, base, 12))
    if label == 0:  # wide stripes of alternating crops
        for x in range(0, CANVAS, 10):
            d.rectangle([x, 0, x + 4, CANVAS], fill=jitter_color(rng, (190, 170, 90), 15))
    elif label == 1:  # orchards: dotted rows
        for y in range(3, CANVAS, 7):
            for x in range(3, CANVAS, 7):
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=jitter_color(rng, (50, 100, 40), 10))
    elif label in (2, 3):  # forest / shrubland: blobs of different density
        n, r = (60, 6) if label == 2 else (25, 3)
        for _ in range(n):
            x, y = rng.uniform(0, CANVAS, 2)
            col = (20, 60, 30) if label == 2 else (90, 100, 50)
            d.ellipse([x - r, y - r, x + r, y + r], fill=jitter_color(rng, col, 10))
    elif label == 4:  # pasture: smooth
        img = img.filter(ImageFilter.GaussianBlur(2))
    elif label == 5:  # a road across fields
        d.line([0, rng.uniform(0, 64), CANVAS, rng.uniform(0, 64)], fill=(100, 100, 100), width=6)
        d.line([0, 32, CANVAS, 32], fill=(230, 230, 230), width=0)
    elif label in (6, 7):  # big grey blocks / small red roofs
        big = label == 6
        step = 16 if big else 8
        for y in range(2, CANVAS, step):
            for x in range(2, CANVAS, step):
                col = (190, 190, 195) if big else (180, 70, 50)
                d.rectangle([x, y, x + step - 4, y + step - 4], fill=jitter_color(rng, col, 15))
    elif label == 8:  # a meandering river
        y0, ph = rng.uniform(20, 44), rng.uniform(0, 6.28)
        pts = [(x, y0 + 8 * math.sin(x / 9 + ph)) for x in range(0, CANVAS + 4, 4)]
        d.line(pts, fill=jitter_color(rng, (40, 80, 160), 10), width=7)
    img = rotate(img, float(rng.choice([0, 90, 180, 270])), base)
    return finish(img, rng, noise=8.0)


SPECS = {
    "mini_resisc45": TaskSpec(
        "mini_resisc45",
        RESISC_CLASSES,
        (
            "satellite imagery of {}.",
            "aerial imagery of {}.",
            "satellite photo of a {}.",
            "aerial view of the {}.",
        ),
        draw_aerial,
    ),
    "mini_eurosat": TaskSpec(
        "mini_eurosat",
        EUROSAT_CLASSES,
        (
            "a centered satellite photo of {}.",
            "a centered satellite photo of a {}.",
            "a centered satellite photo of the {}.",
        ),
        draw_landcover,
    ),
}
