"""``train.time_budget_s``: the run ends on its budget of training-step seconds, records it, a cosine lr decays to
its floor by the budget's end, and a resumed run whose budget is spent does not train again."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.ldm_train.trainer.helpers import only_run_dir, read_stats, run_trainer, tiny_overrides

pytestmark = pytest.mark.integration  # starts processes or servers


def test_time_budget_ends_the_run_and_is_kept_across_resumes(latents_root: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # a budget far below total_samples' worth of steps: the budget, not the sample count, ends the run
    args = tiny_overrides(latents_root, runs, **{"train.total_samples": 8 * 100000, "train.time_budget_s": 2,
                                                 "train.checkpoint.every_samples": 8, "run_name": "budget",
                                                 "train.optim.lr_decay": "cosine"})
    run_trainer(args, nproc=1)
    run_dir = only_run_dir(runs)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["train_wall_s"] >= 2  # stopped at the first log interval past the budget
    assert summary["samples_seen"] < 8 * 100000
    steps = [row["step"] for row in read_stats(run_dir) if "loss" in row]
    # the cosine follows the training time, not the 100,000 steps total_samples allows: it falls at every logged
    # step, and each step's lr is the cosine at the training time the step before it ended (its checkpoint's)
    lr = {row["step"]: row["lr"] for row in read_stats(run_dir) if "loss" in row}
    assert list(lr) == steps and all(lr[a] > lr[b] for a, b in zip(steps, steps[1:], strict=False)), lr
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run_dir / "checkpoints" / latest / "meta.json").read_text())
    assert meta["step"] == steps[-1]
    assert abs(meta["train_wall_s"] - summary["train_wall_s"]) < 0.1  # saved at the step the budget ended
    # a checkpoint after every step (the last few kept), each recording the training seconds it was taken at,
    # increasing; how many steps fit in the budget depends on the machine's load, so the count is not asserted
    metas = [json.loads((d / "meta.json").read_text()) for d in sorted((run_dir / "checkpoints").glob("step_*"))]
    kept = [m["step"] for m in metas]
    assert kept and kept == steps[-len(kept):], (kept, steps)
    walls = [m["train_wall_s"] for m in metas]
    assert all(a < b for a, b in zip(walls, walls[1:], strict=False)), walls
    for before, m in zip(metas, metas[1:], strict=False):
        cosine = 1e-3 * 0.5 * (1 + math.cos(math.pi * min(1.0, before["train_wall_s"] / 2)))
        # meta.json keeps the seconds to 0.01: the cosine's slope (at most pi/4 * 1e-3 per s) bounds the difference
        assert lr[m["step"]] == pytest.approx(cosine, abs=4e-6), (m, before, lr)
    # the same command again: the budget is spent, nothing trains, the checkpoint stays
    proc = run_trainer(args, nproc=1)
    assert [row["step"] for row in read_stats(run_dir) if "loss" in row] == steps, proc.stdout[-2000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == latest


@pytest.mark.slow  # a training that measures FID with the real Inception every second (~45 s)
def test_fid_at_training_time_moments_and_at_the_budgets_end(latents_root: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    folder = tmp_path / "heldout"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red square")
    runs = tmp_path / "runs"
    args = tiny_overrides(latents_root, runs, **{"train.total_samples": 8 * 100000, "train.time_budget_s": 3,
                                                 "train.fid.every_s": 1, "train.fid.num_samples": 4,
                                                 "train.fid.reference": str(folder), "train.fid.reference_images": 0,
                                                 "train.fid.steps": 2, "train.fid.bootstrap": 2,
                                                 "train.fid.batch_size": 4, "run_name": "moments"})
    proc = run_trainer(args, nproc=1)
    stats = read_stats(only_run_dir(runs))
    rows = [r for r in stats if "fid4" in r]
    walls = [r["train_wall_s"] for r in rows]
    # an FID after the step that passes each second of training time, the last at the budget's end (3 s), which
    # is the run's last step
    moments = [int(w) for w in walls]
    assert moments == sorted(set(moments)) and moments[0] >= 1 and walls[-1] >= 3, (walls, proc.stdout[-3000:])
    assert rows[-1]["step"] == max(r["step"] for r in stats if "loss" in r)
    # with steps well under a second (an unloaded machine) no second passes inside one step: one FID per second
    if max(r["step_time_s"] for r in stats if "loss" in r) < 0.5:
        assert moments == [1, 2, 3], walls
    assert all(r["fid4_std"] >= 0 for r in rows)
