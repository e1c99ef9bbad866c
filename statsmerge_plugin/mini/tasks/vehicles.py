"""Vehicles (Stanford Cars analogue): ten car body shapes."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .drawing import CANVAS, finish, jitter_color, new_canvas
from .spec import TaskSpec

CAR_CLASSES = (
    "sedan",
    "hatchback",
    "station wagon",
    "suv",
    "pickup truck",
    "van",
    "bus",
    "limousine",
    "sports car",
    "convertible",
)

# (body length, body height, cabin start, cabin end, cabin height, rear slope) in canvas px
_CAR_SHAPES = {
    0: (40, 8, 0.25, 0.75, 8, 0.0),
    1: (32, 8, 0.2, 0.95, 8, 0.5),
    2: (42, 8, 0.2, 0.98, 8, 0.0),
    3: (40, 12, 0.15, 0.95, 10, 0.0),
    4: (44, 9, 0.05, 0.4, 9, 0.0),
    5: (44, 18, 0.0, 1.0, 0, 0.0),
    6: (56, 20, 0.0, 1.0, 0, 0.0),
    7: (56, 7, 0.15, 0.85, 7, 0.0),
    8: (40, 6, 0.35, 0.65, 5, 0.8),
    9: (40, 8, 0.35, 0.4, 6, 0.0),
}


def draw_car(rng: np.random.Generator, label: int) -> Image.Image:
    img, d = new_canvas(jitter_color(rng, (170, 175, 180), 30))
    d.rectangle([0, 52, CANVAS, CANVAS], fill=jitter_color(rng, (70, 70, 75), 10))
    length, height, c0, c1, ch, slope = _CAR_SHAPES[label]
    length *= rng.uniform(0.93, 1.07)
    height, ch = 1.5 * height, 1.5 * ch
    x0 = (CANVAS - length) / 2 + rng.uniform(-3, 3)
    y1 = 50
    y0 = y1 - height
    color = tuple(int(c) for c in rng.integers(20, 235, 3))
    d.rectangle([x0, y0, x0 + length, y1], fill=color)
    if ch > 0:
        a, b = x0 + c0 * length, x0 + c1 * length
        back = b - slope * (b - a) * 0.6
        if label == 9:  # convertible: windscreen only
            d.line([a, y0, a + 3, y0 - ch], fill=(40, 40, 40), width=2)
        else:
            d.polygon([(a, y0), (a + 4, y0 - ch), (back, y0 - ch), (b, y0)], fill=color)
            d.polygon(
                [(a + 3, y0 - 1), (a + 5, y0 - ch + 2), (back - 2, y0 - ch + 2), (b - 3, y0 - 1)],
                fill=(150, 200, 230),
            )
    else:  # van / bus: window row
        n = 3 if label == 5 else 6
        for i in range(n):
            wx = x0 + 3 + i * (length - 6) / n
            d.rectangle([wx, y0 + 4, wx + (length - 6) / n - 2, y0 + 12], fill=(150, 200, 230))
    r = 5.5 if label != 6 else 6.5
    for wx in (x0 + 0.2 * length, x0 + 0.8 * length):
        d.ellipse([wx - r, y1 - r + 1, wx + r, y1 + r + 1], fill=(20, 20, 20))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return finish(img, rng)


SPECS = {
    "mini_stanford_cars": TaskSpec(
        "mini_stanford_cars",
        CAR_CLASSES,
        (
            "a photo of a {}.",
            "a photo of the {}.",
            "a photo of my {}.",
            "i love my {}!",
            "a photo of my new {}.",
            "a photo of my old {}.",
        ),
        draw_car,
    ),
}
