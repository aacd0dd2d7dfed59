"""Build the pieces the loop wires together: run dir, tokenizer, model, data, DeepSpeed engine, EMA."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from ldm_train.config import TextEncoderConfig, UNetConfig, to_dataclass
from ldm_train.distributed import barrier, get_rank, get_world_size
from ldm_train.trainer.rundir import describe_run, resolve_run_dir, slurm_job_id

TOKENIZER_CORPUS_LIMIT = 200_000  # captions read to train a tokenizer when none is configured


def broadcast_str(value: str | None) -> str:
    """Rank 0's string on every rank (run dir names must agree)."""
    if not (dist.is_available() and dist.is_initialized()):
        assert value is not None
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def make_run_dir(cfg: DictConfig, world_size: int, global_batch: int) -> Path:
    path = None
    if get_rank() == 0:
        # Hydra parses run_name=nan / 00012 as a float / int: a name is always a string
        run_name = None if cfg.get("run_name") is None else str(cfg.get("run_name"))
        desc = describe_run(cfg.experiment_name, cfg.first_stage.name, world_size, global_batch)
        path = str(resolve_run_dir(cfg.runs_root, cfg.experiment_name, desc, run_name, slurm_job_id()))
    return Path(broadcast_str(path))


def read_captions(shards: list[tuple[str, int]], limit: int = TOKENIZER_CORPUS_LIMIT) -> list[str]:
    """Captions of the latent shards (the tokenizer corpus), read in manifest order up to ``limit``."""
    import tarfile

    from ldm_train.data.latents import _open

    captions: list[str] = []
    for url, _ in shards:
        with _open(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if member.isreg() and member.name.endswith(".txt"):
                    captions.append(tar.extractfile(member).read().decode("utf-8"))
                    if len(captions) >= limit:
                        return captions
    return captions


def setup_tokenizer(te_cfg: TextEncoderConfig, run_dir: Path, shards: list[tuple[str, int]]) -> tuple[Any, Path]:
    """The configured tokenizer dir, else the run's own (trained once on the shard captions by rank 0)."""
    from ldm_train.data.tokenizer import resolve_tokenizer

    def resolve() -> tuple[Any, str]:
        return resolve_tokenizer(te_cfg.tokenizer, str(run_dir), lambda: read_captions(shards),
                                 te_cfg.vocab_size, te_cfg.max_seq_len)

    if get_rank() == 0:
        tok, where = resolve()  # may train and save: the other ranks wait, then load what it wrote
    barrier()
    if get_rank() != 0:
        tok, where = resolve()
    return tok, Path(where)


def build_model(cfg: DictConfig) -> torch.nn.Module:
    from ldm_train.diffusion.schedule import make_schedule
    from ldm_train.models.text_encoder import BERTEmbedder
    from ldm_train.models.unet import UNetModel
    from ldm_train.trainer.model import LatentDiffusion

    unet = UNetModel(to_dataclass(cfg.unet, UNetConfig))
    text = BERTEmbedder(to_dataclass(cfg.text_encoder, TextEncoderConfig))
    d = cfg.train.diffusion
    schedule = make_schedule(d.beta_schedule, d.timesteps, linear_start=d.linear_start, linear_end=d.linear_end)
    return LatentDiffusion(unet, text, schedule, d.parameterization, d.min_snr_gamma)


def flops_per_sample(cfg: DictConfig) -> float | None:
    """Training FLOPs per sample (fwd + bwd of UNet + text encoder) from the models engineer's counter."""
    try:
        from ldm_train.summary import summarize
    except ImportError:
        return None
    try:
        return float(summarize(cfg)["train_flops_per_sample"])
    except Exception as err:  # a counting failure must not stop training; the banner says n/a
        print(f"[train] FLOP count unavailable ({err}); MFU will not be logged", flush=True)
        return None


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world() -> tuple[int, int]:
    return get_rank(), get_world_size()
