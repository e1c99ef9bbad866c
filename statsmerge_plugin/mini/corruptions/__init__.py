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

# flake8: noqa F401
from .blur import motion_blur, motion_kernel
from .digital import contrast, jpeg_compression, pixelate
from .noise import gaussian_noise, impulse_noise
from .pixels import ImageLike, as_rgb_array
from .splits import (
    MANIFEST,
    SPLITS,
    corrupted_dir,
    corrupted_key,
    ensure_corrupted,
    image_seed,
    load_corrupted_split,
    split_key,
)
from .table import (
    CORRUPTED_VERSION,
    CORRUPTIONS,
    DEFAULT_SEVERITY,
    FUNCTIONS,
    SEPARATOR,
    SEVERITIES,
    check_corruption,
    check_severity,
    corrupt,
)
from .weather import canny, equalize_hist, spatter
