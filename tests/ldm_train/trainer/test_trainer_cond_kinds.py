"""``cond.kind`` class and none through the real DeepSpeed engine (ZeRO-2, CPU, one process): train a few steps on
labelled latent shards, checkpoint, resume, draw the sample grid, export in the CompVis layout, and sample the
export with ``eval.run`` (class: per class with guidance scales; none: one unguided set)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from tests.latent_shards import write_class_shards
from tests.ldm_train.trainer.helpers import read_stats, run_trainer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900), pytest.mark.slow]  # two trainer starts each: ~1.5-3 min on 2 shared cores


@pytest.fixture(scope="module")
def class_latents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/fmnist_kl_f4: 256 samples of 10 classes (3x8x8 KL moments), the label in each json."""
    root = tmp_path_factory.mktemp("class_latents")
    write_class_shards(root / "fmnist_kl_f4", 256, shard_size=64)
    return root


def _overrides(experiment: str, latents: Path, runs: Path, **extra: object) -> list[str]:
    args = {
        "experiment": experiment, "runs_root": runs, "run_name": "r", "data.latents_root": latents,
        "data.num_workers": 0, "train.global_batch": 8, "train.micro_batch": 8, "train.total_samples": 8 * 4,
        "train.log_every_samples": 8, "train.optim.warmup_samples": 0, "train.checkpoint.every_samples": 16,
        "train.sampling.every_samples": 24, "train.sampling.steps": 2, "logger.mode": "offline",
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def _train_stop_resume(experiment: str, latents: Path, runs: Path, **extra: object) -> Path:
    """Steps 1-2 (checkpoint at 2, stop), then a resumed session to step 4 (grid at step 3, checkpoint at 4)."""
    run_trainer(_overrides(experiment, latents, runs, **{"train.max_steps": 2}, **extra), nproc=1)
    run_dir = runs / experiment / "r"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    proc = run_trainer(_overrides(experiment, latents, runs, **extra), nproc=1)
    assert "resumed" in proc.stdout and "at step 2" in proc.stdout, proc.stdout[-3000:]
    assert [row["step"] for row in read_stats(run_dir) if "loss" in row] == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    return run_dir


def _eval(run_dir: Path, out: Path, **extra: object) -> dict:
    from eval.pipeline import run
    from tests.eval.conftest import eval_config

    return run(eval_config(checkpoint=run_dir, num_samples=6, steps=2, batch_size=3, output_dir=out,
                           allow_random_first_stage="true", progress="false", **{
                               "metrics.fid": "false", "metrics.isc": "false", "metrics.prc": "false",
                               "wandb.mode": "disabled"}, **extra))


def test_class_kind_trains_resumes_samples_per_class_and_exports_compvis_keys(class_latents: Path,
                                                                             tmp_path: Path) -> None:
    run_dir = _train_stop_resume("fmnist_class", class_latents, tmp_path / "runs", **{
        "train.sampling.classes": "[0,3,7]", "train.sampling.samples_per_class": 2})
    step_dir = run_dir / "checkpoints" / "step_0000004"
    raw, ema = load_file(str(step_dir / "model.safetensors")), load_file(str(step_dir / "model_ema.safetensors"))
    assert raw.keys() == ema.keys()
    assert [k for k in raw if k.startswith("cond_stage_model.")] == ["cond_stage_model.embedding.weight"]
    assert tuple(raw["cond_stage_model.embedding.weight"].shape) == (11, 64)  # 10 classes + the null class
    assert all(k.startswith(("model.diffusion_model.", "cond_stage_model.")) for k in raw)
    assert not (step_dir / "tokenizer").exists()  # no text encoder, no tokenizer
    # the grid at step 3: one row per class of train.sampling.classes, samples_per_class columns (8x8 latents)
    with Image.open(run_dir / "samples" / "samples-000000003.png") as grid:
        assert grid.size == (2 * 8, 3 * 8)

    report = _eval(run_dir, tmp_path / "eval", guidance_scale="[1.0,3.0]", classes="[1,4]")
    rows = [json.loads(line) for line in (tmp_path / "eval" / "prompts.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [1, 4, 1, 4, 1, 4] and rows[1]["class_name"] == "coat"
    assert [r["guidance_scale"] for r in report["per_scale"]] == [1.0, 3.0]
    assert report["cond"] == {"kind": "class", "classes": [1, 4], "num_classes": 10}
    for scale in ("gs1", "gs3"):
        assert len(list((tmp_path / "eval" / "samples" / scale).glob("*.png"))) == 6
    _class_run_exports_to_diffusers(run_dir, tmp_path / "hf", _random_first_stage(run_dir, tmp_path))


def _random_first_stage(run_dir: Path, tmp_path: Path) -> str:
    """The run's first stage at its random init as a file (these latents were never encoded by one)."""
    from omegaconf import OmegaConf

    from ldm_train.checkpoints.first_stage import export_first_stage
    from ldm_train.config import FirstStageConfig, to_dataclass
    from ldm_train.models.autoencoder import build_first_stage

    cfg = OmegaConf.load(run_dir / "checkpoints" / "step_0000004" / "config.yaml")
    path = str(tmp_path / "first_stage.safetensors")
    export_first_stage(build_first_stage(to_dataclass(cfg.first_stage, FirstStageConfig)), path)
    return path


def _class_run_exports_to_diffusers(run_dir: Path, out: Path, first_stage: str) -> None:
    """The diffusers export of a class model: the cross-attention UNet through from_pretrained and the label
    table in class_embedder/ give our prediction for a label and for the null class."""
    import torch

    diffusers = pytest.importorskip("diffusers")
    from eval.checkpoint import load_sampling_model
    from ldm_train.checkpoints.diffusers_export import export

    summary = export(str(run_dir), out, first_stage_checkpoint=first_stage)
    assert "class_embedder" in summary["folders"] and "text_encoder" not in summary["folders"]
    config = json.loads((out / "class_embedder" / "config.json").read_text())
    assert config["num_classes"] == 10 and config["null_label"] == 10
    table = load_file(str(out / "class_embedder" / "model.safetensors"))["embedding.weight"]
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(out), subfolder="unet").eval()
    ours = load_sampling_model(str(run_dir), first_stage_checkpoint=first_stage)
    labels = torch.tensor([3, config["null_label"]])
    c, h, w = ours.latent_shape
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        a = ours.ldm.unet(x, t, context=ours.ldm.cond_stage_model(labels))
        b = unet(x, t, encoder_hidden_states=table[labels][:, None]).sample
    assert float((a - b).abs().max()) < 1e-4


def test_none_kind_trains_resumes_samples_and_exports_without_cond_stage(class_latents: Path, tmp_path: Path) -> None:
    run_dir = _train_stop_resume("fmnist_uncond", class_latents, tmp_path / "runs",
                                 **{"train.sampling.num_samples": 4})
    raw = load_file(str(run_dir / "checkpoints" / "step_0000004" / "model_ema.safetensors"))
    assert raw and all(k.startswith("model.diffusion_model.") for k in raw)
    with Image.open(run_dir / "samples" / "samples-000000003.png") as grid:
        assert grid.size == (2 * 8, 2 * 8)  # 4 plain samples, a square grid

    report = _eval(run_dir, tmp_path / "eval", guidance_scale="[1.0,3.0]")
    assert [r["guidance_scale"] for r in report["per_scale"]] == [1.0]  # unconditional: one unguided set
    assert report["cond"] == {"kind": "none"} and report["prompts"] is None
    assert sorted(p.name for p in (tmp_path / "eval" / "samples").iterdir()) == ["gs1"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "prompts.jsonl").read_text().splitlines()]
    assert rows == [{"index": i} for i in range(6)]
    # diffusers has no UNet2DConditionModel for it: refused, naming what was written (the CompVis file first)
    from ldm_train.checkpoints.diffusers_export import export

    with pytest.raises(ValueError, match=r"unconditional.*written to .*compvis/model\.safetensors, vqvae/, scheduler/"):
        export(str(run_dir), tmp_path / "hf", first_stage_checkpoint=_random_first_stage(run_dir, tmp_path))
    full = load_file(str(tmp_path / "hf" / "compvis" / "model.safetensors"))
    assert any(k.startswith("first_stage_model.") for k in full) and not any(k.startswith("cond_stage") for k in full)


@pytest.fixture(scope="module")
def sr_latents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/fmnist_kl_f2: 64 synthetic 32 px images encoded by the encode job (random fmnist_kl_f2 weights) with
    their 16 px copies (lowres_factor=2: the latent grid)."""
    from data_prep.encode_job import run_encode
    from data_prep.synthetic import write_synthetic
    from tests.data_prep.helpers import encode_args, encode_cfg

    images, root = tmp_path_factory.mktemp("sr_images"), tmp_path_factory.mktemp("sr_latents")
    write_synthetic(str(root / "heldout"), num_samples=8, resolution=32, shard_size=8, seed=9)
    write_synthetic(str(images), num_samples=64, resolution=32, shard_size=32, seed=4)
    res = run_encode(encode_cfg(encode_args(input=images, output=root, resolution=32, lowres_factor=2,
                                            first_stage="fmnist_kl_f2", allow_random_first_stage="true")))
    assert res.ok and res.num_samples == 64
    return root


def test_concat_kind_trains_resumes_and_samples_super_resolution(sr_latents: Path, tmp_path: Path) -> None:
    run_dir = _train_stop_resume("fmnist_sr", sr_latents, tmp_path / "runs", **{"train.sampling.num_samples": 4})
    raw = load_file(str(run_dir / "checkpoints" / "step_0000004" / "model_ema.safetensors"))
    assert raw and all(k.startswith("model.diffusion_model.") for k in raw)  # no cond stage (CompVis: Identity)
    assert tuple(raw["model.diffusion_model.input_blocks.0.0.weight"].shape[:2]) == (32, 2 + 3)
    stats = [row for row in read_stats(run_dir) if "loss" in row]
    assert all(row["loss"] == row["loss"] for row in stats)  # finite
    # the grid at step 3: the first 4 training samples' 16 px images super-resolved (latents 16x16, no decoder)
    with Image.open(run_dir / "samples" / "samples-000000003.png") as grid:
        assert grid.size == (2 * 16, 2 * 16)

    # eval super-resolves the held-out images' 16 px copies (random first stage: 32 px decodes), one unguided set,
    # and scores each sample against its 32 px original
    report = _eval(run_dir, tmp_path / "eval", guidance_scale="[1.0,3.0]",
                   **{"reference.path": sr_latents / "heldout", "reference.num_images": 4})
    assert [r["guidance_scale"] for r in report["per_scale"]] == [1.0]
    assert report["cond"]["kind"] == "concat" and report["cond"]["count"] == 4
    row = report["per_scale"][0]
    assert 0 < row["psnr"] < 100 and -1 <= row["ssim"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "eval" / "prompts.jsonl").read_text().splitlines()]
    assert [r["reference_index"] for r in rows] == [0, 1, 2, 3, 0, 1]
    samples = sorted((tmp_path / "eval" / "samples" / "gs1").glob("*.png"))
    assert len(samples) == 6
    with Image.open(samples[0]) as im:
        assert im.size == (32, 32)
