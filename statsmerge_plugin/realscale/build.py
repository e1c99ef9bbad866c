"""Synthetic full-size CLIP pools, built offline in seconds (no weights are downloaded).

A build directory holds what FusionBench's eight-task CLIP pools hold, at the published sizes
(:mod:`.specs`), with random weights:

* ``pretrained/``: a randomly initialised ``CLIPModel`` (both towers) and its ``CLIPProcessor``:
  OpenAI CLIP's preprocessing (resize, centre crop, CLIP mean/std) and CLIP's full BPE tokenizer,
  converted from open_clip's bundled vocabulary (:mod:`statsmerge_plugin.mini.tokenizer`);
* ``models/<task>/``: a ``CLIPVisionModel`` per task, ``theta_0 + tau_k`` where every tensor of
  ``tau_k`` is Gaussian with an RMS of ``relative_size`` times that tensor's RMS in ``theta_0``
  (tensors that start at zero, biases, use ``relative_size * 0.02``, the initialiser's scale);
* ``data/<task>/<split>/``: small sets of synthetic images (blocky colour patterns, larger than the
  crop so the processor resizes as for real photos) with labels of the task's real class count,
  saved with ``datasets.save_to_disk``; the layout of the mini benchmark, so its
  :func:`~statsmerge_plugin.mini.evaluate.modelpool` loads a build unchanged;
* optionally ``teachers/<task>/``: a ResNet-50-sized ``ResNetForImageClassification`` (the published
  ``microsoft/resnet-50`` configuration, a head of the task's classes, ``id2label`` in the task's
  order) with its own image processor, a teacher of another architecture for the heterogeneous
  mode, and extra train splits ``data/<task>/train_<n>/`` of other sizes.

Task names are FusionBench's (``sun397``, ..., ``dtd``), so its class names and templates apply.
Accuracies on these models are meaningless: the pools exist to measure cost and to catch
size-dependent failures. Builds are keyed by their recipe, written into a temporary directory and
moved into place (the mini builder's conventions), so a build is made once and reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Tuple

import torch

from statsmerge_plugin.mini.store import cached_build, check_root, read_manifest

from .specs import ClipSize, get_size, vision_parameter_count

TA8 = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
#: bump when a build's content changes for the same recipe
REALSCALE_VERSION = 1
#: RMS of the Gaussian task-vector noise of tensors that are zero in theta_0, relative to this
ZERO_TENSOR_SCALE = 0.02


@dataclass(frozen=True)
class PoolRecipe:
    """Everything that determines a build.

    Attributes:
        size: ``vit-b-32``, ``vit-l-14`` or ``tiny`` (:data:`~.specs.SIZES`).
        tasks: FusionBench task names, one fine-tuned model each.
        images: ``((split, images per task), ...)``.
        relative_size: RMS of each task-vector tensor over the RMS of the pretrained tensor.
        teacher_task: a task whose model also exists as a ResNet teacher (``None``: no teacher).
        teacher_train_sizes: sizes of extra train splits ``train_<n>`` of ``teacher_task``.
        seed: seeds weights and images.
    """

    size: str = "vit-b-32"
    tasks: Tuple[str, ...] = TA8
    images: Tuple[Tuple[str, int], ...] = (("train", 64), ("val", 128), ("test", 64))
    relative_size: float = 0.01
    teacher_task: Optional[str] = None
    teacher_train_sizes: Tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        get_size(self.size)
        if not self.tasks:
            raise ValueError("a pool needs at least one task")
        if not (math.isfinite(self.relative_size) and self.relative_size > 0):
            raise ValueError(
                f"`relative_size` must be a finite number > 0, not {self.relative_size}"
            )
        if self.teacher_task is not None and self.teacher_task not in self.tasks:
            raise ValueError(f"teacher task {self.teacher_task!r} is not one of {self.tasks}")
        if self.teacher_train_sizes and self.teacher_task is None:
            raise ValueError("`teacher_train_sizes` needs a `teacher_task`")
        for split, n in self.images:
            if int(n) != n or n < 1:
                raise ValueError(f"split {split!r}: the image count must be an integer >= 1")

    @property
    def spec(self) -> ClipSize:
        return get_size(self.size)

    def to_dict(self) -> Dict:
        return asdict(self)

    def key(self) -> str:
        """Directory name of the build: ``<size>-k<tasks>-<digest of the recipe and version>``."""
        payload = json.dumps({"v": REALSCALE_VERSION, **self.to_dict()}, sort_keys=True)
        digest = hashlib.sha256(payload.encode()).hexdigest()[:12]
        return f"{self.size}-k{len(self.tasks)}-{digest}"

    def replace(self, **changes) -> "PoolRecipe":
        return replace(self, **changes)


# --- weights -----------------------------------------------------------------------------------


def noise_scale(tensor: torch.Tensor, relative_size: float) -> float:
    """The RMS of a task-vector tensor: ``relative_size`` x RMS of ``tensor`` (or of
    :data:`ZERO_TENSOR_SCALE` for a zero tensor)."""
    rms = float(tensor.float().pow(2).mean().sqrt()) if tensor.numel() else 0.0
    return relative_size * (rms if rms > 0 else ZERO_TENSOR_SCALE)


def task_model_state(
    theta_0: Mapping[str, torch.Tensor], relative_size: float, generator: torch.Generator
) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(name, theta_0 + tau)`` tensor by tensor (one tensor of noise in memory at a time)."""
    for name, tensor in theta_0.items():
        noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        yield name, tensor + noise_scale(tensor, relative_size) * noise


def write_vision_model(directory: Path, config, state: Mapping[str, torch.Tensor]) -> Path:
    """A ``CLIPVisionModel`` checkpoint (``config.json`` + ``model.safetensors``) without building
    the module."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config.architectures = ["CLIPVisionModel"]
    config.save_pretrained(directory)
    save_file(
        {n: t.contiguous() for n, t in state.items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return directory


def clip_processor(spec: ClipSize, work: Path):
    """OpenAI CLIP's preprocessing at ``spec.image_size`` and CLIP's full BPE tokenizer."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from statsmerge_plugin.mini.tokenizer import load_merges, load_tokenizer, write_tokenizer_files

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    tokenizer = load_tokenizer(write_tokenizer_files(work / "tokenizer", load_merges()))
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def write_pretrained(out: Path, spec: ClipSize, seed: int) -> Dict[str, torch.Tensor]:
    """``pretrained/`` (random ``CLIPModel`` + processor); returns the vision tower's state."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    clip = CLIPModel(spec.clip_config()).eval()
    clip.save_pretrained(out / "pretrained")
    clip_processor(spec, out / ".work").save_pretrained(out / "pretrained")
    shutil.rmtree(out / ".work", ignore_errors=True)
    vision = {
        n: t.detach().clone() for n, t in clip.state_dict().items() if n.startswith("vision_model.")
    }
    del clip
    return vision


def write_teacher(directory: Path, task: str, spec: ClipSize, seed: int) -> Path:
    """A ResNet classifier teacher of ``task`` with its own processor (ResNet-50 sized for the
    real sizes, a small ResNet for ``tiny``), ``id2label`` the task's class names in order."""
    from fusion_bench.tasks.clip_classification import get_classnames
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    classnames = list(get_classnames(task))
    if spec.name == "tiny":
        stages = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    else:  # microsoft/resnet-50
        stages = dict(
            embedding_size=64,
            hidden_sizes=[256, 512, 1024, 2048],
            depths=[3, 4, 6, 3],
            layer_type="bottleneck",
        )
    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=3,
        hidden_act="relu",
        num_labels=len(classnames),
        id2label=dict(enumerate(classnames)),
        label2id={c: i for i, c in enumerate(classnames)},
        **stages,
    )
    ResNetForImageClassification(config).save_pretrained(directory)
    ConvNextImageProcessor(size={"shortest_edge": spec.image_size}, crop_pct=0.875).save_pretrained(
        directory
    )
    return directory


# --- images ------------------------------------------------------------------------------------


def image_side(spec: ClipSize) -> int:
    """Side of the stored images: larger than the crop, as photos are (224 -> 256)."""
    return int(round(spec.image_size * 8 / 7))


def synthetic_dataset(n: int, num_classes: int, side: int, seed: int, classnames=None):
    """``n`` blocky colour images of ``side`` px (cheap to encode, not constant) with labels."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    rng = np.random.default_rng(seed)
    grids = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    images = [Image.fromarray(g).resize((side, side), Image.NEAREST) for g in grids]
    labels = [int(x) for x in rng.integers(0, num_classes, n)]
    label = (
        ClassLabel(names=list(classnames)) if classnames else ClassLabel(num_classes=num_classes)
    )
    features = Features({"image": ImageFeature(), "label": label})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


def write_split(path: Path, task: str, n: int, side: int, seed: int) -> Path:
    from fusion_bench.tasks.clip_classification import get_classnames

    classnames = list(get_classnames(task))
    synthetic_dataset(n, len(classnames), side, seed, classnames).save_to_disk(str(path))
    return path


# --- the build ---------------------------------------------------------------------------------


def _build(out: Path, recipe: PoolRecipe) -> Dict:
    timings: Dict[str, float] = {}
    t0 = t = time.perf_counter()
    spec = recipe.spec
    theta_0 = write_pretrained(out, spec, recipe.seed)
    timings["pretrained"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    config = spec.vision_config()
    for k, task in enumerate(recipe.tasks):
        generator = torch.Generator().manual_seed(1000 * recipe.seed + k + 1)
        state = dict(task_model_state(theta_0, recipe.relative_size, generator))
        write_vision_model(out / "models" / task, config, state)
        del state
    timings["task_models"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    side = image_side(spec)
    splits = dict(recipe.images)
    for k, task in enumerate(recipe.tasks):
        for j, (split, n) in enumerate(splits.items()):
            write_split(out / "data" / task / split, task, n, side, 10_000 * k + j + recipe.seed)
    if recipe.teacher_task is not None:
        write_teacher(
            out / "teachers" / recipe.teacher_task, recipe.teacher_task, spec, recipe.seed
        )
        k = recipe.tasks.index(recipe.teacher_task)
        for n in recipe.teacher_train_sizes:
            path = out / "data" / recipe.teacher_task / f"train_{n}"
            write_split(path, recipe.teacher_task, n, side, 10_000 * k + 100 + n)
    timings["data_and_teacher"] = round(time.perf_counter() - t, 2)
    timings["total"] = round(time.perf_counter() - t0, 2)
    counts = vision_parameter_count(spec)
    vision_bytes = 4 * counts["parameters"]
    return {
        "version": REALSCALE_VERSION,
        "key": recipe.key(),
        "recipe": recipe.to_dict(),
        "architecture": spec.to_dict(),
        "vision_tensors": counts["tensors"],
        "vision_parameters": counts["parameters"],
        "vision_bytes": vision_bytes,
        # what every in-memory merge has to hold: theta_0 and one task vector per task (float32)
        "theta0_plus_task_vectors_bytes": (1 + len(recipe.tasks)) * vision_bytes,
        "timings_seconds": timings,
        "complete": True,
    }


def build_pool(root, recipe: PoolRecipe = PoolRecipe(), force: bool = False) -> Path:
    """The build of ``recipe`` under ``root`` (``<root>/<recipe.key()>``), made if missing.

    Concurrent callers wait on a lock and then reuse the finished build; ``force`` rebuilds.
    Returns the build directory (its ``manifest.json`` describes it).
    """
    root = check_root(Path(root).expanduser())
    target = root / recipe.key()

    def build(tmp: Path) -> Dict:
        tmp.mkdir(parents=True)
        return _build(tmp, recipe)

    cached_build(root, recipe.key(), build, force)
    return target


def load_manifest(build: Path) -> Dict:
    """The manifest of a complete build; ``ValueError`` naming the directory otherwise."""
    manifest = read_manifest(Path(build))
    if manifest is None:
        raise ValueError(f"{str(build)!r} is not a complete real-scale pool build (no manifest)")
    return manifest
