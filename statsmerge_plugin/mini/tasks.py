"""Eight procedural image-classification tasks analogous to FusionBench's TA8.

Every task has ten classes, FusionBench-style prompt templates and a generator that draws one
32x32 RGB image of a class from a ``numpy.random.Generator``. Classes are ordered so that classes
``2k`` and ``2k+1`` form a visually close pair (the pairs the pretraining captions may blur, see
``build.py``). Nothing here imports torch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SIZE = 32
CANVAS = 64

TASK_NAMES: Tuple[str, ...] = (
    "mini_sun397",
    "mini_stanford_cars",
    "mini_resisc45",
    "mini_eurosat",
    "mini_svhn",
    "mini_gtsrb",
    "mini_mnist",
    "mini_dtd",
)


@dataclass(frozen=True)
class TaskSpec:
    """Class names, prompt templates (``str.format`` patterns) and image generator of a task."""

    name: str
    classnames: Tuple[str, ...]
    template_patterns: Tuple[str, ...]
    draw: Callable[[np.random.Generator, int], Image.Image]

    @property
    def templates(self) -> List[Callable[[str], str]]:
        """Templates as callables, the form FusionBench's ``CLIPTemplateFactory`` expects."""
        return [p.format for p in self.template_patterns]

    def captions(self, label: int) -> List[str]:
        return [p.format(self.classnames[label]) for p in self.template_patterns]


# --------------------------------------------------------------------------------------------
# drawing helpers


def _canvas(color) -> Tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (CANVAS, CANVAS), tuple(int(c) for c in color))
    return img, ImageDraw.Draw(img)


def _jit(rng: np.random.Generator, color, amount: float = 25.0) -> Tuple[int, int, int]:
    c = np.asarray(color, dtype=float) + rng.normal(0, amount, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _finish(img: Image.Image, rng: np.random.Generator, noise: float = 6.0) -> Image.Image:
    """Downsample to 32x32, jitter brightness and add mild pixel noise."""
    small = img.resize((SIZE, SIZE), Image.LANCZOS)
    arr = np.asarray(small, dtype=np.float32)
    arr = arr * rng.uniform(0.85, 1.15) + rng.normal(0, noise, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _rotate(img: Image.Image, angle: float, fill) -> Image.Image:
    return img.rotate(angle, resample=Image.BILINEAR, fillcolor=tuple(int(c) for c in fill))


@functools.lru_cache(maxsize=None)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
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


def _text(draw, xy, s: str, font, fill) -> None:
    draw.text(xy, s, font=font, fill=fill, anchor="mm")


# --------------------------------------------------------------------------------------------
# 1. scenes (SUN397)

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
    sky = _jit(
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
    img, d = _canvas(sky)
    if label == 0:  # beach: sea band then sand
        d.rectangle([0, h, CANVAS, h + 10], fill=_jit(rng, (40, 100, 200)))
        d.rectangle([0, h + 10, CANVAS, CANVAS], fill=_jit(rng, (230, 210, 150)))
    elif label == 1:  # lake: green shore around an ellipse of water
        d.rectangle([0, h, CANVAS, CANVAS], fill=_jit(rng, (70, 140, 60)))
        x = rng.uniform(8, 24)
        d.ellipse([x, h + 6, x + 36, h + 24], fill=_jit(rng, (50, 110, 190)))
    elif label == 2:  # desert: dunes
        d.rectangle([0, h, CANVAS, CANVAS], fill=_jit(rng, (220, 170, 100)))
        for _ in range(3):
            x = rng.uniform(-10, 60)
            d.ellipse([x, h - 8, x + 30, h + 10], fill=_jit(rng, (210, 160, 90)))
    elif label == 3:  # wheat field: yellow rows
        d.rectangle([0, h, CANVAS, CANVAS], fill=_jit(rng, (220, 190, 80)))
        for y in range(h + 3, CANVAS, 5):
            d.line([0, y, CANVAS, y], fill=_jit(rng, (170, 140, 50)), width=1)
    elif label in (4, 5):  # forest / jungle: trees
        d.rectangle([0, h, CANVAS, CANVAS], fill=_jit(rng, (60, 110, 50)))
        n = 6 if label == 4 else 14
        for _ in range(n):
            x, s = rng.uniform(0, CANVAS), rng.uniform(8, 16)
            g = (30, 110, 40) if label == 4 else (20, 150, 60)
            if label == 4:
                d.polygon(
                    [(x, h - 2 * s), (x - s / 2, h + 4), (x + s / 2, h + 4)], fill=_jit(rng, g)
                )
            else:
                y = rng.uniform(h - 20, h + 10)
                d.ellipse([x - s / 2, y - s / 2, x + s / 2, y + s / 2], fill=_jit(rng, g))
        if label == 4:
            d.polygon([(28, CANVAS), (36, CANVAS), (33, h + 4), (31, h + 4)], fill=(150, 120, 80))
    elif label in (6, 7):  # mountain / volcano: a cone
        d.rectangle([0, h, CANVAS, CANVAS], fill=_jit(rng, (90, 100, 80)))
        x = rng.uniform(20, 44)
        top = h - rng.uniform(16, 22)
        col = (120, 120, 130) if label == 6 else (90, 60, 40)
        d.polygon([(x - 26, h + 2), (x, top), (x + 26, h + 2)], fill=_jit(rng, col, 12))
        cap = (250, 250, 250) if label == 6 else (240, 70, 20)
        d.polygon([(x - 6, top + 7), (x, top), (x + 6, top + 7)], fill=cap)
        if label == 7:
            d.ellipse([x - 6, top - 12, x + 8, top - 2], fill=(80, 80, 80))
    else:  # skyscraper / harbor: buildings, with water for the harbor
        base = h if label == 8 else h - 4
        for _ in range(5 if label == 8 else 3):
            x, w = rng.uniform(0, 56), rng.uniform(6, 12)
            top = base - (rng.uniform(15, 30) if label == 8 else rng.uniform(5, 10))
            d.rectangle([x, top, x + w, base], fill=_jit(rng, (110, 110, 120)))
            for y in range(int(top) + 2, base - 1, 4):
                d.line([x + 2, y, x + w - 2, y], fill=(230, 230, 150))
        ground = (100, 100, 100) if label == 8 else (40, 90, 170)
        d.rectangle([0, base, CANVAS, CANVAS], fill=_jit(rng, ground))
        if label == 9:
            x = rng.uniform(5, 40)
            d.polygon(
                [(x, base + 8), (x + 18, base + 8), (x + 14, base + 14), (x + 4, base + 14)],
                fill=(240, 240, 240),
            )
    return _finish(img, rng)


# --------------------------------------------------------------------------------------------
# 2. vehicles (Stanford Cars)

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
    img, d = _canvas(_jit(rng, (170, 175, 180), 30))
    d.rectangle([0, 52, CANVAS, CANVAS], fill=_jit(rng, (70, 70, 75), 10))
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
    return _finish(img, rng)


# --------------------------------------------------------------------------------------------
# 3. aerial scenes (RESISC45)

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
    ground = _jit(rng, (110, 130, 90), 15)
    img, d = _canvas(ground)
    c = 32
    if label == 0:
        d.rectangle([0, 0, CANVAS, CANVAS], fill=_jit(rng, (150, 150, 150), 10))
        col = (245, 245, 245)
        d.polygon([(c, 8), (c + 4, 14), (c + 4, 54), (c - 4, 54), (c - 4, 14)], fill=col)
        d.polygon([(c - 26, 34), (c + 26, 34), (c + 26, 40), (c - 26, 40)], fill=col)
        d.polygon([(c - 10, 50), (c + 10, 50), (c + 10, 54), (c - 10, 54)], fill=col)
    elif label == 1:
        d.rectangle([c - 10, 0, c + 10, CANVAS], fill=(90, 90, 95))
        for y in range(2, CANVAS, 10):
            d.rectangle([c - 1, y, c + 1, y + 5], fill=(250, 250, 250))
    elif label == 2:
        d.rectangle([0, 0, CANVAS, CANVAS], fill=_jit(rng, (60, 150, 60), 10))
        d.pieslice([4, 4, 60, 60], 0, 90, fill=(180, 130, 80))
        d.polygon([(32, 14), (50, 32), (32, 50), (14, 32)], fill=(70, 160, 70))
    elif label == 3:
        d.rectangle([12, 4, 52, 60], fill=_jit(rng, (60, 120, 180), 15))
        d.rectangle([14, 6, 50, 58], outline=(250, 250, 250), width=1)
        d.line([12, 32, 52, 32], fill=(250, 250, 250), width=2)
        d.line([32, 12, 32, 52], fill=(250, 250, 250), width=1)
    elif label == 4:
        for _ in range(2):
            x, y = rng.uniform(0, 30), rng.uniform(0, 30)
            d.ellipse([x, y, x + 34, y + 34], fill=_jit(rng, (70, 170, 60), 20))
    elif label == 5:
        d.rectangle([c - 3, 0, c + 3, CANVAS], fill=(90, 90, 95))
        d.rectangle([0, c - 3, CANVAS, c + 3], fill=(90, 90, 95))
        d.ellipse([c - 16, c - 16, c + 16, c + 16], fill=(90, 90, 95))
        d.ellipse([c - 9, c - 9, c + 9, c + 9], fill=_jit(rng, (60, 150, 60)))
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
        d.rectangle([0, c - 12, CANVAS, c + 12], fill=_jit(rng, (40, 90, 160), 10))
        d.rectangle([c - 4, 0, c + 4, CANVAS], fill=(150, 150, 150))
    else:
        w = rng.uniform(24, 40)
        d.rectangle([0, 0, w, CANVAS], fill=_jit(rng, (40, 100, 190), 10))
        d.rectangle([w, 0, w + 14, CANVAS], fill=_jit(rng, (225, 205, 150), 10))
    img = _rotate(img, rng.uniform(0, 360), ground)
    return _finish(img, rng)


# --------------------------------------------------------------------------------------------
# 4. land-cover textures (EuroSAT)

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
    img, d = _canvas(_jit(rng, base, 12))
    if label == 0:  # wide stripes of alternating crops
        for x in range(0, CANVAS, 10):
            d.rectangle([x, 0, x + 4, CANVAS], fill=_jit(rng, (190, 170, 90), 15))
    elif label == 1:  # orchards: dotted rows
        for y in range(3, CANVAS, 7):
            for x in range(3, CANVAS, 7):
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=_jit(rng, (50, 100, 40), 10))
    elif label in (2, 3):  # forest / shrubland: blobs of different density
        n, r = (60, 6) if label == 2 else (25, 3)
        for _ in range(n):
            x, y = rng.uniform(0, CANVAS, 2)
            col = (20, 60, 30) if label == 2 else (90, 100, 50)
            d.ellipse([x - r, y - r, x + r, y + r], fill=_jit(rng, col, 10))
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
                d.rectangle([x, y, x + step - 4, y + step - 4], fill=_jit(rng, col, 15))
    elif label == 8:  # a meandering river
        y0, ph = rng.uniform(20, 44), rng.uniform(0, 6.28)
        pts = [(x, y0 + 8 * math.sin(x / 9 + ph)) for x in range(0, CANVAS + 4, 4)]
        d.line(pts, fill=_jit(rng, (40, 80, 160), 10), width=7)
    img = _rotate(img, float(rng.choice([0, 90, 180, 270])), base)
    return _finish(img, rng, noise=8.0)


# --------------------------------------------------------------------------------------------
# 5. house-number digits (SVHN) and 7. handwritten digits (MNIST)

DIGIT_CLASSES = tuple(str(i) for i in range(10))


DIGIT_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono-Bold.ttf", "cmss10.ttf")


def draw_house_number(rng: np.random.Generator, label: int) -> Image.Image:
    """A house-number digit: random colours of contrasting luminance, sometimes a partial
    neighbouring digit at an edge (as in SVHN's cropped digits)."""
    dark = rng.random() < 0.5
    bg = rng.integers(150, 256, 3) if dark else rng.integers(0, 100, 3)
    fg = rng.integers(0, 70, 3) if dark else rng.integers(180, 256, 3)
    bg, fg = tuple(int(c) for c in bg), tuple(int(c) for c in fg)
    img, d = _canvas(bg)
    font = _font(DIGIT_FONTS[int(rng.integers(len(DIGIT_FONTS)))], int(rng.uniform(40, 48)))
    x, y = 32 + rng.uniform(-2, 2), 32 + rng.uniform(-2, 2)
    for dx in (-40, 40):  # partial neighbouring digits at the edges
        if rng.random() < 0.3:
            _text(d, (x + dx, y), str(int(rng.integers(10))), font, fg)
    _text(d, (x, y), str(label), font, fg)
    img = _rotate(img, rng.uniform(-5, 5), bg)
    return _finish(img, rng)


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
    return _finish(img.convert("RGB"), rng, noise=4.0)


# --------------------------------------------------------------------------------------------
# 6. traffic signs (GTSRB)

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
    bg = _jit(rng, (120, 130, 120), 45)
    img, d = _canvas(bg)
    for _ in range(3):  # clutter
        x, y = rng.uniform(0, 64, 2)
        d.rectangle([x, y, x + rng.uniform(4, 20), y + rng.uniform(4, 20)], fill=_jit(rng, bg, 40))
    box = [6, 6, 58, 58]
    if label in (0, 1, 2):
        d.ellipse(box, fill=RED)
        if label == 2:
            d.rectangle([14, 27, 50, 37], fill=WHITE)
        else:
            d.ellipse([13, 13, 51, 51], fill=WHITE)
            _text(
                d, (32, 33), "30" if label == 0 else "60", _font("DejaVuSans-Bold.ttf", 22), BLACK
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
        _text(d, (32, 33), "STOP", _font("DejaVuSans-Bold.ttf", 13), WHITE)
    elif label == 4:
        d.polygon([(4, 8), (60, 8), (32, 58)], fill=RED)
        d.polygon([(14, 14), (50, 14), (32, 46)], fill=WHITE)
    elif label == 5:
        d.polygon([(4, 56), (60, 56), (32, 6)], fill=RED)
        d.polygon([(14, 50), (50, 50), (32, 18)], fill=WHITE)
        _text(d, (32, 39), "!", _font("DejaVuSans-Bold.ttf", 20), BLACK)
    elif label in (6, 7, 8):
        d.ellipse(box, fill=BLUE)
        _arrow(d, label)
    else:
        d.polygon([(32, 2), (62, 32), (32, 62), (2, 32)], fill=WHITE)
        d.polygon([(32, 12), (52, 32), (32, 52), (12, 32)], fill=YELLOW)
    img = _rotate(img, rng.uniform(-8, 8), bg)
    s = rng.uniform(0.85, 1.0)  # scale jitter by cropping
    m = (1 - s) * CANVAS / 2
    img = img.crop((m, m, CANVAS - m, CANVAS - m))
    return _finish(img, rng)


# --------------------------------------------------------------------------------------------
# 8. textures (DTD)

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
    img, d = _canvas(bg)
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
    img = _rotate(img, rng.uniform(0, 180) if label not in (2, 3, 9) else rng.uniform(-20, 20), bg)
    return _finish(img, rng)


# --------------------------------------------------------------------------------------------
# registry of the eight tasks

_PATTERNS = {
    "mini_sun397": ("a photo of a {}.", "a photo of the {}."),
    "mini_stanford_cars": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ),
    "mini_resisc45": (
        "satellite imagery of {}.",
        "aerial imagery of {}.",
        "satellite photo of a {}.",
        "aerial view of the {}.",
    ),
    "mini_eurosat": (
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    ),
    "mini_svhn": ('a photo of the number: "{}".',),
    "mini_gtsrb": (
        'a zoomed in photo of a "{}" traffic sign.',
        'a centered photo of a "{}" traffic sign.',
        'a close up photo of a "{}" traffic sign.',
    ),
    "mini_mnist": ('a photo of the number: "{}".',),
    "mini_dtd": (
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a photo of the {} texture.",
        "a photo of the {} pattern.",
    ),
}

_CLASSES = {
    "mini_sun397": SUN_CLASSES,
    "mini_stanford_cars": CAR_CLASSES,
    "mini_resisc45": RESISC_CLASSES,
    "mini_eurosat": EUROSAT_CLASSES,
    "mini_svhn": DIGIT_CLASSES,
    "mini_gtsrb": GTSRB_CLASSES,
    "mini_mnist": DIGIT_CLASSES,
    "mini_dtd": DTD_CLASSES,
}

_DRAW = {
    "mini_sun397": draw_scene,
    "mini_stanford_cars": draw_car,
    "mini_resisc45": draw_aerial,
    "mini_eurosat": draw_landcover,
    "mini_svhn": draw_house_number,
    "mini_gtsrb": draw_sign,
    "mini_mnist": draw_handwritten,
    "mini_dtd": draw_texture,
}

TASKS: Dict[str, TaskSpec] = {
    name: TaskSpec(name, _CLASSES[name], _PATTERNS[name], _DRAW[name]) for name in TASK_NAMES
}


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of a mini task, with a helpful error for unknown names."""
    if name not in TASKS:
        raise KeyError(f"unknown mini task {name!r}; known: {', '.join(TASK_NAMES)}")
    return TASKS[name]


def draw(task: str, rng: np.random.Generator, label: int, part: str) -> Image.Image:
    """Draw one image; ``part`` picks disjoint source pools where a task has real sources."""
    if task == "mini_mnist":
        return draw_handwritten(rng, label, part)
    return get_task(task).draw(rng, label)


def caption_corpus() -> List[str]:
    """Every caption of every task (class names x templates), in a fixed order."""
    return [c for spec in TASKS.values() for lab in range(10) for c in spec.captions(lab)]
