"""The vision ProDistill gives the same merged weights, bit for bit, as before the block engine was
shared with the language models (issue 17): sha256 of every merged tensor against
``tests/data/prodistill_vision_reference.json``, recorded at commit 41554c0 by
``tests/record_prodistill_reference.py`` on the tiny CLIP pool, the tiny OpenCLIP pool and the mini
smoke build."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import record_prodistill_reference as ref  # noqa: E402

REFERENCE = json.loads(
    (Path(__file__).parent / "data/prodistill_vision_reference.json").read_text()
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("pool", sorted(REFERENCE["pools"]))
def test_vision_merge_is_bit_identical_to_the_recorded_one(pool, tmp_path, smoke_mini, monkeypatch):
    assert REFERENCE["options"] == ref.OPTIONS
    if pool == "smoke_mini":
        monkeypatch.setenv("STATSMERGE_MINI_ROOT", str(Path(smoke_mini["path"]).parent))
        modelpool = ref.smoke_mini_pool(tmp_path, Path(smoke_mini["path"]).parent)
    else:
        modelpool = ref.POOLS[pool](tmp_path)
    got = ref.run(modelpool)
    expected = REFERENCE["pools"][pool]
    assert sorted(got) == sorted(expected)
    changed = [n for n in expected if got[n] != expected[n]]
    assert not changed, f"{pool}: merged tensors differ from the recorded ones: {changed[:5]}"
