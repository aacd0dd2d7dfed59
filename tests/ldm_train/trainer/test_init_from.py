"""train.init_from: a new run starts from a CompVis-layout checkpoint with all three prefixes; the
loaded weights equal the file's (a step at learning rate 0 leaves them in place), the first stage and the latent
scale factor come from the same file, and a file that does not fit is refused naming it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.ldm_train.trainer.helpers import only_run_dir, run_trainer, tiny_overrides

pytestmark = pytest.mark.integration  # starts processes or servers


def _compvis_file(latents_root: Path, path: Path) -> dict[str, torch.Tensor]:
    from ldm_train.app import compose
    from ldm_train.build import build_ldm
    from ldm_train.checkpoints.compvis import export_safetensors
    from ldm_train.models.autoencoder import build_first_stage
    from ldm_train.trainer.config import TrainAppConfig

    cfg = compose("train", TrainAppConfig, ["experiment=tiny", f"data.latents_root={latents_root}"])
    torch.manual_seed(123)
    ldm = build_ldm(cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ldm.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    first_stage = build_first_stage(cfg.first_stage)
    # a released checkpoint also carries LatentDiffusion's buffers, scale_factor among them
    return export_safetensors(str(path), {"unet": ldm.unet, "text_encoder": ldm.cond_stage_model,
                                          "first_stage": first_stage, "": {"scale_factor": torch.tensor(0.25)}})


def test_init_from_a_compvis_checkpoint_loads_every_weight(tmp_path, latents_root, tokenizer_dir) -> None:
    from safetensors.torch import load_file

    source = tmp_path / "released.safetensors"
    tensors = _compvis_file(latents_root, source)
    runs = tmp_path / "runs"
    proc = run_trainer(tiny_overrides(latents_root, runs, **{
        "train.init_from": source, "train.max_steps": 1, "train.optim.base_lr": 0.0,
        "train.optim.weight_decay": 0.0, "text_encoder.tokenizer": tokenizer_dir}), nproc=1)
    assert f"[train] train.init_from: {source}: unet:" in proc.stdout and "fresh optimizer, step 0" in proc.stdout
    assert f"first_stage.checkpoint from train.init_from: {source}" in proc.stdout
    run = only_run_dir(runs)
    step = sorted((run / "checkpoints").glob("step_*"))[-1]
    exported = load_file(str(step / "model.safetensors"))
    assert "scale factor 0.25 (the scale_factor buffer of train.init_from)" in proc.stdout
    assert "scale_factor: 0.25" in (run / "config.yaml").read_text()  # recorded: exports, resume and eval use it
    compared = [k for k in exported if k in tensors]
    assert len(compared) == len(exported) and len(exported) > 50
    assert all(torch.equal(exported[k], tensors[k].float()) for k in compared)
    assert f"checkpoint: {source}" in (run / "config.yaml").read_text()


def test_init_from_a_file_that_does_not_fit_is_refused(tmp_path, latents_root, tokenizer_dir) -> None:
    from ldm_train.checkpoints.compvis import export_safetensors

    bad = tmp_path / "other.safetensors"
    export_safetensors(str(bad), {"unet": {"input_blocks.0.0.weight": torch.zeros(8, 3, 3, 3)}})
    proc = run_trainer(tiny_overrides(latents_root, tmp_path / "runs", **{
        "train.init_from": bad, "train.max_steps": 1, "text_encoder.tokenizer": tokenizer_dir}), nproc=1,
        check=False)
    assert proc.returncode != 0
    assert f"{bad}: UNet weights do not match the configured model" in proc.stderr


def test_init_from_a_pickle_with_code_is_refused_without_running_it(tmp_path) -> None:
    """train.init_from is a user file too: read weights-only, the payload never runs."""
    import pytest

    from ldm_train.trainer import init_from
    from tests.malicious_pickle import write_malicious

    marker = tmp_path / "pwned"
    bad = write_malicious(tmp_path / "released.ckpt", marker,
                          {"state_dict": {"model.diffusion_model.x": torch.zeros(1)}})
    with pytest.raises(Exception) as err:
        init_from.resolve(str(bad))
    assert str(bad) in str(err.value)
    assert not marker.exists()


@pytest.mark.slow  # exports a pipeline folder, then trains from it: 25-55 s on the 2-core machine
def test_init_from_a_diffusers_pipeline_folder(tmp_path, latents_root, tokenizer_dir) -> None:
    """A pipeline saved by diffusers' own classes starts a run: its UNet, LDMBert text encoder, VAE (the first
    stage) and tokenizer are converted once to our layout, and a step at learning rate 0 leaves them in place."""
    import pytest
    from safetensors.torch import load_file

    pytest.importorskip("diffusers")
    from ldm_train.app import compose
    from ldm_train.trainer.config import TrainAppConfig
    from tests.diffusers_pipeline import save_diffusers_pipeline

    folder = tmp_path / "hf"
    save_diffusers_pipeline(folder, compose("train", TrainAppConfig, ["experiment=tiny",
                                                                      f"data.latents_root={latents_root}"]),
                            tokenizer_dir)
    runs = tmp_path / "runs"
    proc = run_trainer(tiny_overrides(latents_root, runs, **{
        "train.init_from": folder, "train.max_steps": 1, "train.optim.base_lr": 0.0,
        "train.optim.weight_decay": 0.0}), nproc=1)
    assert f"converted from the diffusers folder {folder}" in proc.stdout
    run = only_run_dir(runs)
    converted = load_file(str(run / "init_from_diffusers.safetensors"))
    assert {k.split(".")[0] for k in converted} == {"model", "cond_stage_model", "first_stage_model"}
    step = sorted((run / "checkpoints").glob("step_*"))[-1]
    exported = load_file(str(step / "model.safetensors"))
    assert len(exported) > 50 and all(k in converted for k in exported)
    assert all(torch.equal(exported[k], converted[k].float()) for k in exported)
    config = (run / "config.yaml").read_text()
    assert f"tokenizer: {folder}/tokenizer" in config and f"checkpoint: {run}/init_from_diffusers.safetensors" in config


def test_a_checkpoint_trained_with_another_schedule_is_named() -> None:
    """A CompVis checkpoint carries its betas: fine-tuning it under another schedule is warned about, with the
    checkpoint's own start and end (the presets' old plain-linspace reading differs by up to 0.126)."""
    from ldm_train.diffusion.schedule import make_beta_schedule
    from ldm_train.trainer.init_from import InitSource, schedule_mismatch

    ours = make_beta_schedule("scaled_linear", 1000, 0.0015, 0.0195).float()
    assert schedule_mismatch(InitSource("x", None, False, False, betas=ours.clone()), ours) is None
    assert schedule_mismatch(InitSource("x", None, False, False), ours) is None  # our exports carry no betas
    plain = make_beta_schedule("sqrt_linear", 1000, 0.0015, 0.0195).float()
    msg = schedule_mismatch(InitSource("x", None, False, False, betas=plain), ours)
    assert "up to 0.126" in msg and "0.0015..0.0195" in msg and "scaled_linear" in msg
    assert "500 timesteps" in schedule_mismatch(InitSource("x", None, False, False, betas=plain[:500]), ours)
