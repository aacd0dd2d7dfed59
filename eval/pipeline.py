"""The eval stage's work: sample on every rank, then metrics on rank 0 (entry point: ``eval.run``).

1. Check the metric networks' weight files (before any sampling: a missing file costs seconds, not hours).
2. Every rank samples its contiguous share of global batches to ``<output_dir>/samples/gs<scale>/`` PNGs
   (``eval.sampling``: seed + i per sample, identical at any world size; re-runs skip finished batches).
3. Rank 0 computes FID / IS / precision / recall per guidance scale against the reference set
   (``eval.fidelity``), prompt adherence on synthetic-shapes prompts, writes ``metrics.json`` and a W&B run.

``stage=sample`` / ``stage=metrics`` split 2 and 3 into separate jobs (``slurm/eval.sh`` runs sampling as a
multi-task srun step, metrics as a one-task step).

What sample i is conditioned on follows the export's ``cond.kind``: prompt ``prompts[i % P]`` (text),
class ``classes[i % C]`` (class: ``classes`` or every class, one sample set per guidance scale; the null class
is the unconditional input), nothing (none: one unguided set, ``gs1``), the low-resolution copy of reference
image ``i % N`` (concat: super-resolution, one unguided set; the reference images are also the targets of the
per-sample PSNR / SSIM).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict
from typing import Any

import torch

from eval.config import EvalConfig
from eval.fidelity import FidelityConfig, check_weights, compute_fidelity, count_images, extractors
from eval.sampling import load_prompts, sample_path, sample_to_folder, scale_dir
from ldm_train.app import config_dict
from ldm_train.config import CondConfig, cond_config
from ldm_train.data import fsspec_io
from ldm_train.runtime.distributed import (
    barrier,
    cleanup,
    device_for_rank,
    get_rank,
    get_world_size,
    init_distributed,
)
from ldm_train.runtime.log import rank0_logger
from ldm_train.sampling import SamplerSettings

log = rank0_logger("eval")


def guidance_scales(value: Any) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return [float(value)]


def export_cond(step_dir: str) -> CondConfig:
    """The ``cond`` node of the export's ``config.yaml`` (text for exports older than the choice)."""
    from omegaconf import OmegaConf

    from ldm_train.checkpoints.export import CONFIG_FILE

    return cond_config(OmegaConf.load(os.path.join(step_dir, CONFIG_FILE)))


def eval_scales(cfg: EvalConfig, cond: CondConfig) -> list[float]:
    """The guidance scales sampled: ``guidance_scale``'s, or 1 alone for an unconditional or concat model."""
    scales = guidance_scales(cfg.guidance_scale)
    if cond.kind in ("none", "concat") and scales != [1.0]:
        log(f"{'unconditional' if cond.kind == 'none' else 'super-resolution'} checkpoint "
            f"(cond.kind={cond.kind}): guidance_scale={scales} ignored, one set gs1")
        return [1.0]
    return scales


def sr_pairs(cfg: EvalConfig, step_dir: str, cond: CondConfig) -> tuple[list[torch.Tensor], torch.Tensor]:
    """concat: the low-resolution inputs ([3, h, w] in [-1, 1], made as ``data_prep.encode lowres_factor`` makes
    them: bicubic, antialiased, 8-bit) and the high-resolution targets [N, 3, H, W] of the first
    ``min(num_samples, reference.num_images)`` images of ``reference.path``, at the export's ``data.resolution``."""
    from omegaconf import OmegaConf

    from ldm_train.checkpoints.export import CONFIG_FILE
    from ldm_train.data.latent_conds import downsample_u8
    from ldm_train.data.readers import image_dataset

    if not cfg.reference.path:
        raise ValueError("a super-resolution checkpoint (cond.kind=concat) super-resolves the images of "
                         "reference.path: set reference.path=IMAGE_FOLDER_OR_SHARDS (held-out images)")
    exported = OmegaConf.load(os.path.join(step_dir, CONFIG_FILE))
    resolution = int(exported.data.resolution)
    factor = int(cond.lowres_factor or exported.first_stage.downsample_factor)
    limit = min(cfg.num_samples, cfg.reference.num_images or cfg.num_samples)
    targets = []
    for sample in image_dataset(cfg.reference.path, resolution):
        targets.append(sample["image"])
        if len(targets) == limit:
            break
    if not targets:
        raise ValueError(f"reference.path={cfg.reference.path} holds no image")
    hr = torch.stack(targets)
    lr = torch.from_numpy(downsample_u8(hr, factor)).float() / 127.5 - 1
    return list(lr), hr


def conditions(cfg: EvalConfig, cond: CondConfig, step_dir: str | None = None) -> list[Any]:
    """Sample i's condition is ``conditions[i % len]``: prompts (text), class indices (class), [None] (none),
    low-resolution images (concat)."""
    if cond.kind == "concat":
        return sr_pairs(cfg, str(step_dir), cond)[0]
    if cond.kind == "text":
        if cfg.prompts is None:
            raise ValueError("prompts=SOURCE is required for a text-conditional checkpoint (a COCO captions .json, "
                             "a .txt with one prompt per line, shards with .txt captions, or a list)")
        return load_prompts(cfg.prompts, cfg.max_prompts)
    if cfg.prompts is not None:
        log(f"cond.kind={cond.kind}: prompts={cfg.prompts!r} ignored")
    if cond.kind == "none":
        return [None]
    classes = [int(c) for c in cfg.classes] if cfg.classes is not None else list(range(cond.num_classes))
    bad = [c for c in classes if not 0 <= c < cond.num_classes]
    if bad or not classes:
        raise ValueError(f"classes={cfg.classes}: give class indices in 0..{cond.num_classes - 1} (null: every class)")
    return classes


def caption(cond: CondConfig, item: Any) -> str:
    """A condition as text: the prompt, the class name (or ``class N``), or "" (unconditional)."""
    if cond.kind == "class":
        return cond.class_name(int(item))
    if cond.kind == "concat":
        return "super-resolved"
    return "" if item is None else str(item)


def default_output_dir(cfg: EvalConfig, step_dir: str) -> str:
    """``<run dir>/eval/<step>/<sampler>-<steps>steps-n<N>-seed<S>`` for a trainer checkpoint (outside
    ``checkpoints/``, whose rotation would delete it), else ``<step dir>/eval/...`` for an export elsewhere."""
    spec = f"{cfg.sampler}-{cfg.steps}steps-n{cfg.num_samples}-seed{cfg.seed}"
    step = os.path.normpath(step_dir)
    parent = os.path.dirname(step)
    if os.path.basename(parent) == "checkpoints":
        return os.path.join(os.path.dirname(parent), "eval", os.path.basename(step), spec)
    return os.path.join(step, "eval", spec)


# ---------------------------------------------------------------------------------------------- sampling


def _check_settings(folder: str, settings: dict[str, Any]) -> None:
    """Refuse to mix samples of different settings in one folder (a re-run must match the first run)."""
    path = os.path.join(folder, "settings.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old != settings:
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise ValueError(f"{folder} holds samples made with other settings {diff} (old, new): "
                             "pick another output_dir or delete the folder")
    elif get_rank() == 0:
        fsspec_io.write_text(path, json.dumps(settings, indent=2))


def _reduce_stats(stats: dict[str, float]) -> dict[str, float]:
    """Sum counts over ranks; wall time is the slowest rank's."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return stats
    counts = torch.tensor([stats["written"], stats["skipped"], stats["assigned"]], dtype=torch.float64)
    secs = torch.tensor([stats["seconds"]], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        counts, secs = counts.cuda(), secs.cuda()
    torch.distributed.all_reduce(counts)
    torch.distributed.all_reduce(secs, op=torch.distributed.ReduceOp.MAX)
    written, skipped, assigned = (int(v) for v in counts.tolist())
    seconds = float(secs.item())
    return {"written": written, "skipped": skipped, "assigned": assigned, "seconds": seconds,
            "images_per_s": written / seconds if seconds > 0 else 0.0}


def _write_prompts(output_dir: str, prompts: list[Any], num_samples: int, cond: CondConfig | None = None) -> None:
    """``prompts.jsonl``: sample i's prompt (text), label and class name (class), or index alone (none) (rank 0)."""
    cond = cond or CondConfig()
    with fsspec_io.atomic_write(os.path.join(output_dir, "prompts.jsonl"), "w") as f:
        for i in range(num_samples):
            item = prompts[i % len(prompts)]
            row: dict[str, Any] = {"index": i}
            if cond.kind == "text":
                row["prompt"] = item
            elif cond.kind == "class":
                row.update(label=int(item), class_name=cond.class_name(int(item)))
            elif cond.kind == "concat":
                row["reference_index"] = i % len(prompts)  # the reference image whose low-resolution copy it took
            f.write(json.dumps(row) + "\n")


def sample_stage(cfg: EvalConfig, prompts: list[str], output_dir: str, device: torch.device) -> dict[str, Any]:
    from eval.checkpoint import load_sampling_model
    from ldm_train.checkpoints.export import EMA_FILE

    model = load_sampling_model(cfg.checkpoint, use_ema=cfg.use_ema, first_stage_checkpoint=cfg.first_stage_checkpoint,
                                scale_factor=cfg.scale_factor, device=device,
                                allow_random_first_stage=cfg.allow_random_first_stage)
    rank, world = get_rank(), get_world_size()
    if rank == 0:
        _write_prompts(output_dir, prompts, cfg.num_samples, model.cond)
    barrier()
    out: dict[str, Any] = {"scale_factor": model.scale_factor, "resolution": model.resolution,
                           "first_stage": model.first_stage_file, "per_scale": {},
                           "checkpoint": {"path": str(model.weights_file), "sha256": model.weights_sha256,
                                          "ema": model.weights_file.name == EMA_FILE}}
    extra = {} if model.cond.kind == "text" else {"cond_kind": model.cond.kind, "classes": str(cfg.classes)}
    if model.cond.kind == "concat":  # the inputs are the reference images' low-resolution copies
        extra.update(reference=str(cfg.reference.path), reference_images=cfg.reference.num_images)
    for scale in eval_scales(cfg, model.cond):
        settings = SamplerSettings(cfg.sampler, cfg.steps, cfg.eta, scale, cfg.seed, cfg.batch_size, cfg.precision,
                                   cfg.timestep_spacing)
        folder = scale_dir(os.path.join(output_dir, "samples"), scale)
        recorded = asdict(settings)
        if settings.spacing == "leading":
            del recorded["spacing"]  # the default: folders sampled before the setting existed match it
        _check_settings(folder, {**recorded, "checkpoint": str(model.weights_file),
                                 "first_stage": model.first_stage_file, "scale_factor": model.scale_factor,
                                 "prompts": str(cfg.prompts), "num_samples": cfg.num_samples, **extra})
        barrier()
        stats = sample_to_folder(model, prompts, cfg.num_samples, folder, settings, rank, world, device,
                                 progress=cfg.progress)
        stats = _reduce_stats(stats)
        log(f"gs={scale:g}: wrote {stats['written']} images ({stats['skipped']} existed) in "
            f"{stats['seconds']:.1f}s, {stats['images_per_s']:.2f} images/s on {world} process(es)")
        out["per_scale"][scale] = stats
    barrier()
    return out


# ---------------------------------------------------------------------------------------------- metrics


def _sample_folders(cfg: EvalConfig, output_dir: str, scales: list[float]) -> dict[float, str]:
    """The per-scale sample folders, each checked complete."""
    folders = {s: scale_dir(os.path.join(output_dir, "samples"), s) for s in scales}
    for folder in folders.values():
        missing = [i for i in range(cfg.num_samples) if not os.path.exists(sample_path(folder, i))]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {len(missing)} of {cfg.num_samples} samples (first: {missing[0]}): "
                                    "run stage=sample (or stage=all) first")
    return folders


def _adherence_applies(setting: Any, prompts: list[str]) -> bool:
    if setting in (True, "true"):
        return True
    if setting in (False, "false", None):
        return False
    from ldm_train.data.shapes_captions import parse_caption

    try:
        for p in set(prompts):
            parse_caption(p)
    except ValueError:
        return False
    return True


def _metric_rows(cfg: EvalConfig, fid_cfg: FidelityConfig, scales: list[float], folders: dict[float, str],
                 n_prompts: list[Any], reference: str | None, ref_key: str | None,
                 cond: CondConfig | None = None) -> list[dict[str, Any]]:
    """One row per guidance scale: sample count, fidelity metrics, prompt adherence (text prompts only)."""
    wanted = fid_cfg.fid or fid_cfg.isc or fid_cfg.prc
    do_adherence = (cond is None or cond.kind == "text") and _adherence_applies(cfg.adherence, n_prompts)
    rows = []
    for s in scales:
        folder = folders[s]
        row: dict[str, Any] = {"guidance_scale": s, "num_samples": count_images(folder)}
        if wanted:
            row.update({k: v for k, v in compute_fidelity(fid_cfg, folder, reference, ref_key).items()
                        if k not in ("feature_extractor", "extractors")})
        if do_adherence:
            from eval.adherence import adherence_of_folder

            row["adherence"] = adherence_of_folder(folder, n_prompts)
            row["colour_accuracy"] = row["adherence"]["colour_accuracy"]
        if cond is not None and cond.kind == "concat":
            row.update(_sr_scores(folder, cfg, cond))
        rows.append(row)
        log(json.dumps({k: v for k, v in row.items() if k != "adherence"}))
    return rows


def _sr_scores(folder: str, cfg: EvalConfig, cond: CondConfig) -> dict[str, float]:
    """concat: mean PSNR / SSIM of sample i against its high-resolution reference image (the paper's Tab. 5)."""
    import numpy as np
    from PIL import Image

    from eval.reconstruction_metrics import psnr, ssim
    from ldm_train.checkpoints.export import resolve_step_dir

    _, hr = sr_pairs(cfg, str(resolve_step_dir(cfg.checkpoint)), cond)
    images = []
    for i in range(cfg.num_samples):
        with Image.open(sample_path(folder, i)) as im:
            images.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1))
    x = torch.stack(images).double() / 255.0
    y = ((hr[torch.arange(cfg.num_samples) % len(hr)].double().clamp(-1, 1) + 1) * 127.5).round() / 255.0
    if x.shape != y.shape:
        raise ValueError(f"samples of {tuple(x.shape[1:])} against references of {tuple(y.shape[1:])}")
    return {"psnr": float(psnr(x, y).clamp(max=100).mean()), "ssim": float(ssim(x, y).mean())}


def _checkpoint_info(cfg: EvalConfig, sampling: dict[str, Any] | None) -> dict[str, Any]:
    """The sampled weights file, its sha256 and whether it is the EMA: from the sample stage when it ran (it read
    the file already), else hashed here (``stage=metrics`` without a sampling.json)."""
    if sampling and "checkpoint" in sampling:
        return sampling["checkpoint"]
    from ldm_train.checkpoints.export import EMA_FILE, weights_file

    weights = weights_file(cfg.checkpoint, cfg.use_ema)
    return {"path": str(weights), "sha256": fsspec_io.sha256(str(weights)), "ema": weights.name == EMA_FILE}


def metrics_stage(cfg: EvalConfig, fid_cfg: FidelityConfig, prompts: list[Any], output_dir: str,
                  sampling: dict[str, Any] | None, cond: CondConfig | None = None) -> dict[str, Any]:
    from PIL import Image

    from eval.reference import materialise_reference
    from eval.report import log_wandb, training_run_link, write_metrics_json

    cond = cond or CondConfig()
    scales = eval_scales(cfg, cond)
    folders = _sample_folders(cfg, output_dir, scales)
    with Image.open(sample_path(folders[scales[0]], 0)) as im:
        resolution = int(cfg.reference.resolution or im.size[0])
    wanted = fid_cfg.fid or fid_cfg.isc or fid_cfg.prc
    reference, ref_key = None, None
    if wanted and (fid_cfg.fid or fid_cfg.prc):
        reference, ref_key = materialise_reference(cfg.reference.path, cfg.reference.name,
                                                   cfg.reference.num_images, resolution, fid_cfg.cache_dir)
    n_prompts = [prompts[i % len(prompts)] for i in range(cfg.num_samples)]  # sample i's prompt
    report = {
        "per_scale": _metric_rows(cfg, fid_cfg, scales, folders, n_prompts, reference, ref_key, cond),
        "feature_extractor": (("random-init-plumbing-only" if fid_cfg.extractor == "random-init" else "pretrained")
                              if wanted else None),
        "extractors": extractors(fid_cfg) if wanted else None,  # which network computed each metric
        "metric_settings": asdict(fid_cfg),
        "reference": {"path": cfg.reference.path, "key": ref_key,
                      "count": count_images(reference) if reference else 0, "resolution": resolution},
        "sampler": {"sampler": cfg.sampler, "steps": cfg.steps, "eta": cfg.eta, "seed": cfg.seed,
                    "guidance_scales": scales, "batch_size": cfg.batch_size, "precision": cfg.precision},
        "num_samples": cfg.num_samples,
        "prompts": {"source": str(cfg.prompts), "count": len(prompts)} if cond.kind == "text" else None,
        "cond": {"kind": cond.kind, **({"classes": [int(c) for c in prompts], "num_classes": cond.num_classes}
                                       if cond.kind == "class" else {}),
                 **({"inputs": str(cfg.reference.path), "count": len(prompts), "lowres_factor": cond.lowres_factor
                     or None} if cond.kind == "concat" else {})},
        "checkpoint": _checkpoint_info(cfg, sampling),
        "sampling": sampling,  # scale factor, first stage, per-scale counts and images/s, world size
    }
    write_metrics_json(os.path.join(output_dir, "metrics.json"), report)
    per_prompt = {s: [(sample_path(folders[s], i), caption(cond, n_prompts[i])) for i in
                      range(min(cfg.wandb.samples_per_scale, cfg.num_samples))] for s in scales}
    log_wandb(output_dir, config_dict(cfg), report, per_prompt, mode=cfg.wandb.mode,
              project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name,
              link=training_run_link(str(cfg.checkpoint)))
    return report


# ---------------------------------------------------------------------------------------------- the stage


def _fidelity_config(cfg: EvalConfig) -> FidelityConfig:
    """A copy of ``cfg.metrics`` whose weights are checked (in EVERY stage, stage=sample included:
    slurm/eval.sh samples in a first step, and a missing file must stop the job before hours of sampling).
    Sampling without metrics: metrics.fid/isc/prc=false."""
    fid_cfg = dataclasses.replace(cfg.metrics)
    if fid_cfg.fid or fid_cfg.isc or fid_cfg.prc:
        check_weights(fid_cfg)
        if (fid_cfg.fid or fid_cfg.prc) and not cfg.reference.path:
            raise ValueError("metrics.fid / metrics.prc need reference.path=IMAGE_FOLDER_OR_SHARDS "
                             "(or metrics.fid=false metrics.prc=false)")
    return fid_cfg


def run(cfg: EvalConfig) -> dict[str, Any] | None:
    """The whole stage; returns the report on the rank that wrote it (rank 0), else None."""
    fid_cfg = _fidelity_config(cfg)
    from ldm_train.checkpoints.export import resolve_step_dir

    step_dir = str(resolve_step_dir(cfg.checkpoint))
    output_dir = str(cfg.output_dir or default_output_dir(cfg, step_dir))
    if fid_cfg.cache_dir is None:
        fid_cfg.cache_dir = os.path.join(os.path.dirname(os.path.abspath(output_dir)), "fidelity_cache")
    cond = export_cond(step_dir)
    prompts = conditions(cfg, cond, step_dir)  # prompts, class indices, [None] or images, as the export's cond.kind
    init_distributed()
    try:
        device = device_for_rank(cfg.device)
        sampling = None
        if cfg.stage in ("all", "sample"):
            sampling = sample_stage(cfg, prompts, output_dir, device)
            sampling["world_size"] = get_world_size()
            if get_rank() == 0:
                with open(os.path.join(output_dir, "sampling.json"), "w") as f:
                    json.dump(sampling, f, indent=2)
        elif os.path.isfile(os.path.join(output_dir, "sampling.json")):
            with open(os.path.join(output_dir, "sampling.json")) as f:
                sampling = json.load(f)
        if get_rank() != 0 or cfg.stage == "sample":
            return None
        return metrics_stage(cfg, fid_cfg, prompts, output_dir, sampling, cond)
    finally:
        cleanup()
