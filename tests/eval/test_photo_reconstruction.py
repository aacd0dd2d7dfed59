"""bench/photo_reconstruction.py at a minimal size: splits of skimage's photographs, a few training steps,
the rows at 64 px (random-init rFID network: the plumbing; the real network is tested in test_eval_fidelity)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.bench import load_script

pr = load_script("photo_reconstruction")
try:
    DATA_DIR = pr.skimage_data_dir()
    pr.check_photos(DATA_DIR, pr.TRAIN_PHOTOS + pr.HELDOUT_COLOUR + pr.HELDOUT_GREY)
    MISSING = ""
except FileNotFoundError as e:
    MISSING = str(e)
pytestmark = [pytest.mark.integration, pytest.mark.skipif(bool(MISSING), reason=f"scikit-image's photographs are missing: {MISSING}")]


def test_named_splits_are_disjoint_and_keep_the_stereo_pair_together() -> None:
    train, heldout = set(pr.TRAIN_PHOTOS), set(pr.HELDOUT_COLOUR + pr.HELDOUT_GREY)
    assert not train & heldout
    pair = {"motorcycle_left.png", "motorcycle_right.png"}  # one scene from two viewpoints
    assert pair <= train or not pair & (train | heldout)


def test_crops_come_only_from_training_photos(tmp_path) -> None:
    splits = pr.prepare_splits(tmp_path, 12, train=("astronaut.png", "ihc.png"), heldout=("chelsea.png",))
    crops = json.loads((tmp_path / "photos" / "crops.json").read_text())
    assert {c["photo"] for c in crops} == {"astronaut.png", "ihc.png"}
    assert sorted(p.name for p in Path(splits["heldout_dir"]).iterdir()) == ["chelsea.png"]
    pngs = sorted(Path(splits["train_dir"]).glob("*.png"))
    assert len(pngs) == 12 and all(p.stat().st_size > 0 for p in pngs)
    from PIL import Image

    assert Image.open(pngs[0]).size == (pr.CROP_SIZE, pr.CROP_SIZE)
    for c in crops:  # every box lies inside its photo and is at least one crop wide
        w, h = Image.open(DATA_DIR / c["photo"]).size
        left, top, side = c["box"]
        assert side >= pr.CROP_SIZE and left + side <= w and top + side <= h
    with pytest.raises(ValueError, match="both splits"):
        pr.prepare_splits(tmp_path / "bad", 4, train=("astronaut.png",), heldout=("astronaut.png",))


def test_bench_rows_at_minimal_size(tmp_path) -> None:
    out = pr.run_bench(tmp_path, ("tiny_kl_f4",), steps=2, resolutions=(64,), num_crops=8, batch_size=2,
                       shuffle_buffer=4, heldout=("chelsea.png", "coins.png"), train=("astronaut.png",),
                       extractor="random-init")
    rows = {r["preset"]: r for r in out["rows"]}
    assert list(rows) == ["bilinear_f4", "tiny_kl_f4"]
    for r in rows.values():
        assert r["resolution"] == 64 and r["num_images"] == 2 and r["f"] == 4 and r["z_channels"] == 3
        assert all(math.isfinite(r[k]) for k in ("psnr", "ssim", "rfid"))
    # the reference keeps a 16x16 image: far better than an autoencoder after two steps
    assert rows["bilinear_f4"]["psnr"] > rows["tiny_kl_f4"]["psnr"] and rows["bilinear_f4"]["psnr"] > 18
    assert rows["tiny_kl_f4"]["train_steps"] == 2 and rows["tiny_kl_f4"]["train_wall_s"] > 0
    assert set(out["heldout_photos"]).isdisjoint(out["train_photos"])
    assert math.isfinite(out["train_stats"]["tiny_kl_f4"]["final_train_psnr"])
    # a second call with the same settings reuses the run instead of training again
    again = pr.train_preset("tiny_kl_f4", pr.prepare_splits(tmp_path, 8, ("astronaut.png",),
                                                            ("chelsea.png", "coins.png")),
                            tmp_path / "runs", 2, batch_size=2, shuffle_buffer=4)
    assert again["reused"] and again["export"] == str(tmp_path / "runs/autoencoder/tiny_kl_f4/export/first_stage.safetensors")
