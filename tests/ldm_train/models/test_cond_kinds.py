"""Conditioning kinds (``cond.kind`` text | class | none): the CompVis ClassEmbedder layout, the builder's checks,
classifier-free guidance with the null class, unconditional sampling, the FLOP summary."""
from __future__ import annotations

import pytest
import torch

from ldm_train.build import build_ldm
from ldm_train.models.class_embedder import ClassEmbedder
from ldm_train.sampling import SamplerSettings, sample_latents
from ldm_train.summary import compose_config


def test_class_embedder_has_the_compvis_cin256_v2_layout_on_meta() -> None:
    # CompVis configs/latent-diffusion/cin256-v2.yaml: ClassEmbedder(n_classes=1001, embed_dim=512) on vq-f4 latents
    cfg = compose_config(["unet=cin256_v2", "first_stage=vq_f4", "data.resolution=256", "cond.kind=class",
                          "cond.num_classes=1000"])
    with torch.device("meta"):
        model = build_ldm(cfg)
    sd = model.state_dict()
    cond_keys = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("cond_stage_model.")}
    assert cond_keys == {"cond_stage_model.embedding.weight": (1001, 512)}
    assert sum(v.numel() for k, v in sd.items() if k.startswith("model.diffusion_model.")) == 400_920_579
    assert model.cond_kind == "class" and model.cond_stage_model.null_label == 1000
    assert all(k.startswith(("model.diffusion_model.", "cond_stage_model.")) for k in sd)


def test_class_embedder_gives_one_context_token_and_the_null_class() -> None:
    emb = ClassEmbedder(11, 8, null_label=10)
    labels = torch.tensor([0, 3, 10])
    out = emb(labels)
    assert out.shape == (3, 1, 8)
    assert torch.equal(out[:, 0], emb.embedding.weight[labels])
    assert emb.unconditional(2, "cpu").tolist() == [10, 10]
    with pytest.raises(ValueError, match=r"labels must be \[B\]"):
        emb(labels[:, None])
    with pytest.raises(ValueError, match="no null class"):
        ClassEmbedder(10, 8).unconditional(1, "cpu")


def test_none_kind_builds_no_cond_stage_and_the_builder_names_wrong_pairs() -> None:
    none = build_ldm(compose_config(["experiment=fmnist_uncond"]))
    assert none.cond_stage_model is None and none.cond_kind == "none"
    assert not [k for k in none.state_dict() if k.startswith("cond_stage_model.")]
    with pytest.raises(ValueError, match="cond.kind=none.*unet.context_dim=null"):
        build_ldm(compose_config(["experiment=fmnist_uncond", "unet.context_dim=64"]))
    with pytest.raises(ValueError, match="cond.kind=class.*set unet.context_dim"):
        build_ldm(compose_config(["experiment=fmnist_class", "unet.context_dim=null"]))
    with pytest.raises(ValueError, match="cond.kind=concat.*unet.context_dim=null"):
        build_ldm(compose_config(["experiment=fmnist_class", "cond.kind=concat"]))
    # the default stays text: every existing config builds the same BERT cond stage
    text = build_ldm(compose_config(["experiment=tiny"]))
    assert text.cond_kind == "text" and "cond_stage_model.transformer.to_logits.weight" in text.state_dict()


def test_trainer_check_refuses_what_no_data_path_feeds() -> None:
    from ldm_train.trainer.build import check_conditioning, label_spec

    cond = check_conditioning(compose_config(["experiment=fmnist_class"]))
    spec = label_spec(cond)
    assert (spec.key, spec.num_classes, spec.null_label) == ("label", 10, 10)
    assert label_spec(check_conditioning(compose_config(["experiment=fmnist_uncond"]))) is None
    with pytest.raises(ValueError, match="cond.kind=text but unet.context_dim is null.*cond.kind=none"):
        check_conditioning(compose_config(["experiment=tiny", "unet.context_dim=null"]))
    with pytest.raises(ValueError, match="null class.*caption_dropout"):
        check_conditioning(compose_config(["experiment=fmnist_class", "cond.null_class=false"]))
    with pytest.raises(ValueError, match="guidance needs the null class"):
        check_conditioning(compose_config(["experiment=fmnist_class", "cond.null_class=false",
                                           "train.caption_dropout=0"]))


class Recorder(torch.nn.Module):
    """Wraps the UNet and records the context of every call."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet, self.contexts = unet, []

    def forward(self, x, t, context=None, **kw):
        self.contexts.append(None if context is None else context.detach().clone())
        return self.unet(x, t, context=context, **kw)


def _tiny(kind_overrides: list[str]):
    torch.manual_seed(0)
    model = build_ldm(compose_config(kind_overrides)).eval()
    with torch.no_grad():  # CompVis zero-initialises the last conv and proj_out: perturb, so the context matters
        for p in model.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.model.diffusion_model = Recorder(model.unet)
    return model


def test_guidance_uses_the_null_class_as_the_unconditional_input() -> None:
    model = _tiny(["experiment=fmnist_class"])
    rec, table = model.unet, model.cond_stage_model.embedding.weight
    settings = SamplerSettings("ddim", steps=2, guidance_scale=3.0)
    labels = [1, 7]
    guided = sample_latents(model, None, labels, [0, 1], settings, (3, 8, 8), torch.device("cpu"))
    assert len(rec.contexts) == 2 and rec.contexts[0].shape == (4, 1, 64)  # one [uncond; cond] batch per step
    ctx = rec.contexts[0][:, 0]
    assert torch.equal(ctx[:2], table[[10, 10]].detach())  # CompVis order: the null class first
    assert torch.equal(ctx[2:], table[labels].detach())
    rec.contexts.clear()
    plain = sample_latents(model, None, labels, [0, 1], SamplerSettings("ddim", steps=2, guidance_scale=1.0),
                           (3, 8, 8), torch.device("cpu"))
    assert rec.contexts[0].shape == (2, 1, 64)  # scale 1: the conditional model alone
    assert not torch.allclose(guided, plain)
    # a sample depends on its own class and seed only, not on its batch neighbours
    alone = sample_latents(model, None, [7], [1], settings, (3, 8, 8), torch.device("cpu"))
    torch.testing.assert_close(alone[0], guided[1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"outside the model's classes 0\.\.9"):
        sample_latents(model, None, [10], [0], settings, (3, 8, 8), torch.device("cpu"))


def test_guidance_without_a_null_class_is_refused() -> None:
    model = _tiny(["experiment=fmnist_class", "cond.null_class=false"])
    assert model.cond_stage_model.embedding.weight.shape == (10, 64)
    with pytest.raises(ValueError, match="needs the null class"):
        sample_latents(model, None, [1], [0], SamplerSettings("ddim", steps=2, guidance_scale=2.0), (3, 8, 8),
                       torch.device("cpu"))
    sample_latents(model, None, [1], [0], SamplerSettings("ddim", steps=2, guidance_scale=1.0), (3, 8, 8),
                   torch.device("cpu"))


def test_unconditional_sampling_has_no_context_and_no_guidance() -> None:
    model = _tiny(["experiment=fmnist_uncond"])
    z = sample_latents(model, None, [None, None, None], [0, 1, 2], SamplerSettings("ddim", steps=2, guidance_scale=3.0),
                       (3, 8, 8), torch.device("cpu"))
    assert z.shape == (3, 3, 8, 8)
    assert all(c is None for c in model.unet.contexts) and len(model.unet.contexts) == 2  # one unguided call a step


def test_summary_counts_the_cond_stage_of_each_kind() -> None:
    from ldm_train.flops import summarize

    cls = summarize(compose_config(["experiment=fmnist_class"]))
    none = summarize(compose_config(["experiment=fmnist_uncond"]))
    text = summarize(compose_config(["experiment=fsweep_fmnist"]))
    assert cls["cond_kind"] == "class" and cls["cond_stage_params"] == 11 * 64 and cls["text_encoder_params"] == 0
    assert cls["trainable_params"] == cls["unet_params"] + 11 * 64
    assert none["cond_kind"] == "none" and none["cond_stage_params"] == 0 and none["trainable_params"] == none["unet_params"]
    assert text["cond_kind"] == "text" and text["cond_stage_params"] == text["text_encoder_params"] > 0
    assert cls["latent_shape"] == none["latent_shape"] == [3, 8, 8]
    # the class model's cross-attention attends over one token, the text model's over 32: cheaper per sample
    assert none["train_flops_per_sample"] < cls["train_flops_per_sample"] < text["train_flops_per_sample"]
