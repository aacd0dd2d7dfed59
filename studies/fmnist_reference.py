"""The reference text-to-image run on Fashion-MNIST, against diffusers' pixel-space DDPM at equal training time.

``python -m studies.fmnist_reference [--out data/fmnist] [--budget-s 2400] [--stages prep,train,sampler,score,report]``

Each stage runs its commands as separate command lines (logs in ``<out>/logs/``) and skips what is done, so a
killed run is resumed by running the same command again:

  prep   32 px train / t10k tars (``data_prep.fashion_mnist``), the ``fmnist_kl_f4`` first stage (cosine lr,
         6,400 steps x batch 8), the latent shards (``data_prep.encode``), the judge (``eval.fmnist_judge``),
         and (``--decoder-steps``: 1,200 by default, 0: off) its decoder fine-tuned with the patch GAN, encoder frozen
         (``train.trainable=decoder``): the latents stay valid, and the LDM's samples are decoded with it
  train  ``ldm_train.train experiment=fmnist_txt2img`` and ``bench/fmnist_pixel_ddpm.py train`` side by side, one
         thread each, each for ``--budget-s`` seconds of training steps (both resume)
  sampler the DDIM steps x guidance grid on the final LDM checkpoint: 1,000 samples per setting, their FID against
         the first 10,000 *train* images (so the choice never looks at t10k) and their prompt adherence; the
         setting with the lowest FID among those with adherence >= 0.85 is the one ``score`` uses (unless
         ``--steps`` / ``--guidance-scale`` are given)
  score  the first stage's PSNR / SSIM (``eval.reconstruction``) and rFID over 5,000 t10k images; for every LDM
         checkpoint and baseline snapshot: ``--curve-samples`` images (``--fid-samples`` for the
         last) with the chosen DDIM steps and guidance (both models alike), sample i prompted with class i % 10
         from seed i; FID with ``python -m eval.fid`` against all t10k images; the real-data floor (the first
         ``--fid-samples`` train images against t10k); prompt adherence of the final sets by the judge
  report ``docs/results/fmnist_ldm.json`` (``--report-dir``) and ``.md``, the FID-against-time plot, the 10 x 8
         sample grids and the first stage's reconstructions (PNG)

Scores are kept under ``<out>/scores``: the LDM's samples, the sampler's choice and the first stage's reconstructions
per decoder (``gan_decoder/`` or, with ``--decoder-steps 0``, ``trained_decoder/``), the baseline's samples and the
reference statistics shared by both.

``--smoke`` shrinks every number (seconds of training, tens of images) to check the chain, not the models.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from studies.fmnist_scores import BASELINE, REPO, Scoring, tars
from studies.quickstart import FIRST_STAGE_RECIPE, PY, StageError, run_stage

# the decoder's fine-tune: L1 + the patch GAN from its first step (adaptive weight 0.5, hinge), Adam 0.5/0.9
DECODER_RECIPE = ["train.micro_batch=16", "train.optim.base_lr=1e-4", "train.optim.lr_scaling=none",
                  "first_stage.lossconfig.disc_start=0", "first_stage.lossconfig.perceptual_weight=0"]
FULL = {"sampler_samples": 1000, "sampler_reference": 10000, "ae_steps": 6400, "budget_s": 2400.0, "fid_samples": 5000, "curve_samples": 500, "baseline_final": 1000, "train_shards": 60,
        "t10k_shards": 10, "reference_images": 10000, "judge_epochs": 3, "ldm_checkpoint_every": 24000, "baseline_snapshot_every_s": 600.0, "baseline_curve_stride": 2,
        "decoder_steps": 1200}
SMOKE = {"sampler_samples": 20, "sampler_reference": 100, "ae_steps": 20, "budget_s": 15.0, "fid_samples": 40, "curve_samples": 20, "baseline_final": 20, "train_shards": 2,
         "t10k_shards": 1, "reference_images": 100, "judge_epochs": 1, "ldm_checkpoint_every": 64, "curve_points": 2, "baseline_snapshot_every_s": 8.0, "baseline_curve_stride": 1,
         "decoder_steps": 4}


class Reference(Scoring):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, Path(args.out)
        self.n = SMOKE if args.smoke else FULL
        self.budget = args.budget_s if args.budget_s is not None else self.n["budget_s"]
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.raw = self.out / "raw"
        self.ae_dir = self.out / "runs" / "autoencoder" / "fmnist_kl_f4_ref"
        self.ae_export = self.ae_dir / "export" / "first_stage.safetensors"
        self.dec_dir = self.out / "runs" / "autoencoder" / "fmnist_kl_f4_gan"
        self.dec_export = self.dec_dir / "export" / "first_stage.safetensors"
        self.decoder_steps = args.decoder_steps if args.decoder_steps is not None else self.n["decoder_steps"]
        # the first stage the samples and the reconstructions are decoded with
        self.decoder = self.dec_export if self.decoder_steps else self.ae_export
        self.judge = self.out / "judge.safetensors"
        self.ldm_dir = self.out / "runs" / "fmnist_txt2img" / "reference"
        self.base_dir = self.out / "runs" / "pixel_ddpm"
        # the baseline's samples and the reference statistics are shared; the LDM's samples and the first stage's
        # reconstructions depend on the decoder, so each decoder has its own folder (a rerun with the other
        # --decoder-steps never reuses images the other one decoded)
        self.scores = self.out / "scores"
        self.score_dir = self.scores / ("gan_decoder" if self.decoder_steps else "trained_decoder")
        # a smoke run never overwrites the committed results
        default_report = self.out / "reference" if args.smoke else REPO / "docs" / "results"
        self.report_dir = Path(args.report_dir) if args.report_dir else default_report
        self.t10k_stats = self.out / "t10k_fid_stats.npz"

    # ---------------------------------------------------------------------------------------------- prep
    def prep(self) -> None:
        from data_prep.fashion_mnist import main as fmnist_main  # noqa: F401  (fails early without the package)

        for split, shards in (("train", self.n["train_shards"]), ("t10k", self.n["t10k_shards"])):
            if not (self.raw / split / f"{shards - 1:06d}.tar").exists():
                limit = [] if not self.args.smoke else [f"limit={shards * 1000}"]
                run_stage(f"data_{split}", [PY, "-m", "data_prep.fashion_mnist", f"output={self.raw / split}",
                                            f"split={split}", "resolution=32", *limit], self.logs)
        if not self.ae_export.exists():
            run_stage("first_stage", [
                PY, "-m", "ldm_train.train_autoencoder", "first_stage=fmnist_kl_f4",
                f"data.input={tars(self.raw / 'train', self.n['train_shards'])}",
                f"data.heldout={tars(self.raw / 't10k', 1)}", f"runs_root={self.out / 'runs'}",
                "run_name=fmnist_kl_f4_ref", *FIRST_STAGE_RECIPE, f"train.max_steps={self.n['ae_steps']}",
                "train.log_every=200", "train.eval_every=1600", "train.image_every=1600",
                "train.checkpoint.every_steps=800", "train.eval_images=256", "data.num_workers=1", "logger=disabled"],
                self.logs)
        latents = self.out / "latents" / "fmnist_kl_f4" / "manifest.json"
        if not latents.exists():
            run_stage("encode", [
                PY, "-m", "data_prep.encode", f"input={tars(self.raw / 'train', self.n['train_shards'])}",
                f"output={self.out / 'latents'}", "resolution=32", "first_stage=fmnist_kl_f4",
                f"first_stage.checkpoint={self.ae_export}", "num_workers=0"], self.logs)
        if self.decoder_steps and self.dec_export.exists():
            self._check_decoder_steps()
        if self.decoder_steps and not self.dec_export.exists():
            run_stage("first_stage_decoder", [
                PY, "-m", "ldm_train.train_autoencoder", "first_stage=fmnist_kl_f4",
                f"first_stage.checkpoint={self.ae_export}", "train.trainable=decoder",
                f"data.input={tars(self.raw / 'train', self.n['train_shards'])}",
                f"data.heldout={tars(self.raw / 't10k', 1)}", f"runs_root={self.out / 'runs'}",
                "run_name=fmnist_kl_f4_gan", *DECODER_RECIPE, f"train.max_steps={self.decoder_steps}",
                "train.log_every=100", f"train.eval_every={self.decoder_steps}",
                f"train.image_every={self.decoder_steps}", "train.checkpoint.every_steps=200",
                "train.eval_images=256", "data.num_workers=1", "logger=disabled"], self.logs)
        if not self.judge.exists():
            limit = ["--train-images", "2000"] if self.args.smoke else []
            run_stage("judge", [PY, "-m", "eval.fmnist_judge", "train", "--out", str(self.judge),
                                "--epochs", str(self.n["judge_epochs"]), *limit], self.logs)

    def _check_decoder_steps(self) -> None:
        """The fine-tuned decoder on disk was trained for the steps asked for (else its scores would be misnamed)."""
        import yaml

        config = self.dec_dir / "config.yaml"
        steps = (yaml.safe_load(config.read_text()) or {}).get("train", {}).get("max_steps") if config.exists() else None
        if steps is not None and int(steps) != self.decoder_steps:
            raise StageError(f"{self.dec_dir} was fine-tuned for {steps} steps, not --decoder-steps "
                             f"{self.decoder_steps}: pass --decoder-steps {steps}, or move that folder away to "
                             "fine-tune again")

    # ---------------------------------------------------------------------------------------------- train
    def ldm_cmd(self) -> list[str]:
        return [PY, "-m", "ldm_train.train", "experiment=fmnist_txt2img", f"data.latents_root={self.out / 'latents'}",
                f"first_stage.checkpoint={self.ae_export}", f"runs_root={self.out / 'runs'}", "run_name=reference",
                f"train.time_budget_s={self.budget}",
                f"train.checkpoint.every_samples={self.n['ldm_checkpoint_every']}"] + (
                ["train.log_every_samples=128", "train.global_batch=32", "train.micro_batch=32",
                 "train.optim.warmup_samples=64"] if self.args.smoke else [])

    def baseline_cmd(self) -> list[str]:
        return [PY, str(BASELINE), "train", "--data", str(self.raw / "train"), "--out", str(self.base_dir),
                "--budget-s", str(self.budget), "--snapshot-every-s", str(self.n["baseline_snapshot_every_s"]),
                "--threads", "1", "--batch-size", "32", "--warmup-steps", "100"] + (
                # a smoke's UNet has a quarter of the channels (its sampling took ~65 of ~450 s at the recipe's 32);
                # sampling reads the width from the snapshot
                ["--batch-size", "16", "--warmup-steps", "2", "--width", "8"] if self.args.smoke else [])

    def train(self) -> None:
        """Both trainings at once, one thread each: the same cores, the same wall time, the same load."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        procs = []
        for name, cmd in (("ldm", self.ldm_cmd()), ("baseline", self.baseline_cmd())):
            if self._trained(name):
                print(f"==> [{name}] already trained for {self.budget:g} s: kept", flush=True)
                continue
            print(f"==> [{name}] {' '.join(cmd)}", flush=True)
            log = open(self.logs / f"train_{name}.log", "a")
            procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        failed = []
        for name, proc, log in procs:
            rc = proc.wait()
            log.close()
            print(f"<== [{name}] exit {rc}", flush=True)
            if rc != 0:
                failed.append(f"{name} (exit {rc}, log {self.logs / f'train_{name}.log'})")
        if failed:
            raise StageError("training failed: " + ", ".join(failed) + "; run the same command again to resume")

    def _trained(self, name: str) -> bool:
        """Whether a finished run of ``name`` already spent the whole budget (a rerun then starts no process)."""
        if name == "ldm":
            summary = self.ldm_dir / "train_summary.json"
            return summary.exists() and json.loads(summary.read_text()).get("train_wall_s", 0.0) >= self.budget
        snaps = self.base_dir / "snapshots.jsonl"
        lines = snaps.read_text().splitlines() if snaps.exists() else []
        return bool(lines) and json.loads(lines[-1])["train_wall_s"] >= self.budget


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m studies.fmnist_reference", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/fmnist")
    ap.add_argument("--stages", default="prep,train,sampler,score,report")
    ap.add_argument("--budget-s", type=float, default=None, help="training seconds of each model (default 2400)")
    ap.add_argument("--steps", type=int, default=None,
                    help="DDIM steps of both models (default: the sampler stage's choice, else 20)")
    ap.add_argument("--guidance-scale", type=float, default=None,
                    help="guidance of both models (default: the sampler stage's choice, else 2.0)")
    ap.add_argument("--decoder-steps", type=int, default=None,
                    help="steps of the decoder's patch-GAN fine-tune (default 1200; 0: none, decode with the first stage as trained)")
    ap.add_argument("--threads", type=int, default=2, help="threads for sampling (training: one each)")
    ap.add_argument("--report-dir", default=None, help="where the JSON and PNGs go (default docs/results)")
    ap.add_argument("--smoke", action="store_true", help="seconds and tens of images: checks the chain only")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    ref = Reference(args)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - {"prep", "train", "sampler", "score", "report"}
    if unknown:
        ap.error(f"--stages: unknown {sorted(unknown)}; use prep, train, sampler, score, report")
    t0 = time.time()
    try:
        for stage in stages:
            getattr(ref, stage)()
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
