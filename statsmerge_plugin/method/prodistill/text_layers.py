R"""ProDistill's adapters for language models (issue 17): GPT-2 (FusionBench's ``gpt-2_glue`` pool,
whose models are ``GPT2Model`` backbones) and decoder-only causal LMs (``LlamaForCausalLM``,
``Qwen2ForCausalLM``, ``MistralForCausalLM`` through FusionBench's ``CausalLMPool``).

A text batch is ``{"input_ids": [N, S], "attention_mask": [N, S]}``, padded on the right. Each block
is called with an explicit additive attention mask ``[N, 1, S, S]`` that is causal *and* hides
padded keys (so a real token never attends to padding), position ids ``0..S-1``, and for decoders
the rotary ``(cos, sin)`` of those positions; caches are off. Padded positions still flow through
the blocks (their rows are never read by a real token) but never enter the feature loss: the loss
is masked with the same attention mask (:func:`.merge.block_loss`).

What sits outside the blocks: GPT-2's ``wte``/``wpe`` (embedding stage) and ``ln_f``; a decoder's
``model.embed_tokens`` (embedding stage), ``model.norm`` and ``lm_head`` (if not tied). Those are
merged by task arithmetic (spec §1.1, §5.1).
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .layers import BlockLayout

#: decoder families whose layers take (hidden, attention_mask, position_ids, position_embeddings)
#: and whose embedding stage is a plain lookup (no scaling, as Gemma's): checked by name
DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def causal_padding_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``[N, S]`` real-token mask → additive ``[N, 1, S, S]`` mask: query ``i`` may attend key ``j``
    iff ``j <= i`` and ``j`` is real (and always itself, so a padded row is never empty)."""
    n, s = mask.shape
    causal = torch.ones(s, s, dtype=torch.bool, device=mask.device).tril()
    allowed = causal[None] & mask.bool()[:, None, :]
    allowed |= torch.eye(s, dtype=torch.bool, device=mask.device)[None]
    additive = torch.zeros(n, 1, s, s, dtype=dtype, device=mask.device)
    return additive.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _positions(hidden: Tensor) -> Tensor:
    return torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)


def _sub(params: Mapping[str, Tensor], prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


# --- GPT-2 ----------------------------------------------------------------------------------------


def call_gpt2_block(
    block: nn.Module, params: Mapping[str, Tensor], hidden: Tensor, mask: Optional[Tensor] = None
) -> Tensor:
    """A ``GPT2Block`` on ``hidden`` ``[N, S, D]`` with the causal padding mask of ``mask``."""
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    kwargs = {"attention_mask": causal_padding_mask(mask, hidden.dtype), "use_cache": False}
    return _first(functional_call(block, dict(params), (hidden,), kwargs, strict=False))


def call_gpt2_embedding_stage(stage: nn.Module, params: Mapping[str, Tensor], inputs) -> Tensor:
    """GPT-2's block-0 input: ``wte(input_ids) + wpe(positions)`` (embedding dropout is off in
    evaluation)."""
    ids = inputs["input_ids"]
    tokens = functional_call(stage.wte, _sub(params, "wte."), (ids,), strict=False)
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    return tokens + functional_call(stage.wpe, _sub(params, "wpe."), (positions,), strict=False)


GPT2_LAYOUT = BlockLayout(
    "transformers GPT2Model",
    re.compile(r"^h\.(\d+)\.(.+)$"),
    "h.{}.",
    "h",
    ("wte", "wpe"),
    ("wte.", "wpe."),
    call_gpt2_block,
    call_gpt2_embedding_stage,
)


# --- decoder-only causal LMs ----------------------------------------------------------------------


class DecoderLayout(BlockLayout):
    """Llama-style decoders: ``model.embed_tokens`` → ``model.layers[l]`` → ``model.norm`` →
    ``lm_head``. The rotary embedding module (buffers only) is kept by the layout, on the compute
    device, to give each block the ``(cos, sin)`` of the positions.
    """

    def __init__(self, model_type: str, rotary: nn.Module):
        super().__init__(
            f"transformers decoder ({model_type})",
            re.compile(r"^model\.layers\.(\d+)\.(.+)$"),
            "model.layers.{}.",
            "model.layers",
            ("model",),
            ("model.embed_tokens.",),
            self._call_block,
            self._call_embedding_stage,
        )
        self.model_type = model_type
        self.rotary = rotary

    def to(self, device) -> "DecoderLayout":
        self.rotary = self.rotary.to(device)
        return self

    def embedding_stage_modules(self, backbone: nn.Module):
        return {}  # a plain lookup of the given weight (the skeleton's own weights are empty)

    def _call_embedding_stage(self, stage: nn.Module, params: Mapping[str, Tensor], inputs):
        weight = params["model.embed_tokens.weight"]
        return nn.functional.embedding(inputs["input_ids"], weight)

    def _call_block(
        self,
        block: nn.Module,
        params: Mapping[str, Tensor],
        hidden: Tensor,
        mask: Optional[Tensor] = None,
    ) -> Tensor:
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        positions = _positions(hidden)
        self.rotary.to(hidden.device)
        cos, sin = self.rotary(hidden, positions)
        kwargs = {
            "attention_mask": causal_padding_mask(mask, hidden.dtype),
            "position_ids": positions,
            "position_embeddings": (cos.to(hidden.dtype), sin.to(hidden.dtype)),
            "use_cache": False,
        }
        return _first(functional_call(block, dict(params), (hidden,), kwargs, strict=False))


def text_layout(model: nn.Module) -> Optional[BlockLayout]:
    """The language adapter of ``model``, ``None`` if it is not a language model.

    Raises:
        ValueError: for a decoder whose model type is not one of :data:`DECODER_MODEL_TYPES`.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    inner = getattr(model, "model", None)
    if model_type == "gpt2" and hasattr(model, "h") and hasattr(model, "wte"):
        return GPT2_LAYOUT
    if inner is not None and hasattr(inner, "layers") and hasattr(inner, "embed_tokens"):
        if model_type not in DECODER_MODEL_TYPES:
            raise ValueError(
                f"ProDistill has no adapter for decoder model type {model_type!r} "
                f"({type(model).__name__}); supported: {', '.join(DECODER_MODEL_TYPES)}"
            )
        return DecoderLayout(model_type, inner.rotary_emb)
    if model_type == "gpt2":
        raise ValueError(
            f"ProDistill merges GPT2Model backbones (FusionBench's gpt-2_glue pool), got "
            f"{type(model).__name__}"
        )
    return None
