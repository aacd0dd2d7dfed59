"""eval.run end to end in-process: samples, metrics.json (flagged random-init metrics), W&B offline, resume."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from data_prep.synthetic import write_synthetic
from eval.pipeline import run

PROMPTS = ["a large red circle in the center on a white background",
           "a small blue square at the top left on a green background"]


def test_eval_run_end_to_end_then_resume(tiny_export, tmp_path, eval_config) -> None:
    write_synthetic(str(tmp_path / "ref"), 12, resolution=32, shard_size=6)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    overrides = dict(checkpoint=tiny_export, prompts=tmp_path / "prompts.txt", num_samples=4, steps=2,
                     batch_size=2, guidance_scale="[1.0,3.0]", output_dir=out, progress="false",
                     **{"reference.path": tmp_path / "ref", "reference.num_images": 10,
                        "metrics.extractor": "random-init", "metrics.save_cpu_ram": "true"})
    report = run(eval_config(**overrides))

    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["feature_extractor"] == "random-init-plumbing-only"
    assert [r["guidance_scale"] for r in on_disk["per_scale"]] == [1.0, 3.0]
    for row in on_disk["per_scale"]:
        assert row["num_samples"] == 4
        assert row["fid"] > 0 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert row["adherence"]["all_count"] == 4  # synthetic prompts: adherence ran (auto)
    weights = Path(on_disk["checkpoint"]["path"])
    assert weights.name == "model_ema.safetensors"
    assert on_disk["checkpoint"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    key = on_disk["reference"]["key"]  # name, count, resolution and a fingerprint of the reference files
    assert re.fullmatch(r"ref-n10-r32-[0-9a-f]{16}", key) and on_disk["reference"]["count"] == 10
    assert on_disk["sampler"]["steps"] == 2 and on_disk["versions"]["torch-fidelity"] == "0.4.0"
    assert report["per_scale"][0]["fid"] == on_disk["per_scale"][0]["fid"]
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    media = out / "wandb"
    assert len(list(media.glob("offline-run-*/files/media/images/samples/*.png"))) == 8  # 4 per scale
    assert list(media.glob("offline-run-*/files/media/table/samples_*.table.json"))
    fid_plot = next(media.glob("offline-run-*/files/media/table/plots/fid_vs_guidance*.table.json"))
    assert [row[0] for row in json.loads(fid_plot.read_text())["data"]] == [1.0, 3.0]
    # reference materialised once, its features cached under a key holding name, count, resolution, extractor
    cache = Path(on_disk["metric_settings"]["cache_dir"])
    assert any(f"{key}-ldm-random-init-a" in p.name for p in cache.iterdir())

    # resume: one lost PNG is recomputed bit-identically, the rest skipped
    lost = out / "samples" / "gs3" / "000001.png"
    before = lost.read_bytes()
    lost.unlink()
    run(eval_config(**overrides, stage="sample"))
    sampling = json.loads((out / "sampling.json").read_text())
    assert sampling["per_scale"]["3.0"]["written"] == 1 and sampling["per_scale"]["3.0"]["skipped"] == 3
    assert sampling["per_scale"]["1.0"]["written"] == 0
    assert lost.read_bytes() == before

    # other settings into the same folder: refused
    with pytest.raises(ValueError, match="other settings"):
        run(eval_config(**overrides, stage="sample", seed=5))


def test_missing_metric_weights_stop_before_sampling(tiny_export, tmp_path, eval_config) -> None:
    out = tmp_path / "out"
    cfg = eval_config(checkpoint=tiny_export, prompts=tmp_path / "none.txt", output_dir=out,
                      **{"metrics.inception_weights": tmp_path / "inception.pth", "reference.path": tmp_path})
    with pytest.raises(FileNotFoundError) as err:
        run(cfg)
    assert f"{tmp_path}/inception.pth" in str(err.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in str(err.value)
    assert not out.exists()


def test_default_output_dir_is_outside_checkpoint_rotation(eval_config, tiny_export) -> None:
    """Rotation of checkpoints/ deleted metrics.json written inside a step dir."""
    import os

    from eval.pipeline import default_output_dir

    cfg = eval_config(checkpoint=tiny_export, prompts="unused.txt")
    run = "/runs/tiny/run1"
    out = default_output_dir(cfg, f"{run}/checkpoints/step_0000010")
    assert out == f"{run}/eval/step_0000010/{cfg.sampler}-{cfg.steps}steps-n{cfg.num_samples}-seed{cfg.seed}"
    assert "checkpoints" not in out
    assert default_output_dir(cfg, "/exports/mine").startswith(os.path.join("/exports/mine", "eval"))


def test_eval_wandb_run_joins_the_training_runs_group(tmp_path) -> None:
    """The eval W&B run is in the training run's group, with the training run's id in its config."""
    import glob
    import json as _json

    from eval.report import log_wandb, training_run_link
    from tests.eval.conftest import build_tiny_export
    from tests.ldm_train import wandb_reader

    run = build_tiny_export(str(tmp_path / "t"))
    (tmp_path / "t" / "run" / "wandb_run_id").write_text("abc123\n")
    link = training_run_link(run)
    assert link["train_run_id"] == "abc123" and link["train_run_dir"] == run
    assert link["group"]  # the training config's experiment name (or logger.group)
    out = tmp_path / "eval_out"
    out.mkdir()
    log_wandb(str(out), {"checkpoint": run}, {"per_scale": []}, {}, mode="offline", link=link)
    files = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    runs = [r.run for r in wandb_reader.wait_for_run_record(files[0]) if r.HasField("run")]
    assert runs and runs[0].run_group == link["group"]
    cfg = wandb_reader.config(files[0])
    training = cfg["training_run"]
    training = _json.loads(training) if isinstance(training, str) else training
    assert training["train_run_id"] == "abc123"
