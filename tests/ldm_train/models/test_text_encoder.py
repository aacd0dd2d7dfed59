"""Text encoder: the paper's parameter counts, CompVis names, bidirectional attention, checkpointing."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ldm_train.config import TextEncoderConfig
from ldm_train.models.text_encoder import BERTEmbedder


def test_1p45b_counts_on_meta() -> None:
    with torch.device("meta"):
        enc = BERTEmbedder(TextEncoderConfig())  # defaults: the paper's n_embed 1280, n_layer 32
    sd = enc.state_dict()
    assert sum(p.numel() for p in enc.parameters()) == 581_994_042
    assert sd["transformer.token_emb.weight"].numel() == 39_068_160
    assert sd["transformer.pos_emb.emb.weight"].numel() == 98_560
    assert sd["transformer.to_logits.weight"].numel() + sd["transformer.to_logits.bias"].numel() == 39_098_682
    assert "transformer.attn_layers.layers.63.1.net.2.weight" in sd  # 32 x (attention, feed-forward)
    assert sd["transformer.attn_layers.layers.0.1.to_q.weight"].shape == (512, 1280)  # 8 heads of 64
    assert "transformer.attn_layers.layers.0.1.to_q.bias" not in sd
    assert enc.unused_parameter_names() == ["transformer.to_logits.weight", "transformer.to_logits.bias"]


def _reference(enc: BERTEmbedder, ids: torch.Tensor) -> torch.Tensor:
    """The x-transformers computation written out with explicit per-head softmax attention."""
    cfg, sd = enc.cfg, enc.state_dict()
    p = "transformer."
    x = sd[p + "token_emb.weight"][ids] + sd[p + "pos_emb.emb.weight"][: ids.shape[1]]
    for i in range(0, 2 * cfg.n_layer, 2):
        a, f = f"{p}attn_layers.layers.{i}.", f"{p}attn_layers.layers.{i + 1}."
        h = F.layer_norm(x, (cfg.n_embed,), sd[a + "0.weight"], sd[a + "0.bias"])
        q, k, v = (h @ sd[a + f"1.to_{n}.weight"].T for n in "qkv")
        heads = []
        for j in range(cfg.heads):
            s = slice(j * cfg.dim_head, (j + 1) * cfg.dim_head)
            w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / cfg.dim_head**0.5, dim=-1)
            heads.append(w @ v[..., s])
        x = x + torch.cat(heads, -1) @ sd[a + "1.to_out.weight"].T + sd[a + "1.to_out.bias"]
        h = F.layer_norm(x, (cfg.n_embed,), sd[f + "0.weight"], sd[f + "0.bias"])
        h = F.gelu(h @ sd[f + "1.net.0.0.weight"].T + sd[f + "1.net.0.0.bias"])
        x = x + h @ sd[f + "1.net.2.weight"].T + sd[f + "1.net.2.bias"]
    return F.layer_norm(x, (cfg.n_embed,), sd[p + "norm.weight"], sd[p + "norm.bias"])


def test_forward_matches_reference(small_text_cfg: TextEncoderConfig, randomize) -> None:
    enc = randomize(BERTEmbedder(small_text_cfg), std=0.2).eval()
    ids = torch.randint(0, small_text_cfg.vocab_size, (3, small_text_cfg.max_seq_len))
    with torch.no_grad():
        out = enc(ids)
        torch.testing.assert_close(out, _reference(enc, ids), atol=1e-5, rtol=1e-4)
        # bidirectional: the last token changes the first position's embedding
        ids2 = ids.clone()
        ids2[:, -1] = (ids2[:, -1] + 1) % small_text_cfg.vocab_size
        assert not torch.allclose(enc(ids2)[:, 0], out[:, 0], atol=1e-5)
    assert out.shape == (3, small_text_cfg.max_seq_len, small_text_cfg.n_embed)
    with pytest.raises(ValueError, match="max_seq_len|L<="):
        enc(torch.zeros(1, small_text_cfg.max_seq_len + 1, dtype=torch.long))


def test_checkpointing_same_gradients(small_text_cfg: TextEncoderConfig, randomize) -> None:
    ids = torch.randint(0, small_text_cfg.vocab_size, (2, 10))
    grads = []
    for use_ckpt in (False, True):
        enc = randomize(BERTEmbedder(dataclasses.replace(small_text_cfg, use_checkpoint=use_ckpt)), std=0.2).train()
        enc(ids).square().mean().backward()
        grads.append({n: p.grad for n, p in enc.named_parameters()})
    assert grads[0]["transformer.to_logits.weight"] is None  # the unused head gets no gradient
    for name, g in grads[0].items():
        if g is not None:
            torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)
