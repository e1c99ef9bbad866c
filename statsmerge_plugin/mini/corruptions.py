R"""The seven image corruptions of FusionBench's robustness benchmark, and corrupted mini test splits.

FusionBench evaluates merged CLIP models on test sets under seven corruptions
(``fusion_bench_config/clip-vit-base-patch32_robustness_corrupted.yaml``; the Hugging Face splits
``tanganke/{stanford_cars,eurosat,resisc45,gtsrb}:<corruption>``), generated with
``fusion_bench/dataset/image_corruption/make_corruption.py``: Hendrycks & Dietterich's CIFAR-10-C code
("Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019), whose
parameters are made for 32x32 images, which is exactly the size of the mini benchmark's images.

This module re-implements those seven functions with the same parameter tables (severity 1..5) on
numpy, scipy and Pillow only (FusionBench's module needs ImageMagick/Wand, OpenCV and scikit-image),
as pure functions of an image and a ``numpy.random.Generator``:

=================== =======================================================================
name                what it does (FusionBench's parameters for severity 1..5)
=================== =======================================================================
motion_blur         ImageMagick's motion blur (radius, sigma) = (6,1) (6,1.5) (6,2) (8,2) (9,2.5),
                    at a random angle in [-45, 45] degrees
impulse_noise       salt-and-pepper on a fraction 0.01 .. 0.07 of the values
gaussian_noise      additive N(0, c^2) in [0, 1] units, c = 0.04 .. 0.10
pixelate            box-downsample to size * (0.95 .. 0.65), box-upsample back
spatter             water (severity 1-3) or mud (4-5) splashes
contrast            (x - mean) * c + mean per channel, c = 0.75 .. 0.15
jpeg_compression    JPEG at quality 80 .. 40
=================== =======================================================================

Differences from FusionBench's module, on purpose: OpenCV's Canny / distance transform / histogram
equalisation / ``filter2D`` in ``spatter`` are ported with scipy (exact Euclidean distance instead of
OpenCV's 5x5 approximation); ImageMagick's motion blur is computed directly from its definition
(one-sided Gaussian kernel of width ``2 * radius + 1`` along the angle, edge pixels repeated);
results are truncated to ``uint8`` as CIFAR-10-C does; every random draw comes from the generator
passed in (FusionBench uses the global numpy state), so a corrupted split is reproducible.

FusionBench records no severity for its published splits (its functions default to severity 1);
:data:`DEFAULT_SEVERITY` is that default, and every entry point takes ``severity``.

The corrupted test splits of a mini build are a derived artifact of the finished build, written on
first use (atomically, under a lock, like the build itself) and never part of the build key::

    <build>/corrupted/v<CORRUPTED_VERSION>/s<severity>/<corruption>/<task>/<split>/
        datasets.save_to_disk files (features image + label, same order and labels as the clean split)
        corruption.json   written last: what was generated, from which clean split, with which seeds

:func:`load_corrupted_split` is the ``_target_`` the robustness YAMLs use.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np
from PIL import Image

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
SEVERITIES = (1, 2, 3, 4, 5)
DEFAULT_SEVERITY = 1
# Bump when what a corruption function produces for the same (image, severity, seed) changes: the
# corrupted splits live under v<CORRUPTED_VERSION>/, so stale ones are never reused.
CORRUPTED_VERSION = 1
SEPARATOR = (
    "__"  # task pool key of a corrupted split: "<task>__<corruption>", e.g. mini_gtsrb__spatter
)

ImageLike = Union[np.ndarray, Image.Image]


# ------------------------------------------------------------------------------------------------
# checks and conversions


def check_corruption(name: str) -> str:
    """``name`` if it is one of :data:`CORRUPTIONS`, else a ValueError naming it."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    return name


def check_severity(severity) -> int:
    """``severity`` as an int in 1..5, else a ValueError naming it."""
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)):
        try:
            value = int(str(severity))
        except ValueError:
            raise ValueError(f"corruption severity must be an integer in 1..5, got {severity!r}")
    else:
        value = int(severity)
    if value not in SEVERITIES:
        raise ValueError(f"corruption severity must be an integer in 1..5, got {severity!r}")
    return value


def as_rgb_array(image: ImageLike) -> np.ndarray:
    """``image`` as a ``uint8`` array ``(H, W, 3)`` (PIL images are converted to RGB)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"expected an RGB image: a PIL image or a uint8 array (H, W, 3), got an array of shape "
            f"{array.shape} and dtype {array.dtype}"
        )
    return array


def _to_uint8(x01: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8, truncating like CIFAR-10-C's ``np.uint8(corruption(x))``."""
    return (np.clip(x01, 0.0, 1.0) * 255.0).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# the seven corruptions: f(image uint8 (H, W, 3), severity, rng) -> uint8 (H, W, 3)


def gaussian_noise(image: ImageLike, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise, std 0.04 .. 0.10 of the value range."""
    c = [0.04, 0.06, 0.08, 0.09, 0.10][check_severity(severity) - 1]
    x = as_rgb_array(image) / 255.0
    return _to_uint8(x + rng.normal(size=x.shape, scale=c))


def impulse_noise(image: ImageLike, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper noise (scikit-image's ``random_noise(mode="s&p")``: every value, channel by
    channel, is replaced with probability ``amount``, by 0 or 1 with equal odds)."""
    amount = [0.01, 0.02, 0.03, 0.05, 0.07][check_severity(severity) - 1]
    x = as_rgb_array(image) / 255.0
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    x = np.where(hit & salt, 1.0, np.where(hit & ~salt, 0.0, x))
    return _to_uint8(x)


def motion_kernel(radius: int, sigma: float, angle_degrees: float):
    """ImageMagick's ``MotionBlurImage`` kernel: weights ``exp(-i^2 / 2 sigma^2)`` (normalised) for
    ``i = 0 .. 2 * radius``, at pixel offsets ``(ceil(i cos a - 0.5), ceil(i sin a - 0.5))`` (x, y).
    """
    width = 2 * int(math.ceil(radius)) + 1
    i = np.arange(width, dtype=np.float64)
    weights = np.exp(-(i**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    angle = math.radians(angle_degrees)
    dx = np.ceil(i * math.cos(angle) - 0.5).astype(int)
    dy = np.ceil(i * math.sin(angle) - 0.5).astype(int)
    return weights, dx, dy


def motion_blur(image: ImageLike, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Motion blur along a random angle in [-45, 45] degrees (edge pixels repeated)."""
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][check_severity(severity) - 1]
    x = as_rgb_array(image).astype(np.float64)
    weights, dx, dy = motion_kernel(radius, sigma, rng.uniform(-45, 45))
    h, w = x.shape[:2]
    rows, cols = np.arange(h), np.arange(w)
    out = np.zeros_like(x)
    for weight, ox, oy in zip(weights, dx, dy):
        shifted = x[np.clip(rows + oy, 0, h - 1)][:, np.clip(cols + ox, 0, w - 1)]
        out += weight * shifted
    return _to_uint8(out / 255.0)


def pixelate(image: ImageLike, severity: int, rng: Optional[np.random.Generator] = None):
    """Box-downsample to ``size * c`` then box-upsample back, c = 0.95 .. 0.65."""
    c = [0.95, 0.9, 0.85, 0.75, 0.65][check_severity(severity) - 1]
    img = Image.fromarray(as_rgb_array(image))
    w, h = img.size
    small = img.resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BOX), dtype=np.uint8)


def contrast(image: ImageLike, severity: int, rng: Optional[np.random.Generator] = None):
    """Contrast reduction towards each channel's mean, factor 0.75 .. 0.15."""
    c = [0.75, 0.5, 0.4, 0.3, 0.15][check_severity(severity) - 1]
    x = as_rgb_array(image) / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((x - means) * c + means)


def jpeg_compression(image: ImageLike, severity: int, rng: Optional[np.random.Generator] = None):
    """A JPEG round trip at quality 80 .. 40 (Pillow's encoder)."""
    quality = [80, 65, 58, 50, 40][check_severity(severity) - 1]
    buffer = io.BytesIO()
    Image.fromarray(as_rgb_array(image)).save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.uint8)


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """scikit-image's ``filters.gaussian`` defaults (mode "nearest", truncate 4)."""
    from scipy import ndimage

    return ndimage.gaussian_filter(x, sigma=sigma, mode="nearest", truncate=4.0)


def _box3(x: np.ndarray) -> np.ndarray:
    """OpenCV's ``blur(x, (3, 3))`` (border reflect-101 = scipy's "mirror")."""
    from scipy import ndimage

    return ndimage.uniform_filter(x.astype(np.float64), size=3, mode="mirror")


def canny(gray: np.ndarray, low: float = 50, high: float = 150) -> np.ndarray:
    """OpenCV's ``Canny(gray, low, high)`` (aperture 3, L1 gradient): Sobel gradients, non-maximum
    suppression in four directions, hysteresis (8-connected). Returns a boolean edge map."""
    from scipy import ndimage

    g = gray.astype(np.float64)
    gx = ndimage.sobel(g, axis=1, mode="nearest")
    gy = ndimage.sobel(g, axis=0, mode="nearest")
    magnitude = np.abs(gx) + np.abs(gy)
    padded = np.pad(magnitude, 1)
    h, w = g.shape
    angle = (np.degrees(np.arctan2(gy, gx)) + 180.0) % 180.0
    # neighbours along the gradient: 0 deg (left/right), 45, 90 (up/down), 135
    steps = {0: (0, 1), 45: (1, 1), 90: (1, 0), 135: (1, -1)}
    sector = ((angle + 22.5) // 45 % 4 * 45).astype(int)
    keep = np.zeros_like(magnitude, dtype=bool)
    for direction, (di, dj) in steps.items():
        a = padded[1 + di : 1 + di + h, 1 + dj : 1 + dj + w]
        b = padded[1 - di : 1 - di + h, 1 - dj : 1 - dj + w]
        local_max = (magnitude > a) & (magnitude >= b)
        keep |= (sector == direction) & local_max
    candidates = keep & (magnitude > low)
    strong = keep & (magnitude > high)
    labels, n = ndimage.label(candidates, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros_like(candidates)
    connected = np.zeros(n + 1, dtype=bool)
    connected[np.unique(labels[strong])] = True
    connected[0] = False
    return connected[labels]


def equalize_hist(u8: np.ndarray) -> np.ndarray:
    """OpenCV's ``equalizeHist`` on a uint8 image."""
    hist = np.bincount(u8.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    total = u8.size
    if hist[first] == total:  # a constant image is returned unchanged
        return u8.copy()
    scale = 255.0 / (total - hist[first])
    lut = np.clip(np.rint(np.cumsum(hist) * scale - hist[first] * scale), 0, 255)
    lut[:first] = 0
    return lut.astype(np.uint8)[u8]


def spatter(image: ImageLike, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Water (severity 1-3, pale turquoise, with embossed edges) or mud (4-5, brown) splashes."""
    loc, scale, sigma, threshold, intensity, mud = [
        (0.62, 0.1, 0.7, 0.7, 0.5, 0),
        (0.65, 0.1, 0.8, 0.7, 0.5, 0),
        (0.65, 0.3, 1, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1),
        (0.65, 0.1, 0.5, 0.68, 0.6, 1),
    ][check_severity(severity) - 1]
    from scipy import ndimage

    x = as_rgb_array(image).astype(np.float64) / 255.0
    liquid = _gaussian(rng.normal(size=x.shape[:2], loc=loc, scale=scale), sigma)
    liquid[liquid < threshold] = 0
    if not mud:
        liquid_u8 = np.clip(liquid * 255, 0, 255).astype(np.uint8)
        edges = canny(liquid_u8, 50, 150)
        if edges.any():
            dist = ndimage.distance_transform_edt(~edges)
        else:
            dist = np.full(liquid.shape, 20.0)
        dist = np.minimum(dist, 20.0)
        dist = equalize_hist(_box3(dist).astype(np.uint8))
        emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
        dist = np.clip(
            np.rint(ndimage.correlate(dist.astype(np.float64), emboss, mode="mirror")), 0, 255
        )
        dist = _box3(dist)
        m = liquid_u8.astype(np.float64) * dist
        peak = m.max()
        m = (m / peak if peak > 0 else m) * intensity
        color = np.array([175, 238, 238], dtype=np.float64) / 255.0  # pale turquoise
        return _to_uint8(x + m[..., None] * color)
    m = _gaussian((liquid > threshold).astype(np.float64), intensity)
    m[m < 0.8] = 0
    color = np.array([63, 42, 20], dtype=np.float64) / 255.0  # mud brown
    return _to_uint8(x * (1 - m[..., None]) + color * m[..., None])


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


# ------------------------------------------------------------------------------------------------
# corrupted splits of a mini build (derived artifacts, written on first use)

SPLITS = ("train", "val", "test")
MANIFEST = "corruption.json"


def image_seed(build_seed: int, corruption: str, severity: int, task: str, split: str, index: int):
    """The random stream of one corrupted image: independent of every other image, so a split (or
    any subset of it) regenerates identically."""
    from .tasks import TASK_NAMES

    return [
        int(build_seed),
        CORRUPTED_VERSION,
        CORRUPTIONS.index(corruption),
        int(severity),
        TASK_NAMES.index(task),
        SPLITS.index(split),
        int(index),
    ]


def corrupted_dir(
    build: Union[str, Path], task: str, corruption: str, severity: int, split: str = "test"
) -> Path:
    """Where the corrupted ``split`` of ``task`` lives inside ``build``."""
    return (
        Path(build)
        / "corrupted"
        / f"v{CORRUPTED_VERSION}"
        / f"s{check_severity(severity)}"
        / check_corruption(corruption)
        / task
        / split
    )


def _complete(path: Path) -> Optional[dict]:
    try:
        record = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("complete") else None


def ensure_corrupted(
    build: Union[str, Path],
    task: str,
    corruption: str,
    severity: int = DEFAULT_SEVERITY,
    split: str = "test",
) -> Path:
    """Path of the corrupted ``split`` of ``task`` in the finished mini ``build``, generated first
    if needed (cheap when it exists).

    Raises:
        ValueError: unknown corruption / severity / split / task, or ``build`` is not a complete
            mini build (no ``manifest.json``) or does not contain ``task``.
        PermissionError: the build directory cannot be written.
    """
    from .build import file_lock, read_manifest

    check_corruption(corruption)
    severity = check_severity(severity)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    build = Path(build)
    manifest = read_manifest(build)
    if manifest is None:
        raise ValueError(f"{str(build)!r} is not a complete mini benchmark build (no manifest)")
    if task not in manifest["tasks"]:
        raise ValueError(
            f"task {task!r} is not in the mini build {str(build)!r}; it has {manifest['tasks']}"
        )
    target = corrupted_dir(build, task, corruption, severity, split)
    if _complete(target):
        return target
    lock_dir = build / "corrupted"
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(
            f"cannot write the corrupted splits of the mini build into {str(lock_dir)!r}: {err}"
        ) from err
    if not os.access(lock_dir, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the corrupted splits into {str(lock_dir)!r}")
    with file_lock(lock_dir / ".lock"):
        if _complete(target):  # another process generated it while we waited
            return target
        for stale in target.parent.glob(f".tmp-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
        try:
            record = _generate(build, manifest, task, corruption, severity, split, tmp)
            (tmp / MANIFEST).write_text(json.dumps(record, indent=2))  # written last
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _generate(build: Path, manifest: dict, task, corruption, severity, split, out: Path) -> dict:
    from .data import Split, load_split, save_split

    clean = load_split(build / "data" / task / split)
    images = np.stack(
        [
            corrupt(
                image,
                corruption,
                severity,
                np.random.default_rng(
                    image_seed(manifest["seed"], corruption, severity, task, split, i)
                ),
            )
            for i, image in enumerate(clean.images)
        ]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_split(Split(images=images, labels=clean.labels), task, out)
    return {
        "complete": True,
        "corrupted_version": CORRUPTED_VERSION,
        "corruption": corruption,
        "severity": severity,
        "task": task,
        "split": split,
        "clean_split": str(build / "data" / task / split),
        "build_key": manifest.get("key"),
        "build_seed": manifest["seed"],
        "num_images": int(len(images)),
        "seed_of_image_i": image_seed(manifest["seed"], corruption, severity, task, split, 0)[:-1]
        + ["i"],
    }


def load_corrupted_split(
    root: Union[str, Path],
    task: str,
    corruption: str,
    severity: int = DEFAULT_SEVERITY,
    split: str = "test",
):
    """The corrupted ``split`` of ``task`` as a ``datasets.Dataset`` (generated on first use).

    The ``_target_`` of the robustness YAMLs (``root: ${mini_clip:}``); features ``image`` (PIL) and
    ``label``, rows in the clean split's order.
    """
    from datasets import load_from_disk

    return load_from_disk(str(ensure_corrupted(root, task, corruption, severity, split)))


def corrupted_key(task: str, corruption: str) -> str:
    """Task pool key of a corrupted split evaluated next to the clean one: ``<task>__<corruption>``."""
    return f"{task}{SEPARATOR}{check_corruption(corruption)}"


def split_key(key: str):
    """``(task, corruption)`` of a task pool key; ``corruption`` is ``None`` for a clean key."""
    task, sep, suffix = key.rpartition(SEPARATOR)
    if sep and suffix in CORRUPTIONS:
        return task, suffix
    return key, None
