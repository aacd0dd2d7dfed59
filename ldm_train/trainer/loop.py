"""The training loop (nanoGPT order): lr, sample grid, micro-steps, clip + step (DeepSpeed), log, FID, checkpoint.

Each micro-step is ``ldm_train/diffusion/step.py``'s: draw t and noise, ``training_loss`` through the engine.
The set-up (process group, data, engine, EMA, resume, tracking) is ``ldm_train/trainer/setup.py``; checkpoints,
sample grids, FID and the summary are ``ldm_train/trainer/outputs.py``.

Host syncs happen at the log interval (``.item()`` of the summed loss, marked below), at checkpoints and
sample grids, and in DeepSpeed's own per-step overflow check (which also tells the guard about skips).
"""
from __future__ import annotations

import sys
import time
from typing import Any

import torch
from omegaconf import DictConfig

from ldm_train.app import to_config
from ldm_train.diffusion.step import draw_t_and_noise, training_loss
from ldm_train.runtime import preemption
from ldm_train.trainer.config import TrainAppConfig
from ldm_train.trainer.derived import lr_at
from ldm_train.trainer.guard import NonFiniteAbort
from ldm_train.trainer.outputs import TrainerOutputs


class Trainer(TrainerOutputs):
    """``Trainer(cfg).run()``: the set-up happens in the constructor (``TrainerSetup``), the loop in ``run``."""

    # ---- one optimizer step -----------------------------------------------------------------------------
    def _latents(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.stored == "moments":
            from ldm_train.data.latents import sample_latents

            moments = batch["moments"].to(self.device, non_blocking=True)
            return sample_latents(moments, self.scale_factor, self.gen)
        return batch["latents"].to(self.device, non_blocking=True).float() * self.scale_factor

    def _cond_input(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """What the cond stage takes: token ids (text), class labels (class; the null class where dropped), the
        low-resolution images (concat), ``model_cond``'s input of inpaint / semantic / layout, None (none)."""
        if self.cond.kind in ("inpaint", "semantic", "layout"):
            from ldm_train.data.cond_inputs import model_cond

            return model_cond(self.cond.kind, batch, self.stored, self.scale_factor, self.cond.num_classes, self.device)
        key = {"text": "tokens", "class": "label", "concat": "lowres"}.get(self.cond.kind)
        return None if key is None else batch[key].to(self.device, non_blocking=True)

    def train_step(self, data_iter: Any, timer: Any) -> torch.Tensor:
        """Accumulate ``accumulation`` micro-batches, then DeepSpeed clips and steps. Returns the loss sum."""
        loss_sum = torch.zeros((), device=self.device)
        inject = self.step in self.tcfg.guard.inject_nan_at_steps
        for _ in range(self.d.accumulation):
            with timer.data():
                batch = next(data_iter)
            z0 = self._latents(batch)
            cond = self._cond_input(batch)
            t, noise = draw_t_and_noise(z0, self.tcfg.diffusion.timesteps, self.tcfg.diffusion.offset_noise, self.gen)
            loss = training_loss(self.engine, z0.to(self.dtype), cond, t, noise.to(self.dtype))
            if inject:
                loss = loss * float("nan")  # fault injection (train.guard.inject_nan_at_steps)
            self.guard.observe_loss(loss)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed: a real step only at the accumulation boundary (clip, overflow skip)
            loss_sum += loss.detach()
        applied = self.engine.was_step_applied()
        if applied and self.ema is not None:
            self.ema.update(self.engine.module)
        self.step += 1
        self.samples_seen += self.d.global_batch
        timer.step(self.d.global_batch)
        self.guard.after_step(applied, fp16=self.tcfg.precision == "fp16")  # may abort: counters are current
        return loss_sum

    # ---- the loop ---------------------------------------------------------------------------------------
    def run(self) -> int:
        from ldm_train.tracking import StepTimer

        d, timer = self.d, StepTimer()
        t_start, samples_start = time.perf_counter(), self.samples_seen
        self.fid_wall_s = 0.0
        data_iter = self._first_batches if self._first_batches is not None else iter(self.loader)
        start_step, last_saved = self.step, self.step
        loss_acc, steps_acc = torch.zeros((), device=self.device), 0
        exit_code = 0
        try:
            while self.step < d.total_steps and not self._budget_spent():
                lr = lr_at(self.step, d, self._lr_wall_s)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                if d.sample_every_steps and self.step % d.sample_every_steps == 0 and self.step > start_step:
                    with timer.excluded():
                        self.sample_grid()
                t_step = time.perf_counter()
                loss_acc += self.train_step(data_iter, timer)
                self.train_wall_s += time.perf_counter() - t_step
                steps_acc += 1
                fid_due_by_time = False
                if self.step % d.log_every_steps == 0 or self.step == d.total_steps:
                    self.log(loss_acc, steps_acc, lr, timer)
                    loss_acc, steps_acc = torch.zeros((), device=self.device), 0
                    fid_due_by_time = self._check_budget()
                elif self.world_size == 1:  # no ranks to agree with: the budget and FID moments to the step
                    fid_due_by_time = self._check_budget()
                if self.fid is not None and self._fid_due(fid_due_by_time):
                    with timer.excluded():
                        self.measure_fid(final=self.step == d.total_steps or self._budget_reached)
                if d.checkpoint_every_steps and self.step % d.checkpoint_every_steps == 0:
                    with timer.excluded():
                        self.save()
                    last_saved = self.step
                if self.preemption.should_stop(self.device):
                    break
                if self.tcfg.max_steps is not None and self.step - start_step >= self.tcfg.max_steps:
                    break
        except NonFiniteAbort as err:
            print(f"[train] rank {self.rank}: {err}", file=sys.stderr, flush=True)
            exit_code = 3
        finished = self.step >= d.total_steps or self._budget_spent()
        if d.sample_every_steps and finished and self.step > start_step and not exit_code:
            self.sample_grid()  # the final weights' grid (the periodic one fires before a step, never after the last)
        if self.step != last_saved or exit_code:
            self.save()  # at exit: preemption, max_steps, the end, or the last good state before an abort
        if self.preemption.received is not None and self.rank == 0:
            preemption.requeue_slurm_job()
        if finished and self.samples_seen > samples_start and not exit_code and self.rank == 0:
            self._write_summary(time.perf_counter() - t_start, self.samples_seen - samples_start)
        return exit_code

    def _check_budget(self) -> bool:
        """At the log interval (after every step in a single process): rank 0's training time decides for every
        rank (one broadcast, no extra sync). Returns whether the training time passed the next multiple of
        ``train.fid.every_s``."""
        every_s = float(self.tcfg.fid.every_s) if self.fid is not None else 0.0
        if not (self.tcfg.time_budget_s or every_s):
            return False
        spent = torch.tensor([self.train_wall_s], dtype=torch.float64)
        if torch.distributed.is_initialized():
            spent = spent.to(self.device)
            torch.distributed.broadcast(spent, 0)
        self.train_wall_s = float(spent.item())
        self._lr_wall_s = self.train_wall_s  # rank 0's time: every rank's lr stays the same
        self._budget_reached = bool(self.tcfg.time_budget_s) and self.train_wall_s >= self.tcfg.time_budget_s
        if not every_s:
            return False
        moment = int(self.train_wall_s // every_s)
        due, self._fid_moment = moment > self._fid_moment, max(moment, self._fid_moment)
        return due

    def _fid_due(self, by_time: bool) -> bool:
        """FID after this step: every ``every_samples``, at a training-time moment, or at the end (``at_end``)."""
        d = self.d
        if by_time or (d.fid_every_steps and self.step % d.fid_every_steps == 0):
            return True
        return bool(self.tcfg.fid.at_end) and (self.step == d.total_steps or self._budget_reached)

    def _budget_spent(self) -> bool:
        return self._budget_reached

    def log(self, loss_acc: torch.Tensor, steps: int, lr: float, timer: Any) -> None:
        """Host sync point: the summed loss is all-reduced and fetched here, once per log interval."""
        from ldm_train.runtime.devices import device_peak_tflops
        from ldm_train.tracking import gpu_memory_gib, mfu

        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss_acc)
        loss = loss_acc.item() / max(steps * self.d.accumulation * self.world_size, 1)  # host sync (log interval)
        t = timer.summary()
        grad_norm = self.engine.get_global_grad_norm()
        scalars = {
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "samples_seen": self.samples_seen,
            "samples_per_s": t["samples_per_s"],
            "step_time_s": t["step_time_s"],
            "data_wait_share": t["data_wait_share"],
            "skipped_steps": self.guard.skipped_total,
            "nonfinite_losses": self.guard.bad_losses_since_last_read(),
        }
        if self.tcfg.precision == "fp16":
            scalars["loss_scale"] = float(getattr(self.optimizer, "cur_scale", getattr(self.optimizer, "loss_scale", 1.0)))
        if self.d.flops_per_sample:
            per_gpu = t["samples_per_s"] / self.world_size
            scalars["tflops_per_gpu"] = self.d.flops_per_sample * per_gpu / 1e12
            peak = device_peak_tflops(self.device, self.tcfg.peak_tflops)
            if peak is not None:
                scalars["mfu"] = mfu(self.d.flops_per_sample, per_gpu, peak * 1e12)
        mem = gpu_memory_gib()
        if mem is not None:
            scalars["gpu_mem_gib"] = mem
        self.tracker.log(self.step, scalars)
        budget = self.tcfg.time_budget_s
        # the timer's rate (sample grids, FID and checkpoints excluded), as stats.jsonl has it
        self.tracker.progress(self.step, self.samples_seen, self.d.total_steps * self.d.global_batch,
                              {"loss": loss, "lr": lr, "grad_norm": scalars["grad_norm"]},
                              samples_per_s=t["samples_per_s"],
                              eta_s=max(budget - self.train_wall_s, 0.0) if budget else None)


def train(cfg: TrainAppConfig | DictConfig) -> int:
    """Build, run, close; returns the exit status (3: aborted by the numerical guard)."""
    signals = preemption.install()
    try:
        trainer = Trainer(to_config(cfg, TrainAppConfig))
        try:
            return trainer.run()
        finally:
            trainer.close()
    finally:
        signals.restore()  # also when the set-up failed
