"""The f-sweep end to end at a minimal size: two points (pixel = LDM-1, and an f=4 first stage) as Hydra multiruns
side by side with the local launcher, each on the same training-time budget, in-training FID with the real FID
Inception at moments of that budget plus a larger final FID with bootstrap stds, one W&B group, the report."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts processes or servers

REPO = Path(__file__).resolve().parents[2]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.skipif(not FMNIST.is_file(), reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
def test_two_point_sweep_to_the_report(tmp_path: Path) -> None:
    out = tmp_path / "fs"
    cmd = [sys.executable, "-m", "studies.fsweep", "--out", str(out), "--points", "pixel,fmnist_kl_f4",
           "--train-images", "1000", "--heldout-images", "128", "--ae-steps", "150", "--ae-eval-images", "32",
           "--budget-s", "60", "--moments", "3", "--fid-samples", "32", "--final-fid-samples", "64",
           "--bootstrap", "5", "--jobs", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=2300,
                          env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # both points ran to the end, in one W&B group, listed in the sweep folder
    points = [json.loads(p.read_text()) for p in sorted((out / "sweep").glob("*/*/point.json"))]
    assert sorted(p["first_stage"] for p in points) == ["fmnist_kl_f4", "pixel"]
    assert sorted(p["latent_shape"] for p in points) == [[3, 8, 8], [3, 32, 32]]
    assert len({p["wandb_group"] for p in points}) == 1
    for p in points:
        run = Path(p["run_dir"])
        assert (run / "train_summary.json").is_file()
        wandb_runs = list((run / "wandb").glob("offline-run-*"))
        assert wandb_runs, f"no offline W&B run in {run}"
        # the in-training FID at 20, 40, 60 s of training; the last also over 64 samples
        rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines() if '"fid32"' in line]
        assert len(rows) == 3, rows
        assert [int(r["train_wall_s"] // 20) for r in rows] == [1, 2, 3], rows
        assert all(math.isfinite(r["fid32"]) for r in rows), rows
        # LDM-4 learns within the budget (LDM-1 sees ~30x fewer samples); measured: fid32 330.6 at 20 s -> 294.2 at 60 s
        if p["first_stage"] == "fmnist_kl_f4":
            assert rows[-1]["fid32"] < rows[0]["fid32"] - 10, rows
        assert "fid64" in rows[-1] and rows[-1]["fid64_std"] > 0, rows[-1]
        summary = json.loads((run / "train_summary.json").read_text())
        assert 60 <= summary["train_wall_s"] < 70, summary

    # the report: a finite final FID per point, the first-stage metrics of the f=4 point, the plot
    report = json.loads((out / "sweep" / "report" / "report.json").read_text())
    rows = {r["first_stage"]: r for r in report["rows"]}
    assert set(rows) == {"pixel", "fmnist_kl_f4"}
    for r in rows.values():
        assert isinstance(r["final_fid"], float) and math.isfinite(r["final_fid"]), r
        assert r["fid_samples"] == 64 and r["fid_std"] > 0 and r["train_budget_s"] == 60, r
        assert [row["fid_std"] > 0 for row in r["rows"]] == [True] * 3, r["rows"]
    assert {g["f"] for g in report["by_f"]} == {1, 4}
    assert rows["pixel"]["first_stage_metrics"] == "identity"
    assert math.isfinite(rows["fmnist_kl_f4"]["psnr"]) and math.isfinite(rows["fmnist_kl_f4"]["rfid"])
    assert (out / "sweep" / "report" / "fid_vs_samples.png").stat().st_size > 10_000
    assert "fmnist_kl_f4" in (out / "sweep" / "report" / "sweep_report.md").read_text()
