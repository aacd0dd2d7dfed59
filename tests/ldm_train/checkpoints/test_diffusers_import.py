"""diffusers -> ours: a pipeline made with diffusers' classes (not our exporter) converts to our modules, which
compute what diffusers' do; a folder built with other settings is refused, naming them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.diffusers_pipeline import save_diffusers_pipeline

diffusers = pytest.importorskip("diffusers")


def _tiny_cfg(tmp_path: Path, *overrides: str):
    from ldm_train.app import compose
    from ldm_train.trainer.config import TrainAppConfig

    return compose("train", TrainAppConfig, ["experiment=tiny", f"data.latents_root={tmp_path}", *overrides])


def _tokenizer(tmp_path: Path) -> Path:
    from data_prep.synthetic import sample_scene
    from ldm_train.data.tokenizer import train_tokenizer

    train_tokenizer([sample_scene(0, "train", i)[0].caption for i in range(200)], 512, str(tmp_path / "tok"), 32)
    return tmp_path / "tok"


def test_a_diffusers_pipeline_converts_to_our_modules(tmp_path: Path) -> None:
    from ldm_train.checkpoints.compvis import load_strict, split_compvis
    from ldm_train.checkpoints.diffusers_import import compvis_from_diffusers
    from ldm_train.config import FirstStageConfig, TextEncoderConfig, UNetConfig, to_dataclass
    from ldm_train.data.tokenizer import load_tokenizer, tokenize
    from ldm_train.models.autoencoder import build_first_stage
    from ldm_train.models.text_encoder import BERTEmbedder
    from ldm_train.models.unet import UNetModel

    torch.set_num_threads(1)
    cfg = _tiny_cfg(tmp_path)
    tok_dir = _tokenizer(tmp_path)
    pipe = save_diffusers_pipeline(tmp_path / "hf", cfg, tok_dir)
    unet_cfg, fs_cfg = to_dataclass(cfg.unet, UNetConfig), to_dataclass(cfg.first_stage, FirstStageConfig)
    text_cfg = to_dataclass(cfg.text_encoder, TextEncoderConfig)
    groups = split_compvis(compvis_from_diffusers(tmp_path / "hf", unet_cfg, fs_cfg, text_cfg))
    unet, text, fs = UNetModel(unet_cfg).eval(), BERTEmbedder(text_cfg).eval(), build_first_stage(fs_cfg).eval()
    load_strict(unet, groups["unet"], "UNet", "converted")
    load_strict(text, groups["text_encoder"], "text encoder", "converted")
    load_strict(fs, groups["first_stage"], "first stage", "converted")

    gen = torch.Generator().manual_seed(1)
    side = unet_cfg.image_size
    x = torch.randn(2, unet_cfg.in_channels, side, side, generator=gen)
    t = torch.tensor([3, 800])
    tokens = tokenize(load_tokenizer(str(tok_dir)), ["a large red circle", ""], text_cfg.max_seq_len)
    with torch.no_grad():
        ctx = text(tokens)
        text_diff = float((ctx - pipe.bert(tokens)[0]).abs().max())
        ours = unet(x, t, context=ctx)
        unet_diff = float((ours - pipe.unet(x, t, encoder_hidden_states=ctx).sample).abs().max())
        decode_diff = float((fs.decode(x) - pipe.vqvae.decode(x).sample).abs().max())
    print(json.dumps({"unet_max_abs_diff": unet_diff, "text_encoder_max_abs_diff": text_diff,
                      "decode_max_abs_diff": decode_diff}))
    assert float(ours.abs().max()) > 1e-2 and float(ctx.abs().max()) > 1e-2
    assert unet_diff < 1e-5 and text_diff < 1e-5 and decode_diff < 1e-4


def test_a_diffusers_unet_with_other_settings_is_refused(tmp_path: Path) -> None:
    from ldm_train.checkpoints.diffusers_import import compvis_from_diffusers
    from ldm_train.config import FirstStageConfig, UNetConfig, to_dataclass

    save_diffusers_pipeline(tmp_path / "hf", _tiny_cfg(tmp_path), _tokenizer(tmp_path))
    other = _tiny_cfg(tmp_path, "unet.num_heads=2")  # same shapes, other heads
    with pytest.raises(ValueError, match=r"unet/config.json.*attention_head_dim: folder 4 vs config 2"):
        compvis_from_diffusers(tmp_path / "hf", to_dataclass(other.unet, UNetConfig),
                               to_dataclass(other.first_stage, FirstStageConfig), None)

