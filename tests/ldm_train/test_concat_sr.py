"""Concat conditioning (``cond.kind=concat``, super-resolution as CompVis bsr_sr): the encode job stores each
image's low-resolution copy, the loader batches it, the model puts it beside the noisy latent, sampling takes it
per sample, and data without it fail at start-up naming the shard and the fix."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.encode_job import run_encode as run_encode_inproc
from data_prep.synthetic import write_synthetic
from ldm_train.data.input_shards import list_input_shards
from ldm_train.data.readers import iter_shard
from tests.data_prep.helpers import encode_args, encode_cfg

pytestmark = pytest.mark.integration  # starts processes or servers


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory):
    """2 input shards of 8 synthetic 32 px images."""
    d = tmp_path_factory.mktemp("sr_images")
    write_synthetic(str(d), num_samples=16, resolution=32, shard_size=8, seed=3)
    return d


@pytest.fixture(scope="module")
def sr_latents(images, tmp_path_factory: pytest.TempPathFactory):
    """fmnist_kl_f2 latents (random weights) of the 32 px images, with their 16 px copies (lowres_factor=2)."""
    out = tmp_path_factory.mktemp("sr_latents")
    res = run_encode_inproc(encode_cfg(encode_args(input=images, output=out, resolution=32, lowres_factor=2,
                                                   first_stage="fmnist_kl_f2", allow_random_first_stage="true")))
    assert res.ok and res.num_samples == 16
    return out


def _compose(latents, **extra: object):
    from ldm_train.app import compose
    from ldm_train.trainer.config import TrainAppConfig

    args = {"experiment": "fmnist_sr", "data.latents_root": latents, "data.num_workers": 0, "train.micro_batch": 4,
            **extra}
    return compose("train", TrainAppConfig, [f"{k}={v}" for k, v in args.items()])


def test_encode_stores_the_bicubic_lowres_copy_and_the_manifest_says_so(images, sr_latents) -> None:
    from ldm_train.data.manifest import read_manifest
    from ldm_train.data.shard_reader import iter_samples

    manifest = read_manifest(str(sr_latents / "fmnist_kl_f2"))
    assert manifest["lowres"] == {"factor": 2, "size": 16, "member": "lowres.png"}
    originals = {s.key: s.image for shard in list_input_shards(str(images)) for s in iter_shard(shard, 32)}
    seen = 0
    for shard in sorted((sr_latents / "fmnist_kl_f2").glob("shard-*.tar")):
        for sample in iter_samples(str(shard)):
            key = sample["__key__"].rsplit("/", 1)[-1]
            with Image.open(io.BytesIO(sample["lowres.png"])) as im:
                assert im.mode == "RGB" and im.size == (16, 16)
                got = np.asarray(im).astype(np.int16)
            want = torch.nn.functional.interpolate(originals[key][None], size=(16, 16), mode="bicubic",
                                                   align_corners=False, antialias=True)[0]
            want = ((want.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.int16)
            assert np.abs(got - want).max() <= 1
            assert got.std() > 5  # an image, not a flat square
            seen += 1
    assert seen == 16


def test_loader_model_and_sampler_take_the_lowres_image(sr_latents) -> None:
    from ldm_train.build import build_ldm
    from ldm_train.data.latents import build_latent_loader, sample_latents
    from ldm_train.sampling import SamplerSettings
    from ldm_train.sampling import sample_latents as sample_z

    cfg = _compose(sr_latents)
    loader = build_latent_loader(cfg.data, cfg.first_stage, cfg.unet, rank=0, world_size=1,
                                 lowres_key=cfg.cond.lowres_key)
    batch = next(iter(loader))
    lowres = batch["lowres"]
    assert lowres.shape == (4, 3, 16, 16) and lowres.dtype == torch.float32
    assert -1 <= lowres.min() < lowres.max() <= 1

    torch.manual_seed(0)
    model = build_ldm(cfg)
    assert model.cond_kind == "concat" and model.cond_stage_model is None
    assert model.unet.input_blocks[0][0].weight.shape[1] == 2 + 3  # latent channels + RGB
    assert not [k for k in model.state_dict() if not k.startswith("model.diffusion_model.")]
    # the output conv starts at zero (no gradient reaches the layers before it): give it weights, as after a step
    torch.nn.init.normal_(model.unet.out[2].weight, std=0.02)
    z0 = sample_latents(batch["moments"], loader.scale_factor, torch.Generator().manual_seed(1))
    t, noise = torch.tensor([10, 200, 500, 900]), torch.randn(z0.shape, generator=torch.Generator().manual_seed(2))
    loss = model(z0, lowres, t, noise)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.mean().backward()
    grad = model.unet.input_blocks[0][0].weight.grad
    assert grad[:, 2:].abs().sum() > 0  # the image channels of the first conv learn
    with torch.no_grad():  # the model's output depends on the image it is given
        assert not torch.allclose(model(z0, lowres, t, noise), model(z0, -lowres, t, noise))
        # a 32 px image is brought to the 16x16 latent grid
        big = torch.nn.functional.interpolate(lowres, scale_factor=2, mode="nearest")
        assert torch.isfinite(model(z0, big, t, noise)).all()
    with pytest.raises(ValueError, match="low-resolution image"):
        model(z0, None, t, noise)

    settings = SamplerSettings("ddim", steps=2, guidance_scale=5.0)  # no guidance for concat: ignored
    conds = list(lowres[:2])
    a = sample_z(model.eval(), None, conds, [0, 1], settings, (2, 16, 16), torch.device("cpu"))
    b = sample_z(model, None, [conds[0]], [0], settings, (2, 16, 16), torch.device("cpu"))
    assert a.shape == (2, 2, 16, 16) and torch.allclose(a[:1], b, atol=1e-5)  # per-sample seeds and images


def test_concat_without_lowres_images_fails_naming_the_shard_and_the_fix(images, tmp_path) -> None:
    from ldm_train.data.latents import build_latent_loader

    res = run_encode_inproc(encode_cfg(encode_args(input=images, output=tmp_path, resolution=32,
                                                   first_stage="fmnist_kl_f2", allow_random_first_stage="true")))
    assert res.ok
    cfg = _compose(tmp_path)
    with pytest.raises(ValueError, match=r"shard .*shard-000000\.tar.*no 'lowres\.png'.*lowres_factor=N"):
        build_latent_loader(cfg.data, cfg.first_stage, cfg.unet, rank=0, world_size=1,
                            lowres_key=cfg.cond.lowres_key)


def test_concat_settings_are_checked_before_anything_is_built(sr_latents) -> None:
    from ldm_train.trainer.build import check_conditioning

    with pytest.raises(ValueError, match="unet.concat_channels=3"):
        check_conditioning(_compose(sr_latents, **{"unet.concat_channels": 0, "unet.in_channels": 2}))
    with pytest.raises(ValueError, match="unet.context_dim=null"):
        check_conditioning(_compose(sr_latents, **{"unet.context_dim": 64}))
    with pytest.raises(ValueError, match="needs cond.kind=concat"):
        check_conditioning(_compose(sr_latents, **{"cond.kind": "none"}))
    with pytest.raises(SystemExit, match="lowres_factor=3 must"):
        run_encode_inproc(encode_cfg(encode_args(input="x", output="y", resolution=32, lowres_factor=3)))
