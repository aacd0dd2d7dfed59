"""The diffusers export: a tiny run's export loads with diffusers' own from_pretrained and gives
our numbers: UNet, the tiny 8-group VAE, the noise schedule, and our text encoder through its documented loader."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.eval.conftest import build_tiny_export

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    from ldm_train.checkpoints.diffusers_export import main

    root = tmp_path_factory.mktemp("diffusers_export")
    run = build_tiny_export(str(root))
    out = root / "out"
    main([run, str(out)])
    return run, out


def test_export_loads_with_from_pretrained_and_matches(exported: tuple[str, Path]) -> None:
    from eval.checkpoint import load_sampling_model
    from ldm_train.checkpoints.diffusers_export import load_text_encoder

    run, out = exported
    ours = load_sampling_model(run)
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(out), subfolder="unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(str(out), subfolder="vqvae").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(str(out), subfolder="scheduler")
    text, tokenizer = load_text_encoder(out)
    assert vae.config.norm_num_groups == ours.first_stage.cfg.ddconfig.norm_groups == 8
    assert vae.config.scaling_factor == pytest.approx(ours.scale_factor)

    gen = torch.Generator().manual_seed(0)
    c, h, w = ours.latent_shape
    x = torch.randn(2, c, h, w, generator=gen)
    t = torch.tensor([5, 900])
    from ldm_train.data.tokenizer import tokenize

    tokens = tokenize(tokenizer, ["a red circle", ""], text.cfg.max_seq_len)
    with torch.no_grad():
        ctx_ours = ours.ldm.encode_text(tokens)
        ctx = text(tokens)
        assert (ctx - ctx_ours).abs().max() == 0
        a = ours.ldm.unet(x, t, context=ctx_ours)
        b = unet(x, t, encoder_hidden_states=ctx).sample
        assert a.abs().max() > 1e-2
        unet_diff = float((a - b).abs().max())
        z = torch.randn(2, c, h, w, generator=gen)
        d_ours = ours.first_stage.decode(z)
        d_theirs = vae.decode(z).sample
        vae_diff = float((d_ours - d_theirs).abs().max())
        img = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
        enc_diff = float((ours.first_stage.encode_moments(img) - vae.quant_conv(vae.encoder(img))).abs().max())
        ours_text = ours.ldm.cond_stage_model.eval()
        bert = diffusers.DiffusionPipeline.from_pretrained(str(out)).bert.eval()  # LDMBertModel, no mask
        bert_diff = float((bert(tokens)[0] - ours_text(tokens)).abs().max())
    print(json.dumps({"unet_max_abs_diff": unet_diff, "ldmbert_max_abs_diff": bert_diff,
                      "vae_decode_max_abs_diff": vae_diff,
                      "vae_encode_max_abs_diff": enc_diff}))
    assert unet_diff < 1e-4 and vae_diff < 1e-4 and enc_diff < 1e-4 and bert_diff < 1e-5
    ours_ac = ours.ldm.schedule.alphas_cumprod
    assert torch.allclose(scheduler.alphas_cumprod.float(), ours_ac, atol=1e-6)
    expected = {"eps": "epsilon", "v": "v_prediction"}[ours.ldm.parameterization]
    assert scheduler.config.prediction_type == expected


def _uint8(images_pm1: torch.Tensor) -> torch.Tensor:
    """Our PNG writer's rounding (eval.sampling.save_png)."""
    return ((images_pm1.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@pytest.mark.parametrize("max_seq_len", [77, 32])
def test_pipeline_from_pretrained_samples_our_images(tmp_path: Path, max_seq_len: int) -> None:
    """DiffusionPipeline.from_pretrained(export) (no custom code) with the same seeds, DDIM steps and guidance
    gives our eval sampler's uint8 images when the model was trained on 77-token prompts (the pipeline's fixed
    padding); with 32 the extra [PAD] positions change the context, and the export says so."""
    from eval.checkpoint import load_sampling_model
    from eval.sampling import sample_batch
    from ldm_train.checkpoints.diffusers_export import export
    from ldm_train.sampling import SamplerSettings

    run = build_tiny_export(str(tmp_path), overrides=(f"text_encoder.max_seq_len={max_seq_len}",))
    summary = export(run, tmp_path / "out")
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    assert type(pipe).__name__ == "LDMTextToImagePipeline"
    assert type(pipe.bert).__name__ == "LDMBertModel" and pipe.bert.config.max_position_embeddings == 77
    note = summary["pipeline"]
    assert note["matches_ldm_train_sampler"] is (max_seq_len == 77)

    ours = load_sampling_model(run)
    prompts = ["a large red circle in the center on a white background", "a small blue square"]
    settings = SamplerSettings("ddim", steps=8, eta=0.0, guidance_scale=3.0, seed=5)
    mine = _uint8(sample_batch(ours, prompts, [0, 1], settings, torch.device("cpu")))
    generators = [torch.Generator().manual_seed(5 + i) for i in range(2)]  # eval: seed + sample index
    theirs = pipe(prompts, height=note["height"], width=note["width"], num_inference_steps=8, guidance_scale=3.0,
                  eta=0.0, generator=generators, output_type="pt").images  # [0, 1]
    theirs = (theirs * 255).round().to(torch.uint8)  # diffusers' numpy_to_pil rounding
    assert theirs.shape == mine.shape == (2, 3, 32, 32)
    diff = int((mine.int() - theirs.int()).abs().max())
    print(json.dumps({"max_seq_len": max_seq_len, "uint8_max_abs_diff": diff,
                      "uint8_mean_abs_diff": float((mine.float() - theirs.float()).abs().mean()),
                      "image_std": float(mine.float().std())}))
    assert float(mine.float().std()) > 5  # not a flat image
    if max_seq_len == 77:
        assert diff <= 1
    else:
        assert diff > 1 and "pads prompts to 77 tokens" in note["why_not"]


def test_export_writes_the_compvis_layout_file(exported: tuple[str, Path]) -> None:
    from safetensors import safe_open

    _, out = exported
    with safe_open(str(out / "compvis" / "model.safetensors"), framework="pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"model", "cond_stage_model", "first_stage_model"}
    summary = json.loads((out / "ldm_train_export.json").read_text())
    assert summary["ema"] is True and summary["folders"] == ["unet", "vqvae", "scheduler", "bert", "tokenizer",
                                                              "compvis"]


def test_export_names_the_missing_first_stage(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from ldm_train.checkpoints.diffusers_export import export

    run = Path(build_tiny_export(str(tmp_path)))
    step = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    cfg = OmegaConf.load(step / "config.yaml")
    OmegaConf.update(cfg, "first_stage.checkpoint", None)
    OmegaConf.save(cfg, step / "config.yaml")
    with pytest.raises(ValueError, match="--first-stage PATH"):
        export(str(run), tmp_path / "out")


@pytest.mark.parametrize("preset", ["tiny_vq_f4", "vq_f4_noattn"])
def test_vq_first_stages_decode_the_same_in_diffusers(tmp_path: Path, preset: str) -> None:
    """VQ first stages (the tiny 8-group one, and one without mid-block attention) through VQModel."""
    from ldm_train.app import compose
    from ldm_train.checkpoints.diffusers_export import export_vae
    from ldm_train.config import FirstStageConfig, to_dataclass
    from ldm_train.first_stage.config import AutoencoderAppConfig
    from ldm_train.models.autoencoder import build_first_stage

    overrides = [f"first_stage={preset}", "data.input=unused"]
    if preset == "vq_f4_noattn":  # the released layout at a CPU-friendly width
        overrides += ["first_stage.ddconfig.ch=32", "first_stage.n_embed=64", "first_stage.ddconfig.resolution=32"]
    fs_cfg = to_dataclass(compose("train_autoencoder", AutoencoderAppConfig, overrides).first_stage, FirstStageConfig)
    torch.manual_seed(0)
    ours = build_first_stage(fs_cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    export_vae(ours.state_dict(), fs_cfg, 1.0, tmp_path)
    theirs = diffusers.VQModel.from_pretrained(str(tmp_path), subfolder="vqvae").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h = ours.encode_moments(x)
        enc = float((h - theirs.encode(x).latents).abs().max())
        dec = float((ours.decode(h) - theirs.decode(h).sample).abs().max())  # both quantize first
    print(json.dumps({"preset": preset, "vq_encode_max_abs_diff": enc, "vq_decode_max_abs_diff": dec}))
    assert enc < 1e-4 and dec < 1e-4


@pytest.mark.parametrize("preset", ["kl_f16", "kl_f32", "vq_f8"])
def test_first_stages_with_attention_in_their_levels_decode_the_same_in_diffusers(tmp_path: Path, preset: str) -> None:
    """The released layouts with attention outside the mid block (kl-f16 at side 16, kl-f32 at 16 and 8, vq-f8 at
    32), at a CPU-friendly width: their level attentions go to diffusers' Attn*EncoderBlock2D / AttnUpDecoderBlock2D,
    loaded back with from_pretrained, and encode and decode as here."""
    from ldm_train.app import compose
    from ldm_train.checkpoints.diffusers_export import export_vae
    from ldm_train.config import FirstStageConfig, to_dataclass
    from ldm_train.first_stage.config import AutoencoderAppConfig
    from ldm_train.models.autoencoder import build_first_stage

    overrides = [f"first_stage={preset}", "data.input=unused", "first_stage.ddconfig.ch=32"]
    if preset.startswith("vq"):
        overrides.append("first_stage.n_embed=64")
    fs_cfg = to_dataclass(compose("train_autoencoder", AutoencoderAppConfig, overrides).first_stage, FirstStageConfig)
    torch.manual_seed(0)
    ours = build_first_stage(fs_cfg).eval()
    n_attn = sum(".attn." in k for k in ours.state_dict())
    assert n_attn > 0  # the case this test is for: attention blocks inside the levels
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    export_vae(ours.state_dict(), fs_cfg, 1.0, tmp_path)
    cls = diffusers.AutoencoderKL if preset.startswith("kl") else diffusers.VQModel
    theirs = cls.from_pretrained(str(tmp_path), subfolder="vqvae").eval()
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        h = ours.encode_moments(x)
        theirs_h = theirs.encode(x).latents if preset.startswith("vq") else theirs.encode(x).latent_dist.parameters
        enc = float((h - theirs_h).abs().max())
        z = h if preset.startswith("vq") else h.chunk(2, dim=1)[0]
        dec = float((ours.decode(z) - theirs.decode(z).sample).abs().max())
    print(json.dumps({"preset": preset, "attention_tensors": n_attn, "encode_max_abs_diff": enc,
                      "decode_max_abs_diff": dec}))
    assert float(h.abs().max()) > 1e-2 and enc < 1e-4 and dec < 1e-4


def test_the_export_without_diffusers_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from ldm_train.checkpoints.diffusers_export import main

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'ldm-train\[diffusers\]'"):
        main([str(tmp_path / "run"), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
