"""The build recipe of the mini benchmark: every knob, the presets, and the build key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Dict, Sequence

from .store import thread_key

# The recipe's version: part of every build key. Bump it whenever what a knob means, or what the
# data generators and training code produce for the same knobs, changes (a pure refactor does not).
RECIPE_VERSION = 2

# Which part of a build a knob determines; ``run`` knobs do not change data or weights.
STAGES = ("data", "model", "pretrain", "finetune")


def _knob(default, stage: str, keyed_when_set: bool = False):
    """A recipe field. ``keyed_when_set``: a knob added after ``RECIPE_VERSION`` 2 that enters the
    build key only away from its default (its neutral value), so that every earlier build keeps its
    key and weights."""
    return field(default=default, metadata={"stage": stage, "keyed_when_set": keyed_when_set})


@dataclass(frozen=True)
class Recipe:
    """All knobs of a build. Sizes are images per class; steps are optimizer steps."""

    # data
    n_pretrain: int = _knob(100, "pretrain")  # the separate pool pretraining draws from
    n_train: int = _knob(200, "data")
    n_val: int = _knob(50, "data")
    n_test: int = _knob(50, "data")
    # model (vision: 32x32 images in 8x8 patches)
    patch_size: int = _knob(8, "model")
    vision_width: int = _knob(128, "model")
    vision_layers: int = _knob(4, "model")
    text_width: int = _knob(64, "model")
    text_layers: int = _knob(1, "model")
    heads: int = _knob(4, "model")
    projection_dim: int = _knob(64, "model")
    # contrastive pretraining of the whole CLIP
    pretrain_steps: int = _knob(1500, "pretrain")
    pretrain_batch: int = _knob(128, "pretrain")
    pretrain_lr: float = _knob(1e-3, "pretrain")
    pretrain_wd: float = _knob(0.1, "pretrain")
    # fraction of the (2k, 2k+1) class pairs whose captions are blurred
    pair_frac: float = _knob(0.6, "pretrain")
    # how often an image of such a pair is captioned as its partner (0.5: blurred, > 0.5: confused)
    pair_swap: float = _knob(0.65, "pretrain")
    # the rare-domain tasks' pretraining images: how far they are rendered from the tasks' own
    # domain and which fraction is kept; the common tasks' rendering shift; how much of a shift
    # is colour loss, and a scale of that for the common tasks alone; the rare tasks' shift of
    # composition (shrunk into a corner) (``domain.py``)
    domain_shift: float = _knob(0.0, "pretrain", keyed_when_set=True)
    rare_frac: float = _knob(1.0, "pretrain", keyed_when_set=True)
    common_shift: float = _knob(0.0, "pretrain", keyed_when_set=True)
    shift_grey: float = _knob(1.0, "pretrain", keyed_when_set=True)
    common_grey: float = _knob(1.0, "pretrain", keyed_when_set=True)
    rare_zoom: float = _knob(0.0, "pretrain", keyed_when_set=True)
    # fine-tuning of the vision tower against the frozen zero-shot head
    ft_steps: int = _knob(500, "finetune")
    ft_batch: int = _knob(32, "finetune")
    ft_lr: float = _knob(2e-4, "finetune")
    ft_wd: float = _knob(0.0, "finetune")
    # evaluation through FusionBench written into the manifest; torch threads (in the key as the
    # effective count, only when it is not 2: ``store.thread_key``)
    evaluate: bool = _knob(True, "run")
    evaluate_merges: bool = _knob(True, "run")
    num_threads: int = _knob(2, "run")

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)


PRESETS: Dict[str, Recipe] = {
    "default": Recipe(),
    "smoke": Recipe(
        n_pretrain=12,
        n_train=12,
        n_val=3,
        n_test=6,
        vision_width=32,
        vision_layers=2,
        text_width=32,
        text_layers=1,
        heads=2,
        projection_dim=16,
        pretrain_steps=20,
        pretrain_batch=64,
        ft_steps=8,
        ft_batch=16,
        num_threads=1,  # tiny models: one thread is as fast, and the weights are the same anywhere
    ),
}


def get_recipe(preset: str) -> Recipe:
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return PRESETS[preset]


def library_versions() -> Dict[str, str]:
    from importlib.metadata import version

    return {lib: version(lib) for lib in ("torch", "transformers", "datasets", "numpy", "pillow")}


def _digest(payload: dict, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:n]


def key_fields(recipe: Recipe, stages: Sequence[str] = STAGES) -> Dict:
    """The recipe fields of ``stages`` (``run`` fields never change the data or weights)."""
    return {
        f.name: getattr(recipe, f.name)
        for f in dataclasses.fields(recipe)
        if f.metadata.get("stage", "run") in stages
        and not (f.metadata.get("keyed_when_set") and getattr(recipe, f.name) == f.default)
    }


def build_key(recipe: Recipe, preset: str, seed: int, tasks: Sequence[str]) -> str:
    """Directory name of a build.

    Keyed on what determines the data and weights: the recipe's fields, ``RECIPE_VERSION``, the
    seed, the task subset, the library versions and the effective thread count
    (:func:`.store.thread_key`); not on the source code, so that a refactor keeps every build. A
    change of what a knob *means* must bump ``RECIPE_VERSION``.
    """
    payload = {
        "version": RECIPE_VERSION,
        "recipe": key_fields(recipe),
        "seed": seed,
        "tasks": list(tasks),
        "libraries": library_versions(),
        **thread_key(recipe.num_threads),
    }
    return f"mini-clip-r{RECIPE_VERSION}-{preset}-s{seed}-t{len(tasks)}-{_digest(payload)}"


def pretrain_key(recipe: Recipe, seed: int, tasks: Sequence[str]) -> str:
    """Key of the pretrained CLIP alone (data, model and pretraining fields): fine-tuning variants
    of one recipe share it (``<root>/.stages/``)."""
    payload = {
        "version": RECIPE_VERSION,
        "recipe": key_fields(recipe, ("data", "model", "pretrain")),
        "seed": seed,
        "tasks": list(tasks),
        "libraries": library_versions(),
        **thread_key(recipe.num_threads),
    }
    return f"pretrain-r{RECIPE_VERSION}-s{seed}-t{len(tasks)}-{_digest(payload)}"
