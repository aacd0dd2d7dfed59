"""The first-stage trainer end to end on the synthetic shapes (16 px, a handful of steps: 2 shared CPU cores)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from ldm_train.first_stage.trainer import Trainer, train

from .helpers import REPO, ae_cfg, stats

pytestmark = pytest.mark.integration  # starts processes or servers


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_discriminator_waits_for_disc_start_then_alternates(tmp_path, shapes32):
    trainer = Trainer(ae_cfg(tmp_path, shapes32, "first_stage.lossconfig.disc_start=2", "train.max_steps=4"))
    try:
        batches = trainer.stream.loader()
        for step in range(4):
            x = next(batches)
            assert x.shape == (4, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
            d_before, g_before = _params(trainer.disc), _params(trainer.model)
            log = trainer.train_step(x)
            trainer.step += 1
            assert _changed(g_before, trainer.model)  # the generator steps every iteration
            if step < 2:  # before disc_start: no discriminator forward, step or BatchNorm update
                assert not _changed(d_before, trainer.disc) and "d_loss" not in log and "g_loss" not in log
            else:
                assert _changed(d_before, trainer.disc) and "d_loss" in log and log["d_weight"] > 0
            assert trainer.d_steps == max(0, step - 1)
            # the generator's adversarial term leaves no gradient on the discriminator
            assert all(p.grad is None for p in trainer.disc.parameters()) or step >= 2
    finally:
        trainer.close()


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, shapes32):
    common = ["first_stage.lossconfig.disc_start=2", "data.num_workers=2", "train.checkpoint.every_steps=3"]
    full = train(ae_cfg(tmp_path / "full", shapes32, *common, "train.max_steps=5"))
    train(ae_cfg(tmp_path / "split", shapes32, *common, "train.max_steps=3"))
    resumed = train(ae_cfg(tmp_path / "split", shapes32, *common, "train.max_steps=5"))
    keys = ["train/total", "train/rec", "train/kl", "train/d_loss", "train/g_loss", "train/psnr"]
    a = {s["step"]: s for s in stats(tmp_path / "full/autoencoder/run") if "train/total" in s}
    b = {s["step"]: s for s in stats(tmp_path / "split/autoencoder/run") if "train/total" in s}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in (4, 5):  # after the resume: model, both optimizers, RNG and data position restored
        for k in keys:
            assert a[step][k] == b[step][k], (step, k, a[step][k], b[step][k])
    assert "train/d_loss" in a[4] and "train/d_loss" not in a[2]
    assert resumed["eval_psnr"] == full["eval_psnr"]
    ckpt_dir = tmp_path / "split/autoencoder/run/checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step_0000003", "step_0000005"]  # no partial
    assert (ckpt_dir / "latest").read_text() == "step_0000005"
    assert json.loads((ckpt_dir / "step_0000005" / "meta.json").read_text()) == {"step": 5, "world_size": 1}


def test_export_loads_in_data_prep_encode(tmp_path, shapes32):
    result = train(ae_cfg(tmp_path, shapes32, "train.max_steps=2", "train.image_every=2", "logger=wandb",
                          "logger.mode=offline"))
    run = tmp_path / "autoencoder/run"
    assert list((run / "wandb").glob("offline-run-*")), "offline W&B run missing"
    assert (run / "samples" / "reconstructions-000000002.png").is_file()
    final = stats(run)[-1]
    assert final["eval/psnr"] > 0 and final["latent/scale_factor"] > 0 and "latent/std_2" in final
    export = result["export"]
    info = json.loads(open(export.replace(".safetensors", ".json")).read())
    assert info["first_stage"]["name"] == "tiny_kl_f4" and info["scale_factor"] > 0
    assert len(info["latent_std"]) == 3
    out = tmp_path / "latents"
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.encode", f"input={shapes32['heldout']}", f"output={out}",
         "first_stage=tiny_kl_f4", f"first_stage.checkpoint={export}", "resolution=16", "num_workers=1",
         "batch_size=8", "progress=false"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((out / "tiny_kl_f4" / "manifest.json").read_text())
    assert manifest["num_samples"] == 16 and list(manifest["latent_shape"]) == [6, 4, 4]
    # the stored moments are our model's moments of the same images
    from ldm_train.checkpoints.first_stage import load_first_stage
    from ldm_train.config import FirstStageConfig, to_dataclass
    from ldm_train.data.readers import image_dataset

    model = load_first_stage(to_dataclass(info["first_stage"], FirstStageConfig))
    images = {s["key"]: s["image"] for s in image_dataset(shapes32["heldout"], 16)}
    tar = next((out / "tiny_kl_f4").glob("shard-*.tar"))
    with tarfile.open(tar) as t:
        member = next(m for m in t.getmembers() if m.name.endswith("latent.npy"))
        key = member.name.split(".")[0]
        latent = np.load(io.BytesIO(t.extractfile(member).read()))
    with torch.no_grad():
        expected = model.encode_moments(images[key][None])[0]
    assert np.abs(latent.astype(np.float32) - expected.numpy()).max() < 2e-2 * max(1.0, float(expected.abs().max()))


def test_vq_trains_and_logs_codebook_usage(tmp_path, shapes32):
    result = train(ae_cfg(tmp_path, shapes32, "first_stage=tiny_vq_f4", "train.max_steps=2"))
    logged = [s for s in stats(tmp_path / "autoencoder/run") if "vq/perplexity" in s]
    assert len(logged) == 2
    for s in logged:
        assert 1.0 <= s["vq/perplexity"] <= 256 and 0 <= s["vq/dead_codes"] < 256 and s["train/codebook"] > 0
    assert result["latent_std"] and result["eval_psnr"] > 0


def test_decoder_fine_tune_keeps_every_latent(tmp_path, shapes32):
    """train.trainable=decoder starts from first_stage.checkpoint, trains decoder and discriminator, leaves the
    encoder (so every latent) exactly as it was; without a checkpoint it is refused before anything is written."""
    first = train(ae_cfg(tmp_path / "base", shapes32, "train.max_steps=2"))
    tuned = ["train.trainable=decoder", f"first_stage.checkpoint={first['export']}",
             "first_stage.lossconfig.disc_start=0"]
    trainer = Trainer(ae_cfg(tmp_path / "tune", shapes32, *tuned, "train.max_steps=3"))
    try:
        from ldm_train.checkpoints.first_stage import load_first_stage

        start = load_first_stage(trainer.fs)
        assert not _changed(_params(start), trainer.model)  # the run starts from the given weights
        frozen = {k: v for k, v in _params(trainer.model).items() if not k.startswith(("decoder.", "post_quant"))}
        decoder, disc = _params(trainer.model.decoder), _params(trainer.disc)
        batches = trainer.stream.loader()
        for _ in range(3):
            log = trainer.train_step(next(batches))
            trainer.step += 1
        assert "d_loss" in log and "g_loss" in log
        assert _changed(decoder, trainer.model.decoder) and _changed(disc, trainer.disc)
        now = trainer.model.state_dict()
        assert all(torch.equal(v, now[k]) for k, v in frozen.items())
        x = next(batches)
        with torch.no_grad():
            assert torch.equal(start.encode_moments(x), trainer.model.encode_moments(x))
    finally:
        trainer.close()
    # its export names the file its encoder came from: latents encoded with that file pass the LDM's check
    from ldm_train.checkpoints.compvis import read_weights
    from ldm_train.data.fsspec_io import sha256
    from ldm_train.data.manifest import ManifestError, check_manifest

    tuned_export = train(ae_cfg(tmp_path / "tune2", shapes32, *tuned, "train.max_steps=1"))["export"]
    assert read_weights(tuned_export).metadata["encoder_sha256"] == sha256(first["export"])
    fs = dict(json.loads(open(first["export"].replace(".safetensors", ".json")).read())["first_stage"])
    manifest = {"first_stage": {**fs, "z_channels": fs["embed_dim"], "sha256": sha256(first["export"])},
                "stored": "moments", "latent_shape": [6, 4, 4]}
    check_manifest(manifest, {**fs, "checkpoint": tuned_export}, verify_checkpoint=True)
    manifest["first_stage"]["sha256"] = "0" * 64  # latents of another encoder are still refused
    with pytest.raises(ManifestError, match="decoder fine-tune of it"):
        check_manifest(manifest, {**fs, "checkpoint": tuned_export}, verify_checkpoint=True)
    with pytest.raises(ValueError, match="first_stage.checkpoint=PATH"):
        train(ae_cfg(tmp_path / "refused", shapes32, "train.trainable=decoder", "train.max_steps=1"))
    assert not (tmp_path / "refused").exists()
