"""The deterministic, cached, atomic builder of the language miniature (issue 17).

A build lives in ``<root>/<key>/`` (``root`` as for mini-TA8: ``$STATSMERGE_MINI_ROOT`` or the user
cache dir; ``key`` from :func:`recipe.build_key`)::

    <key>/tokenizer/                       character-level PreTrainedTokenizerFast
    <key>/pretrained/                      LlamaForCausalLM pretrained on the procedural mix
    <key>/models/<skill>/                  its full fine-tune on one skill
    <key>/data/<skill>/{train,val,test}    datasets.save_to_disk: prompt, answer, text
    <key>/manifest.json                    written last: a build without it is not complete

The manifest holds the recipe, the exact match of the pretrained and fine-tuned models on val
and test, the stage timings and a SHA-256 digest of every weight and data file. The build runs in
``<root>/.tmp-<key>-<pid>`` and is moved into place with ``os.replace`` under an ``fcntl`` lock,
with the helpers of the mini-TA8 builder.
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path
from typing import Dict, Optional, Union

from ..mini.store import (  # the mini-TA8 builds' cache, lock, atomic install and digests
    build_digests,
    cached_build,
    check_root,
    default_root,
    torch_threads,
)
from .recipe import RECIPE_VERSION, Recipe, build_key, get_recipe, library_versions
from .skills import SKILLS, draw_splits, pretraining_text
from .train import build_tokenizer, encode, exact_match, model_config, train

SPLITS = ("train", "val", "test")


def _save_splits(directory: Path, splits: Dict[str, list]) -> None:
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar

    disable_progress_bar()
    try:
        for split, rows in splits.items():
            prompts, answers = zip(*rows)
            Dataset.from_dict(
                {
                    "prompt": list(prompts),
                    "answer": list(answers),
                    "text": [p + a for p, a in rows],
                }
            ).save_to_disk(str(directory / split))
    finally:
        enable_progress_bar()


def _scores(model, tokenizer, splits: Dict[str, Dict[str, list]]) -> Dict[str, Dict[str, float]]:
    """Exact match (%) of ``model`` on the val and test prompts of every skill."""
    scores: Dict[str, Dict[str, float]] = {"val": {}, "test": {}}
    for split, row in scores.items():
        for skill in SKILLS:
            hits = exact_match(model, tokenizer, splits[skill][split])
            row[skill] = round(100 * sum(hits) / len(hits), 2)
    return scores


def build_into(target: Path, recipe: Recipe, seed: int, progress: bool = True) -> dict:
    """Build everything into the (new) directory ``target``; return the manifest."""
    import torch
    from transformers import LlamaForCausalLM

    timings: Dict[str, float] = {}
    start = time.perf_counter()
    tokenizer = build_tokenizer(target / "tokenizer")
    sizes = {"train": recipe.n_train, "val": recipe.n_val, "test": recipe.n_test}
    splits = {skill: draw_splits(skill, sizes, seed) for skill in SKILLS}
    for skill in SKILLS:
        _save_splits(target / "data" / skill, splits[skill])
    held_out = frozenset(
        p for s in SKILLS for split in ("val", "test") for p, _ in splits[s][split]
    )
    timings["data"] = round(time.perf_counter() - start, 2)

    def pretraining_batch(rng: random.Random):
        lines = [
            pretraining_text(rng, recipe.knowledge, recipe.formats, held_out)
            for _ in range(recipe.pretrain_batch)
        ]
        ids, attention, _ = encode(tokenizer, lines, [""] * len(lines))
        return ids, attention, attention.bool() & attention.roll(-1, dims=1).bool()

    torch.manual_seed(seed)
    config = model_config(
        len(tokenizer), recipe.width, recipe.layers, recipe.heads, recipe.mlp, recipe.max_len
    )
    base = LlamaForCausalLM(config)
    t0 = time.perf_counter()
    pretrain_losses = train(
        base,
        pretraining_batch,
        recipe.pretrain_steps,
        recipe.pretrain_lr,
        recipe.pretrain_wd,
        seed,
        "mini-lm pretraining",
        progress,
    )
    base.save_pretrained(target / "pretrained")
    tokenizer.save_pretrained(target / "pretrained")
    timings["pretrain"] = round(time.perf_counter() - t0, 2)
    scores = {"pretrained": _scores(base, tokenizer, splits)}
    losses = {"pretrain": round(sum(pretrain_losses[-50:]) / len(pretrain_losses[-50:]), 4)}
    for i, skill in enumerate(SKILLS):
        rows = splits[skill]["train"]

        def skill_batch(rng: random.Random, rows=rows):
            return encode(tokenizer, *zip(*(rng.choice(rows) for _ in range(recipe.ft_batch))))

        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        ft_losses = train(
            model,
            skill_batch,
            recipe.ft_steps,
            recipe.ft_lr,
            recipe.ft_wd,
            100 * seed + 1 + i,
            f"mini-lm fine-tuning {skill}",
            progress,
        )
        model.save_pretrained(target / "models" / skill)
        timings[f"finetune_{skill}"] = round(time.perf_counter() - t0, 2)
        scores[skill] = _scores(model, tokenizer, splits)
        losses[skill] = round(sum(ft_losses[-50:]) / len(ft_losses[-50:]), 4)
    timings["total"] = round(time.perf_counter() - start, 2)
    return {
        "name": "mini-lm",
        "recipe_version": RECIPE_VERSION,
        "recipe": recipe.to_dict(),
        "seed": seed,
        "skills": list(SKILLS),
        "libraries": library_versions(),
        "torch_threads": torch.get_num_threads(),
        "exact_match": scores,
        "final_loss": losses,
        "timings_s": timings,
        "digests": build_digests(target),
    }


def build_mini_lm(
    root: Union[None, str, Path] = None,
    seed: int = 0,
    preset: str = "default",
    force: bool = False,
    recipe: Optional[Recipe] = None,
    progress: bool = True,
) -> dict:
    """Build (or reuse) the language miniature; return its manifest with ``"path"`` added.

    Args:
        root: cache directory holding builds (default: the mini-TA8 root).
        seed: seeds data, initialisation, pretraining and fine-tuning.
        preset: ``"default"`` (the benchmark) or ``"smoke"`` (tiny, for tests).
        force: rebuild even if a complete build exists.
        recipe: a custom :class:`Recipe` (variants for experiments); overrides ``preset``'s.
        progress: show tqdm progress bars.
    """
    recipe = recipe or get_recipe(preset)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"mini-lm seed must be a non-negative integer, got {seed!r}")
    root = check_root(Path(root).expanduser() if root is not None else default_root())
    key = build_key(recipe, preset, seed)

    def build(tmp: Path) -> dict:
        with torch_threads(recipe.num_threads):
            return build_into(tmp, recipe, seed, progress)

    return cached_build(root, key, build, force, extra={"preset": preset, "key": key})


def ensure_built(
    root: Union[None, str, Path] = None,
    seed: int = 0,
    preset: str = "default",
    progress: bool = True,
) -> Path:
    """Path of a complete build, building it first if needed (cheap when it exists)."""
    return Path(build_mini_lm(root, seed, preset, progress=progress)["path"])
