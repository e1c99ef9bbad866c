"""The vision ProDistill gives the same merged weights, bit for bit, as before the block engine was
shared with the language models (issue 17): sha256 of every merged tensor against
``tests/data/prodistill_vision_reference.json``, recorded by ``tests/record_prodistill_reference.py``
with the code of 41554c0 (at fd51b96) on the tiny CLIP pool, the tiny OpenCLIP pool and the mini
smoke build.

The bits of a float32 merge depend on the CPU kernels torch dispatches to, so the file holds one
reference per kind of machine it was recorded on (an Intel Xeon with AMX, an AMD EPYC; each recorded
with the *old* code). A merge must equal one of them exactly; on a machine of a third kind the test
fails and names this machine's numerics fingerprint, to be recorded with the old code.
"""

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
POOLS = sorted({pool for r in REFERENCE["references"] for pool in r["pools"]})

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("pool", POOLS)
def test_vision_merge_is_bit_identical_to_the_recorded_one(pool, tmp_path, smoke_mini, monkeypatch):
    from statsmerge_plugin.mini.store import numerics_fingerprint

    assert REFERENCE["options"] == ref.OPTIONS
    if pool == "smoke_mini":
        monkeypatch.setenv("STATSMERGE_MINI_ROOT", str(Path(smoke_mini["path"]).parent))
        modelpool = ref.smoke_mini_pool(tmp_path, Path(smoke_mini["path"]).parent)
    else:
        modelpool = ref.POOLS[pool](tmp_path)
    got = ref.run(modelpool)
    recorded = [r for r in REFERENCE["references"] if pool in r["pools"]]
    assert all(sorted(got) == sorted(r["pools"][pool]) for r in recorded)
    if any(got == r["pools"][pool] for r in recorded):
        return
    changed = {
        r["machine"]: [n for n in got if got[n] != r["pools"][pool][n]][:5] for r in recorded
    }
    raise AssertionError(
        f"{pool}: merged tensors differ from every recorded reference: {changed}. This machine's "
        f"numerics fingerprint is {numerics_fingerprint(1)} (recorded: "
        f"{[r['numerics'] for r in recorded]}); on a new kind of machine, record its reference "
        "with the code of 41554c0 (tests/record_prodistill_reference.py at fd51b96)."
    )
