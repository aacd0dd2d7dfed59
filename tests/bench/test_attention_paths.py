"""bench/attention_paths.py runs both attention paths over its grid and reports which one ``attention()`` takes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration  # starts the bench script


def test_the_bench_reports_every_shape_and_the_path_taken() -> None:
    proc = subprocess.run([sys.executable, "bench/attention_paths.py", "--iters", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {tuple(r["shape"]): r for r in out["rows"]}
    assert len(rows) == 18 and all(r["sdpa_ms"] > 0 and r["narrow_ms"] > 0 for r in rows.values())
    assert rows[(2, 8, 256, 256, 8)]["taken"] and rows[(2, 8, 256, 77, 8)]["taken"]  # 4 MiB and less, 8 channels
    assert not rows[(8, 8, 256, 256, 8)]["taken"] and not rows[(2, 8, 256, 256, 16)]["taken"]
