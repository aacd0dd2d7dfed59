"""The first-stage trainer's checkpoint directory: the LDM trainer's checks (files.json, latest, fall back to the
previous intact checkpoint naming the damaged file) and the earlier layout (no latest, no files.json) still resumes."""
from __future__ import annotations

import torch

from ldm_train.first_stage.checkpoint import load_checkpoint, resume_path, rng_name, save_checkpoint


def _state(step: int) -> dict:
    return {"step": step, "world_size": 1, "model": {"w": torch.full((64,), float(step))}}


def test_a_damaged_checkpoint_is_named_moved_aside_and_the_previous_one_resumes(tmp_path, capsys) -> None:
    ckpts = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        save_checkpoint(ckpts, step, _state(step), keep=5)
    assert (ckpts / "latest").read_text() == "step_0000009"
    (ckpts / "step_0000009" / rng_name(0)).unlink()
    truncated = ckpts / "step_0000006" / "state.pt"
    size = truncated.stat().st_size
    with open(truncated, "r+b") as f:
        f.truncate(size // 2)

    assert resume_path(ckpts) == ckpts / "step_0000003"
    err = capsys.readouterr().err
    assert f"{ckpts / 'step_0000009' / rng_name(0)} is missing" in err
    assert f"{truncated} has {size // 2} bytes, {size} when it was saved" in err
    assert "resuming from" in err and "step_0000003, the newest intact checkpoint" in err
    assert sorted(p.name for p in ckpts.iterdir()) == ["damaged-step_0000006", "damaged-step_0000009", "latest",
                                                      "step_0000003"]
    assert load_checkpoint(ckpts / "step_0000003", 0, 1)["model"]["w"][0] == 3.0


def test_checkpoints_of_the_earlier_layout_resume_and_are_pruned_as_new_ones_come(tmp_path, capsys) -> None:
    """Written before the directory had `latest` and files.json: step folders of state.pt and rng files only."""
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4):
        (ckpts / f"step_{step:07d}").mkdir(parents=True)
        torch.save(_state(step), ckpts / f"step_{step:07d}" / "state.pt")
    assert resume_path(ckpts) == ckpts / "step_0000004"
    assert f"{ckpts / 'step_0000004'} has no files.json" in capsys.readouterr().out
    state = load_checkpoint(ckpts / "step_0000004", 0, 1)  # no rng file: re-seeded
    assert state["step"] == 4 and state["reseed"]

    save_checkpoint(ckpts, 6, _state(6), keep=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000004", "step_0000006"]
    assert resume_path(ckpts) == ckpts / "step_0000006"
    assert resume_path(tmp_path / "nothing") is None
