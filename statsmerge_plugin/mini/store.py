"""Where mini builds live, and how they are published: the cache root, the manifest that marks a
complete build, an ``fcntl`` lock per key, the atomic install of a finished build
(:func:`cached_build` is the whole flow), the digests of what a build holds (:func:`build_digests`:
same key, same digests), and a scoped torch thread count. Shared by the mini-TA8 builder, its derived corrupted splits and the language
miniature (:mod:`statsmerge_plugin.mini_lm`); imports nothing else of the package.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

ENV_ROOT = "STATSMERGE_MINI_ROOT"
MANIFEST = "manifest.json"


def default_root() -> Path:
    """``$STATSMERGE_MINI_ROOT`` or ``<user cache dir>/statsmerge-plugin/mini``."""
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("statsmerge-plugin")) / "mini"


def check_root(root: Path) -> Path:
    """``root`` as a directory the builder can write into (created if missing), else a clear error."""
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"mini benchmark root {str(root)!r} exists and is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the mini benchmark root {str(root)!r}: {err}") from err
    if not os.access(root, os.W_OK | os.X_OK):
        raise PermissionError(f"mini benchmark root {str(root)!r} is not writable")
    return root


def read_manifest(path: Path) -> Optional[dict]:
    """The manifest of a complete build at ``path``, else ``None``."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("complete") else None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive ``fcntl`` lock (blocks until the holder releases it, e.g. another DDP rank)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def effective_threads(n: int) -> int:
    """The torch thread count a build asking for ``n`` threads runs with on this machine."""
    return max(1, min(int(n), os.cpu_count() or 1))


@functools.lru_cache(maxsize=None)
def numerics_fingerprint(n: int) -> str:
    """sha256 (12 hex digits) of the float32 bits a fixed training step gives on this machine with
    ``effective_threads(n)`` threads: linear layers of the mini models' widths, layer norm,
    softmax attention, a patch convolution, cross-entropy, backward and an AdamW step.

    The bits of a build depend on the CPU kernels torch dispatches to (vendor, vector ISA, BLAS
    code path) and on how many threads split their sums; a machine whose probe gives other bits
    builds other weights. The probe covers the op types, not every shape, so the manifest's
    digests stay the real check (``docs/mini-benchmark.md``, "Layout and caching")."""
    import torch

    with torch_threads(n), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 128, 8, 8)
        attn = torch.nn.MultiheadAttention(128, 4, batch_first=True)
        mlp = torch.nn.Sequential(
            torch.nn.LayerNorm(128), torch.nn.Linear(128, 512), torch.nn.GELU(),
            torch.nn.Linear(512, 128), torch.nn.LayerNorm(128), torch.nn.Linear(128, 64),
        )  # fmt: skip
        params = [*conv.parameters(), *attn.parameters(), *mlp.parameters()]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
        images, labels = torch.randn(48, 3, 32, 32), torch.randint(0, 64, (48,))
        tokens = conv(images).flatten(2).transpose(1, 2)
        logits = mlp(attn(tokens, tokens, tokens, need_weights=False)[0]).mean(1)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        opt.step()
        h = hashlib.sha256(logits.detach().numpy().tobytes())
        for p in params:
            h.update(p.detach().numpy().tobytes())
    return h.hexdigest()[:12]


def thread_key(n: int) -> dict:
    """The build-key entry of the machine a build asking for ``n`` threads runs on: the effective
    thread count and :func:`numerics_fingerprint` (same key, same bytes, on any machine)."""
    return {"threads": effective_threads(n), "numerics": numerics_fingerprint(n)}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(effective_threads(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def install(tmp: Path, target: Path) -> None:
    """Atomically move a finished build into place (replacing an old one under ``force``)."""
    if target.exists():
        trash = target.with_name(f".trash-{target.name}-{os.getpid()}")
        os.replace(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, target)


def cached_build(
    root: Path,
    key: str,
    build: Callable[[Path], dict],
    force: bool = False,
    extra: Optional[Mapping] = None,
) -> dict:
    """The complete build ``root/key``, made first if needed; its manifest with ``"path"`` added.

    Under the key's lock (``root/.<key>.lock``): a complete build is reused unless ``force``;
    otherwise ``build(tmp)`` fills ``root/.tmp-<key>-<pid>`` and returns its manifest, which gets
    ``extra`` and ``complete: true`` and is written last, and the directory is moved into place
    atomically (under ``force`` the old build goes only then). What an interrupted build left is
    removed first; a failed build leaves nothing behind.
    """
    target = root / key
    with file_lock(root / f".{key}.lock"):
        manifest = None if force else read_manifest(target)
        if manifest is None:
            for stale in root.glob(f".tmp-{key}-*"):  # left by an interrupted build
                shutil.rmtree(stale, ignore_errors=True)
            tmp = root / f".tmp-{key}-{os.getpid()}"
            try:
                manifest = build(tmp)
                manifest.update(extra or {}, complete=True)
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
                install(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return dict(manifest, path=str(target))


#: the parts of a build whose bytes its digests cover (weights and data; not the manifest)
BUILD_PARTS = ("pretrained", "models", "data")


def tree_digest(path: Path) -> str:
    """SHA-256 over the relative paths and bytes of every file under ``path`` (sorted)."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode())
        h.update(file.read_bytes())
    return h.hexdigest()


def build_digests(build: Path, parts=BUILD_PARTS) -> dict:
    """``{part: tree_digest(build/part)}`` for the weights and data of a build: two builds with the
    same key hold the same bytes exactly when these agree."""
    return {part: tree_digest(Path(build) / part) for part in parts}
