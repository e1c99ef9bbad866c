"""The build recipe of the language miniature: every knob, the presets, and the build key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Dict

from ..mini.store import thread_key

# Part of every build key. Bump it whenever what a knob means, or what the generators and the
# training code produce for the same knobs, changes (a pure refactor does not).
RECIPE_VERSION = 1


def _knob(default, stage: str = "build"):
    return field(default=default, metadata={"stage": stage})


@dataclass(frozen=True)
class Recipe:
    """All knobs of a build (sizes are prompts per skill, steps optimizer steps)."""

    # data (per skill; the arithmetic train split is cut to its domain, see skills.CAPACITY)
    n_train: int = _knob(5000)
    n_val: int = _knob(300)
    n_test: int = _knob(300)
    # model: LlamaForCausalLM
    width: int = _knob(128)
    layers: int = _knob(4)
    heads: int = _knob(4)
    mlp: int = _knob(384)
    max_len: int = _knob(64)
    # pretraining on the procedural mix (skills.pretraining_text)
    pretrain_steps: int = _knob(3000)
    pretrain_batch: int = _knob(64)
    pretrain_lr: float = _knob(1e-3)
    pretrain_wd: float = _knob(0.1)
    knowledge: float = _knob(0.5)  # share of lines stating what a skill computes, in prose
    formats: float = _knob(0.15)  # share of lines in the narrow slice of a skill's prompt format
    # full fine-tuning of one model per skill, loss on the answer tokens
    ft_steps: int = _knob(500)
    ft_batch: int = _knob(64)
    ft_lr: float = _knob(3e-4)
    ft_wd: float = _knob(0.0)
    # torch threads (not in the key: the same weights on any count is not promised, see the docs)
    num_threads: int = _knob(2, "run")

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)


PRESETS: Dict[str, Recipe] = {
    "default": Recipe(),
    "smoke": Recipe(
        n_train=60,
        n_val=20,
        n_test=20,
        width=32,
        layers=2,
        heads=2,
        mlp=64,
        pretrain_steps=30,
        pretrain_batch=32,
        ft_steps=10,
        ft_batch=16,
    ),
}


def get_recipe(preset: str) -> Recipe:
    if preset not in PRESETS:
        raise KeyError(f"unknown mini-lm preset {preset!r}; known: {', '.join(PRESETS)}")
    return PRESETS[preset]


def library_versions() -> Dict[str, str]:
    from importlib.metadata import version

    return {lib: version(lib) for lib in ("torch", "transformers", "datasets", "tokenizers")}


def key_fields(recipe: Recipe) -> Dict:
    return {
        f.name: getattr(recipe, f.name)
        for f in dataclasses.fields(recipe)
        if f.metadata.get("stage") != "run"
    }


def build_key(recipe: Recipe, preset: str, seed: int) -> str:
    """Directory name of a build: keyed on the recipe's build knobs, ``RECIPE_VERSION``, the seed,
    the library versions and the effective thread count (``mini.store.thread_key``); not on the source code, so that a refactor keeps every build.
    """
    payload = {
        "version": RECIPE_VERSION,
        "recipe": key_fields(recipe),
        "seed": seed,
        "libraries": library_versions(),
        **thread_key(recipe.num_threads),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return f"mini-lm-r{RECIPE_VERSION}-{preset}-s{seed}-{digest}"
