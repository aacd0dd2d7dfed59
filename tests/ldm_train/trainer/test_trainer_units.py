"""Fast trainer tests (no DeepSpeed engine): derived quantities, DeepSpeed config, run dirs, guard,
checkpoint bookkeeping, export layout, and the composed Hydra configs of both experiments."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from ldm_train.runtime.rundir import resolve_run_dir
from ldm_train.trainer.config import TrainConfig
from ldm_train.trainer.derived import derive, describe, lr_at
from ldm_train.trainer.ds_config import compose_ds_config
from ldm_train.trainer.guard import NonFiniteAbort, NumericalGuard


def _cfg(**kw) -> TrainConfig:
    cfg = TrainConfig()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_derive_accumulation_and_intervals_in_samples():
    cfg = _cfg(global_batch=64, micro_batch=4, total_samples=6400, log_every_samples=100)
    cfg.checkpoint.every_samples = 640
    d = derive(cfg, world_size=2, flops_per_sample=1e9)
    assert (d.accumulation, d.total_steps, d.checkpoint_every_steps) == (8, 100, 10)
    assert d.log_every_steps == 2  # 100 samples -> ceil(100 / 64) steps, never 0
    assert d.flops_per_step == pytest.approx(64e9)
    # the same run at world size 8: same global batch, same steps; only the accumulation changes
    d8 = derive(cfg, world_size=8)
    assert (d8.accumulation, d8.total_steps, d8.checkpoint_every_steps) == (2, 100, 10)
    assert "accumulation 8" in describe(d) and "global batch 64" in describe(d)


def test_derive_refuses_indivisible_batch_and_scales_lr_like_compvis():
    with pytest.raises(ValueError, match="not divisible by micro_batch x world_size = 4 x 3 = 12"):
        derive(_cfg(global_batch=64, micro_batch=4), world_size=3)
    cfg = _cfg(global_batch=680, micro_batch=5)
    cfg.optim.base_lr, cfg.optim.lr_scaling = 5e-5, "compvis"
    assert derive(cfg, world_size=8).lr == pytest.approx(5e-5 * 680)  # ngpu * batch * accumulate * base_lr
    cfg.optim.lr_scaling = "none"
    assert derive(cfg, world_size=8).lr == pytest.approx(5e-5)


def test_warmup_is_linear_then_constant():
    cfg = _cfg(global_batch=10, micro_batch=10)
    cfg.optim.base_lr, cfg.optim.warmup_samples = 1.0, 40
    d = derive(cfg, 1)
    assert [lr_at(s, d) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decay_after_warmup_reaches_the_floor_at_the_end():
    cfg = _cfg(global_batch=10, micro_batch=10)
    cfg.total_samples = 140  # 14 steps: 4 warm-up, 10 of cosine
    cfg.optim.base_lr, cfg.optim.warmup_samples = 1.0, 40
    cfg.optim.lr_decay, cfg.optim.min_lr_ratio = "cosine", 0.1
    d = derive(cfg, 1)
    lrs = [lr_at(s, d) for s in range(15)]
    assert lrs[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]  # warm-up, then the cosine starts at lr
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half way: the mean of lr and the floor
    assert lrs[14] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert "then cosine to 0.1" in describe(d)


def test_cosine_with_a_time_budget_ends_at_the_budget_or_the_last_step_whichever_first():
    cfg = _cfg(global_batch=10, micro_batch=10)
    cfg.total_samples = 10_000_000  # 1,000,000 steps: the time budget ends the run long before
    cfg.time_budget_s = 100.0
    cfg.optim.base_lr, cfg.optim.warmup_samples = 1.0, 40
    cfg.optim.lr_decay, cfg.optim.min_lr_ratio = "cosine", 0.1
    d = derive(cfg, 1)
    assert lr_at(2, d, train_wall_s=50.0) == 0.75  # warm-up is counted in steps
    assert lr_at(10, d, train_wall_s=0.0) == pytest.approx(1.0, abs=1e-9)
    assert lr_at(10, d, train_wall_s=50.0) == pytest.approx(0.1 + 0.9 * 0.5)  # half the budget: half way
    assert lr_at(10, d, train_wall_s=100.0) == pytest.approx(0.1)
    assert lr_at(10, d, train_wall_s=250.0) == pytest.approx(0.1)  # past the budget (a resumed run): the floor
    assert "by the end of 100 s of training" in describe(d)
    cfg.total_samples = 140  # the steps end first: the step count decides
    d = derive(cfg, 1)
    assert lr_at(14, d, train_wall_s=1.0) == pytest.approx(0.1)
    cfg.optim.lr_decay = "constant"  # a time budget alone changes nothing
    assert lr_at(10, derive(cfg, 1), train_wall_s=99.0) == 1.0


def test_ds_config_takes_batch_precision_clipping_from_train():
    cfg = _cfg(global_batch=32, micro_batch=4, precision="bf16")
    cfg.optim.grad_clip = 0.5
    d = derive(cfg, world_size=2)
    ds = compose_ds_config({"zero_optimization": {"stage": 2}}, cfg, d, load_universal=True)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and "fp16" not in ds
    assert ds["checkpoint"]["load_universal"] is True
    cfg.precision = "fp16"
    assert compose_ds_config({}, cfg, d)["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    with pytest.raises(ValueError, match="come from `train:`"):
        compose_ds_config({"train_batch_size": 7}, cfg, d)


def test_run_dir_names_indices_and_slurm_reuse(tmp_path: Path):
    a = resolve_run_dir(tmp_path, "tiny", "tiny-tiny_kl_f4-gpus2-batch32")
    b = resolve_run_dir(tmp_path, "tiny", "tiny-tiny_kl_f4-gpus2-batch32", slurm_job_id="4242")
    assert a.name == "00000-tiny-tiny_kl_f4-gpus2-batch32" and b.name.startswith("00001-")
    # a requeued job (same SLURM job id) finds its run again, even if its world size changed
    assert resolve_run_dir(tmp_path, "tiny", "tiny-tiny_kl_f4-gpus1-batch32", slurm_job_id="4242") == b
    assert resolve_run_dir(tmp_path, "tiny", "x", run_name="mine").name == "mine"


def test_guard_aborts_after_k_consecutive_skips():
    guard = NumericalGuard(max_consecutive=3, device=torch.device("cpu"))
    guard.observe_loss(torch.tensor(float("nan")))
    guard.observe_loss(torch.tensor(1.0))
    for applied in (False, False, True, False, False):
        guard.after_step(applied)
    assert guard.skipped_total == 4 and guard.consecutive == 2
    assert guard.bad_losses_since_last_read() == 1 and guard.bad_losses_since_last_read() == 0
    with pytest.raises(NonFiniteAbort, match="3 optimizer steps in a row"):
        guard.after_step(False)


def test_prune_keeps_last_k_and_latest(tmp_path: Path):
    from ldm_train.data.fsspec_io import write_text
    from ldm_train.runtime import checkpoint_dir as cd

    for step in (10, 20, 30, 40):
        (tmp_path / cd.tag_for(step)).mkdir()
        (tmp_path / cd.tag_for(step) / cd.META).write_text("{}")
    write_text(tmp_path / cd.LATEST, cd.tag_for(40))
    cd.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [cd.tag_for(30), cd.tag_for(40)]
    assert cd.latest_tag(tmp_path) == cd.tag_for(40)
    write_text(tmp_path / cd.LATEST, cd.tag_for(10))  # names a deleted checkpoint
    with pytest.raises(FileNotFoundError, match="is missing"):
        cd.latest_tag(tmp_path)


def _compose(overrides: list[str]):
    from ldm_train.summary import compose_config

    return compose_config(overrides)


def test_experiments_compose_and_first_stage_drives_shapes_and_shards():
    cfg = _compose(["experiment=txt2img_1p45b"])
    assert cfg.unet.image_size == 32 and cfg.unet.in_channels == 4 and cfg.unet.context_dim == 1280
    assert not cfg.unet.use_checkpoint and not cfg.text_encoder.use_checkpoint  # the planner's choice on 80 GB
    assert cfg.train.precision == "bf16" and cfg.train.ema.decay == 0.9999 and cfg.train.caption_dropout == 0.1
    assert cfg.deepspeed.zero_optimization.stage == 2
    assert cfg.data.batch_size == cfg.train.micro_batch  # one source of truth
    d = derive(TrainConfig(**{k: v for k, v in cfg.train.items() if k in ("global_batch", "micro_batch")}), 8)
    assert d.accumulation == 1 and cfg.train.micro_batch == 85
    f16 = _compose(["experiment=txt2img_1p45b", "first_stage=kl_f16", "data.latents_root=s3://b/lat"])
    assert (f16.unet.in_channels, f16.unet.out_channels, f16.unet.image_size) == (16, 16, 16)
    assert f16.data.shards == "s3://b/lat/kl_f16"
    tiny = _compose(["experiment=tiny", "deepspeed=zero3"])
    assert tiny.deepspeed.zero_optimization.stage == 3 and tiny.experiment_name == "tiny"


def test_sweep_launcher_presets_compose():
    from hydra import compose, initialize_config_dir

    from ldm_train.summary import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", ["experiment=txt2img_1p45b", "hydra/launcher=slurm"], return_hydra_config=True)
        local = compose("train", ["hydra/launcher=local"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert launcher.additional_parameters.requeue is True and launcher.signal_delay_s > 0
    assert local.hydra.launcher._target_.endswith("BasicLauncher")


def test_export_roundtrip_compvis_layout(tmp_path: Path):
    from omegaconf import OmegaConf

    from ldm_train.build import build_ldm
    from ldm_train.checkpoints.export import full_state_dict, load_export, write_export
    from ldm_train.config import TextEncoderConfig, UNetConfig, to_dataclass
    from ldm_train.models.text_encoder import BERTEmbedder
    from ldm_train.models.unet import UNetModel

    cfg = _compose(["experiment=tiny"])
    torch.manual_seed(0)
    model = build_ldm(cfg)
    raw = full_state_dict(model, zero_stage=2)
    assert any(k.startswith("model.diffusion_model.input_blocks.0.0.") for k in raw)
    assert "cond_stage_model.transformer.to_logits.weight" in raw
    ema = {k: v + 1 for k, v in raw.items()}
    step = tmp_path / "checkpoints" / "step_0000005"
    step.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_0000005")
    write_export(step, raw, ema, OmegaConf.to_yaml(cfg, resolve=True), None, {"step": 5})
    from tests.ldm_train.checkpoints.test_first_stage import opens_of

    got, n = opens_of(str(step / "model_ema.safetensors"), lambda: load_export(tmp_path))  # via checkpoints/latest
    assert n == 1  # the weights file is read once: tensors and sha256 from the same bytes
    assert got.sha256 == hashlib.sha256((step / "model_ema.safetensors").read_bytes()).hexdigest()
    assert got.ema and got.step_dir == step
    unet = UNetModel(to_dataclass(got.config.unet, UNetConfig))
    text = BERTEmbedder(to_dataclass(got.config.text_encoder, TextEncoderConfig))
    unet.load_state_dict(got.unet, strict=True)
    text.load_state_dict(got.text_encoder, strict=True)
    key = "input_blocks.0.0.weight"
    assert torch.equal(unet.state_dict()[key], raw["model.diffusion_model." + key] + 1)
    assert torch.equal(load_export(step, ema=False).unet[key], raw["model.diffusion_model." + key])


def test_cond_presets_compose_and_the_grid_follows_the_kind():
    from ldm_train.config import cond_config
    from ldm_train.trainer.samples import grid_layout

    text, cls, none = (_compose([f"experiment={e}"]) for e in ("tiny", "fmnist_class", "fmnist_uncond"))
    assert cond_config(text).kind == "text"  # the default: every existing preset keeps its text conditioning
    assert cond_config(cls).kind == "class" and cls.cond.num_classes == 10 and cls.unet.context_dim == 64
    assert cls.first_stage.name == "fmnist_kl_f4" and cls.unet.image_size == 8 and cls.data.resolution == 32
    assert cond_config(none).kind == "none" and none.unet.context_dim is None and none.train.caption_dropout == 0
    assert grid_layout(text, to_config_node(text.train.sampling)).conds == list(text.train.sampling.prompts)
    layout = grid_layout(cls, to_config_node(cls.train.sampling))
    assert layout.conds == [c for c in range(10) for _ in range(4)] and layout.cols == 4
    assert layout.captions[:5] == ["t-shirt"] * 4 + ["trouser"]
    assert grid_layout(none, to_config_node(none.train.sampling)).conds == [None] * 16
    # the grid is drawn for class / none without prompts; text without prompts draws none (as before)
    sampling = TrainConfig(global_batch=8, micro_batch=8)
    sampling.sampling.every_samples = 16
    assert derive(sampling, 1).sample_every_steps == 0
    assert derive(sampling, 1, grid=True).sample_every_steps == 2


def to_config_node(node):
    from ldm_train.config import to_dataclass
    from ldm_train.trainer.config import SamplingConfig

    return to_dataclass(node, SamplingConfig)
