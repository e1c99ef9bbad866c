"""How the pretraining pool renders each task: the lever for zero-shot weakness by domain shift.

Real CLIP is weak zero-shot on EuroSAT, SVHN, GTSRB, MNIST and DTD mostly because such images are
rare, or differently rendered, in its web pretraining data, not because their captions are wrong.
The mini recipe models that with three knobs that touch only the ``pretrain`` pool (never the
train/val/test splits); the first two concern the *rare-domain* tasks (:data:`RARE_DOMAIN_TASKS`,
the five with the lowest zero-shot accuracy on the real ViT-B/32):

``rare_frac``
    the fraction of their pretraining images that is kept (1.0: as many as the other tasks);
``domain_shift``
    in ``[0, 1]``, how far their pretraining images are from the rendering the task's
    train/val/test splits use: colour is mixed toward grey by ``domain_shift`` and the image is
    box-downsampled to ``32 * (1 - domain_shift / 2)`` pixels and back (web thumbnails);
``common_shift``
    the same rendering, usually milder, for the other (common-domain) tasks: real CLIP is far from
    perfect on SUN397, Cars and RESISC45 too (60-65 % zero-shot);
``shift_grey``
    in ``[0, 1]``, how much of either shift is colour loss: colour is mixed toward grey by
    ``shift_grey * shift`` while the downsampling keeps the full ``shift``. At 1.0 (its default)
    colour and resolution move together as above; at 0 a shifted image keeps its colours and is
    only a low-resolution thumbnail. Real web thumbnails of satellite scenes keep their colours,
    and a task whose classes differ mostly by colour (the EuroSAT analogue) otherwise has to build
    colour features in its fine-tune that trimming then removes (``docs/mini-benchmark.md``, r3
    search).
``common_grey``
    in ``[0, 1]``, scales ``shift_grey`` for the common tasks alone: their colour is mixed toward
    grey by ``common_grey * shift_grey * common_shift``. At 1.0 (its default) both kinds of task
    lose colour alike; at 0 the common tasks' pretraining images keep their colours (still
    low-resolution) while the rare ones stay grey, as a web pool that is colourful everywhere but
    holds the rare domains only as grey scans would.
``rare_zoom``
    in ``[0, 1]``, a shift of composition rather than rendering for the rare-domain tasks: each of
    their pretraining images is shrunk to ``32 * (1 - rare_zoom / 2)`` pixels and placed in one
    corner (the four in turn, one per round of classes) of a canvas of its own mean colour, as a
    web photo that shows the scene small and off-centre would. Colour is untouched (applied after
    ``domain_shift``). Finding 9 of the r3 search: a shift that lives in colour and resolution is
    undone by the fine-tunes at the patch embedding, which then interferes when merged.

Captions are never changed by these knobs. At their neutral values (``domain_shift=0``,
``rare_frac=1``, ``common_shift=0``, ``shift_grey=1``, ``common_grey=1``, ``rare_zoom=0``) the
pretraining pool is exactly r2's, and the knobs stay out of the build key (``recipe.py``), so every
earlier build keeps its key.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

RARE_DOMAIN_TASKS = ("mini_eurosat", "mini_svhn", "mini_gtsrb", "mini_mnist", "mini_dtd")


def check_domain_knobs(
    domain_shift: float,
    rare_frac: float,
    common_shift: float = 0.0,
    shift_grey: float = 1.0,
    common_grey: float = 1.0,
    rare_zoom: float = 0.0,
) -> None:
    """Raise ``ValueError`` naming the recipe knob out of its range."""
    for name, value in (
        ("domain_shift", domain_shift),
        ("common_shift", common_shift),
        ("shift_grey", shift_grey),
        ("common_grey", common_grey),
        ("rare_zoom", rare_zoom),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"recipe knob {name} must be in [0, 1], got {value}")
    if not 0.0 < rare_frac <= 1.0:
        raise ValueError(f"recipe knob rare_frac must be in (0, 1], got {rare_frac}")


def render_shifted(images: np.ndarray, domain_shift: float, shift_grey: float = 1.0) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 images in the pretraining domain of a rare task (module doc)."""
    if domain_shift == 0.0:
        return images
    out = images
    mix = shift_grey * domain_shift
    if mix > 0.0:
        x = images.astype(np.float32)
        grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        x = (1.0 - mix) * x + mix * grey[..., None]
        out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    size = images.shape[1]
    low = max(4, int(round(size * (1.0 - domain_shift / 2))))
    if low < size:
        out = np.stack(
            [
                np.asarray(
                    Image.fromarray(im)
                    .resize((low, low), Image.BOX)
                    .resize((size, size), Image.BOX)
                )
                for im in out
            ]
        )
    return out


def render_zoomed(images: np.ndarray, rare_zoom: float, num_classes: int) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 images shrunk by ``rare_zoom`` into a corner of a canvas of their
    mean colour (module doc); image ``i`` goes to corner ``(i // num_classes) % 4``, so that in
    a class-interleaved split every class meets all four corners."""
    size = images.shape[1]
    small = max(4, int(round(size * (1.0 - rare_zoom / 2))))
    if rare_zoom == 0.0 or small >= size:
        return images
    out = np.empty_like(images)
    out[:] = np.rint(images.reshape(len(images), -1, 3).mean(axis=1))[:, None, None, :]
    far = size - small
    for i, im in enumerate(images):
        corner = (i // num_classes) % 4
        y, x = far * (corner // 2), far * (corner % 2)
        out[i, y : y + small, x : x + small] = np.asarray(
            Image.fromarray(im).resize((small, small), Image.BOX)
        )
    return out


def pretrain_pool(
    task: str,
    split,
    domain_shift: float,
    rare_frac: float,
    common_shift=0.0,
    shift_grey=1.0,
    common_grey=1.0,
    rare_zoom=0.0,
):
    """``split`` (a :class:`~.data.Split` of the ``pretrain`` part) as the pretraining pool shows
    ``task``: re-rendered by ``common_shift`` (colour loss scaled by ``common_grey``) for the
    common tasks; subsampled (class-balanced, first images kept) and re-rendered by
    ``domain_shift`` and then ``rare_zoom`` for the rare-domain ones."""
    check_domain_knobs(domain_shift, rare_frac, common_shift, shift_grey, common_grey, rare_zoom)
    if task not in RARE_DOMAIN_TASKS:
        images = render_shifted(split.images, common_shift, common_grey * shift_grey)
        return type(split)(images=images, labels=split.labels)
    num_classes = int(split.labels.max()) + 1
    keep = max(num_classes, int(round(rare_frac * len(split.labels))))
    keep -= keep % num_classes  # whole rounds of the class-interleaved order
    images = render_shifted(split.images[:keep], domain_shift, shift_grey)
    return type(split)(
        images=render_zoomed(images, rare_zoom, num_classes), labels=split.labels[:keep]
    )
