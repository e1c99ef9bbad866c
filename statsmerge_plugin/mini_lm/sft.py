"""Supervised (next-token) training sets of the language miniature for FusionBench's LM methods.

FusionBench's layer-wise AdaMerging for causal LMs (``LayerWiseAdaMergingForLlamaSFT``) reads
``modelpool.load_train_dataset(task)`` through ``default_data_collator``: rows of equal-length
``input_ids``, ``attention_mask`` and ``labels`` (``-100`` where no loss is taken).
"""

from __future__ import annotations

from typing import Optional


def sft_dataset(dataset_path: str, tokenizer: str, max_length: Optional[int] = None):
    """The ``prompt``/``answer`` split at ``dataset_path`` tokenized for the loss on the answer
    tokens, right-padded to ``max_length`` (default: the longest row)."""
    from datasets import Dataset, load_from_disk
    from transformers import AutoTokenizer

    from .train import encode

    rows = load_from_disk(str(dataset_path))
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    input_ids, attention, answer = encode(tok, rows["prompt"], rows["answer"])
    if max_length is not None:
        if input_ids.shape[1] > max_length:
            raise ValueError(
                f"sft_dataset({dataset_path!r}): rows of {input_ids.shape[1]} tokens exceed "
                f"max_length={max_length}"
            )
        pad = max_length - input_ids.shape[1]
        input_ids, attention, answer = (_pad(t, pad) for t in (input_ids, attention, answer.long()))
        answer = answer.bool()
    # HF causal LMs shift the labels themselves: the label at position t is the token at t
    labels = input_ids.masked_fill(~answer.roll(1, dims=1), -100)
    data = Dataset.from_dict(
        {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    )
    return data.with_format("torch")


def _pad(tensor, n: int):
    import torch

    return torch.nn.functional.pad(tensor, (0, n)) if n > 0 else tensor
