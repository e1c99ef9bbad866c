R"""Reading one block's tensors at a time from each model of the pool (spec §1.6).

ProDistill only ever needs block ``l`` of every model while it trains block ``l``. Readers hand out
exactly the requested tensors (canonical names, see :mod:`.layers`), so the models are never all held
whole in memory:

* :class:`SafetensorsReader`: pool entries that resolve to a local directory with ``model.safetensors``
  (or a sharded ``model.safetensors.index.json``). ``safetensors.safe_open`` reads just the requested
  keys; the file is opened per read and closed right after, so the memory-mapped pages of the other
  blocks are never mapped into the process for long.
* :class:`ModuleReader`: pool entries that already are ``nn.Module`` instances (in memory anyway).
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

from ..openclip import is_openclip_pool, load_openclip_model
from .layers import canonical_buffers, canonical_parameters

log = logging.getLogger(__name__)

VISION_PREFIX = "vision_model."


class WeightReader:
    """Reads named tensors (canonical names) of one model on demand."""

    name: str

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """``{canonical name: shape}`` of every vision parameter, without reading any tensor data."""
        raise NotImplementedError

    def read(self, names: Iterable[str]) -> Dict[str, Tensor]:
        """Copies (fp32, CPU) of the requested tensors."""
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
    """

    def __init__(self, name: str, key_files: Mapping[str, Path], buffer_names: Iterable[str] = ()):
        self.name = name
        self._key_files = dict(key_files)
        keys = list(self._key_files)
        # CLIPModel and CLIPVisionModel checkpoints both store `vision_model.<canonical name>`; a
        # flattened checkpoint (no such key) is read as canonical names directly.
        self._prefix = VISION_PREFIX if any(k.startswith(VISION_PREFIX) for k in keys) else ""
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

    def read(self, names: Iterable[str]) -> Dict[str, Tensor]:
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
                        out[canon] = f.get_tensor(self._canonical[canon]).to(torch.float32).clone()
            except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...
                raise unreadable(self.name, path, err) from err
        return out


class ModuleReader(WeightReader):
    """Reads from a model that is already in memory (pool entries given as ``nn.Module``)."""

    def __init__(self, name: str, model: nn.Module):
        self.name = name
        self._params = canonical_parameters(model)

    @property
    def source(self) -> str:
        return "in-memory nn.Module"

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self._params.items()}

    def read(self, names: Iterable[str]) -> Dict[str, Tensor]:
        names = list(names)
        missing = [n for n in names if n not in self._params]
        if missing:
            raise KeyError(f"model {self.name!r} has no parameters {missing[:5]}")
        return {n: self._params[n].detach().to(torch.float32, copy=True) for n in names}


def _local_directory(modelpool, name: str) -> Optional[Path]:
    """The local directory of a pool entry given as a string (local path or resolved hub id)."""
    config = modelpool._models[name]
    if not isinstance(config, str):
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


def _streaming_reader(modelpool, name: str, buffer_names: Iterable[str]) -> Optional[WeightReader]:
    config = modelpool._models[name]
    if isinstance(config, nn.Module):
        return ModuleReader(name, config)
    directory = _local_directory(modelpool, name)
    if directory is not None:
        key_files = _safetensors_files(directory, name)
        if key_files is not None:
            return SafetensorsReader(name, key_files, buffer_names)
    return None


def open_reader(modelpool, name: str, buffer_names: Iterable[str] = ()) -> WeightReader:
    """A reader for one pass over pool entry ``name``: streamed from safetensors when possible, else
    from the model loaded once in memory (nothing is written). Free it before opening the next."""
    reader = _streaming_reader(modelpool, name, buffer_names)
    return reader if reader is not None else ModuleReader(name, load_pool_model(modelpool, name))


def make_reader(
    modelpool, name: str, scratch_dir: Path, buffer_names: Iterable[str] = ()
) -> WeightReader:
    """A block-wise reader for pool entry ``name`` (see the module docstring for the three cases)."""
    reader = _streaming_reader(modelpool, name, buffer_names)
    if reader is not None:
        return reader
    # Fallback: load once, write the vision parameters to a scratch safetensors file, free the model.
    from safetensors.torch import save_file

    log.info(f"model {name!r}: no safetensors checkpoint to stream from; converting it once")
    model = load_pool_model(modelpool, name)
    state = {
        n: p.detach().to(torch.float32).contiguous() for n, p in canonical_parameters(model).items()
    }
    buffer_names = set(buffer_names) | set(canonical_buffers(model))
    scratch_dir.mkdir(parents=True, exist_ok=True)
    path = scratch_dir / f"{name.replace('/', '_')}.safetensors"
    save_file(state, str(path))
    del model, state
    gc.collect()
    return SafetensorsReader(name, {k: path for k in _keys_of(name, path)}, buffer_names)
