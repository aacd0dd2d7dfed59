"""Dashboards: W&B, ``stats.jsonl`` beside it, a console progress line, and the throughput helpers.

Only global rank 0 writes anything; on other ranks every method is a cheap no-op, so callers need no
``if rank == 0``. Values must already be Python numbers or tensors fetched at the log interval (``log``
calls ``float()`` on tensors: that is the one host sync, keep it to the log interval).

Files under the run directory: ``stats.jsonl`` (one JSON object per ``log``: step, the same scalars as W&B,
unix time), ``wandb_run_id`` (so a requeued job continues the same W&B run, resume="allow"),
``wandb/`` (W&B's own files; offline runs sync later with ``wandb sync <run_dir>/wandb/offline-run-*``),
``samples/<name>-<step>.png`` (every image grid logged).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ldm_train.config_checks import one_of
from ldm_train.data.fsspec_io import write_text

if TYPE_CHECKING:
    import torch

RUN_ID_FILE = "wandb_run_id"
STATS_FILE = "stats.jsonl"
_SECRET = re.compile(r"(^|[_\-.])(api_?key|key|token|secret|password|passwd|credentials?)($|[_\-.])", re.I)


LOGGER_MODES = ("online", "offline", "disabled")  # W&B mode: logger.mode and eval's wandb.mode
WANDB_CONSOLES = ("auto", "off", "wrap", "redirect", "wrap_raw", "wrap_emu")  # wandb.Settings(console=...)


@dataclass
class LoggerConfig:
    """``conf/logger/*.yaml``: where the dashboards go."""

    mode: str = one_of("offline", LOGGER_MODES)  # "online" | "offline" | "disabled" (W&B); stats.jsonl and console always
    project: str = "ldm-train"
    entity: str | None = None
    group: str | None = None  # default: the experiment name (+ "-" + sweep when given)
    sweep: str | None = None  # e.g. the Hydra multirun name, appended to the group
    job_type: str = "train"
    name: str | None = None  # default: the run directory's name
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    console: str = one_of("auto", WANDB_CONSOLES)  # W&B console capture: "auto" | "off" | "wrap" | ...


def wandb_group(cfg: LoggerConfig, experiment: str | None) -> str | None:
    """``logger.group`` or the experiment name, plus ``-<logger.sweep>`` when the run is part of a sweep."""
    group = cfg.group or experiment
    return f"{group}-{cfg.sweep}" if group and cfg.sweep else group


def strip_secrets(obj: Any) -> Any:
    """Copy of a nested dict/list with values under secret-looking keys (api_key, token, ...) masked."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET.search(str(k)) else strip_secrets(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strip_secrets(v) for v in obj]
    return obj


def mfu(flops_per_sample: float, samples_per_s_per_gpu: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s per GPU over the hardware peak.

    ``flops_per_sample`` counts one whole training step per sample (forward + backward, about 3x the
    forward: ~780 GFLOP for the 1.45B model), ``peak_flops`` the dense peak of the precision used
    (A100 bf16: 312e12).
    """
    if peak_flops <= 0:
        return float("nan")
    return flops_per_sample * samples_per_s_per_gpu / peak_flops


def gpu_memory_gib(reset: bool = True) -> float | None:
    """Peak GPU memory allocated since the last call (GiB), None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


class StepTimer:
    """Time spent waiting for the loader vs. the whole step, summed between ``summary()`` calls.

    Usage: ``with timer.data(): batch = next(it)`` then ``timer.step(samples)`` at the end of the optimizer
    step. Host-side wall time: with CUDA the step time includes the sync that ``.item()`` at the log
    interval forces, so read the summary at the log interval.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._start = time.perf_counter()
        self._data = 0.0
        self._excluded = 0.0
        self._steps = 0
        self._samples = 0

    @contextmanager
    def excluded(self):
        """Time spent in here (sample grids, in-training FID, checkpoints) does not count as training time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - t0

    @contextmanager
    def data(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._data += time.perf_counter() - t0

    def step(self, samples: int = 0) -> None:
        self._steps += 1
        self._samples += samples

    def summary(self, reset: bool = True) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._start - self._excluded, 1e-9)
        out = {
            "data_wait_share": self._data / elapsed,
            "step_time_s": elapsed / max(self._steps, 1),
            "samples_per_s": self._samples / elapsed,
        }
        if reset:
            self.reset()
        return out


def _to_float(v: Any) -> Any:
    torch = sys.modules.get("torch")  # a tensor implies torch is loaded: a config's import does not load it
    if torch is not None and isinstance(v, torch.Tensor):
        return v.detach().float().item()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] float in [-1, 1] (the model's range) or uint8 -> HWC uint8."""
    import torch

    image = image.detach().cpu()
    if image.dtype != torch.uint8:
        image = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return image.permute(1, 2, 0).numpy()


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Tracker:
    """W&B run + stats.jsonl + console line for one training run (no-op off rank 0)."""

    def __init__(
        self,
        cfg: LoggerConfig | Any,
        run_dir: str | os.PathLike,
        rank: int | None = None,
        resume_run_id: str | None = None,
        run_config: dict[str, Any] | None = None,
        experiment: str | None = None,
    ) -> None:
        from ldm_train.runtime.distributed import get_rank

        if not isinstance(cfg, LoggerConfig):
            from ldm_train.config import to_dataclass

            cfg = to_dataclass(cfg, LoggerConfig)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank = get_rank() if rank is None else rank
        self.enabled = self.rank == 0
        self.run = None
        self.run_id: str | None = resume_run_id
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = self._persisted_run_id(resume_run_id)
        self._stats = open(self.run_dir / STATS_FILE, "a", buffering=1)  # line-buffered: survives a kill
        if cfg.mode != "disabled":
            self._init_wandb(run_config, experiment)

    def _persisted_run_id(self, resume_run_id: str | None) -> str:
        path = self.run_dir / RUN_ID_FILE
        if resume_run_id:
            run_id = resume_run_id
        elif path.exists():
            run_id = path.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
        write_text(path, run_id + "\n")
        return run_id

    def _init_wandb(self, run_config: dict[str, Any] | None, experiment: str | None) -> None:
        import wandb

        # W&B's files live with the run, not in the submission directory or $HOME
        os.environ["WANDB_DIR"] = str(self.run_dir)
        os.environ.setdefault("WANDB_CACHE_DIR", str(self.run_dir / "wandb" / ".cache"))
        os.environ.setdefault("WANDB_DATA_DIR", str(self.run_dir / "wandb" / ".data"))
        group = wandb_group(self.cfg, experiment)
        self.run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            group=group,
            job_type=self.cfg.job_type,
            name=self.cfg.name or self.run_dir.name,
            tags=list(self.cfg.tags) or None,
            notes=self.cfg.notes,
            id=self.run_id,
            resume="allow",
            dir=str(self.run_dir),
            mode=self.cfg.mode,
            config=strip_secrets(run_config or {}),
            settings=wandb.Settings(console=self.cfg.console),
        )

    def log(self, step: int, scalars: dict[str, Any]) -> dict[str, Any]:
        """Write ``scalars`` at ``step`` to W&B and stats.jsonl (the same numbers); returns them as floats."""
        if not self.enabled:
            return {}
        values = {k: _to_float(v) for k, v in scalars.items()}
        record = {"step": int(step), **values, "time": time.time()}
        # NaN/inf are not JSON: write them as strings so the line stays parseable
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}
        self._stats.write(json.dumps(clean) + "\n")
        if self.run is not None:
            self.run.log(values, step=int(step))
        return values

    def log_images(
        self,
        step: int,
        name: str,
        images: torch.Tensor | str | os.PathLike,
        captions: list[str] | None = None,
        cols: int | None = None,
    ) -> Path | None:
        """Log a grid ([3, H, W]) or a batch ([N, 3, H, W], one caption each) in [-1, 1], or a PNG path.

        A tensor is also saved as ``samples/<name>-<step>.png`` (a batch as one row-major grid, ``cols`` images
        a row; None: a square-ish grid). W&B gets a batch twice: one image per sample under ``name`` and that grid
        under ``<name>_grid``.
        """
        if not self.enabled:
            return None
        import torch
        from PIL import Image

        if isinstance(images, torch.Tensor):
            batch = images if images.dim() == 4 else images.unsqueeze(0)
            arrays = [_to_uint8_hwc(img) for img in batch]
            cols = min(int(cols), len(arrays)) if cols else math.ceil(math.sqrt(len(arrays)))
            rows = math.ceil(len(arrays) / cols)
            h, w, c = arrays[0].shape
            grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
            for i, a in enumerate(arrays):
                grid[i // cols * h : (i // cols + 1) * h, i % cols * w : (i % cols + 1) * w] = a
            path = self.run_dir / "samples" / f"{name.replace('/', '_')}-{int(step):09d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(path)
        else:
            path, arrays = Path(images), None
        if self.run is not None:
            import wandb

            grid_image = wandb.Image(str(path), caption=" | ".join(captions or []) or None)
            if arrays is not None and len(arrays) > 1:
                caps = captions or [""] * len(arrays)
                # one panel per sample, and the whole grid at a glance (as diffusers' validation logging)
                media = {name: [wandb.Image(a, caption=cap) for a, cap in zip(arrays, caps, strict=False)],
                         f"{name}_grid": grid_image}
            else:
                media = {name: grid_image}
            self.run.log(media, step=int(step))
        return path

    def progress(
        self,
        step: int,
        samples_seen: int,
        total_samples: int,
        scalars: dict[str, Any],
        samples_per_s: float,
        eta_s: float | None = None,
    ) -> str:
        """Print (rank 0) and return one console line: progress, samples/s, ETA, scalars.

        ``samples_per_s`` is the interval's rate as stats.jsonl records it (``StepTimer.summary``: measured over the
        interval itself, so the first line has one too); ``eta_s`` overrides the ETA the rate gives (a run ended by
        a time budget).
        """
        if not self.enabled:
            return ""
        rate = float(samples_per_s)
        eta = (total_samples - samples_seen) / rate if rate > 0 else float("nan")
        if eta_s is not None:
            eta = min(eta, eta_s) if eta == eta else eta_s
        parts = [
            f"step {step}",
            f"{samples_seen:,}/{total_samples:,} samples ({100.0 * samples_seen / max(total_samples, 1):.1f}%)",
        ]
        for k, v in scalars.items():
            v = _to_float(v)
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        parts += [f"{rate:.1f} samples/s", f"ETA {_fmt_duration(eta)}"]
        line = " | ".join(parts)
        print(line, file=sys.stdout, flush=True)
        return line

    def summary(self, values: dict[str, Any]) -> None:
        """Set run-summary values (final metrics) in W&B."""
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = _to_float(v)

    def close(self) -> None:
        """Flush stats.jsonl and finish the W&B run (safe to call twice)."""
        if not self.enabled:
            return
        if not self._stats.closed:
            self._stats.close()
        if self.run is not None:
            import wandb

            self.run.finish()
            self.run = None
            # finish() can return before wandb-core has flushed the offline .wandb file; tearing the service
            # down waits for it, so a requeued job or a reader sees the whole run
            wandb.teardown()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
