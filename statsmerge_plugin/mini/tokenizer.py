"""CLIP's BPE tokenizer, built offline.

The full vocabulary is converted from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz``
(located with ``importlib.util.find_spec`` without importing open_clip, which would import
torchvision). The mini benchmark uses a *pruned* copy committed under ``assets/``: the 512 byte
symbols, only the merges the task captions need (in their original order), and the two special
tokens. Captions tokenize exactly as with the full vocabulary; any other text still tokenizes,
into smaller pieces.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

ASSETS = Path(__file__).parent / "assets"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def open_clip_bpe_path() -> Path:
    """Path of open_clip's bundled BPE file, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed; its BPE vocabulary is needed")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(path)
    return path


def load_merges(path: Optional[Path] = None) -> List[Tuple[str, str]]:
    """The 48,894 merges of CLIP's BPE, in rank order."""
    text = gzip.open(path or open_clip_bpe_path()).read().decode("utf-8")
    lines = text.split("\n")[1 : NUM_MERGES + 1]
    return [tuple(line.split()) for line in lines]


def vocab_from_merges(merges: Sequence[Tuple[str, str]]) -> List[str]:
    """CLIP's vocabulary layout: bytes, bytes + ``</w>``, merge results, then specials."""
    chars = list(bytes_to_unicode().values())
    return chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]


def write_tokenizer_files(directory: Path, merges: Sequence[Tuple[str, str]]) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (HF format) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = vocab_from_merges(merges)
    (directory / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def read_merges_file(path: Path) -> List[Tuple[str, str]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [tuple(line.split()) for line in lines[1:] if line.strip()]


def load_tokenizer(directory: Path):
    """A slow ``transformers.CLIPTokenizer`` from ``vocab.json`` + ``merges.txt``."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))


def used_merges(merges: Sequence[Tuple[str, str]], tokens: Iterable[str]) -> List[Tuple[str, str]]:
    """The merges that BPE applies to produce ``tokens``, kept in rank order.

    Every merge result string is unique in CLIP's vocabulary, so the merges that built a token are
    the closure of "the merge producing this string" over the token's parts.
    """
    producer = {"".join(m): i for i, m in enumerate(merges)}
    keep, stack = set(), [t for t in tokens if t in producer]
    while stack:
        i = producer[stack.pop()]
        if i not in keep:
            keep.add(i)
            stack.extend(part for part in merges[i] if part in producer)
    return [merges[i] for i in sorted(keep)]


def prune_for_corpus(corpus: Sequence[str], work_dir: Path) -> List[Tuple[str, str]]:
    """Merges of the full CLIP vocabulary that tokenizing ``corpus`` needs."""
    merges = load_merges()
    full = load_tokenizer(write_tokenizer_files(Path(work_dir) / "full", merges))
    tokens = {t for text in corpus for t in full.tokenize(text)}
    return used_merges(merges, tokens)


def write_assets(corpus: Sequence[str], work_dir: Path, assets: Path = ASSETS) -> Path:
    """Regenerate the committed pruned vocabulary under ``assets``."""
    pruned = prune_for_corpus(corpus, work_dir)
    return write_tokenizer_files(assets, pruned)


def copy_assets(directory: Path, assets: Path = ASSETS) -> Path:
    """Copy the committed pruned ``vocab.json`` / ``merges.txt`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(assets / name, directory / name)
    return directory
