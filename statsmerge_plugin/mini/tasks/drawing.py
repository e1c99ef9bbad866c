"""The drawing helpers every task family shares: a 64x64 canvas, colour jitter, rotation, fonts,
centred text, and the finish (downsample to 32x32, brightness jitter, pixel noise)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 32
CANVAS = 64


def new_canvas(color) -> Tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (CANVAS, CANVAS), tuple(int(c) for c in color))
    return img, ImageDraw.Draw(img)


def jitter_color(rng: np.random.Generator, color, amount: float = 25.0) -> Tuple[int, int, int]:
    c = np.asarray(color, dtype=float) + rng.normal(0, amount, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def finish(img: Image.Image, rng: np.random.Generator, noise: float = 6.0) -> Image.Image:
    """Downsample to 32x32, jitter brightness and add mild pixel noise."""
    small = img.resize((SIZE, SIZE), Image.LANCZOS)
    arr = np.asarray(small, dtype=np.float32)
    arr = arr * rng.uniform(0.85, 1.15) + rng.normal(0, noise, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def rotate(img: Image.Image, angle: float, fill) -> Image.Image:
    return img.rotate(angle, resample=Image.BILINEAR, fillcolor=tuple(int(c) for c in fill))


@functools.lru_cache(maxsize=None)
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    return ImageFont.truetype(str(path), size)


FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
)


def draw_text(draw, xy, s: str, font, fill) -> None:
    draw.text(xy, s, font=font, fill=fill, anchor="mm")
