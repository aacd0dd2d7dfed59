"""The first-stage trainer: a KL or VQ autoencoder with the paper's LPIPS + patch-GAN objective.

Parallelism is plain DDP (gloo on CPU, nccl on GPU): the models are small (kl-f8 84M), and the GAN needs
two optimizers plus an ``autograd.grad`` of the reconstruction and adversarial losses at the decoder's
last layer, which DDP allows as is. The discriminator is not DDP-wrapped: the generator step runs it with
frozen weights, so its gradients are averaged by hand in its own step (one all-reduce).

Run dir ``<runs_root>/<run_group>/<run>/``: ``config.yaml``, ``stats.jsonl`` + W&B, ``samples/``,
``checkpoints/step_NNNNNNN/`` (resumable; with ``first_stage.safetensors``) and ``export/first_stage.safetensors``
+ ``first_stage.json`` (config, latent statistics, suggested scale_factor) for data_prep.encode and eval.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ldm_train.app import config_dict, config_yaml
from ldm_train.checkpoints.first_stage import export_first_stage
from ldm_train.first_stage.checkpoint import load_checkpoint, resume_path, save_checkpoint
from ldm_train.first_stage.config import AutoencoderAppConfig
from ldm_train.first_stage.data import ImageStream, load_heldout
from ldm_train.first_stage.losses import FirstStageLoss, build_lpips
from ldm_train.models.autoencoder import AutoencoderKL, DiagonalGaussian, build_first_stage
from ldm_train.models.discriminator import NLayerDiscriminator
from ldm_train.runtime import preemption
from ldm_train.runtime.checkpoint_dir import CHECKPOINTS
from ldm_train.runtime.distributed import (
    all_reduce_,
    cleanup,
    device_for_rank,
    get_rank,
    get_world_size,
    init_distributed,
)
from ldm_train.runtime.log import rank0_logger
from ldm_train.runtime.precision import autocast
from ldm_train.tracking import Tracker

log = rank0_logger("train_autoencoder")
LOG_KEYS = ["train/total", "train/rec", "train/psnr", "train/d_loss", "train/d_accuracy", "vq/perplexity"]


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak = 1 after mapping to [0, 1])."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _average_grads(module: torch.nn.Module) -> None:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads or get_world_size() == 1:
        return
    flat = all_reduce_(torch.cat([g.flatten() for g in grads]), average=True)
    torch.nn.utils.vector_to_parameters(flat, grads)  # writes the averages back into the .grad tensors


class Trainer:
    """Owns the models, optimizers and run state; ``fit()`` is the loop."""

    def __init__(self, cfg: AutoencoderAppConfig) -> None:
        self.preemption = preemption.install()  # first: a signal during start-up stops after the first step
        self.env = init_distributed()
        self.rank, self.world = get_rank(), get_world_size()
        self.device = device_for_rank()
        self.cfg = cfg
        self.fs, self.data, self.tcfg, self.optim = cfg.first_stage, cfg.data, cfg.train, cfg.train.optim

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        perceptual = self._build_models()
        self.encoder_source: str | None = None  # sha256 of the file the frozen encoder is from (trainable=decoder)
        trained = self._initial_weights()
        self.global_batch = self.tcfg.micro_batch * self.world
        scale = self.global_batch if self.optim.lr_scaling == "compvis" else 1
        self.lr = self.optim.base_lr * scale
        betas = tuple(self.optim.betas)
        self.opt_g = torch.optim.Adam(trained, lr=self.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=self.lr, betas=betas)
        self.step, self.d_steps = 0, 0

        self.run_dir = self._run_dir()
        self.ckpt_dir = self.run_dir / CHECKPOINTS
        reseed = self._maybe_resume()
        if reseed or self.step == 0:  # else the checkpoint restored this rank's RNG streams
            torch.manual_seed(cfg.seed + 1000 * self.rank + self.step)
        self.ddp = DistributedDataParallel(self.model) if self.world > 1 else self.model
        self.stream = ImageStream(self.data, self.tcfg.micro_batch, cfg.seed + (self.step if reseed else 0),
                                  self.rank, self.world, skip_batches=0 if reseed else self.step)
        self.heldout = load_heldout(self.data, self.tcfg.eval_images)
        self.tracker = Tracker(cfg.logger, self.run_dir, run_config=config_dict(cfg), experiment=cfg.run_group)
        self.usage = torch.zeros(max(self.fs.n_embed, 1), device=self.device)  # VQ code counts per log interval
        n_params = sum(p.numel() for p in self.model.parameters())
        log(f"first_stage {self.fs.name} ({self.fs.kind}, f={self.fs.downsample_factor}, {n_params:,} params), "
            f"world {self.world} x batch {self.tcfg.micro_batch} = {self.global_batch}, lr {self.lr:.3g}, "
            f"disc_start {self.fs.lossconfig.disc_start}, perceptual {'off' if perceptual is None else 'LPIPS'}, "
            f"trains {self.tcfg.trainable} ({sum(p.numel() for p in trained):,} params)"
            f"{f' from {self.fs.checkpoint}' if self.fs.checkpoint else ''}, run dir {self.run_dir}, start step {self.step}")

    def _build_models(self) -> torch.nn.Module | None:
        """Autoencoder, discriminator and objective (in this order: it fixes the initial weights); the LPIPS."""
        self.model = build_first_stage(self.fs).to(self.device)
        lc = self.fs.lossconfig
        if self.data.resolution // 2**lc.disc_num_layers < 3:  # two stride-1 4x4 convs follow the stride-2 ones
            raise ValueError(f"data.resolution={self.data.resolution} is too small for a {lc.disc_num_layers}-layer "
                             f"patch discriminator: lower first_stage.lossconfig.disc_num_layers or raise the resolution")
        self.disc = NLayerDiscriminator(lc.disc_in_channels, lc.disc_ndf, lc.disc_num_layers).to(self.device)
        loss = self.cfg.loss
        perceptual = build_lpips(loss.lpips_backbone, loss.lpips_random_backbone) if lc.perceptual_weight > 0 else None
        self.objective = FirstStageLoss(lc, self.fs.kind, perceptual).to(self.device)
        return perceptual

    def _initial_weights(self) -> list[torch.nn.Parameter]:
        """Load ``first_stage.checkpoint`` (the weights a new run starts from; a resume overrides them) and freeze
        what ``train.trainable`` leaves out; returns the parameters the generator's optimizer updates."""
        if self.fs.checkpoint:
            from ldm_train.checkpoints.first_stage import (
                encoder_sha256,
                load_first_stage,
                read_first_stage_file,
            )

            weights = read_first_stage_file(self.fs)
            self.model.load_state_dict(load_first_stage(self.fs, weights=weights).state_dict())
            if self.tcfg.trainable == "decoder":  # the exports carry it: latents of that encoder stay valid
                self.encoder_source = encoder_sha256(weights)
        if self.tcfg.trainable == "decoder":
            if not self.fs.checkpoint:
                raise ValueError("train.trainable=decoder fine-tunes a trained first stage with its encoder frozen: "
                                 "set first_stage.checkpoint=PATH (an export/first_stage.safetensors), or use "
                                 "train.trainable=all to train from scratch")
            self.model.requires_grad_(False)
            self.model.decoder.requires_grad_(True)
            self.model.post_quant_conv.requires_grad_(True)
        return [p for p in self.model.parameters() if p.requires_grad]

    def _run_dir(self) -> Path:
        from ldm_train.runtime.rundir import resolve_run_dir, shared_run_dir, slurm_job_id

        def make() -> Path:  # rank 0: found or created and locked before anything is written to it
            desc = f"{self.fs.name}-gpus{self.world}-batch{self.global_batch}"
            run_dir = resolve_run_dir(self.cfg.runs_root, self.cfg.run_group, desc, self.cfg.run_name, slurm_job_id())
            (run_dir / "config.yaml").write_text(config_yaml(self.cfg))
            return run_dir

        return shared_run_dir(make)

    def _maybe_resume(self) -> bool:
        path = resume_path(self.ckpt_dir)
        if path is None:
            return False
        state = load_checkpoint(path, self.rank, self.world)
        self.model.load_state_dict(state["model"])
        self.disc.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.step, self.d_steps = int(state["step"]), int(state["d_steps"])
        log(f"resumed from {path} at step {self.step}")
        return bool(state.get("reseed", False))

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.tcfg.precision, "train.precision")

    def lr_at(self, step: int) -> float:
        """The learning rate of update ``step`` (0-based): linear warm-up, then constant or cosine decay."""
        o = self.optim
        if step < o.warmup_steps:
            return self.lr * (step + 1) / o.warmup_steps
        if o.lr_decay == "cosine":
            span = max(self.tcfg.max_steps - o.warmup_steps, 1)
            frac = min((step - o.warmup_steps) / span, 1.0)
            return self.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
        return self.lr

    def train_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One generator update, then (from disc_start on) one discriminator update on the same batch."""
        lr = self.lr_at(self.step)
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = lr
        self.disc.requires_grad_(False)  # the generator's adversarial term must not train the discriminator
        with self._autocast():
            if isinstance(self.model, AutoencoderKL):
                xrec, posterior = self.ddp(x)
                reg = posterior.kl()
            else:
                xrec, reg, info = self.ddp(x)
                self.usage += info["counts"]
            loss, terms = self.objective.generator_loss(x, xrec, reg, self.step, self.model.last_layer, self.disc)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        if self.optim.grad_clip:
            terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        self.opt_g.step()
        if self.objective.disc_active(self.step):
            self.disc.requires_grad_(True)
            with self._autocast():
                d_loss, d_log = self.objective.discriminator_loss(x, xrec, self.disc)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            _average_grads(self.disc)
            self.opt_d.step()
            self.d_steps += 1
            terms.update(d_log)
        terms["psnr"] = psnr(x, xrec.detach().float()).mean()
        return terms

    def _reconstruct(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent the diffusion model would see, reconstruction) of a batch."""
        h = self.model.encode_moments(chunk)
        if isinstance(self.model, AutoencoderKL):
            posterior = DiagonalGaussian(h)
            rec = self.model.decode(posterior.mode())
            return posterior.sample(), rec  # the diffusion model sees samples: their std sets the scale factor
        return h, self.model.decode(h)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out PSNR (posterior mode / quantized latent), the mean-image baseline, latent statistics.

        Each rank takes every world-th image; sums are all-reduced (no rank recomputes another's share).
        """
        self.model.eval()
        mine = self.heldout[self.rank :: self.world].to(self.device)
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # psnr sum, baseline psnr sum, count
        z_sum = torch.zeros(self.fs.embed_dim, device=self.device, dtype=torch.float64)
        z_sq, z_n = torch.zeros_like(z_sum), torch.zeros((), device=self.device, dtype=torch.float64)
        mean_image = self.heldout.mean(0, keepdim=True).to(self.device)
        recs = []
        for chunk in mine.split(self.tcfg.micro_batch):
            z, rec = self._reconstruct(chunk)
            recs.append(rec)
            sums[0] += psnr(chunk, rec).double().sum()
            sums[1] += psnr(chunk, mean_image.expand_as(chunk)).double().sum()
            sums[2] += len(chunk)
            z_sum += z.double().sum((0, 2, 3))
            z_sq += z.double().pow(2).sum((0, 2, 3))
            z_n += z.shape[0] * z.shape[2] * z.shape[3]
        for t in (sums, z_sum, z_sq, z_n):
            all_reduce_(t)
        self.model.train()
        if self.rank == 0 and recs:
            self._log_grid(mine, recs)
        return self._eval_summary(sums, z_sum, z_sq, z_n)

    def _eval_summary(self, sums: torch.Tensor, z_sum: torch.Tensor, z_sq: torch.Tensor,
                      z_n: torch.Tensor) -> dict[str, float]:
        z_mean = z_sum / z_n
        z_std = (z_sq / z_n - z_mean.pow(2)).clamp_min(0).sqrt()
        overall_std = ((z_sq.sum() / (z_n * len(z_sum))) - (z_sum.sum() / (z_n * len(z_sum))) ** 2).sqrt()
        prefix = "eval" if self.data.heldout else "eval_train"  # PSNR on training images is labelled as such
        out = {f"{prefix}/psnr": float(sums[0] / sums[2]), f"{prefix}/psnr_mean_image": float(sums[1] / sums[2]),
               "latent/scale_factor": float(1.0 / overall_std)}
        for c in range(len(z_sum)):
            out[f"latent/mean_{c}"], out[f"latent/std_{c}"] = float(z_mean[c]), float(z_std[c])
        return out

    def _log_grid(self, originals: torch.Tensor, recs: list[torch.Tensor]) -> None:
        """Up to 8 originals (at most one eval batch) over their reconstructions."""
        n = min(8, len(recs[0]))
        top, bottom = originals[:n], torch.cat(recs)[:n].clamp(-1, 1)
        grid = torch.cat([torch.cat(list(top), dim=2), torch.cat(list(bottom), dim=2)], dim=1)
        self.tracker.log_images(self.step, "reconstructions", grid.cpu())

    def _log(self, terms: dict[str, torch.Tensor], t0: float, steps: int) -> None:
        if not bool(torch.isfinite(terms["total"])):  # checked at the log interval only: one host sync
            raise FloatingPointError(
                f"non-finite generator loss at step {self.step} on rank {self.rank}: lower train.optim.base_lr or "
                f"set train.optim.grad_clip; the run resumes from the last checkpoint in {self.ckpt_dir}")
        scalars = {f"train/{k}": v for k, v in terms.items()}
        if self.fs.kind == "vq":  # codebook usage over the interval, all ranks
            counts = all_reduce_(self.usage.clone())
            probs = counts / counts.sum().clamp_min(1)
            scalars["vq/perplexity"] = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            scalars["vq/dead_codes"] = (counts == 0).sum()
            self.usage.zero_()
        scalars.update({"lr": self.lr_at(self.step - 1), "d_steps": self.d_steps,
                        "samples_per_s": steps * self.global_batch / max(time.perf_counter() - t0, 1e-9)})
        values = self.tracker.log(self.step, scalars)  # the host sync of this interval
        rate = steps / max(time.perf_counter() - t0, 1e-9)  # steps/s over this interval
        left = (self.tcfg.max_steps - self.step) / max(rate, 1e-9)
        log(f"step {self.step}/{self.tcfg.max_steps} " + " ".join(
            f"{k.split('/')[-1]} {values[k]:.4g}" for k in LOG_KEYS if k in values)
            + f" | {rate * self.global_batch:.3g} img/s, ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}")

    def _state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "discriminator": self.disc.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "step": self.step,
                "d_steps": self.d_steps, "world_size": self.world, "config": config_dict(self.cfg)}

    def _provenance(self) -> dict[str, str]:
        from ldm_train.checkpoints.first_stage import ENCODER_SHA256

        return {ENCODER_SHA256: self.encoder_source} if self.encoder_source else {}

    def checkpoint(self) -> Path:
        def export(path: Path) -> None:
            export_first_stage(self.model, str(path), {"step": self.step, **self._provenance()})

        ckpt = self.tcfg.checkpoint
        return save_checkpoint(self.ckpt_dir, self.step, self._state() if self.rank == 0 else {}, ckpt.keep_last,
                               export if ckpt.export_weights else None)

    def fit(self) -> dict[str, Any]:
        t0, since = time.perf_counter(), self.step
        stopped = False
        loader = self.stream.loader()
        while self.step < self.tcfg.max_steps:
            x = next(loader).to(self.device, non_blocking=True)
            terms = self.train_step(x)
            self.step += 1
            if self.step % self.tcfg.log_every == 0 or self.step == self.tcfg.max_steps:
                self._log(terms, t0, self.step - since)
                t0, since = time.perf_counter(), self.step
            periodic = self.step % self.tcfg.image_every == 0 or self.step % self.tcfg.eval_every == 0
            if periodic and self.step < self.tcfg.max_steps:  # the last step is evaluated by finish()
                self.tracker.log(self.step, self.evaluate())
            if self.preemption.should_stop(self.device):
                stopped = True
                break
            if self.step % self.tcfg.checkpoint.every_steps == 0 and self.step < self.tcfg.max_steps:
                self.checkpoint()
        self.checkpoint()
        if stopped:
            if self.rank == 0:
                preemption.requeue_slurm_job()
            return {"step": self.step, "stopped": True}
        return self.finish()

    def finish(self) -> dict[str, Any]:
        final = self.evaluate()
        self.tracker.log(self.step, final)
        extra = {"step": self.step, "scale_factor": final.get("latent/scale_factor"),
                 "latent_mean": [final[k] for k in sorted(final) if k.startswith("latent/mean_")],
                 "latent_std": [final[k] for k in sorted(final) if k.startswith("latent/std_")],
                 "eval_psnr": final.get("eval/psnr"), "eval_psnr_mean_image": final.get("eval/psnr_mean_image"),
                 "train_images_psnr": final.get("eval_train/psnr"), **self._provenance()}
        export_path = self.run_dir / "export" / "first_stage.safetensors"
        if self.rank == 0:
            export_path.parent.mkdir(parents=True, exist_ok=True)
            export_first_stage(self.model, str(export_path), extra)
            self.tracker.summary(final)
            log(f"exported {export_path}; " + ", ".join(f"{k} {v:.4g}" for k, v in final.items()
                                                        if not k.startswith("latent/") or "scale" in k))
        return {"export": str(export_path), "run_dir": str(self.run_dir), **extra}

    def close(self) -> None:
        from ldm_train.runtime.rundir import release_run_dir

        self.preemption.restore()
        self.tracker.close()
        release_run_dir(self.run_dir)


def train(cfg: AutoencoderAppConfig) -> dict[str, Any]:
    """Build, fit, export; returns the final numbers (export path, PSNRs, suggested scale_factor)."""
    signals = preemption.install()
    try:
        trainer = Trainer(cfg)
        try:
            return trainer.fit()
        finally:
            trainer.close()
            cleanup()
    finally:
        signals.restore()  # also when the set-up failed
