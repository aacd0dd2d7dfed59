"""The training loop (nanoGPT order): lr, checkpoint/samples, micro-steps, clip + step (DeepSpeed), log.

Host syncs happen at the log interval (``.item()`` of the summed loss, marked below), at checkpoints and
sample grids, and in DeepSpeed's own per-step overflow check (which also tells the guard about skips).
"""
from __future__ import annotations

import copy
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ldm_train.app import config_dict, config_yaml, to_config
from ldm_train.build import build_ldm
from ldm_train.checkpoints.export import EMA_FILE, LazySafetensors, full_state_dict, write_export
from ldm_train.diffusion.losses import sample_noise
from ldm_train.runtime import preemption
from ldm_train.runtime.distributed import (
    DistEnv,
    barrier,
    cleanup,
    device_for_rank,
    init_distributed,
    rng_state,
    set_rng_state,
)
from ldm_train.trainer import build
from ldm_train.trainer import checkpoint as ckpt
from ldm_train.trainer.config import TrainAppConfig, TrainConfig
from ldm_train.trainer.derived import Derived, derive, describe, lr_at
from ldm_train.trainer.ds_config import compose_ds_config
from ldm_train.trainer.guard import NonFiniteAbort, NumericalGuard
from ldm_train.trainer.samples import SampleGrid, grid_layout


def _process_group() -> DistEnv:
    """Join the launcher's process group, or make a 1-process one when there is no launcher.

    Under torchrun or srun the group always comes from the launcher's rendezvous (``env://``), world size 1
    included: torchrun's agent serves the store at its MASTER_ADDR:MASTER_PORT, and a group of our own on another
    port would wait forever for that agent's store there. Without a launcher DeepSpeed still needs a group.
    """
    launcher = DistEnv.from_env().launcher
    env = init_distributed(force_group=launcher != "none")
    if not torch.distributed.is_initialized():
        _single_process_group()
    return env


def _single_process_group() -> None:
    """A 1-process group on a free loopback port, for a plain ``python -m`` start (without a launcher
    DeepSpeed would bind 29500, which collides when a sweep runs several single-process jobs on one machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo" if not torch.cuda.is_available() else "nccl",
                                         init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def rewind_stats(run_dir: Path, step: int) -> int:
    """Keep the ``stats.jsonl`` rows up to ``step`` (the step training resumes from), so that the steps logged
    after the last checkpoint by an interrupted session are not in the file twice once they are trained again.
    The rows taken out are appended to ``stats_discarded.jsonl``. Returns how many were taken out."""
    from ldm_train.tracking import STATS_FILE

    path = run_dir / STATS_FILE
    if not path.is_file():
        return 0
    keep, drop = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            row_step = None  # a line cut short by a kill
        (keep if row_step is not None and row_step <= step else drop).append(line)
    if not drop:
        return 0
    with open(run_dir / "stats_discarded.jsonl", "a") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in drop)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
    print(f"[train] stats.jsonl: {len(drop)} row(s) after step {step} moved to stats_discarded.jsonl "
          f"(they are logged again as those steps are retrained)", flush=True)
    return len(drop)


class Trainer:
    def __init__(self, cfg: TrainAppConfig) -> None:
        self.preemption = preemption.install()  # first: a signal during start-up stops after the first step
        self.cfg = cfg
        self.tcfg: TrainConfig = cfg.train
        self.env = _process_group()
        self.rank, self.world_size = self.env.rank, self.env.world_size
        self.device = device_for_rank()
        self.d: Derived = derive(self.tcfg, self.world_size, build.flops_per_sample(cfg),
                                 grid=bool(grid_layout(cfg, self.tcfg.sampling).conds))
        self.run_dir = build.make_run_dir(cfg, self.world_size, self.d.global_batch)
        self.ckpt_dir = self.run_dir / ckpt.CHECKPOINTS
        self.step = 0
        self.samples_seen = 0
        self.train_wall_s = 0.0  # time in training steps, summed over sessions (train.time_budget_s)
        self._budget_reached = False  # decided at the log interval, the same on every rank
        self._fid_moment = 0  # training-time moments (train.fid.every_s) whose FID has been measured
        self._setup_data()
        self._setup_engine()
        self.guard = NumericalGuard(self.tcfg.guard.max_consecutive_skips, self.device)
        client = self._resume()
        if self.rank == 0:
            rewind_stats(self.run_dir, self.step)  # rows past the resumed step are logged again from here
        self._setup_tracking(client.get("wandb_run_id") if client else None)
        self.grid = SampleGrid(cfg, self.tcfg.sampling, self.tokenizer, self.scale_factor, self.device)
        if self.cond.kind == "concat" and self.rank == 0 and self.grid.layout.conds:
            self.grid.use_lowres(self.shards, self.cond.lowres_key)
        self.fid = self._setup_fid()
        self._banner()

    # ---- set-up -----------------------------------------------------------------------------------------
    def _setup_data(self) -> None:
        from ldm_train.data import fsspec_io
        from ldm_train.data.cond_inputs import cond_inputs
        from ldm_train.data.latents import build_latent_loader
        from ldm_train.data.manifest import read_manifest, shard_list
        from ldm_train.data.tokenizer import BatchTokenizer

        cfg = self.cfg
        data_cfg = cfg.data
        manifest = read_manifest(data_cfg.manifest or data_cfg.shards)
        self.init_source = None  # train.init_from: a new run starts from these weights (not on a resume)
        self.resuming = self.tcfg.checkpoint.resume and (self.ckpt_dir / ckpt.LATEST).exists()
        if self.tcfg.init_from and not self.resuming:
            from ldm_train.trainer import init_from

            self.init_source = init_from.resolve(self.tcfg.init_from, self.tcfg.init_use_ema, cfg, self.run_dir)
            if self.init_source.tokenizer_dir and not cfg.text_encoder.tokenizer \
                    and str(getattr(getattr(cfg, "cond", None), "kind", "text")) == "text":
                cfg.text_encoder.tokenizer = self.init_source.tokenizer_dir  # the ids the encoder was trained on
        recorded = (manifest.get("first_stage") or {}).get("checkpoint")
        if not cfg.first_stage.checkpoint and recorded and cfg.first_stage.kind != "pixel" \
                and fsspec_io.exists(str(recorded)):
            # the encode job recorded its first stage: the sample grid, the FID and eval decode with it (the
            # manifest check below verifies its sha256), and config.yaml names it for eval
            cfg.first_stage.checkpoint = str(recorded)
            if self.rank == 0:
                print(f"[train] first_stage.checkpoint from the latent manifest: {recorded}", flush=True)
        if not cfg.first_stage.checkpoint and cfg.first_stage.kind != "pixel" and self.init_source is not None \
                and self.init_source.has_first_stage:
            cfg.first_stage.checkpoint = self.init_source.weights  # first_stage_model.* of the init file
            if self.rank == 0:
                print(f"[train] first_stage.checkpoint from train.init_from: {self.init_source.weights}", flush=True)
        shards = shard_list(manifest, base_url=None if data_cfg.manifest else data_cfg.shards)
        self.cond = build.check_conditioning(cfg)  # cond.kind: text (tokens), class (labels), none or concat
        tokenize_fn, labels = None, build.label_spec(self.cond)
        self.tokenizer, self.tokenizer_dir = None, None
        if self.cond.kind == "text":
            self.tokenizer, self.tokenizer_dir = build.setup_tokenizer(
                cfg.text_encoder, self.run_dir, shards
            )
            tokenize_fn = BatchTokenizer(self.tokenizer, int(cfg.text_encoder.max_seq_len))
        self.shards = shards
        if self.cond.kind == "concat":
            factor = self.cond.lowres_factor or int(cfg.first_stage.downsample_factor)
            stored = (manifest.get("lowres") or {}).get("factor")
            if stored is not None and int(stored) != factor:
                raise ValueError(f"the latents under {data_cfg.shards} hold images downsampled {stored}x "
                                 f"(data_prep.encode lowres_factor={stored}) but cond.lowres_factor={factor}"
                                 f"{' (0: the first stage f)' if not self.cond.lowres_factor else ''}: set "
                                 f"cond.lowres_factor={stored}, which eval uses to make its inputs")
        self.loader = build_latent_loader(
            data_cfg, cfg.first_stage, cfg.unet, tokenize_fn, self.rank, self.world_size, labels=labels,
            lowres_key=self.cond.lowres_key if self.cond.kind == "concat" else None, extra=cond_inputs(self.cond),
        )
        self.stored = self.loader.stored
        self._setup_scale_factor()

    def _setup_scale_factor(self) -> None:
        """The latent scale factor (ldm_train/trainer/scale_factor.py); a measured or inherited value is written into
        the config, so config.yaml, exports, a resume and eval use it."""
        from ldm_train.trainer.scale_factor import recorded_scale_factor, resolve_scale_factor

        cfg, init = self.cfg, self.init_source
        fixed = cfg.data.scale_factor if cfg.data.scale_factor is not None else cfg.first_stage.scale_factor
        self._first_batches = None
        scale = resolve_scale_factor(
            fixed, cfg.first_stage.scale_factor_from, (self.loader.manifest or {}).get("scale_factor"),
            init.scale_factor if init is not None else None,
            recorded_scale_factor(self.run_dir) if self.resuming else None, self.resuming, self._measure_first_batch)
        self.scale_factor, self.scale_source = scale.value, scale.source
        if scale.record:
            cfg.first_stage.scale_factor = cfg.data.scale_factor = scale.value
        if init is not None and init.scale_factor is not None and init.scale_factor != scale.value and self.rank == 0:
            print(f"[train] note: train.init_from's scale_factor buffer is {init.scale_factor:.6g} but "
                  f"{scale.value:.6g} ({scale.source}) is used: set first_stage.scale_factor=null to take the "
                  "checkpoint's", flush=True)

    def _measure_first_batch(self) -> float:
        """CompVis scale_by_std: 1/std of the first batch's unscaled latents; that batch is still trained on first."""
        import itertools

        from ldm_train.data.latents import sample_latents
        from ldm_train.trainer.scale_factor import first_batch_scale_factor

        stream = iter(self.loader)
        first = next(stream)
        self._first_batches = itertools.chain([first], stream)
        if self.stored == "moments":
            gen = torch.Generator(device=self.device).manual_seed(self.tcfg.seed * 1000 + self.rank)
            z = sample_latents(first["moments"].to(self.device), 1.0, gen)
        else:
            z = first["latents"].to(self.device)
        return first_batch_scale_factor(z)

    def _setup_engine(self) -> None:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            if self.tcfg.precision == "fp16":
                raise ValueError("train.precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16): "
                                 "use train.precision=bf16 or fp32 on CPU")
        import deepspeed

        from ldm_train.runtime.ds_ops import skip_unused_ops

        skip_unused_ops()  # nothing compiled that training does not call
        torch.manual_seed(self.tcfg.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's)
        model = build_ldm(self.cfg)
        # the newest intact checkpoint (checked against its file manifest; a damaged one is moved aside)
        self.latest = ckpt.select_resume_tag(self.ckpt_dir) if self.tcfg.checkpoint.resume else None
        self.resume_universal = False
        if self.latest is not None:
            meta = ckpt.read_meta(self.ckpt_dir, self.latest)
            self.resume_universal = int(meta["world_size"]) != self.world_size
        elif self.init_source is not None:
            from ldm_train.trainer import init_from

            line = init_from.load_into(model, self.init_source, self.tcfg.init_use_ema)
            mismatch = init_from.schedule_mismatch(self.init_source, model.schedule.betas)
            if self.rank == 0:
                print(f"[train] train.init_from: {self.init_source.weights}: {line}; fresh optimizer, step 0",
                      flush=True)
                if mismatch:
                    print(f"[train] warning: train.init_from was trained with another noise schedule: {mismatch}",
                          flush=True)
        if self.tcfg.compile:
            compiled = model.compile_in_place()
            if self.rank == 0:
                print(f"[train] train.compile: {' and '.join(compiled)} compiled (torch.compile, in place)", flush=True)
        ds_group = copy.deepcopy(dict(self.cfg.deepspeed))
        self.ds_config = compose_ds_config(ds_group, self.tcfg, self.d, load_universal=self.resume_universal)
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        o = self.tcfg.optim
        # a client torch AdamW: DeepSpeed's config optimizer would JIT-compile FusedAdam (CPU) for nothing; on a
        # GPU torch's fused kernel (one launch for all parameters), which needs the parameters there first
        fused = self.device.type == "cuda"
        if fused:
            model = model.to(self.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.d.lr, betas=tuple(o.betas), eps=o.eps,
                                      weight_decay=o.weight_decay, fused=fused or None)
        self.ds_config.setdefault("zero_allow_untested_optimizer", True)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            dist_init_required=False if torch.distributed.is_initialized() else None,
        )
        torch.manual_seed(self.tcfg.seed + self.rank)  # seed offset per rank from here on (dropout etc.)
        random.seed(self.tcfg.seed + self.rank)
        self.gen = torch.Generator(device=self.device).manual_seed(self.tcfg.seed * 1000 + self.rank)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.tcfg.precision, torch.float32)
        self.ema = None
        if self.tcfg.ema.enabled:
            from ldm_train.ema import EMA

            # after deepspeed.initialize: under ZeRO-3 each rank averages its fp32 master partition
            self.ema = EMA(self.engine.module, decay=self.tcfg.ema.decay, warmup=self.tcfg.ema.warmup)

    def _resume(self) -> dict[str, Any] | None:
        if self.latest is None:
            return None
        from ldm_train.trainer.pinned import check_resume_settings

        accepted = check_resume_settings(self.run_dir, config_dict(self.cfg), list(self.tcfg.allow_changed))
        if accepted and self.rank == 0:
            print(f"[train] resuming with changed settings (train.allow_changed): {', '.join(accepted)}", flush=True)
        client = ckpt.load_checkpoint(self.engine, self.ckpt_dir, self.latest, universal=self.resume_universal)
        state = client["trainer"]
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.train_wall_s = float(state.get("train_wall_s", 0.0))  # the same on every rank (rank 0's)
        self._budget_reached = bool(self.tcfg.time_budget_s) and self.train_wall_s >= self.tcfg.time_budget_s
        if self.tcfg.fid.every_s:
            self._fid_moment = int(self.train_wall_s // float(self.tcfg.fid.every_s))
        self.guard.load_state_dict(state.get("guard", {}))
        rank_state = ckpt.load_rank_state(self.ckpt_dir, self.latest, self.rank, not self.resume_universal)
        if rank_state is not None:
            self.loader.load_state_dict(rank_state["data"])  # another world size: it restarts past the old blocks
            if not self.resume_universal:
                set_rng_state(rank_state["rng"], self.gen)
        if self.ema is not None:
            self._load_exported_ema(int(state.get("ema_updates", self.step)))
        print(f"[train] rank {self.rank}: resumed {self.ckpt_dir / self.latest} at step {self.step} "
              f"({self.samples_seen} samples){' via a universal checkpoint' if self.resume_universal else ''}; "
              f"AdamW exp_avg norm {self._adam_moment_norm():.4g}", flush=True)
        return client

    def _adam_moment_norm(self) -> float:
        """Norm of this rank's AdamW first moments (0 means the optimizer state was not restored)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        sq = sum(float(v["exp_avg"].float().pow(2).sum()) for v in inner.state.values() if "exp_avg" in v)
        return sq**0.5

    def _load_exported_ema(self, num_updates: int) -> None:
        """The EMA persists once, as the exported full fp32 model_ema.safetensors; each rank takes its slice."""
        path = self.ckpt_dir / self.latest / EMA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the checkpoint has no EMA to resume; set train.ema.enabled=false "
                                    f"or resume from a checkpoint written with the EMA on")
        self.ema.load_state_dict({"shadow": LazySafetensors(path), "num_updates": num_updates,
                                  "decay": self.tcfg.ema.decay, "warmup": self.tcfg.ema.warmup})

    def _setup_tracking(self, run_id: str | None) -> None:
        from ldm_train.tracking import Tracker, wandb_group
        from ldm_train.trainer import sweep

        point = sweep.current_point()  # a Hydra multirun point: one W&B group per sweep, point.json in its folder
        sweep.join_group(self.cfg, point)
        run_config = config_dict(self.cfg)
        if point is not None:
            run_config["sweep"] = sweep.describe(self.cfg, point)
        self.tracker = Tracker(self.cfg.logger, self.run_dir, self.rank, resume_run_id=run_id,
                               run_config=run_config, experiment=self.cfg.experiment_name)
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(config_yaml(self.cfg))
            if point is not None:
                sweep.write_point(self.cfg, point, self.run_dir, wandb_group(self.cfg.logger, self.cfg.experiment_name))

    def _setup_fid(self) -> Any:
        """The in-training FID (``train.fid``), its reference statistics ready (computed once, then cached)."""
        if not (self.d.fid_every_steps or self.tcfg.fid.every_s):
            return None
        from ldm_train.trainer.fid import InTrainingFID

        if self.ema is None and self.zero_stage == 3:
            raise ValueError("train.fid under ZeRO-3 samples with the EMA weights: set train.ema.enabled=true, "
                             "or train.fid.every_samples=0")
        fid = InTrainingFID(self.tcfg.fid, self.grid, int(self.cfg.data.resolution), str(self.cfg.runs_root),
                            self.rank, self.world_size, self.device, cond=self.cond)
        fid.prepare()
        return fid

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

    def _banner(self) -> None:
        if self.rank != 0:
            return
        print(f"[train] run dir {self.run_dir}\n[train] " + describe(self.d).replace("\n", "\n[train] ")
              + f"\n[train] ZeRO stage {self.zero_stage}, {self.tcfg.precision}, scale factor {self.scale_factor:.5g} ({self.scale_source}), "
              f"latents stored as {self.stored}", flush=True)
        if self.tcfg.precision != "fp32" and self.d.accumulation > 1 \
                and type(self.engine.optimizer).__name__ != "BF16_Optimizer":
            print(f"[train] note: gradients accumulate in {self.tcfg.precision} over {self.d.accumulation} micro-steps "
                  f"(ZeRO stage {self.zero_stage}); for fp32 accumulation use deepspeed=zero1 with "
                  "+deepspeed.data_types.grad_accum_dtype=fp32 (DeepSpeed's BF16 optimizer; ZeRO-2/3 ignore that "
                  "setting), or fewer micro-steps (python -m ldm_train.plan)", flush=True)
        if self.device.type == "cuda":  # the planner's estimate for this plan on this device (ldm_train.plan)
            try:
                from ldm_train.plan import startup_line

                print("[train] " + startup_line(self.cfg, self.world_size, self.env.local_world_size), flush=True)
            except Exception as err:  # an estimate only: never stop a run for it
                print(f"[train] plan: no estimate ({err})", flush=True)

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
            t = torch.randint(0, self.tcfg.diffusion.timesteps, (z0.shape[0],), device=self.device, generator=self.gen)
            noise = sample_noise(z0.shape, self.tcfg.diffusion.offset_noise, self.gen, self.device)
            loss = self.engine(z0.to(self.dtype), cond, t, noise.to(self.dtype)).float().mean()
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
                lr = lr_at(self.step, d)
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

    def _write_summary(self, wall_s: float, samples: int) -> None:
        """``train_summary.json``: what this session of a finished run cost (the sweep report reads it)."""
        train_s = max(wall_s - self.fid_wall_s, 1e-9)
        summary = {"samples_seen": self.samples_seen, "samples_this_session": samples, "wall_s": round(wall_s, 1),
                   "fid_wall_s": round(self.fid_wall_s, 1), "fid_share": round(self.fid_wall_s / max(wall_s, 1e-9), 4),
                   "samples_per_s": round(samples / train_s, 2), "world_size": self.world_size,
                   "train_wall_s": round(self.train_wall_s, 1)}
        tmp = self.run_dir / "train_summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, self.run_dir / "train_summary.json")

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

    # ---- checkpoints and samples ------------------------------------------------------------------------
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
