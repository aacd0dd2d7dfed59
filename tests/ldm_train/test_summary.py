"""``python -m ldm_train.summary``: the paper's counts and FLOPs for the 1.45B model (meta device), and any
composition of the config groups."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ldm_train.flops import summarize
from ldm_train.summary import compose_config

pytestmark = pytest.mark.integration  # starts processes or servers


def test_1p45b_summary_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ldm_train.summary", "experiment=txt2img_1p45b"],
        capture_output=True, text=True, timeout=240, check=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout  # one JSON object, nothing else on stdout
    s = json.loads(lines[0])
    assert s["unet_params"] == 872_300_484
    assert s["text_encoder_params"] == 581_994_042
    assert s["text_encoder_unused_params"] == 39_098_682  # to_logits
    assert s["latent_shape"] == [4, 32, 32] and s["resolution"] == 256
    assert abs(s["train_flops_per_sample"] - 780e9) / 780e9 < 0.05
    assert abs(s["unet_forward_gflops"] - 182.1) / 182.1 < 0.01
    assert abs(s["text_encoder_forward_gflops"] - 77.9) / 77.9 < 0.01
    assert s["first_stage"] == "kl_f8" and s["first_stage_params"] > 0


def test_any_composition() -> None:
    s = summarize(compose_config(["first_stage=tiny_kl_f8", "data.resolution=128"]))
    assert s["first_stage"] == "tiny_kl_f8"
    assert s["latent_shape"] == [4, 16, 16]  # 128 px / f=8, z=4
    small = summarize(compose_config(["first_stage=tiny_kl_f8", "data.resolution=64"]))
    assert small["latent_shape"] == [4, 8, 8]
    assert small["unet_params"] == s["unet_params"]  # the UNet is resolution independent
    # the UNet's conv/attention work grows with the latent area (4x pixels: between 3x and 17x FLOPs)
    assert 3 * small["unet_forward_gflops"] < s["unet_forward_gflops"] < 17 * small["unet_forward_gflops"]
    # training = forward + backward of UNet and text encoder: about 3x the two forwards
    fwd = s["unet_forward_gflops"] + s["text_encoder_forward_gflops"]
    assert 2.5 * fwd < s["train_gflops_per_sample"] < 3.2 * fwd
    vq = summarize(compose_config(["first_stage=tiny_vq_f4"]))
    assert vq["first_stage"] == "tiny_vq_f4" and "first_stage_error" not in vq
    assert vq["first_stage_decode_gflops"] > 0 and vq["first_stage_params"] > 0


def test_a_first_stage_preset_can_extend_another() -> None:
    """fmnist_kl_f4_z8 is fmnist_kl_f4 (its defaults list) with 8 latent channels: the LDM's input follows."""
    z8 = compose_config(["experiment=fmnist_txt2img", "first_stage=fmnist_kl_f4_z8"])
    z3 = compose_config(["experiment=fmnist_txt2img"])
    assert z8.first_stage.name == "fmnist_kl_f4_z8" and z3.first_stage.name == "fmnist_kl_f4"
    assert z8.first_stage.embed_dim == z8.first_stage.ddconfig.z_channels == 8 == z8.unet.in_channels
    assert z8.first_stage.ddconfig.ch_mult == z3.first_stage.ddconfig.ch_mult
    assert z8.first_stage.lossconfig == z3.first_stage.lossconfig
    assert summarize(z8)["latent_shape"] == [8, 8, 8]
