"""Our text encoder <-> diffusers' ``LDMBertModel`` (``diffusers.pipelines.latent_diffusion``), both ways.

The two are the same network (pre-norm attention without q/k/v bias, exact GELU feed-forward, final LayerNorm,
learned positions, an LM head ``to_logits``): the conversion is a key rename. Two differences are handled here:

- ``LDMTextToImagePipeline`` pads every prompt to 77 tokens, so the exported position table has
  ``max(77, max_seq_len)`` rows; rows past ``max_seq_len`` (never trained) repeat the last trained row, and
  ``ldm_train_max_seq_len`` in ``config.json`` records where the trained rows end (the import keeps those only).
- the pipeline passes no attention mask and neither do we: [PAD] positions take part in the context, so the
  pipeline reproduces our sampler exactly only when ``max_seq_len`` is 77 (the paper's ``bert_1p45b``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ldm_train.config import TextEncoderConfig

PIPELINE_TOKENS = 77  # LDMTextToImagePipeline: padding="max_length", max_length=77


def key_table(n_layer: int) -> dict[str, str]:
    """Our key (``transformer.*``) -> LDMBertModel key, for ``n_layer`` attention + feed-forward pairs."""
    table = {"transformer.token_emb.weight": "model.embed_tokens.weight",
             "transformer.pos_emb.emb.weight": "model.embed_positions.weight"}
    for p in ("weight", "bias"):
        table[f"transformer.norm.{p}"] = f"model.layer_norm.{p}"
        table[f"transformer.to_logits.{p}"] = f"to_logits.{p}"
    for i in range(n_layer):
        ours, theirs = f"transformer.attn_layers.layers.{2 * i}", f"model.layers.{i}"
        ff = f"transformer.attn_layers.layers.{2 * i + 1}"
        for name in ("q", "k", "v"):
            table[f"{ours}.1.to_{name}.weight"] = f"{theirs}.self_attn.{name}_proj.weight"
        for p in ("weight", "bias"):
            table[f"{ours}.0.{p}"] = f"{theirs}.self_attn_layer_norm.{p}"
            table[f"{ours}.1.to_out.{p}"] = f"{theirs}.self_attn.out_proj.{p}"
            table[f"{ff}.0.{p}"] = f"{theirs}.final_layer_norm.{p}"
            table[f"{ff}.1.net.0.0.{p}"] = f"{theirs}.fc1.{p}"
            table[f"{ff}.1.net.2.{p}"] = f"{theirs}.fc2.{p}"
    return table


def ldmbert_config(cfg: TextEncoderConfig, pad_token_id: int = 0) -> dict[str, Any]:
    """``LDMBertConfig`` keywords of our encoder (dropouts 0: it is an inference export)."""
    return dict(vocab_size=cfg.vocab_size, max_position_embeddings=max(PIPELINE_TOKENS, cfg.max_seq_len),
                encoder_layers=cfg.n_layer, encoder_ffn_dim=cfg.n_embed * cfg.ff_mult,
                encoder_attention_heads=cfg.heads, head_dim=cfg.dim_head, d_model=cfg.n_embed,
                activation_function="gelu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                pad_token_id=pad_token_id, ldm_train_max_seq_len=cfg.max_seq_len)


def to_ldmbert(sd: Mapping[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> LDMBertModel's, the position table extended to ``max(77, max_seq_len)`` rows."""
    table = key_table(cfg.n_layer)
    stray = [k for k in sd if k not in table]
    if stray:
        raise ValueError(f"text encoder keys without an LDMBert name: {stray[:3]}")
    out = {table[k]: v for k, v in sd.items()}
    pos = out["model.embed_positions.weight"]
    extra = max(PIPELINE_TOKENS, cfg.max_seq_len) - pos.shape[0]
    if extra > 0:
        out["model.embed_positions.weight"] = torch.cat([pos, pos[-1:].expand(extra, -1)])
    return out


def text_encoder_config(config: Mapping[str, Any], name: str = "ldmbert") -> TextEncoderConfig:
    """Our ``TextEncoderConfig`` of an LDMBert ``config.json`` (``max_seq_len``: the trained rows)."""
    d_model, heads = int(config["d_model"]), int(config["encoder_attention_heads"])
    return TextEncoderConfig(
        name=name, vocab_size=int(config["vocab_size"]), n_embed=d_model, n_layer=int(config["encoder_layers"]),
        heads=heads, dim_head=int(config.get("head_dim", d_model // heads)),
        ff_mult=int(config["encoder_ffn_dim"]) // d_model,
        max_seq_len=int(config.get("ldm_train_max_seq_len") or config["max_position_embeddings"]))


def from_ldmbert(sd: Mapping[str, torch.Tensor], n_layer: int, max_seq_len: int) -> dict[str, torch.Tensor]:
    """LDMBertModel's state dict -> ours, keeping the first ``max_seq_len`` positions."""
    inverse = {v: k for k, v in key_table(n_layer).items()}
    stray = [k for k in sd if k not in inverse]
    if stray:
        raise ValueError(f"LDMBert keys without a name in our text encoder (n_layer={n_layer}): {stray[:3]}")
    out = {inverse[k]: v for k, v in sd.items()}
    pos = out["transformer.pos_emb.emb.weight"]
    if pos.shape[0] < max_seq_len:
        raise ValueError(f"the LDMBert position table has {pos.shape[0]} rows but text_encoder.max_seq_len is "
                         f"{max_seq_len}: set text_encoder.max_seq_len<={pos.shape[0]}")
    out["transformer.pos_emb.emb.weight"] = pos[:max_seq_len]
    return out
