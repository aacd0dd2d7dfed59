"""The README's first command, end to end: every stage as its own command line, summary.json at the end.

CI runs it at smoke scale (a shorter first stage and LDM run, fewer eval samples: the same stages and code
paths in a fraction of the time). The default-scale run, whose numbers docs/results.md records, asserts
that the text conditioning is learned; it runs with ``LDM_RUN_DEMOS=1 pytest -m slow``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration  # starts processes or servers

REPO = Path(__file__).resolve().parents[2]
KEYS = ["first_stage_psnr", "fid", "fid_untrained", "kid", "kid_untrained", "precision", "recall", "prompt_adherence",
        "prompt_adherence_untrained", "train_samples_per_s", "wall_s"]
SMOKE = ["--train-images", "1000", "--heldout-images", "64", "--ae-steps", "120", "--train-samples", "2400",
         "--eval-samples", "32", "--eval-steps", "10"]


def run_quickstart(out: Path, extra: list[str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "studies.quickstart", "--out", str(out), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in KEYS:
        assert isinstance(summary[key], (int, float)) and math.isfinite(summary[key]), (key, summary[key])
    assert Path(summary["sample_grid"]).is_file()
    assert Path(summary["wandb_run"]).is_dir()
    # the real FID network; IS needs logits it does not have
    assert summary["feature_extractor"] == "pretrained" and summary["inception_score"] is None
    # the first stage beats predicting the mean image
    assert summary["first_stage_psnr"] > summary["first_stage_psnr_mean_image_baseline"] + 3.0, summary
    # the trained model is closer to the held-out images than the same model before training
    assert summary["fid"] < summary["fid_untrained"] and summary["kid"] < summary["kid_untrained"], summary
    return summary


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quickstart_at_smoke_scale(tmp_path: Path) -> None:
    # 2,400 samples learn the images (FID 248.7 against 348.2 untrained, KID 0.190 against 0.383; first stage 14.3 dB
    # against 8.6 for the mean image; 367 s in all, measured) but not yet the prompts' colours: the default-scale test
    # below asserts those
    run_quickstart(tmp_path / "qs", SMOKE, timeout=1100)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LDM_RUN_DEMOS") != "1",
                    reason="the default-scale quickstart (about 25 minutes); run with LDM_RUN_DEMOS=1 -m slow")
@pytest.mark.timeout(2400)
def test_quickstart_learns_text_conditioning(tmp_path: Path) -> None:
    summary = run_quickstart(tmp_path / "qs", [], timeout=2300)
    # text conditioning learns: well above the untrained model and above chance (1/8 colours)
    assert summary["prompt_adherence"] >= summary["prompt_adherence_untrained"] + 0.2, summary
    assert summary["prompt_adherence"] >= 2 * summary["prompt_adherence_chance"], summary
