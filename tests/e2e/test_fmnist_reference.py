"""The reference Fashion-MNIST run's command at smoke scale: every stage of ``studies.fmnist_reference --smoke``
(data, first stage, latents, judge, the LDM and the diffusers baseline side by side, the sampler grid, scores,
report) from nothing, then the report's contract: the JSON keys, the plot and the grids. The full run is a documented
command (docs/results.md); this checks the chain, not the models."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ldm_train.trainer.helpers import REPO, trainer_env

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(not FMNIST.is_file(), reason="needs Debian's dataset-fashion-mnist")]

KEYS = ("fid", "fid_real_floor", "num_samples", "train_wall_s", "judge_accuracy_t10k", "prompt_adherence",
        "baseline_fid", "baseline_train_wall_s", "commit", "commands", "curve", "first_stage")


def test_reference_chain_at_smoke_scale(tmp_path: Path) -> None:
    out, report = tmp_path / "fmnist", tmp_path / "report"
    cmd = [sys.executable, "-m", "studies.fmnist_reference", "--smoke", "--out", str(out), "--report-dir", str(report),
           "--threads", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((report / "fmnist_ldm.json").read_text())
    assert all(k in result for k in KEYS), sorted(set(KEYS) - set(result))
    assert result["num_samples"] == 40 and result["baseline_num_samples"] == 20
    # both trainings ran for their budget of training seconds (15 s), side by side
    assert 15 <= result["train_wall_s"] < 120 and 15 <= result["baseline_train_wall_s"] < 120
    assert len(result["curve"]["ldm"]) >= 2 and len(result["curve"]["baseline"]) >= 2
    assert 0.0 <= result["prompt_adherence"] <= 1.0 and result["judge_accuracy_t10k"] > 0.5
    assert result["fid"] > 0 and result["baseline_fid"] > 0 and result["first_stage"]["psnr"] > 10
    # samples and reconstructions are decoded by the decoder fine-tuned with the patch GAN (encoder frozen)
    assert result["first_stage"]["checkpoint"].endswith("fmnist_kl_f4_gan/export/first_stage.safetensors")
    assert result["first_stage"]["decoder_fine_tune_steps"] == 4
    # the sampler grid (DDIM 20 steps x guidance 1 and 2 at smoke scale) chose the setting the scores used
    grid = result["sampler_grid"]
    assert [(g["steps"], g["guidance_scale"]) for g in grid["grid"]] == [(20, 1.0), (20, 2.0)]
    assert all(g["fid_vs_train"] > 0 and 0 <= g["prompt_adherence"] <= 1 for g in grid["grid"])
    assert {k: result["sampler"][k] for k in ("steps", "guidance_scale")} == grid["chosen"]
    for png in ("fmnist_fid_vs_time.png", "fmnist_ldm_samples.png", "fmnist_baseline_samples.png",
                "fmnist_kl_f4_reconstructions.png"):
        assert (report / png).stat().st_size > 1000, png
    # a second run resumes: every stage is done, nothing trains again
    again = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already trained for 15 s: kept") == 2, again.stdout[-3000:]
    assert json.loads((report / "fmnist_ldm.json").read_text())["samples_seen"] == result["samples_seen"]
