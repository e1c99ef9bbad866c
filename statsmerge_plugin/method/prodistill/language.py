R"""ProDistill for language models (issue 17): ``fusion_bench method=prodistill/causal_lm`` on
FusionBench's ``CausalLMPool`` (Llama, Qwen2, Mistral decoders) and ``method=prodistill/gpt2_glue``
on its ``gpt-2_glue`` pool (``GPT2Model`` backbones; each task keeps its own classifier head, as
FusionBench's ``GPT2TextClassificationTaskPool`` attaches it).

The loop is :class:`~.engine.ProDistillEngine`'s (spec §1.3–§1.6): the same dual inputs and
element-wise coefficients per task and parameter of the current decoder layer, with each sample's
own fine-tuned layer as the teacher, the feature loss over real tokens only, and everything outside
the layers (token/position embeddings, final norm, untied LM head) by task arithmetic. Differences
from the vision class, all for scale (spec §1.6, the official LLM script loads full models):

* the output skeleton is built from the pretrained config with empty (``meta``) weights; nothing is
  allocated for a full model until the end, when the merged tensors, written block by block to the
  scratch directory in the pool's dtype, are *memory-mapped* into it (``load_state_dict(assign=True)``
  from safetensors): the returned model's pages are read from disk when first used, so the run's peak
  memory does not grow with depth;
* block weights stay in their stored dtype (bfloat16 for FusionBench's LLM pools) and are cast to
  float32 per tensor inside the merge; coefficients and Adam moments are float32;
* few-shot prompts come from per-task specs (:mod:`statsmerge_plugin.text_data`, never a test split),
  checked before any model is loaded. GPT-2 defaults to the pool's own train/val datasets.

The official LLM code samples its shots from the evaluation sets; here that is refused.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from fusion_bench.mixins import auto_register_config
from fusion_bench.modelpool import BaseModelPool
from safetensors.torch import load_file, save_file
from torch import nn

from ...data import (
    HELD_OUT_SOURCES,
    TestSplitGuard,
    dataset_record,
    held_out_indices,
    resolve_held_out_source,
)
from ...memory import release_free_memory
from ...model_io import canonical_buffers, canonical_parameters, load_pool_model, make_reader
from ...text_data import few_shot_texts, pad_shots, parse_specs, tokenize_texts
from ...threads import configure_torch_threads
from ...validation import check_choice, check_int, check_pool_models
from .adapters import block_layout
from .engine import PRETRAINED, ProDistillEngine

log = logging.getLogger(__name__)


@auto_register_config
class ProDistillForCausalLM(ProDistillEngine):
    """ProDistill for a ``CausalLMPool`` (decoder-only LMs sharing one architecture).

    Args:
        few_shot: ``{task: spec}`` few-shot prompt specs (:class:`~statsmerge_plugin.text_data.
            FewShotTextSpec`: ``dataset``, ``split``, ``name``, ``template`` or ``text_field``,
            ``shots``, ``max_tokens``); required for a ``CausalLMPool`` (it has no datasets).
        max_tokens: tokens per prompt (longer prompts are cut); a spec's ``max_tokens`` wins.
        **kwargs: the engine's options (:class:`~.engine.ProDistillEngine`).
    """

    def __init__(self, few_shot: Optional[dict] = None, max_tokens: int = 256, **kwargs):
        super().__init__(**kwargs)

    def check_options(self) -> None:
        super().check_options()
        check_int("max_tokens", self.max_tokens, 1)

    # --- data -----------------------------------------------------------------------------------

    def few_shot_inputs(self, modelpool, tasks: List[str], guard: TestSplitGuard) -> List:
        """Every task's prompts, tokenized with the pool's tokenizer (before any model is loaded)."""
        specs = parse_specs(self.few_shot, tasks)
        loaded = {}
        for task, spec in specs.items():  # all refusals (splits, fingerprints) before tokenizing
            loaded[task] = few_shot_texts(
                task, spec, spec.shots or self.shots_per_task, self.seed, guard
            )
        tokenizer = modelpool.load_tokenizer()
        self._data_read = {t: record for t, (_, record) in loaded.items()}
        ids = {
            t: tokenize_texts(texts, tokenizer, specs[t].max_tokens or self.max_tokens)
            for t, (texts, _) in loaded.items()
        }
        return self._pad(ids, tasks, getattr(tokenizer, "pad_token_id", None))

    def _pad(self, ids: Dict[str, List[List[int]]], tasks: List[str], pad_id) -> List:
        length = max(len(s) for seqs in ids.values() for s in seqs)
        self._data_info = {t: len(ids[t]) for t in tasks}
        return [pad_shots(ids[t], length, pad_id or 0) for t in tasks]

    # --- the output skeleton --------------------------------------------------------------------

    def load_skeleton(self, modelpool) -> nn.Module:
        """The pretrained architecture with empty weights (its buffers, e.g. rotary frequencies,
        are real): from the pretrained config and the pool's ``model_kwargs`` dtype."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        path = modelpool.get_model_path(PRETRAINED)
        kwargs = modelpool.get_model_kwargs() if hasattr(modelpool, "get_model_kwargs") else {}
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as err:  # noqa: BLE001
            raise ValueError(
                f"model {PRETRAINED!r} ({path}): cannot read its config ({err})"
            ) from err
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                config, torch_dtype=kwargs.get("torch_dtype") or config.torch_dtype
            )
        model.tie_weights()  # tied embeddings are one parameter (and one checkpoint key)
        return model

    def check_pool(self, modelpool) -> None:
        if not isinstance(modelpool, BaseModelPool) or not hasattr(modelpool, "load_tokenizer"):
            raise TypeError(
                f"{type(self).__name__} needs a CausalLMPool (models and a tokenizer), got "
                f"{type(modelpool).__name__}"
            )

    # --- the algorithm --------------------------------------------------------------------------

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        """Merge the pool's decoders with ProDistill; returns the merged model (memory-mapped from
        the merged checkpoint in the scratch directory, see the module docstring)."""
        self.check_options()
        self.check_pool(modelpool)
        check_pool_models(modelpool, min_models=1 if self.allow_single_task else 2)
        tasks = list(modelpool.model_names)
        configure_torch_threads()
        guard = TestSplitGuard(modelpool, getattr(self._program, "taskpool", None))
        t0 = time.perf_counter()
        with self.profile("few-shot data"):
            inputs = self.few_shot_inputs(modelpool, tasks, guard)  # refusals before any model
        self.check_outputs()
        self.block_records, self.loss_curves = [], type(self.loss_curves)()
        own_scratch = self.scratch_dir is None
        scratch = (  # a temporary directory is this process's own; a given one gets rank subdirs
            Path(tempfile.mkdtemp(prefix="prodistill_"))
            if own_scratch
            else self.rank_scratch(Path(self.scratch_dir))
        )
        try:
            return self._run(modelpool, tasks, inputs, scratch, t0)
        finally:  # the returned model maps files that are unlinked here: their pages stay readable
            if own_scratch:
                shutil.rmtree(scratch, ignore_errors=True)

    def _run(self, modelpool, tasks, inputs, scratch: Path, t0: float) -> nn.Module:
        device = self.fabric.device
        with self.profile("load output skeleton"):
            model = self.load_skeleton(modelpool)
            self._layout = layout = block_layout(model)
            if hasattr(layout, "to"):
                layout.to(device)
            params = canonical_parameters(model)
            self.set_dtypes(params)
            reference = {n: tuple(p.shape) for n, p in params.items()}
            dtypes = {n: p.dtype for n, p in params.items()}
        with self.profile("open readers and validate"):
            buffers = list(canonical_buffers(model))
            readers = {
                name: make_reader(modelpool, name, scratch / "converted", buffers, reference)
                for name in [PRETRAINED] + tasks
            }
            self._sources = {name: r.source for name, r in readers.items()}
            ref_blocks = self.validate_pool(reference, readers)
            _, other_names = layout.group_names(reference)
        merged_dir = scratch / "merged"
        merged_dir.mkdir(parents=True, exist_ok=True)
        with self.profile("task arithmetic (non-block)"), torch.no_grad():
            outside = {}

            def store(name, value):
                outside[name] = value.to(dtypes[name])

            student_emb = self.merge_outside_blocks(other_names, readers, tasks, store)
            save_file(outside, str(merged_dir / "outside_blocks.safetensors"))
            del outside
            release_free_memory()  # the embedding-sized temporaries, before the first layer
        with self.profile("stage 0: embeddings"):
            first = next(iter(ref_blocks))
            block_numel = sum(
                int(torch.Size(reference[layout.block_prefix(first) + n]).numel())
                for n in ref_blocks[first]
            )
            cache = self.stage0(
                model, inputs, student_emb, readers, tasks, device, scratch, block_numel
            )
            self._cache_info = {"placement": cache.placement, "mb": cache.nbytes / 2**20}
        del student_emb, inputs
        release_free_memory()
        setup_seconds = time.perf_counter() - t0
        self.distill_blocks(
            ref_blocks, layout.blocks(model), readers, tasks, cache, device, merged_dir
        )
        with self.profile("assemble output"):
            state = {}
            for path in sorted(merged_dir.glob("*.safetensors")):
                state.update(load_file(str(path)))  # memory-mapped, nothing read yet
            missing = sorted(set(reference) - set(state))
            if missing:
                raise RuntimeError(f"ProDistill: merged checkpoint lacks {missing[:5]}")
            model.load_state_dict(state, strict=False, assign=True)
            if hasattr(model, "tie_weights"):
                model.tie_weights()
        self.write_outputs(tasks, setup_seconds, time.perf_counter() - t0)
        self.print_profile_summary()
        return model.eval()


@auto_register_config
class ProDistillForGPT2(ProDistillForCausalLM):
    """ProDistill for FusionBench's ``gpt-2_glue`` pool (``GPT2Model`` backbones).

    Args:
        data_source: with ``few_shot: null`` (default) the pool's own tokenized GLUE datasets: ``auto``
            (the val split if the pool has one for the task, else a seeded train slice), ``val`` or
            ``train``; never the test split (the task pool's GLUE validation sets are its test sets
            and are refused by the guard).
        few_shot: optional per-task specs instead (as :class:`ProDistillForCausalLM`).
        **kwargs: ``max_tokens`` and the engine's options.
    """

    def __init__(self, data_source: str = "auto", **kwargs):
        super().__init__(**kwargs)

    def check_options(self) -> None:
        super().check_options()
        check_choice("data_source", self.data_source, HELD_OUT_SOURCES)

    def check_pool(self, modelpool) -> None:
        if not isinstance(modelpool, BaseModelPool) or not hasattr(modelpool, "load_classifier"):
            raise TypeError(
                "ProDistillForGPT2 needs FusionBench's GPT-2 classification pool (gpt-2_glue), got "
                f"{type(modelpool).__name__}"
            )

    def load_skeleton(self, modelpool) -> nn.Module:
        import copy

        model = load_pool_model(modelpool, PRETRAINED)  # GPT2Model, 124M parameters at most
        return (
            copy.deepcopy(model) if isinstance(modelpool._models[PRETRAINED], nn.Module) else model
        )

    def few_shot_inputs(self, modelpool, tasks: List[str], guard: TestSplitGuard) -> List:
        if self.few_shot is not None:
            return super().few_shot_inputs(modelpool, tasks, guard)
        ids, self._data_read = {}, {}
        for task in tasks:
            split = resolve_held_out_source(modelpool, task, self.data_source, guard)
            dataset = getattr(modelpool, f"load_{split}_dataset")(task)
            guard.check_dataset(task, split, dataset)
            rows = held_out_indices(len(dataset), self.shots_per_task, self.seed, task, split)
            ids[task] = [_real_ids(dataset[i], self.max_tokens) for i in rows]
            self._data_read[task] = dataset_record(dataset, split) | {"num_samples": len(rows)}
        tokenizer = getattr(modelpool, "tokenizer", None)
        return self._pad(ids, tasks, getattr(tokenizer, "pad_token_id", None))


def _real_ids(row, max_tokens: int) -> List[int]:
    """The real (unpadded) token ids of a tokenized row (``input_ids``, ``attention_mask``); the
    label, if any, is not read."""
    ids = list(row["input_ids"])
    mask = row.get("attention_mask")
    if mask is not None:
        ids = [i for i, m in zip(ids, mask) if m]
    return ids[:max_tokens]
