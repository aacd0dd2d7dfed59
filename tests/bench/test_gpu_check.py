"""bench/gpu_check.sh --dry-run (the tiny config on CPU) runs, so the one-shot GPU check cannot rot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts processes or servers

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # the whole GPU check script on CPU: 25-55 s on the 2-core machine
def test_gpu_check_dry_run_prints_its_json() -> None:
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "gpu_check" and result["dry_run"] and result["experiment"] == "tiny"
    (run,) = result["runs"]
    assert run["compiled"] is False and run["samples_per_s"] > 0 and run["step_s"] > 0
    assert result["peak_tflops_bf16"] is None and run["mfu"] is None  # no made-up MFU on a CPU
    # the planner's estimate of the same run sits beside the measurement (on CPU: for a named h100-80g)
    plan = result["planner"]
    assert plan["gpu"] == "h100-80g" and plan["micro_batch"] == 2 and plan["samples_per_s"] > 0
    assert plan["total_gib"] > plan["activations_gib"] > 0
