"""Tracker: W&B offline files hold what stats.jsonl holds; run id persists; secrets stripped; helpers."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_train.tracking import LoggerConfig, StepTimer, Tracker, mfu, strip_secrets
from tests.ldm_train import wandb_reader


def wandb_file(run_dir: Path, run_id: str) -> Path:
    (path,) = sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))[-1:]
    return path


def stats(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


@pytest.fixture
def run_config() -> dict:
    return {"optim": {"lr": 1e-4, "aws_secret_access_key": "AKIA-SECRET"}, "logger": {"api_key": "k"},
            "text_encoder": {"tokenizer": "/data/tok", "max_seq_len": 77}}


def test_wandb_offline_run_agrees_with_stats_jsonl(tmp_path: Path, run_config: dict) -> None:
    run_dir = tmp_path / "00001-tiny"
    tracker = Tracker(LoggerConfig(), run_dir, rank=0, run_config=run_config, experiment="tiny")
    logged = {}
    for step in (10, 20, 30):
        logged[step] = tracker.log(step, {"loss": torch.tensor(1.0 / step), "lr": 1e-4 * step, "samples": step * 8})
    grid = torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)
    png = tracker.log_images(30, "samples/grid", grid, ["a red circle", "a blue square", "", "x"])
    line = tracker.progress(30, 240, 1000, {"loss": 0.0333}, samples_per_s=8.0)
    tracker.close()

    lines = stats(run_dir)
    assert [row["step"] for row in lines] == [10, 20, 30]
    path = wandb_file(run_dir, tracker.run_id)
    history = wandb_reader.history(path)
    for row in lines:
        for key in ("loss", "lr", "samples"):
            assert history[row["step"]][key] == pytest.approx(row[key], rel=1e-6)
            assert row[key] == pytest.approx(logged[row["step"]][key])
    assert lines[0]["loss"] == pytest.approx(0.1)
    images = history[30]
    assert images["samples/grid/count"] == 4
    assert images["samples/grid/captions"] == ["a red circle", "a blue square", "", "x"]
    for name in images["samples/grid/filenames"]:  # the media files sit in the offline run
        assert (wandb_file(run_dir, tracker.run_id).parent / "files" / name).is_file()
    # and the whole grid as one image: 2 x 2 tiles of 8 x 8, sample i at row i // 2, column i % 2
    assert (images["samples/grid_grid/width"], images["samples/grid_grid/height"]) == (16, 16)
    assert images["samples/grid_grid/caption"] == "a red circle | a blue square |  | x"
    tiles = np.asarray(Image.open(wandb_file(run_dir, tracker.run_id).parent / "files"
                                  / images["samples/grid_grid/path"]))
    expected = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(4):
        assert np.array_equal(tiles[i // 2 * 8:(i // 2 + 1) * 8, i % 2 * 8:(i % 2 + 1) * 8], expected[i]), i
    assert png is not None and png.name == "samples_grid-000000030.png" and png.stat().st_size > 0
    assert "step 30" in line and "240/1,000 samples (24.0%)" in line and "loss 0.0333" in line
    assert "8.0 samples/s" in line and "ETA 0:01:35" in line  # 760 samples left at 8/s

    config = wandb_reader.config(wandb_file(run_dir, tracker.run_id))
    assert config["optim"] == {"lr": 1e-4, "aws_secret_access_key": "***"}
    assert config["logger"] == {"api_key": "***"}
    assert config["text_encoder"]["tokenizer"] == "/data/tok"  # "tokenizer" is not a secret


def test_run_id_persists_across_requeues(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = Tracker(LoggerConfig(), run_dir, rank=0)
    first.log(1, {"loss": 1.0})
    first.close()
    second = Tracker(LoggerConfig(), run_dir, rank=0)  # a requeued job: same run dir, no id given
    second.log(2, {"loss": 0.5})
    second.close()
    assert second.run_id == first.run_id == (run_dir / "wandb_run_id").read_text().strip()
    runs = sorted(run_dir.glob(f"wandb/offline-run-*-{first.run_id}/run-*.wandb"))
    # one offline-run dir per start (one when both start within the same second), all of the same run id
    assert runs and all(wandb_reader.run_ids(p) == [first.run_id] for p in runs)
    assert [row["step"] for row in stats(run_dir)] == [1, 2]  # appended, not truncated
    third = Tracker(LoggerConfig(mode="disabled"), run_dir, rank=0, resume_run_id="fromckpt01")
    third.close()
    assert (run_dir / "wandb_run_id").read_text().strip() == "fromckpt01"


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    tracker = Tracker(LoggerConfig(), tmp_path / "run", rank=1)
    assert tracker.log(1, {"loss": 1.0}) == {}
    assert tracker.log_images(1, "g", torch.zeros(3, 4, 4)) is None
    tracker.close()
    assert not (tmp_path / "run").exists()


def test_disabled_mode_still_writes_stats(tmp_path: Path) -> None:
    with Tracker(LoggerConfig(mode="disabled"), tmp_path / "run", rank=0) as tracker:
        tracker.log(5, {"loss": float("nan"), "grad_norm": 2.0})
    (row,) = stats(tmp_path / "run")
    assert row["loss"] == "nan" and row["grad_norm"] == 2.0  # a NaN keeps the line valid JSON
    assert not (tmp_path / "run" / "wandb").exists()


def test_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert mfu(780e9, 100.0, 312e12) == pytest.approx(0.25)
    assert strip_secrets({"a": [{"hf_token": "t", "token_len": 3}], "password": "p", "keys": 1}) == {
        "a": [{"hf_token": "***", "token_len": "***"}], "password": "***", "keys": 1}
    clock = [100.0]  # the timer's clock, moved by hand: no share depends on how busy the machine is
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    timer = StepTimer()
    for _ in range(3):
        with timer.data():
            clock[0] += 0.3  # waiting for the loader
        clock[0] += 0.1  # the step itself
        with timer.excluded():
            clock[0] += 5.0  # a checkpoint: not training time
        timer.step(samples=8)
    summary = timer.summary()
    assert summary["data_wait_share"] == pytest.approx(0.75)
    assert summary["step_time_s"] == pytest.approx(0.4) and summary["samples_per_s"] == pytest.approx(24 / 1.2)
    clock[0] += 1.0
    assert timer.summary()["samples_per_s"] == 0.0  # reset after reading
