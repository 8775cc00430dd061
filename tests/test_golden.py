"""Behaviour is pinned: every case of ``golden_cases.py`` reproduces ``data/golden.json``.

On the machine kind that wrote the record (same torch build, CPU kernel set, one thread) the
outputs must be bit-identical (sha256 of the float32 bytes); elsewhere float kernels may
round differently, so a strided sample of values must agree within 1e-4 relative.
"""

from __future__ import annotations

import json
import math

import pytest

import golden_cases

RECORD = json.loads(golden_cases.GOLDEN.read_text())
EXACT = RECORD["fingerprint"] == golden_cases.fingerprint()


@pytest.mark.parametrize("case", sorted(golden_cases.CASES))
def test_outputs_match_the_record(case: str) -> None:
    want = RECORD["cases"][case]
    got = golden_cases.compute(case)
    assert sorted(got) == sorted(want), f"{case}: outputs {sorted(got)} != {sorted(want)}"
    for name, ref in want.items():
        now = got[name]
        assert now["shape"] == ref["shape"], f"{case}/{name}: shape {now['shape']}"
        for a, b in zip(now["sample"], ref["sample"], strict=True):
            if math.isnan(b):
                assert math.isnan(a), f"{case}/{name}: {a} where the record has NaN"
            else:
                assert abs(a - b) <= 1e-5 + 1e-4 * abs(b), f"{case}/{name}: {a} vs {b}"
        if EXACT:
            assert now["sha256"] == ref["sha256"], f"{case}/{name}: not bit-identical"
