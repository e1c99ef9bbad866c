"""Weather corruptions (CIFAR-10-C's weather family): water and mud spatter, with OpenCV's Canny
edge detector and histogram equalisation ported to scipy and numpy."""

from __future__ import annotations

import numpy as np

from .pixels import ImageLike, as_rgb_array, box3, check_severity, gaussian_filter, to_uint8


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
    liquid = gaussian_filter(rng.normal(size=x.shape[:2], loc=loc, scale=scale), sigma)
    liquid[liquid < threshold] = 0
    if not mud:
        liquid_u8 = np.clip(liquid * 255, 0, 255).astype(np.uint8)
        edges = canny(liquid_u8, 50, 150)
        if edges.any():
            dist = ndimage.distance_transform_edt(~edges)
        else:
            dist = np.full(liquid.shape, 20.0)
        dist = np.minimum(dist, 20.0)
        dist = equalize_hist(box3(dist).astype(np.uint8))
        emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
        dist = np.clip(
            np.rint(ndimage.correlate(dist.astype(np.float64), emboss, mode="mirror")), 0, 255
        )
        dist = box3(dist)
        m = liquid_u8.astype(np.float64) * dist
        peak = m.max()
        m = (m / peak if peak > 0 else m) * intensity
        color = np.array([175, 238, 238], dtype=np.float64) / 255.0  # pale turquoise
        return to_uint8(x + m[..., None] * color)
    m = gaussian_filter((liquid > threshold).astype(np.float64), intensity)
    m[m < 0.8] = 0
    color = np.array([63, 42, 20], dtype=np.float64) / 255.0  # mud brown
    return to_uint8(x * (1 - m[..., None]) + color * m[..., None])
