"""The first-stage objective: reconstruction/KL/codebook terms, adaptive weight, hinge loss, LPIPS wiring."""
from __future__ import annotations

import pytest
import torch

from ldm_train.config import FirstStageLossConfig
from ldm_train.first_stage.losses import FirstStageLoss, build_lpips, hinge_d_loss
from ldm_train.models.discriminator import NLayerDiscriminator


def test_kl_generator_loss_before_disc_start():
    cfg = FirstStageLossConfig(disc_start=10, kl_weight=1e-3, perceptual_weight=0)
    obj = FirstStageLoss(cfg, "kl", None)
    x, xrec = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    kl = torch.tensor([3.0, 5.0])
    called = []
    loss, log = obj.generator_loss(x, xrec, kl, step=9, last_layer=torch.zeros(1),
                                   discriminator=lambda t: called.append(1) or t)
    expected = (x - xrec).abs().sum() / 2 + 1e-3 * 4.0
    assert torch.allclose(loss, expected) and not called and "g_loss" not in log


def test_vq_generator_loss_uses_mean_and_codebook_weight():
    cfg = FirstStageLossConfig(disc_start=10, codebook_weight=2.0, perceptual_weight=0)
    obj = FirstStageLoss(cfg, "vq", None)
    x, xrec = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    loss, log = obj.generator_loss(x, xrec, torch.tensor(0.5), 0, torch.zeros(1), lambda t: t)
    assert torch.allclose(loss, (x - xrec).abs().mean() + 1.0) and torch.allclose(log["codebook"], torch.tensor(0.5))


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    torch.manual_seed(0)
    cfg = FirstStageLossConfig(disc_start=0, disc_weight=0.5, perceptual_weight=0, kl_weight=0.0)
    obj = FirstStageLoss(cfg, "kl", None)
    last = torch.nn.Parameter(torch.randn(3, 3))
    x = torch.rand(2, 3, 16, 16)
    xrec = torch.einsum("ij,bjhw->bihw", last, torch.rand(2, 3, 16, 16))
    disc = NLayerDiscriminator(3, 8, n_layers=1).eval()
    with torch.no_grad():  # larger logits keep the ratio below the 1e4 clamp
        for p in disc.parameters():
            p.mul_(5.0)
    loss, log = obj.generator_loss(x, xrec, torch.zeros(1), 0, last, disc)
    rec_loss = (x - xrec).abs().sum() / 2
    g_loss = -disc(xrec).mean()
    gr = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    gg = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    expected = 0.5 * gr.norm() / (gg.norm() + 1e-4)
    assert expected < 0.5 * 1e4
    assert torch.allclose(log["d_weight"], expected, rtol=1e-4)
    assert torch.allclose(loss, rec_loss + expected * g_loss, rtol=1e-5)


def test_hinge_and_discriminator_accuracy():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0  # confident and right: no loss
    assert torch.isclose(hinge_d_loss(torch.zeros(4), torch.zeros(4)), torch.tensor(1.0))
    obj = FirstStageLoss(FirstStageLossConfig(perceptual_weight=0), "kl", None)
    x, xrec = torch.ones(2, 3, 4, 4), -torch.ones(2, 3, 4, 4)
    d_loss, log = obj.discriminator_loss(x, xrec, lambda t: t.mean((1, 2, 3)) * 3)  # real -> +3, fake -> -3
    assert d_loss == 0 and log["d_accuracy"] == 1.0


def test_patch_discriminator_shape_and_names():
    d = NLayerDiscriminator(3, 64, 3)
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 70x70 PatchGAN on 64 px: a 6x6 logit grid
    assert "main.0.weight" in d.state_dict() and "main.11.weight" in d.state_dict()
    # 3136 + (131072 + 256) + (524288 + 512) + (2097152 + 1024) + 8193: convs without bias before BatchNorm
    assert sum(p.numel() for p in d.parameters()) == 2_765_633


def test_lpips_needs_a_backbone_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        build_lpips(str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="perceptual_weight=0"):
        build_lpips(None)


def test_lpips_random_backbone_only_when_asked(capsys):
    model = build_lpips(None, random_backbone=True)
    assert "RANDOM" in capsys.readouterr().out
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert model(x, x).abs().max() < 1e-6 and model(x, -x).item() > 0
    assert not any(p.requires_grad for p in model.parameters())


def test_lpips_backbone_with_code_is_refused_naming_the_file_and_setting(tmp_path):
    """torch's own refusal names no file and advises weights_only=False (running the file's code); ours names the
    file and the setting and points at torchvision's tensors-only file."""
    from tests.malicious_pickle import write_malicious

    marker = tmp_path / "ran"
    evil = write_malicious(tmp_path / "vgg16.pth", marker)
    with pytest.raises(ValueError) as err:
        build_lpips(str(evil))
    msg = str(err.value)
    assert f"refusing to load {evil} (loss.lpips_backbone)" in msg
    assert "builtins.exec" in msg or "GLOBAL exec" in msg  # the global it asked for
    assert "vgg16-397923af.pth" in msg
    assert "weights_only=False" not in msg and "`weights_only` set to `False`" not in msg
    assert not marker.exists()
    other = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ValueError, match=rf"loss\.lpips_backbone: {other} is not torchvision's VGG16 weights"):
        build_lpips(str(other))
