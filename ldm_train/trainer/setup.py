"""The trainer's set-up, run once before the loop: process group, data, scale factor, engine (model, AdamW,
DeepSpeed), EMA, checkpoint restore, tracking, sample grid, in-training FID and the start-up banner.

``TrainerSetup.__init__`` reads top to bottom in that order; ``ldm_train/trainer/loop.py`` holds the loop itself.
"""
from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path
from typing import Any

import torch

from ldm_train.app import config_dict, config_yaml
from ldm_train.build import build_ldm
from ldm_train.checkpoints.export import EMA_FILE, LazySafetensors
from ldm_train.data import fsspec_io
from ldm_train.runtime import preemption
from ldm_train.runtime.distributed import DistEnv, device_for_rank, init_distributed, set_rng_state
from ldm_train.runtime.precision import precision_dtype
from ldm_train.trainer import build
from ldm_train.trainer import checkpoint as ckpt
from ldm_train.trainer.config import TrainAppConfig, TrainConfig
from ldm_train.trainer.derived import Derived, derive, describe
from ldm_train.trainer.ds_config import compose_ds_config
from ldm_train.trainer.guard import NumericalGuard
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
    from ldm_train.runtime.distributed import free_ports

    port = free_ports()[0]
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
    fsspec_io.write_text(str(path), "".join(keep))
    print(f"[train] stats.jsonl: {len(drop)} row(s) after step {step} moved to stats_discarded.jsonl "
          f"(they are logged again as those steps are retrained)", flush=True)
    return len(drop)


class TrainerSetup:
    """Builds everything the loop uses, as attributes; resumes from the newest intact checkpoint."""

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
        self._lr_wall_s = 0.0  # train_wall_s as the ranks last agreed on it (the time-bounded cosine reads it)
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
        # a client torch AdamW: DeepSpeed's config optimizer would JIT-compile FusedAdam (CPU) for nothing. Torch's
        # fused kernel (one pass over all parameters): on a GPU one launch, which needs the parameters there first;
        # on CPU ~4x faster than the default for-loop, equal to 3e-8 (bench/train_step.py --adamw)
        fused = self.device.type in ("cuda", "cpu")
        if self.device.type == "cuda":
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
        self.dtype = precision_dtype(self.tcfg.precision, "train.precision")
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
        self._lr_wall_s = self.train_wall_s
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

