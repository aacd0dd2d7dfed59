"""The paper's f-sweep (Sec. 4.1, Fig. 6) end to end at CPU scale: ``python -m studies.fsweep [--out fsweep_out]``.

Each stage is its own command line (logs in ``<out>/logs/``), as on a cluster:

  1. ``studies.first_stage_family``  Fashion-MNIST at 32 px (train + t10k tars) and the KL first stages f = 2, 4, 8, 16,
                                  each with its reconstruction PSNR / rFID (the pixel point, f=1, needs none)
  2. ``data_prep.encode``         latent shards of the training images with every first stage (``first_stage=pixel``
                                  stores the pixels)
  3. ``ldm_train.train -m``       Hydra multiruns over ``first_stage=pixel,fmnist_kl_f2,...`` with
                                  ``experiment=fsweep_fmnist``: the same UNet, text encoder and recipe for every
                                  point and EQUAL COMPUTE: each trains for ``--budget-s`` seconds of training steps
                                  (``train.time_budget_s``), with the in-training FID of K samples against the t10k
                                  images at ``--moments`` evenly spaced moments of that budget and a larger final FID
                                  (``--final-fid-samples``), each with its bootstrap std. One multirun per point in
                                  ``<out>/sweep/<point>_s<seed>/``, ``--jobs`` side by side (``--threads`` threads
                                  each); ``--second-seed`` trains the named points again with ``train.seed=1``. All
                                  points share one W&B group.
  4. ``studies.sweep_report``        the tables and the FID-vs-samples / FID-vs-time plot (``<out>/sweep/report/``)

A re-run with the same ``--out`` skips finished first stages and latents and resumes every point from its last
checkpoint (the run dirs are named after the first stage).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from studies.quickstart import StageError, output_dirs, run_stage, stage_env

PY = sys.executable
POINTS = ("pixel", "fmnist_kl_f2", "fmnist_kl_f4", "fmnist_kl_f8", "fmnist_kl_f16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="fsweep_out", help="output directory (deleted first with --fresh)")
    p.add_argument("--fresh", action="store_true", help="delete --out before starting")
    p.add_argument("--points", default=",".join(POINTS), help="first stages of the sweep (pixel = LDM-1)")
    p.add_argument("--train-images", type=int, default=60000, help="Fashion-MNIST training images (first stages and LDMs)")
    p.add_argument("--heldout-images", type=int, default=3000, help="t10k images: the in-training FID's reference "
                   "(more than the Inception's 2,048 dimensions, so its covariance is full rank)")
    p.add_argument("--ae-steps", type=int, default=None, help="first-stage steps (default: the family command's)")
    p.add_argument("--ae-eval-images", type=int, default=1000, help="t10k images for first-stage PSNR / SSIM / rFID")
    p.add_argument("--budget-s", type=float, default=480, help="training seconds per point (train.time_budget_s; "
                   "0: a sample budget instead, --samples)")
    p.add_argument("--moments", type=int, default=5, help="in-training FIDs per point, evenly spread over the budget")
    p.add_argument("--samples", type=int, default=None, help="with --budget-s 0: LDM training length in samples "
                   "seen, every point (default: the experiment preset's train.total_samples)")
    p.add_argument("--fid-every", type=int, default=None, help="with --budget-s 0: in-training FID interval in samples")
    p.add_argument("--fid-samples", type=int, default=250, help="K, generated images per in-training FID")
    p.add_argument("--final-fid-samples", type=int, default=1000, help="generated images of each point's final FID")
    p.add_argument("--bootstrap", type=int, default=20, help="bootstrap resamples per FID (its std; 0: none)")
    p.add_argument("--jobs", type=int, default=2, help="multiruns side by side (one point each at a time)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of each training process")
    p.add_argument("--second-seed", default="", help="points trained again with train.seed=1 (comma-separated)")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every point (key=value)")
    return p.parse_args(argv)


def _family(a: argparse.Namespace, out: Path, logs: Path, env: dict[str, str]) -> dict[str, Any]:
    """Train (or reuse) the first stages; returns {name: family row} and the data specs."""
    presets = [p for p in a.points.split(",") if p != "pixel"]
    cmd = [PY, "-m", "studies.first_stage_family", "--out", str(out / "first_stages"),
           "--train-images", str(a.train_images)]
    if presets:
        cmd += ["--presets", ",".join(presets)]
    if a.ae_steps is not None:
        cmd += ["--steps", str(a.ae_steps)]
    cmd += ["--eval-images", str(a.ae_eval_images)]
    run_stage("first_stages", cmd, logs, env)
    return {r["name"]: r for r in json.loads((out / "first_stages" / "family.json").read_text())}


def _heldout(out: Path, images: int) -> str:
    """The in-training FID's reference: the first ``images`` t10k images at 32 px (written once)."""
    from data_prep.fashion_mnist import write_fashion_mnist

    folder = out / "heldout"
    marker = folder / "_done.json"
    if not (marker.is_file() and json.loads(marker.read_text()).get("images") == images):
        if folder.exists():
            shutil.rmtree(folder)
        write_fashion_mnist(str(folder), "t10k", images, 32, shard_size=5000)
        marker.write_text(json.dumps({"images": images}) + "\n")
    return _tar_spec(folder)


def _tar_spec(folder: Path) -> str:
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise StageError(f"no .tar shards in {folder}: the first_stages stage writes them; re-run with --fresh")
    first, last = tars[0].stem, tars[-1].stem
    return str(folder / (f"{{{first}..{last}}}.tar" if first != last else f"{first}.tar"))


def _reference_stats(out: Path, heldout_spec: str, images: int, k: int) -> None:
    """The in-training FID's reference statistics, computed once here (all threads) into the cache every point
    reads, instead of by each of the points that start side by side."""
    import torch

    from ldm_train.trainer.config import FIDConfig
    from ldm_train.trainer.fid import InTrainingFID

    cfg = FIDConfig(every_samples=1, num_samples=k, reference=heldout_spec, reference_images=images, batch_size=50)
    InTrainingFID(cfg, None, 32, str(out / "runs"), rank=0, world_size=1, device=torch.device("cpu")).prepare()


def _sweep_cmd(a: argparse.Namespace, out: Path, sweep_dir: Path, group: list[str], seed: int,
               heldout_spec: str) -> list[str]:
    """A Hydra multirun over ``group`` (its points one after another), every point in the W&B group fsweep."""
    cmd = [PY, "-m", "ldm_train.train", "-m", "experiment=fsweep_fmnist", f"first_stage={','.join(group)}",
           f"data.latents_root={out / 'latents'}", f"runs_root={out / 'runs'}", f"hydra.sweep.dir={sweep_dir}",
           f"train.seed={seed}", "run_name=${first_stage.name}_s${train.seed}", "logger.sweep=fsweep",
           f"train.fid.reference='{heldout_spec}'", f"train.fid.reference_images={a.heldout_images}",
           f"train.fid.num_samples={a.fid_samples}", f"train.fid.final_num_samples={a.final_fid_samples}",
           f"train.fid.bootstrap={a.bootstrap}", "logger.mode=offline"]
    if a.budget_s:
        every_s = a.budget_s / max(1, a.moments)
        # the budget ends the run; the sample count is only a ceiling. Checkpoints, grids at each FID moment.
        cmd += [f"train.time_budget_s={a.budget_s}", f"train.fid.every_s={every_s:g}", "train.fid.every_samples=0",
                "train.total_samples=100000000", "train.checkpoint.every_samples=0", "train.log_every_samples=160",
                "train.sampling.every_samples=0"]
    else:
        for flag, key in ((a.samples, "train.total_samples"), (a.fid_every, "train.fid.every_samples")):
            if flag is not None:
                cmd.append(f"{key}={flag}")
        if a.fid_every is not None:  # checkpoints and grids at the FID interval too
            cmd += [f"train.checkpoint.every_samples={a.fid_every}", f"train.sampling.every_samples={a.fid_every}"]
    return cmd + list(a.extra)


def _run_parallel(stages: list[tuple[str, list[str]]], logs: Path, env: dict[str, str], jobs: int) -> float:
    """Run the stages ``jobs`` at a time, in order (each as run_stage would, log in ``logs/<name>.log``)."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.time()
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(run_stage, name, cmd, logs, env) for name, cmd in stages]
        errors = [f.exception() for f in futures]
    failed = [e for e in errors if e is not None]
    if failed:
        raise failed[0]
    return time.time() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    out, logs = output_dirs(a.out, a.fresh)
    t_start = time.time()
    env = stage_env(a.threads)
    times: dict[str, float] = {}
    points = a.points.split(",")

    t0 = time.time()
    family = _family(a, out, logs, env)
    times["first_stages"] = time.time() - t0
    train_spec = _tar_spec(out / "first_stages" / "raw" / "train")
    heldout_spec = _heldout(out, a.heldout_images)

    for name in points:
        if (out / "latents" / name / "manifest.json").is_file():
            print(f"==> [encode_{name}] done before, reusing {out / 'latents' / name}", flush=True)
            continue
        cmd = [PY, "-m", "data_prep.encode", f"input='{train_spec}'", f"output={out / 'latents'}",
               f"first_stage={name}", "resolution=32", "progress=false"]
        if name != "pixel":
            cmd.append(f"first_stage.checkpoint={family[name]['checkpoint']}")
        times[f"encode_{name}"] = run_stage(f"encode_{name}", cmd, logs, env)

    sweep_dir = out / "sweep"
    t0 = time.time()
    _reference_stats(out, heldout_spec, a.heldout_images, a.fid_samples)
    times["fid_reference"] = time.time() - t0
    tasks = [(name, 0) for name in points] + [(name, 1) for name in a.second_seed.split(",") if name]
    times["sweep"] = _run_parallel(
        [(f"sweep_{name}_s{seed}", _sweep_cmd(a, out, sweep_dir / f"{name}_s{seed}", [name], seed, heldout_spec))
         for name, seed in tasks], logs, env, a.jobs)
    times["report"] = run_stage("report", [PY, "-m", "studies.sweep_report", str(sweep_dir)], logs, env)

    report_path = sweep_dir / "report" / "report.json"
    report = json.loads(report_path.read_text())
    command = "python -m studies.fsweep " + " ".join(argv if argv is not None else sys.argv[1:])
    # one file with everything the answer rests on: the points, per f over seeds, and the first-stage table
    report.update(command=command, first_stages=list(family.values()), train_budget_s=a.budget_s or None,
                  fid_reference={"images": a.heldout_images, "split": "t10k", "resolution": 32})
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    (sweep_dir / "report" / "first_stages.md").write_text((out / "first_stages" / "family.md").read_text())
    summary = {"command": command,
               "points": points, "first_stages": family, "report": str(sweep_dir / "report"),
               "report_rows": report.get("rows"), "stage_wall_s": {k: round(v, 1) for k, v in times.items()},
               "wall_s": round(time.time() - t_start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print((sweep_dir / "report" / "sweep_report.md").read_text(), flush=True)
    print(f"wall {summary['wall_s']:.0f} s; summary {out / 'summary.json'}", flush=True)
    return summary


if __name__ == "__main__":
    try:
        main()
    except StageError as err:
        print(f"[fsweep] {err}", file=sys.stderr)
        sys.exit(1)
