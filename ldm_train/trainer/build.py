"""Build the pieces the loop wires together: run dir, conditioning check, tokenizer, model, data, DeepSpeed engine, EMA."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm_train.config import CondConfig, TextEncoderConfig
from ldm_train.runtime.distributed import barrier, get_rank
from ldm_train.runtime.rundir import describe_run, resolve_run_dir, shared_run_dir, slurm_job_id

TOKENIZER_CORPUS_LIMIT = 200_000  # captions read to train a tokenizer when none is configured


def make_run_dir(cfg: Any, world_size: int, global_batch: int) -> Path:
    """The run dir on every rank, found or created and locked by rank 0 (a second training on it is refused)."""
    def make() -> Path:
        # Hydra parses run_name=nan / 00012 as a float / int: a name is always a string
        run_name = None if cfg.run_name is None else str(cfg.run_name)
        desc = describe_run(cfg.experiment_name, cfg.first_stage.name, world_size, global_batch)
        return resolve_run_dir(cfg.runs_root, cfg.experiment_name, desc, run_name, slurm_job_id())

    return shared_run_dir(make)


def check_conditioning(cfg: Any) -> CondConfig:
    """``cond`` checked against ``unet`` (and ``train.caption_dropout``) before anything is built: the kind in use."""
    from ldm_train.build import check_cond
    from ldm_train.config import UNetConfig, cond_config, to_dataclass

    cond = cond_config(cfg)
    text_cfg = to_dataclass(cfg.text_encoder, TextEncoderConfig) if cond.kind in ("text", "layout") else None
    check_cond(cond, to_dataclass(cfg.unet, UNetConfig), text_cfg, trainable=True)
    if cond.kind == "class" and not cond.null_class:
        if float(cfg.train.caption_dropout) > 0:
            raise ValueError(f"train.caption_dropout={cfg.train.caption_dropout} drops labels to the null class, but "
                             "cond.null_class=false: set cond.null_class=true or train.caption_dropout=0")
        if float(cfg.train.sampling.guidance_scale) != 1 or ((cfg.train.fid.every_samples or cfg.train.fid.every_s) and
                                                              float(cfg.train.fid.guidance_scale) != 1):
            raise ValueError("classifier-free guidance needs the null class: set cond.null_class=true, or "
                             "train.sampling.guidance_scale=1 and train.fid.guidance_scale=1")
    return cond


def label_spec(cond: CondConfig) -> Any:
    """The loader's class-label spec for ``cond.kind=class`` (None otherwise)."""
    from ldm_train.data.latent_conds import LabelSpec

    if cond.kind != "class":
        return None
    return LabelSpec(key=cond.label_key, num_classes=int(cond.num_classes), null_label=cond.null_label())


def setup_tokenizer(te_cfg: TextEncoderConfig, run_dir: Path, shards: list[tuple[str, int]]) -> tuple[Any, Path]:
    """The configured tokenizer dir, else the run's own (trained once on the shard captions by rank 0)."""
    from ldm_train.data.shard_reader import shard_captions
    from ldm_train.data.tokenizer import resolve_tokenizer

    def resolve() -> tuple[Any, str]:
        return resolve_tokenizer(te_cfg.tokenizer, str(run_dir), lambda: shard_captions([u for u, _ in shards], TOKENIZER_CORPUS_LIMIT),
                                 te_cfg.vocab_size, te_cfg.max_seq_len)

    if get_rank() == 0:
        tok, where = resolve()  # may train and save: the other ranks wait, then load what it wrote
    barrier()
    if get_rank() != 0:
        tok, where = resolve()
    return tok, Path(where)


def flops_per_sample(cfg: Any) -> float | None:
    """Training FLOPs per sample (fwd + bwd of UNet + text encoder), counted on the meta device."""
    from ldm_train.flops import summarize

    try:
        return float(summarize(cfg)["train_flops_per_sample"])
    except Exception as err:  # a counting failure must not stop training; the banner says n/a
        print(f"[train] FLOP count unavailable ({err}); MFU will not be logged", flush=True)
        return None
