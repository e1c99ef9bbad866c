"""Few-shot, unlabelled text for label-free merging of language models (ProDistill on GPT-2 and
causal LMs, issue 17). Never a test set.

A per-task **few-shot spec** (Hydra, ``method.few_shot.<task>``) says where a task's prompts come from::

    few_shot:
      math:
        dataset: gsm8k            # a hub dataset name, or a local directory (datasets.load_from_disk)
        name: main                # the hub config name (optional)
        split: train              # never a test split
        template: "Question: {question}\\nAnswer:"   # or text_field: question
        shots: 16                 # default: the method's shots_per_task
        max_tokens: 256           # default: the method's max_tokens

The test-split guard of the vision path applies (:class:`~statsmerge_plugin.data.TestSplitGuard`):
a spec whose split expression names a ``test`` split, or that reads the same files, hub dataset and
split or Hugging Face fingerprint as a test set of the model pool or the task pool, is refused with
an error naming the task, before any model is loaded. Only the rendered prompt text is kept: no
answer or label field is read unless the template names it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

import torch
from omegaconf import OmegaConf

from .data import TestSplitGuard, dataset_record, held_out_indices, split_names

log = logging.getLogger(__name__)


@dataclass
class FewShotTextSpec:
    """Where one task's few-shot prompts come from (see the module docstring)."""

    dataset: str
    split: str = "train"
    name: Optional[str] = None
    template: Optional[str] = None
    text_field: Optional[str] = None
    shots: Optional[int] = None
    max_tokens: Optional[int] = None

    def dataset_config(self) -> dict:
        """What the spec reads, in the form :func:`~statsmerge_plugin.data.dataset_sources` compares
        with the test sets."""
        if os.path.exists(os.path.expanduser(self.dataset)):
            return {"dataset_path": self.dataset, "split": self.split}
        return {"path": self.dataset, "name": self.name, "split": self.split}

    def render(self, row: Mapping) -> str:
        if self.template is not None:
            try:
                return self.template.format(**row)
            except KeyError as err:
                raise ValueError(f"template field {err} is not a column") from err
        return str(row[self.text_field])


def parse_specs(few_shot, tasks: Sequence[str]) -> Dict[str, FewShotTextSpec]:
    """``method.few_shot`` → ``{task: spec}`` for every task of the pool.

    Raises:
        ValueError: naming the task and key for a missing task, an unknown key, a missing dataset or
            text source (``template`` or ``text_field``), a bad count, or a test split.
    """
    if few_shot is None:
        raise ValueError(
            "option `few_shot` is required: the pool carries no datasets; give each task a spec "
            f"(`method.few_shot.<task>.dataset`, ...) for tasks {list(tasks)}"
        )
    raw = (
        OmegaConf.to_container(few_shot, resolve=True)
        if OmegaConf.is_config(few_shot)
        else few_shot
    )
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"option `few_shot` must map task names to specs, got {type(raw).__name__}"
        )
    missing = [t for t in tasks if t not in raw]
    if missing:
        raise ValueError(f"option `few_shot` has no spec for task(s) {missing}")
    extra = [t for t in raw if t not in tasks]
    if extra:
        raise ValueError(
            f"option `few_shot` names task(s) {extra} that are not in the pool {list(tasks)}"
        )
    known = {f.name for f in fields(FewShotTextSpec)}
    specs = {}
    for task in tasks:
        entry = raw[task]
        where = f"few_shot.{task}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"`{where}` must be a mapping with `dataset`, `split`, ...")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"`{where}`: unknown key(s) {unknown}; known: {sorted(known)}")
        if not entry.get("dataset"):
            raise ValueError(f"`{where}.dataset` is required (a hub name or a local directory)")
        spec = FewShotTextSpec(**{k: entry[k] for k in entry})
        if (spec.template is None) == (spec.text_field is None):
            raise ValueError(f"`{where}`: give exactly one of `template` and `text_field`")
        for key in ("shots", "max_tokens"):
            value = getattr(spec, key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"`{where}.{key}` must be a positive integer, got {value!r}")
        check_not_test_split(task, spec)
        specs[task] = spec
    return specs


def check_not_test_split(task: str, spec: FewShotTextSpec) -> None:
    """Refuse a spec whose split expression names a test split (``test``, ``test[:10%]``,
    ``train+test``, ``test_matched``...)."""
    for split in split_names(spec.split):
        if split is None or "test" in str(split).lower():
            raise ValueError(
                f"task {task!r}: the few-shot spec reads split {spec.split!r}, which "
                f"{'is every split' if split is None else 'is a test split'}; refusing to train on "
                f"test data. Point `few_shot.{task}.split` at a train or held-out validation split."
            )


def load_spec_dataset(task: str, spec: FewShotTextSpec):
    """The spec's dataset (a ``datasets.Dataset``): ``load_from_disk`` for a local directory (a
    ``DatasetDict`` is indexed by the split), else ``load_dataset(dataset, name, split=split)``."""
    import datasets

    try:
        if os.path.exists(os.path.expanduser(spec.dataset)):
            ds = datasets.load_from_disk(os.path.expanduser(spec.dataset))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[spec.split]
            return ds
        return datasets.load_dataset(spec.dataset, spec.name, split=spec.split)
    except Exception as err:  # noqa: BLE001 - OSError, KeyError, hub errors
        raise ValueError(
            f"task {task!r}: cannot load its few-shot dataset {spec.dataset!r} split {spec.split!r} "
            f"({type(err).__name__}: {err})"
        ) from err


def few_shot_texts(
    task: str, spec: FewShotTextSpec, shots: int, seed: int, guard: TestSplitGuard
) -> tuple:
    """``(texts, record)``: ``shots`` seeded rows of the spec's dataset rendered as prompts, after the
    guard's config and fingerprint checks."""
    guard.check_config(task, "few_shot", spec.dataset_config())
    dataset = load_spec_dataset(task, spec)
    guard.check_dataset(task, "few_shot", dataset)
    indices = held_out_indices(len(dataset), shots, seed, task, spec.split)
    texts = []
    for i in indices:
        try:
            texts.append(spec.render(dataset[i]))
        except (KeyError, ValueError) as err:
            raise ValueError(f"task {task!r}: few-shot row {i} cannot be rendered ({err})") from err
    record = dataset_record(dataset, spec.split) | {"num_samples": len(texts), "spec": vars(spec)}
    return texts, record


class TokenizedShots:
    """Few-shot token ids of one task, right-padded to one length: ``input_ids`` and ``masks``
    (``[n, S]``, True on real tokens), in batches for the engine's stage 0."""

    def __init__(self, input_ids: torch.Tensor, masks: torch.Tensor):
        self.input_ids = input_ids.to(torch.long)
        self.masks = masks.to(torch.bool)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batches(self, batch_size: int) -> Iterator[dict]:
        for s in range(0, len(self), batch_size):
            yield {
                "input_ids": self.input_ids[s : s + batch_size],
                "attention_mask": self.masks[s : s + batch_size],
            }


def pad_shots(sequences: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> TokenizedShots:
    """Right-pad token id lists (already truncated) to ``length``."""
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        seq = list(seq)[:length]
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = True
    return TokenizedShots(ids, mask)


def tokenize_texts(texts: List[str], tokenizer, max_tokens: int) -> List[List[int]]:
    """Token ids of each text (special tokens as the tokenizer adds them), cut at ``max_tokens``."""
    return [list(tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"]) for t in texts]
