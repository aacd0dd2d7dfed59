"""metrics.json and the W&B run of an eval.

metrics.json: one row per guidance scale (FID, IS, precision, recall, f-score, adherence), the counts, the
sampler settings, the checkpoint's path and sha256, the first stage's, the feature extractor (flagged
``random-init-plumbing-only`` when the metric networks are random) and package versions.
W&B (offline by default): a table of samples per prompt and guidance scale, and the metrics per scale
as line plots (x = guidance scale).
"""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from typing import Any

PACKAGES = ("torch", "torchvision", "torch-fidelity", "lpips", "numpy", "scipy", "ldm-train", "wandb")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_metrics_json(path: str, report: dict[str, Any]) -> None:
    """Atomic write (a reader never sees a half file)."""
    from ldm_train.data.fsspec_io import write_text

    write_text(path, json.dumps({**report, "versions": package_versions()}, indent=2, sort_keys=False, default=str))


def training_run_link(checkpoint: str) -> dict[str, Any]:
    """The training run an eval belongs to: its W&B group (as the trainer named it), run id and run dir, read from
    the checkpoint's ``config.yaml`` and ``<run dir>/wandb_run_id``; {} where they are not there."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from ldm_train.checkpoints.export import CONFIG_FILE, resolve_step_dir

    try:
        step_dir = resolve_step_dir(checkpoint)
    except FileNotFoundError:
        return {}
    link: dict[str, Any] = {"train_step_dir": str(step_dir)}
    run_dir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else None
    if run_dir is not None:
        link["train_run_dir"] = str(run_dir)
        id_file = Path(run_dir) / "wandb_run_id"
        if id_file.is_file():
            link["train_run_id"] = id_file.read_text().strip()
    if (step_dir / CONFIG_FILE).is_file():
        from ldm_train.tracking import wandb_group

        train_cfg = OmegaConf.load(step_dir / CONFIG_FILE)
        logger = train_cfg.get("logger") or OmegaConf.create({})
        group = wandb_group(OmegaConf.create({"group": logger.get("group"), "sweep": logger.get("sweep")}),
                            train_cfg.get("experiment_name"))
        if group:
            link["group"] = str(group)
    return link


def log_wandb(output_dir: str, cfg: dict[str, Any], report: dict[str, Any], samples: dict[float, list[tuple[str, str]]],
              mode: str = "offline", project: str = "ldm-train", entity: str | None = None,
              name: str | None = None, link: dict[str, Any] | None = None) -> str | None:
    """One W&B run (job_type eval): config, a samples table and per-scale metric plots. Returns the run dir.

    ``link`` (:func:`training_run_link`): the run joins the training run's group and its config records the
    training run's id and folders."""
    if mode == "disabled":
        return None
    import wandb

    link = link or {}
    os.environ.setdefault("WANDB_DIR", output_dir)
    os.environ.setdefault("WANDB_CACHE_DIR", os.path.join(output_dir, ".wandb_cache"))
    run = wandb.init(project=project, entity=entity, name=name or os.path.basename(output_dir.rstrip("/")),
                     job_type="eval", mode=mode, dir=output_dir, group=link.get("group"),
                     config={**cfg, "training_run": {k: v for k, v in link.items() if k != "group"}},
                     reinit="finish_previous")
    try:
        table = wandb.Table(columns=["guidance_scale", "index", "prompt", "image"])
        for scale, items in samples.items():
            for path, prompt in items:
                index = int(os.path.basename(path).split(".")[0])
                table.add_data(scale, index, prompt, wandb.Image(path, caption=prompt))
        run.log({"samples": table})
        # also as plain image panels: images inside a Table only travel in the table artifact, which offline
        # runs keep out of files/media until `wandb sync` (wandb issue #4611)
        run.log({f"samples/gs{scale:g}": [wandb.Image(path, caption=prompt) for path, prompt in items]
                 for scale, items in samples.items()})
        rows = report.get("per_scale", [])
        keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k != "guidance_scale"})
        for key in keys:
            data = [[r["guidance_scale"], r[key]] for r in rows if isinstance(r.get(key), (int, float))]
            plot_table = wandb.Table(data=data, columns=["guidance_scale", key])
            run.log({f"plots/{key}_vs_guidance": wandb.plot.line(plot_table, "guidance_scale", key,
                                                                  title=f"{key} vs guidance scale")})
        for r in rows:
            for key in keys:
                if isinstance(r.get(key), (int, float)):
                    run.summary[f"gs{r['guidance_scale']:g}/{key}"] = r[key]
        run.summary["feature_extractor"] = report.get("feature_extractor")
        return run.dir
    finally:
        run.finish()
