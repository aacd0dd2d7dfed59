"""LatentDiffusion: the diffusion schedule reaches the device once, not on every forward."""
from __future__ import annotations

import torch

from ldm_train.config import TextEncoderConfig, UNetConfig
from ldm_train.diffusion.schedule import DiffusionSchedule, make_schedule
from ldm_train.models.ldm import LatentDiffusion
from ldm_train.models.text_encoder import BERTEmbedder
from ldm_train.models.unet import UNetModel


def test_schedule_is_moved_to_the_device_once(monkeypatch) -> None:
    unet = UNetModel(UNetConfig(image_size=8, model_channels=32, channel_mult=[1], attention_resolutions=[1],
                                num_res_blocks=1, num_heads=2, context_dim=32))
    text = BERTEmbedder(TextEncoderConfig(vocab_size=50, max_seq_len=8, n_embed=32, n_layer=1, heads=2, dim_head=16))
    model = LatentDiffusion(unet, text, make_schedule(num_timesteps=100))
    moves: list[str] = []
    original = DiffusionSchedule.to

    def counting_to(self: DiffusionSchedule, device):
        moves.append(str(device))
        return original(self, device)

    monkeypatch.setattr(DiffusionSchedule, "to", counting_to)
    # the meta device stands in for a GPU here: a device other than the schedule's (CPU)
    model = model.to("meta")
    for _ in range(3):
        z0 = torch.empty(2, 4, 8, 8, device="meta")
        loss = model(z0, torch.zeros(2, 8, dtype=torch.long, device="meta"),
                     torch.zeros(2, dtype=torch.long, device="meta"), torch.empty_like(z0))
        assert loss.shape == (2,)
    assert moves == ["meta"]
    assert model.schedule_on(torch.device("meta")).device.type == "meta"
    assert model.schedule.device.type == "cpu"  # the config copy stays where it was built
