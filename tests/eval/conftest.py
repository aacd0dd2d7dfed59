"""Shared fixtures of the eval tests: small PNG folders with known structure."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image


def write_pngs(folder: str, images: np.ndarray) -> str:
    """uint8 [N, H, W, 3] -> folder/000000.png ..."""
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(os.path.join(folder, f"{i:06d}.png"))
    return folder


def colour_images(colours: np.ndarray, size: int = 32, noise: float = 6.0, seed: int = 0) -> np.ndarray:
    """Flat-colour images (one per row of ``colours`` 0..255) with a little pixel noise."""
    rng = np.random.default_rng(seed)
    base = np.broadcast_to(colours[:, None, None, :].astype(np.float64), (len(colours), size, size, 3))
    img = base + rng.normal(0, noise, base.shape)
    # a gradient stripe gives the conv features some spatial structure to respond to
    img[:, : size // 4] += np.linspace(-30, 30, size)[None, None, :, None]
    return np.clip(img, 0, 255).round().astype(np.uint8)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Eval tests run their tiny models on one thread (restored after): on the shared 2-core machines a
    2-thread process is often many times slower than a 1-thread one, and subprocess runs use 1 too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(name="write_pngs")
def write_pngs_fixture():
    return write_pngs


@pytest.fixture(name="colour_images")
def colour_images_fixture():
    return colour_images


@pytest.fixture
def wide_colours() -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 255, (48, 3))


def build_tiny_export(root: str, resolution: int = 32, overrides: tuple[str, ...] = ()) -> str:
    """A randomly initialised tiny UNet + text encoder + KL-f4 first stage in ldm_train's export layout
    (``overrides``: more Hydra overrides of the train config).

    Returns the run dir (``checkpoints/latest`` names the step dir). Weights are perturbed from their init
    so the output depends on the prompt (CompVis zero-initialises the UNet's last conv).
    """
    from pathlib import Path

    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from data_prep.synthetic import sample_scene
    from ldm_train.checkpoints.compvis import compvis_state_dict
    from ldm_train.checkpoints.export import write_export
    from ldm_train.checkpoints.first_stage import export_first_stage
    from ldm_train.config import (
        FirstStageConfig,
        TextEncoderConfig,
        UNetConfig,
        register_configs,
        to_dataclass,
    )
    from ldm_train.data.tokenizer import train_tokenizer
    from ldm_train.models.autoencoder import build_first_stage
    from ldm_train.models.text_encoder import BERTEmbedder
    from ldm_train.models.unet import UNetModel
    from ldm_train.trainer.config import register_trainer_configs

    register_configs()
    register_trainer_configs()
    conf = str(Path(__file__).resolve().parents[2] / "conf")
    with initialize_config_dir(conf, version_base=None):
        cfg = compose("train", overrides=[f"data.resolution={resolution}", *overrides])
    run = Path(root) / "run"
    step = run / "checkpoints" / "step_0000010"
    step.mkdir(parents=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    def perturb(module: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        return module

    fs = build_first_stage(to_dataclass(cfg.first_stage, FirstStageConfig))
    fs_path = str(Path(root) / "first_stage.safetensors")
    export_first_stage(fs, fs_path)
    unet = perturb(UNetModel(to_dataclass(cfg.unet, UNetConfig)))
    text = perturb(BERTEmbedder(to_dataclass(cfg.text_encoder, TextEncoderConfig)))
    captions = [sample_scene(0, "train", i)[0].caption for i in range(200)]
    tok_dir = Path(root) / "tokenizer"
    train_tokenizer(captions, cfg.text_encoder.vocab_size, str(tok_dir), cfg.text_encoder.max_seq_len)
    OmegaConf.update(cfg, "first_stage.checkpoint", fs_path)
    OmegaConf.update(cfg, "data.scale_factor", 0.9)
    sd = compvis_state_dict(unet.state_dict(), text.state_dict())
    write_export(step, sd, sd, OmegaConf.to_yaml(cfg, resolve=True), tok_dir, {"step": 10, "samples_seen": 320})
    (run / "checkpoints" / "latest").write_text(step.name)
    return str(run)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> str:
    return build_tiny_export(str(tmp_path_factory.mktemp("tiny_export")))


def eval_config(**overrides: object):
    """The typed conf/eval.yaml (``EvalConfig``) composed as ``python -m eval.run`` would, with ``key=value`` overrides."""
    from eval.config import EvalConfig
    from ldm_train.app import compose

    return compose("eval", EvalConfig, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(name="eval_config")
def eval_config_fixture():
    return eval_config
