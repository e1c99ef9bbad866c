"""Scenes (SUN397 analogue): ten outdoor scene layouts (beach, lake, ... harbor)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .drawing import CANVAS, finish, jitter_color, new_canvas
from .spec import TaskSpec

SUN_CLASSES = (
    "beach",
    "lake",
    "desert sand",
    "wheat field",
    "forest path",
    "jungle",
    "mountain snowy",
    "volcano",
    "skyscraper",
    "harbor",
)


def draw_scene(rng: np.random.Generator, label: int) -> Image.Image:
    h = int(rng.uniform(22, 34))
    sky = jitter_color(
        rng,
        [
            (110, 170, 235),
            (120, 180, 230),
            (235, 190, 120),
            (140, 190, 240),
            (150, 200, 240),
            (120, 160, 150),
            (160, 180, 210),
            (70, 50, 60),
            (150, 170, 200),
            (130, 180, 230),
        ][label],
    )
    img, d = new_canvas(sky)
    if label == 0:  # beach: sea band then sand
        d.rectangle([0, h, CANVAS, h + 10], fill=jitter_color(rng, (40, 100, 200)))
        d.rectangle([0, h + 10, CANVAS, CANVAS], fill=jitter_color(rng, (230, 210, 150)))
    elif label == 1:  # lake: green shore around an ellipse of water
        d.rectangle([0, h, CANVAS, CANVAS], fill=jitter_color(rng, (70, 140, 60)))
        x = rng.uniform(8, 24)
        d.ellipse([x, h + 6, x + 36, h + 24], fill=jitter_color(rng, (50, 110, 190)))
    elif label == 2:  # desert: dunes
        d.rectangle([0, h, CANVAS, CANVAS], fill=jitter_color(rng, (220, 170, 100)))
        for _ in range(3):
            x = rng.uniform(-10, 60)
            d.ellipse([x, h - 8, x + 30, h + 10], fill=jitter_color(rng, (210, 160, 90)))
    elif label == 3:  # wheat field: yellow rows
        d.rectangle([0, h, CANVAS, CANVAS], fill=jitter_color(rng, (220, 190, 80)))
        for y in range(h + 3, CANVAS, 5):
            d.line([0, y, CANVAS, y], fill=jitter_color(rng, (170, 140, 50)), width=1)
    elif label in (4, 5):  # forest / jungle: trees
        d.rectangle([0, h, CANVAS, CANVAS], fill=jitter_color(rng, (60, 110, 50)))
        n = 6 if label == 4 else 14
        for _ in range(n):
            x, s = rng.uniform(0, CANVAS), rng.uniform(8, 16)
            g = (30, 110, 40) if label == 4 else (20, 150, 60)
            if label == 4:
                d.polygon(
                    [(x, h - 2 * s), (x - s / 2, h + 4), (x + s / 2, h + 4)],
                    fill=jitter_color(rng, g),
                )
            else:
                y = rng.uniform(h - 20, h + 10)
                d.ellipse([x - s / 2, y - s / 2, x + s / 2, y + s / 2], fill=jitter_color(rng, g))
        if label == 4:
            d.polygon([(28, CANVAS), (36, CANVAS), (33, h + 4), (31, h + 4)], fill=(150, 120, 80))
    elif label in (6, 7):  # mountain / volcano: a cone
        d.rectangle([0, h, CANVAS, CANVAS], fill=jitter_color(rng, (90, 100, 80)))
        x = rng.uniform(20, 44)
        top = h - rng.uniform(16, 22)
        col = (120, 120, 130) if label == 6 else (90, 60, 40)
        d.polygon([(x - 26, h + 2), (x, top), (x + 26, h + 2)], fill=jitter_color(rng, col, 12))
        cap = (250, 250, 250) if label == 6 else (240, 70, 20)
        d.polygon([(x - 6, top + 7), (x, top), (x + 6, top + 7)], fill=cap)
        if label == 7:
            d.ellipse([x - 6, top - 12, x + 8, top - 2], fill=(80, 80, 80))
    else:  # skyscraper / harbor: buildings, with water for the harbor
        base = h if label == 8 else h - 4
        for _ in range(5 if label == 8 else 3):
            x, w = rng.uniform(0, 56), rng.uniform(6, 12)
            top = base - (rng.uniform(15, 30) if label == 8 else rng.uniform(5, 10))
            d.rectangle([x, top, x + w, base], fill=jitter_color(rng, (110, 110, 120)))
            for y in range(int(top) + 2, base - 1, 4):
                d.line([x + 2, y, x + w - 2, y], fill=(230, 230, 150))
        ground = (100, 100, 100) if label == 8 else (40, 90, 170)
        d.rectangle([0, base, CANVAS, CANVAS], fill=jitter_color(rng, ground))
        if label == 9:
            x = rng.uniform(5, 40)
            d.polygon(
                [(x, base + 8), (x + 18, base + 8), (x + 14, base + 14), (x + 4, base + 14)],
                fill=(240, 240, 240),
            )
    return finish(img, rng)


SPECS = {
    "mini_sun397": TaskSpec(
        "mini_sun397",
        SUN_CLASSES,
        (
            "a photo of a {}.",
            "a photo of the {}.",
        ),
        draw_scene,
    ),
}
