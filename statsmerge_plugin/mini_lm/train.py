"""Model, tokenizer, training and exact-match scoring of the language miniature (issue 17).

The model is a small ``LlamaForCausalLM`` from transformers (random init, untied head), the
tokenizer a character-level ``PreTrainedTokenizerFast`` (one token per character, ``<pad>`` = 0),
so that FusionBench's ``CausalLMPool`` loads both with ``from_pretrained``.

Exact match is scored teacher-forced: a prompt counts as solved when the arg-max next token is the
reference token at every answer position, the final ``"."`` included. That is exactly the event
"greedy decoding of the prompt, cut at its first ``"."``, equals the answer" (greedy decoding
reproduces the reference prefix as long as every earlier arg-max agreed), at the cost of one
forward pass per batch instead of one per generated token.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

from .skills import ALPHABET

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def build_tokenizer(directory: Optional[Path] = None):
    """The character-level tokenizer (saved to ``directory`` when given)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, BOS: 1, EOS: 2} | {c: i + 3 for i, c in enumerate(ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="right"
    )
    if directory is not None:
        fast.save_pretrained(directory)
    return fast


def model_config(vocab_size: int, width: int, layers: int, heads: int, mlp: int, max_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def encode(tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> Tuple[torch.Tensor, ...]:
    """Right-padded ``input_ids``, ``attention_mask`` and an ``answer_mask`` marking the positions
    whose *next* token is an answer token (where the loss and the exact match are read)."""
    ids = [tokenizer.encode(p + a, add_special_tokens=False) for p, a in zip(prompts, answers)]
    starts = [len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
    length = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), length, dtype=torch.long)
    attention = torch.zeros(len(ids), length, dtype=torch.long)
    answer = torch.zeros(len(ids), length, dtype=torch.bool)
    for row, (x, start) in enumerate(zip(ids, starts)):
        input_ids[row, : len(x)] = torch.tensor(x)
        attention[row, : len(x)] = 1
        answer[row, start - 1 : len(x) - 1] = True
    return input_ids, attention, answer


def next_token_loss(model, input_ids, attention, target_mask) -> torch.Tensor:
    """Mean cross-entropy of the next token at the positions of ``target_mask``."""
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    targets = input_ids.roll(-1, dims=1)
    return torch.nn.functional.cross_entropy(logits[target_mask], targets[target_mask])


def train(
    model,
    batches: Callable[[random.Random], Tuple[torch.Tensor, ...]],
    steps: int,
    lr: float,
    weight_decay: float,
    seed: int,
    desc: str,
    progress: bool = True,
    warmup: int = 50,
) -> List[float]:
    """AdamW with linear warm-up and cosine decay; ``batches(rng)`` draws one batch. Returns the
    loss of every step."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = min(warmup, max(1, steps // 10))

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        loss = next_token_loss(model, *batches(rng))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def exact_match(
    model, tokenizer, examples: Iterable[Tuple[str, str]], batch_size: int = 256
) -> List[bool]:
    """Per example: does greedy decoding of the prompt reproduce the answer (see module doc)?"""
    examples = list(examples)
    was_training = model.training
    model.eval()
    out: List[bool] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        input_ids, attention, answer = encode(tokenizer, *zip(*chunk))
        device = next(model.parameters()).device
        input_ids, attention, answer = (t.to(device) for t in (input_ids, attention, answer))
        predicted = model(input_ids=input_ids, attention_mask=attention).logits.argmax(-1)
        hit = (predicted == input_ids.roll(-1, dims=1)) | ~answer
        out.extend(hit.all(dim=1).tolist())
    model.train(was_training)
    return out
