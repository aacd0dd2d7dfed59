"""What the training loop writes at its intervals: checkpoints (with the export beside each), sample grids, the
in-training FID, ``train_summary.json``; and closing the run."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ldm_train.app import config_yaml
from ldm_train.checkpoints.export import full_state_dict, write_export
from ldm_train.data import fsspec_io
from ldm_train.runtime.distributed import barrier, cleanup, rng_state
from ldm_train.trainer import checkpoint as ckpt
from ldm_train.trainer.setup import TrainerSetup


class TrainerOutputs(TrainerSetup):
    """Checkpoints, sample grids, FID and the summary of a set-up trainer (``ldm_train/trainer/setup.py``)."""

    def _ema_state(self) -> dict[str, torch.Tensor] | None:
        return None if self.ema is None else self.ema.gathered_state_dict(rank0_only=True)  # collective (ZeRO: sharded EMA)

    def save(self) -> str:
        t0 = time.perf_counter()
        client = {
            "trainer": {"step": self.step, "samples_seen": self.samples_seen, "guard": self.guard.state_dict(),
                        "train_wall_s": self.train_wall_s,
                        "ema_updates": self.ema.num_updates if self.ema is not None else 0},
            "wandb_run_id": getattr(self.tracker, "run_id", None),
        }
        rank_state = {"data": self.loader.state_dict(), "rng": rng_state(self.gen)}
        meta = {"step": self.step, "samples_seen": self.samples_seen, "train_wall_s": round(self.train_wall_s, 2),
                "world_size": self.world_size,
                "zero_stage": self.zero_stage, "precision": self.tcfg.precision, "global_batch": self.d.global_batch}

        def exports(tag_dir: Path) -> None:
            # the EMA is always written (it is how the EMA itself is checkpointed); the raw export is optional
            raw = full_state_dict(self.engine.module, self.zero_stage) if self.tcfg.checkpoint.export_weights else None
            ema = self._ema_state()
            if self.rank == 0:
                write_export(tag_dir, raw, ema, config_yaml(self.cfg), self.tokenizer_dir,
                             {"format": "compvis-ldm", "step": self.step, "samples_seen": self.samples_seen})

        tag = ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.step, client, rank_state, meta, exports,
                                   self.tcfg.checkpoint.keep_last)
        if self.rank == 0:
            print(f"[train] checkpoint {self.ckpt_dir / tag} ({time.perf_counter() - t0:.1f} s)", flush=True)
        return tag

    def sample_grid(self) -> None:
        sd = self._ema_state() if (self.ema is not None and self.tcfg.sampling.use_ema) else \
            full_state_dict(self.engine.module, self.zero_stage)
        if self.rank == 0:
            images = self.grid.render(sd)
            layout = self.grid.layout
            self.tracker.log_images(self.step, "samples", images, layout.captions, cols=layout.cols)
        barrier()

    def close(self) -> None:
        from ldm_train.runtime.rundir import release_run_dir

        self.preemption.restore()
        self.tracker.close()
        cleanup()
        release_run_dir(self.run_dir)

    def measure_fid(self, final: bool = False) -> None:
        """K-sample FID of the EMA weights (the raw ones without EMA), split across ranks; logged by rank 0."""
        if self.ema is not None:
            state = self.ema.gathered_state_dict(rank0_only=False)  # every rank samples its share
        else:
            state = {k: v.detach().float().cpu() for k, v in self.engine.module.state_dict().items()}
        values = self.fid.measure(state, final=final)
        if self.rank == 0:
            self.fid_wall_s += values["fid_seconds"]
            self.tracker.log(self.step, {**values, "samples_seen": self.samples_seen,
                                         "train_wall_s": round(self.train_wall_s, 2)})
            shown = ", ".join(f"{k} {v:.2f}" + (f" +- {values[k + '_std']:.2f}" if k + "_std" in values else "")
                              for k, v in values.items() if k.startswith("fid") and k[3:].isdigit())
            print(f"[train] step {self.step}: {shown} ({values['fid_seconds']:.0f} s)", flush=True)

    def _write_summary(self, wall_s: float, samples: int) -> None:
        """``train_summary.json``: what this session of a finished run cost (the sweep report reads it)."""
        train_s = max(wall_s - self.fid_wall_s, 1e-9)
        summary = {"samples_seen": self.samples_seen, "samples_this_session": samples, "wall_s": round(wall_s, 1),
                   "fid_wall_s": round(self.fid_wall_s, 1), "fid_share": round(self.fid_wall_s / max(wall_s, 1e-9), 4),
                   "samples_per_s": round(samples / train_s, 2), "world_size": self.world_size,
                   "train_wall_s": round(self.train_wall_s, 1)}
        fsspec_io.write_text(str(self.run_dir / "train_summary.json"), json.dumps(summary, indent=2) + "\n")
