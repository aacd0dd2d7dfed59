"""A training run as one point of a Hydra multirun sweep (``python -m ldm_train.train -m first_stage=a,b``).

Every point of one multirun, with the basic launcher (one after another in this process) or with submitit
(``hydra/launcher=slurm``, one job each), finds the sweep through Hydra's config: it joins the W&B group
``<experiment>-<sweep folder name>`` (unless ``logger.group``/``logger.sweep`` are set), puts ``sweep``
(first stage, f, latent shape, point number) in its W&B config, and writes ``point.json`` plus a ``run``
link to its run dir into its Hydra subfolder ``<sweep dir>/<n>-<first_stage>/``: the folder
``python -m studies.sweep_report SWEEP_DIR`` reads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm_train.data.fsspec_io import write_text


@dataclass
class SweepPoint:
    sweep_dir: Path  # absolute
    subdir: str
    job_num: int
    overrides: list[str]

    @property
    def name(self) -> str:
        """The sweep's name: its folder (``<date>_<time>`` by default), unique per multirun."""
        return self.sweep_dir.name

    @property
    def point_dir(self) -> Path:
        return self.sweep_dir / self.subdir


def current_point() -> SweepPoint | None:
    """The sweep point this process runs, or None outside a Hydra multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return None
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return SweepPoint(Path(str(hc.sweep.dir)).resolve(), str(hc.sweep.subdir), int(hc.job.num),
                      list(hc.overrides.task))


def describe(cfg: Any, point: SweepPoint) -> dict[str, Any]:
    """The point as the W&B config column ``sweep`` and as ``point.json`` (without the run dir)."""
    fs = cfg.first_stage
    f = int(fs.downsample_factor)
    side = int(cfg.data.resolution) // f
    return {"name": point.name, "dir": str(point.sweep_dir), "job_num": point.job_num, "first_stage": fs.name,
            "kind": fs.kind, "downsample_factor": f, "f": f, "latent_shape": [int(fs.embed_dim), side, side],
            "overrides": point.overrides}


def join_group(cfg: Any, point: SweepPoint | None) -> None:
    """All points of one multirun share one W&B group: name the sweep after its folder unless the user did."""
    if point is not None and cfg.logger.sweep is None:
        cfg.logger.sweep = point.name


def write_point(cfg: Any, point: SweepPoint, run_dir: Path, wandb_group: str | None) -> Path:
    """``<point dir>/point.json`` and ``<point dir>/run`` -> the run dir (rank 0; rewritten on resume)."""
    point.point_dir.mkdir(parents=True, exist_ok=True)
    info = describe(cfg, point)
    info.update(run_dir=str(Path(run_dir).resolve()), wandb_group=wandb_group)
    path = point.point_dir / "point.json"
    write_text(path, json.dumps(info, indent=2) + "\n")
    link = point.point_dir / "run"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(run_dir).resolve(), target_is_directory=True)
    return path
