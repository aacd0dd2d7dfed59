"""The README's first command, end to end: every stage as its own command line, summary.json at the end."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KEYS = ["first_stage_psnr", "fid", "fid_untrained", "kid", "kid_untrained", "precision", "recall", "prompt_adherence",
        "prompt_adherence_untrained", "train_samples_per_s", "wall_s"]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_quickstart_learns_text_conditioning(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "eval.quickstart", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=2300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in KEYS:
        assert isinstance(summary[key], (int, float)) and math.isfinite(summary[key]), (key, summary[key])
    assert Path(summary["sample_grid"]).is_file()
    assert Path(summary["wandb_run"]).is_dir()
    # the first stage beats predicting the mean image
    assert summary["first_stage_psnr"] > summary["first_stage_psnr_mean_image_baseline"] + 3.0
    # text conditioning learns: well above the untrained model and above chance (1/8 colours)
    assert summary["prompt_adherence"] >= summary["prompt_adherence_untrained"] + 0.2, summary
    assert summary["prompt_adherence"] >= 2 * summary["prompt_adherence_chance"], summary
    # the real FID network: the trained model is closer to the held-out images than the same model before training
    assert summary["feature_extractor"] == "pretrained" and summary["inception_score"] is None
    assert summary["fid"] < summary["fid_untrained"] and summary["kid"] < summary["kid_untrained"], summary
