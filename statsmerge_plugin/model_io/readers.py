R"""Reading one group of tensors (a block) at a time from each model of a pool (ProDistill spec §1.6).

ProDistill only ever needs block ``l`` of every model while it trains block ``l``; StatsMerging's
statistics and both methods' checks stream the models group by group. Readers hand out exactly the
requested tensors (canonical names, see :mod:`.canonical`), so the models are never all held whole
in memory:

* :class:`SafetensorsReader`: pool entries that resolve to a local directory with ``model.safetensors``
  (or a sharded ``model.safetensors.index.json``). ``safetensors.safe_open`` reads just the requested
  keys; the file is opened per read and closed right after, so the memory-mapped pages of the other
  blocks are never mapped into the process for long.
* :class:`ModuleReader`: pool entries that already are ``nn.Module`` instances (in memory anyway), or
  a mapping of tensors such as FusionBench's ``LazyStateDict`` (``CausalLMPool`` with
  ``enable_lazy_loading``), which reads each tensor from its checkpoint on access.
* Fallback (:func:`make_reader` with anything else, e.g. a ``DictConfig`` or a directory with only
  ``pytorch_model.bin``): the model is loaded *once*, its vision parameters are written to a
  ``safetensors`` file in a scratch directory, the model is freed, and a :class:`SafetensorsReader`
  serves the blocks from that file (the official NLG code pre-splits checkpoints the same way).
  :func:`open_reader` (for a single pass, e.g. validation) loads such a model and reads from it in
  memory instead, without writing anything.

A file that cannot be read (truncated, corrupt, not a safetensors file) raises ``ValueError`` naming
the model and the file.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..method.openclip import is_openclip_pool, load_openclip_model
from .canonical import canonical_buffers, canonical_parameters

log = logging.getLogger(__name__)

VISION_PREFIX = "vision_model."
#: prefixes a checkpoint may put before a model's canonical names: a CLIPModel's vision tower, a
#: GPT2ForSequenceClassification checkpoint read as GPT2Model (FusionBench's ``gpt-2_glue`` pool)
PREFIXES = ("", VISION_PREFIX, "transformer.")


def checkpoint_prefix(keys: Iterable[str], reference: Optional[Iterable[str]] = None) -> str:
    """The prefix of ``keys`` before canonical names.

    Without ``reference`` (vision pools): ``vision_model.`` when a key has it, else none. With the
    ``reference`` canonical names: the first of :data:`PREFIXES` under which every reference name
    is a key (else the one that covers most; validation then names what is missing).
    """
    keys = set(keys)
    if reference is None:
        return VISION_PREFIX if any(k.startswith(VISION_PREFIX) for k in keys) else ""
    reference = list(reference)
    cover = [sum(p + r in keys for r in reference) for p in PREFIXES]
    return PREFIXES[max(range(len(PREFIXES)), key=lambda i: (cover[i], -i))]


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def _cast(tensor: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    return tensor if dtype is None else tensor.to(dtype)


class WeightReader:
    """Reads named tensors (canonical names) of one model on demand."""

    name: str

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """``{canonical name: shape}`` of every vision parameter, without reading any tensor data."""
        raise NotImplementedError

    def read(
        self, names: Iterable[str], dtype: Optional[torch.dtype] = torch.float32
    ) -> Dict[str, Tensor]:
        """Copies (CPU) of the requested tensors, in ``dtype`` (``None``: as stored)."""
        raise NotImplementedError

    @property
    def source(self) -> str:
        raise NotImplementedError


def unreadable(name: str, path, err: Exception) -> ValueError:
    """The error for a model file that cannot be read, naming the model and the file."""
    return ValueError(f"model {name!r}: cannot read {str(path)!r} ({type(err).__name__}: {err})")


def _keys_of(name: str, path: Path) -> List[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise unreadable(name, path, err) from err


def _safetensors_files(directory: Path, name: str = "<model>") -> Optional[Dict[str, Path]]:
    """``{file key: shard path}`` for a directory holding a (possibly sharded) safetensors model."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return {k: single for k in _keys_of(name, single)}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise unreadable(name, index, err) from err
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise ValueError(f"model {name!r}: shard {str(directory / shard)!r} is missing")
        return {k: directory / shard for k, shard in weight_map.items()}
    return None


class SafetensorsReader(WeightReader):
    """Block-wise reads from safetensors files via ``safe_open`` (one open/close per read).

    Args:
        name: the model's name in the pool (used in error messages).
        key_files: ``{file key: shard path}``.
        buffer_names: canonical names of buffers (e.g. ``embeddings.position_ids``), ignored.
        reference: canonical names of the model the tensors are for; picks the checkpoint's prefix
            (see :func:`checkpoint_prefix`).
    """

    def __init__(
        self,
        name: str,
        key_files: Mapping[str, Path],
        buffer_names: Iterable[str] = (),
        reference: Optional[Iterable[str]] = None,
    ):
        self.name = name
        self._key_files = dict(key_files)
        keys = list(self._key_files)
        # CLIPModel and CLIPVisionModel checkpoints both store `vision_model.<canonical name>`; a
        # flattened checkpoint (no such key) is read as canonical names directly.
        self._prefix = checkpoint_prefix(keys, reference)
        buffers = set(buffer_names)
        self._canonical = {
            k[len(self._prefix) :]: k
            for k in keys
            if k.startswith(self._prefix) and k[len(self._prefix) :] not in buffers
        }
        self._shapes: Optional[Dict[str, Tuple[int, ...]]] = None

    @property
    def source(self) -> str:
        files = sorted({str(p) for p in self._key_files.values()})
        return files[0] if len(files) == 1 else f"{len(files)} safetensors shards"

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        if self._shapes is None:
            from safetensors import safe_open

            shapes = {}
            by_file: Dict[Path, List[str]] = {}
            for canon, key in self._canonical.items():
                by_file.setdefault(self._key_files[key], []).append(canon)
            for path, names in by_file.items():
                try:
                    with safe_open(str(path), framework="pt") as f:
                        for canon in names:
                            shapes[canon] = tuple(f.get_slice(self._canonical[canon]).get_shape())
                except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...
                    raise unreadable(self.name, path, err) from err
            self._shapes = shapes
        return dict(self._shapes)

    def dtypes(self) -> Dict[str, torch.dtype]:
        """``{canonical name: stored dtype}`` (header only, no tensor data)."""
        from safetensors import safe_open

        out = {}
        by_file: Dict[Path, List[str]] = {}
        for canon, key in self._canonical.items():
            by_file.setdefault(self._key_files[key], []).append(canon)
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for canon in names:
                    code = f.get_slice(self._canonical[canon]).get_dtype()
                    out[canon] = SAFETENSORS_DTYPES.get(code, torch.float32)
        return out

    def read(
        self, names: Iterable[str], dtype: Optional[torch.dtype] = torch.float32
    ) -> Dict[str, Tensor]:
        from safetensors import safe_open

        names = list(names)
        missing = [n for n in names if n not in self._canonical]
        if missing:
            raise KeyError(f"model {self.name!r} has no parameters {missing[:5]}")
        by_file: Dict[Path, List[str]] = {}
        for canon in names:
            by_file.setdefault(self._key_files[self._canonical[canon]], []).append(canon)
        out = {}
        for path, group in by_file.items():
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for canon in group:
                        # .to(float32) of a float32 tensor is a no-op, so clone to own the memory
                        # independently of the file mapping, which is closed right after.
                        out[canon] = _cast(f.get_tensor(self._canonical[canon]), dtype).clone()
            except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...
                raise unreadable(self.name, path, err) from err
        return out


class ModuleReader(WeightReader):
    """Reads from a model that is already in memory (pool entries given as ``nn.Module``), or from a
    mapping of tensors read on access (FusionBench's ``LazyStateDict``)."""

    def __init__(self, name: str, model: "nn.Module | Mapping[str, Tensor]"):
        self.name = name
        self._lazy = not isinstance(model, nn.Module)
        if self._lazy:
            skip = set(getattr(model, "tied_weights_keys", None) or ())
            self._params = model
            self._shapes = {
                n: tuple(p.shape)
                for n, p in model.meta_module.named_parameters()
                if n in model and n not in skip
            }
        else:
            self._params = canonical_parameters(model)
            self._shapes = {n: tuple(p.shape) for n, p in self._params.items()}

    @property
    def source(self) -> str:
        if self._lazy:
            return f"LazyStateDict of {getattr(self._params, 'checkpoint', '?')}"
        return "in-memory nn.Module"

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return dict(self._shapes)

    def dtypes(self) -> Dict[str, torch.dtype]:
        if self._lazy:
            meta = dict(self._params.meta_module.named_parameters())
            return {n: meta[n].dtype for n in self._shapes}
        return {n: p.dtype for n, p in self._params.items()}

    def read(
        self, names: Iterable[str], dtype: Optional[torch.dtype] = torch.float32
    ) -> Dict[str, Tensor]:
        names = list(names)
        missing = [n for n in names if n not in self._shapes]
        if missing:
            raise KeyError(f"model {self.name!r} has no parameters {missing[:5]}")
        out = {}
        for n in names:
            t = self._params[n].detach()
            out[n] = t.to(dtype or t.dtype, copy=True)
        return out


def _local_directory(modelpool, name: str) -> Optional[Path]:
    """The local directory of a pool entry given as a string (local path or resolved hub id)."""
    config = _entry_path(modelpool._models[name])
    if config is None:
        return None
    if os.path.isdir(config):
        return Path(config)
    if os.path.isfile(config):  # a checkpoint file (e.g. an open_clip pickle), not a hub id
        return None
    try:  # a hub id: the same resolution `CLIPVisionModelPool.load_model` performs
        from fusion_bench.utils.modelscope import resolve_repo_path

        path = resolve_repo_path(
            config, repo_type="model", platform=getattr(modelpool, "_platform", "hf")
        )
    except Exception as err:  # noqa: BLE001 - fall back to loading the model
        log.info(f"model {name!r}: could not resolve {config!r} to a local directory ({err})")
        return None
    return Path(path) if path is not None and os.path.isdir(path) else None


def load_pool_model(modelpool, name: str) -> nn.Module:
    """``modelpool.load_model(name)``; a failure names the model and its pool entry (path or id)."""
    try:
        if is_openclip_pool(modelpool):
            return load_openclip_model(modelpool, name)
        return modelpool.load_model(name)
    except Exception as err:  # noqa: BLE001 - OSError, SafetensorError, ValueError, ...
        config = modelpool._models.get(name) if hasattr(modelpool, "_models") else None
        if isinstance(config, (str, os.PathLike)) and os.path.isdir(config):
            _safetensors_files(Path(config), name)  # names the unreadable file, if that is it
        where = f" ({config})" if isinstance(config, (str, os.PathLike)) else ""
        raise ValueError(
            f"model {name!r}{where} cannot be loaded ({type(err).__name__}: {err})"
        ) from err


def _entry_path(config) -> Optional[str]:
    """The checkpoint a pool entry names: a string, or ``pretrained_model_name_or_path`` of a config
    (``CausalLMPool`` and ``gpt-2_glue`` entries)."""
    if isinstance(config, (str, os.PathLike)):
        return str(config)
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(config) or isinstance(config, Mapping):
            value = config.get("pretrained_model_name_or_path")
            return str(value) if value is not None else None
    except Exception:  # noqa: BLE001
        pass
    return None


def _streaming_reader(
    modelpool, name: str, buffer_names: Iterable[str], reference: Optional[Iterable[str]] = None
) -> Optional[WeightReader]:
    config = modelpool._models[name]
    if isinstance(config, nn.Module):
        return ModuleReader(name, config)
    directory = _local_directory(modelpool, name)
    if directory is not None:
        key_files = _safetensors_files(directory, name)
        if key_files is not None:
            return SafetensorsReader(name, key_files, buffer_names, reference)
    return None


def _loaded_reader(modelpool, name: str) -> WeightReader:
    return _as_reader(name, load_pool_model(modelpool, name))


def _as_reader(name: str, model) -> WeightReader:
    if not isinstance(model, nn.Module) and not hasattr(model, "meta_module"):
        raise ValueError(
            f"model {name!r}: the pool returned a {type(model).__name__}, not a model or a "
            "LazyStateDict; cannot read its weights"
        )
    return ModuleReader(name, model)


def open_reader(
    modelpool,
    name: str,
    buffer_names: Iterable[str] = (),
    reference: Optional[Iterable[str]] = None,
) -> WeightReader:
    """A reader for one pass over pool entry ``name``: streamed from safetensors when possible, else
    from the model loaded once in memory (nothing is written). Free it before opening the next."""
    reader = _streaming_reader(modelpool, name, buffer_names, reference)
    return reader if reader is not None else _loaded_reader(modelpool, name)


def make_reader(
    modelpool,
    name: str,
    scratch_dir: Path,
    buffer_names: Iterable[str] = (),
    reference: Optional[Iterable[str]] = None,
) -> WeightReader:
    """A block-wise reader for pool entry ``name`` (see the module docstring for the three cases)."""
    reader = _streaming_reader(modelpool, name, buffer_names, reference)
    if reader is not None:
        return reader
    # Fallback: load once, write the vision parameters to a scratch safetensors file, free the model.
    from safetensors.torch import save_file

    log.info(f"model {name!r}: no safetensors checkpoint to stream from; converting it once")
    model = load_pool_model(modelpool, name)
    if not isinstance(model, nn.Module):  # a LazyStateDict reads tensor by tensor already
        return _as_reader(name, model)
    state = {
        n: p.detach().contiguous() for n, p in canonical_parameters(model).items()  # stored dtype
    }
    buffer_names = set(buffer_names) | set(canonical_buffers(model))
    scratch_dir.mkdir(parents=True, exist_ok=True)
    path = scratch_dir / f"{name.replace('/', '_')}.safetensors"
    save_file(state, str(path))
    del model, state
    gc.collect()
    return SafetensorsReader(name, {k: path for k in _keys_of(name, path)}, buffer_names, reference)
