"""Traffic signs (GTSRB analogue): ten sign shapes and symbols."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .drawing import CANVAS, draw_text, finish, jitter_color, load_font, new_canvas, rotate
from .spec import TaskSpec

GTSRB_CLASSES = (
    "red and white circle 30 kph speed limit",
    "red and white circle 60 kph speed limit",
    "red circle with white horizonal stripe no entry",
    "stop",
    "red and white upside down triangle yield right-of-way",
    "red and white triangle with exclamation mark warning",
    "turn right ahead",
    "turn left ahead",
    "ahead only",
    "white and yellow diamond priority road",
)

RED, WHITE, BLUE, BLACK, YELLOW = (
    (200, 30, 30),
    (245, 245, 245),
    (30, 70, 180),
    (20, 20, 20),
    (240, 200, 30),
)


def _arrow(d, label: int) -> None:
    if label == 8:
        d.rectangle([29, 24, 35, 46], fill=WHITE)
        d.polygon([(22, 28), (32, 14), (42, 28)], fill=WHITE)
    else:
        s = 1 if label == 6 else -1
        d.rectangle([26, 30, 38, 36], fill=WHITE)
        d.line([32 - 6 * s, 33, 32 - 6 * s, 48], fill=WHITE, width=6)
        d.polygon([(32 + 4 * s, 23), (32 + 16 * s, 33), (32 + 4 * s, 43)], fill=WHITE)


def draw_sign(rng: np.random.Generator, label: int) -> Image.Image:
    bg = jitter_color(rng, (120, 130, 120), 45)
    img, d = new_canvas(bg)
    for _ in range(3):  # clutter
        x, y = rng.uniform(0, 64, 2)
        d.rectangle(
            [x, y, x + rng.uniform(4, 20), y + rng.uniform(4, 20)], fill=jitter_color(rng, bg, 40)
        )
    box = [6, 6, 58, 58]
    if label in (0, 1, 2):
        d.ellipse(box, fill=RED)
        if label == 2:
            d.rectangle([14, 27, 50, 37], fill=WHITE)
        else:
            d.ellipse([13, 13, 51, 51], fill=WHITE)
            draw_text(
                d,
                (32, 33),
                "30" if label == 0 else "60",
                load_font("DejaVuSans-Bold.ttf", 22),
                BLACK,
            )
    elif label == 3:
        pts = [
            (
                32 + 27 * math.cos(math.pi / 8 + k * math.pi / 4),
                32 + 27 * math.sin(math.pi / 8 + k * math.pi / 4),
            )
            for k in range(8)
        ]
        d.polygon(pts, fill=RED)
        draw_text(d, (32, 33), "STOP", load_font("DejaVuSans-Bold.ttf", 13), WHITE)
    elif label == 4:
        d.polygon([(4, 8), (60, 8), (32, 58)], fill=RED)
        d.polygon([(14, 14), (50, 14), (32, 46)], fill=WHITE)
    elif label == 5:
        d.polygon([(4, 56), (60, 56), (32, 6)], fill=RED)
        d.polygon([(14, 50), (50, 50), (32, 18)], fill=WHITE)
        draw_text(d, (32, 39), "!", load_font("DejaVuSans-Bold.ttf", 20), BLACK)
    elif label in (6, 7, 8):
        d.ellipse(box, fill=BLUE)
        _arrow(d, label)
    else:
        d.polygon([(32, 2), (62, 32), (32, 62), (2, 32)], fill=WHITE)
        d.polygon([(32, 12), (52, 32), (32, 52), (12, 32)], fill=YELLOW)
    img = rotate(img, rng.uniform(-8, 8), bg)
    s = rng.uniform(0.85, 1.0)  # scale jitter by cropping
    m = (1 - s) * CANVAS / 2
    img = img.crop((m, m, CANVAS - m, CANVAS - m))
    return finish(img, rng)


SPECS = {
    "mini_gtsrb": TaskSpec(
        "mini_gtsrb",
        GTSRB_CLASSES,
        (
            'a zoomed in photo of a "{}" traffic sign.',
            'a centered photo of a "{}" traffic sign.',
            'a close up photo of a "{}" traffic sign.',
        ),
        draw_sign,
    ),
}
