"""A first-stage family on Fashion-MNIST at 32 px (f = 2, 4, 8, 16): train each, then PSNR / SSIM / rFID.

``python -m studies.first_stage_family --out DIR [--steps N] [--presets fmnist_kl_f2,...] [--train-images N]
[--eval-images N]``

The paper's f-sweep (Sec. 4.1 / Fig. 6) at our scale. Each stage runs as its own command line (as in
``studies.quickstart``), with its log in ``DIR/logs/``:

  0. ``data_prep.fashion_mnist``       train and t10k splits at 32 px under ``DIR/raw/`` (once; in this process)
  1. ``ldm_train.train_autoencoder``   each preset for ``--steps`` steps (L1 + KL: the presets switch LPIPS and
                                       the GAN off) -> ``DIR/runs/autoencoder/<preset>/export/first_stage.safetensors``
  2. ``eval.reconstruction``           the first ``--eval-images`` t10k images: PSNR, SSIM, rFID (the real FID
                                       Inception; LPIPS off: no VGG weights offline)

Beside each export ``X.safetensors`` it writes ``X.reconstruction.json`` = {psnr, ssim, rfid, num_images,
resolution} (the contract the sweep report reads), then ``DIR/family.json`` (one row per preset) and the
table ``DIR/family.md``. A re-run skips presets already trained for ``--steps`` and evaluated on
``--eval-images`` images (more eval images re-run only the eval), and refuses training data, batch or lr other
than what the finished presets saw, naming the flags that match them. rFID over 1,000 images is a small-sample FID (biased upwards): compare the presets
with each other, not with the paper's 50k-image rFIDs.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_prep.fashion_mnist import DEFAULT_ROOT, write_fashion_mnist
from studies.quickstart import PY, StageError, output_dirs, run_stage

RESOLUTION = 32
PRESETS = ("fmnist_kl_f2", "fmnist_kl_f4", "fmnist_kl_f8", "fmnist_kl_f16")
SPLIT_SIZES = {"train": 60000, "t10k": 10000}
# The recipe of the reference run's first stage (studies.quickstart.FIRST_STAGE_RECIPE): Adam at 1e-3 for batch 8,
# 100 warm-up steps, cosine decay to 0. Measured on the shared 2-core machine (fmnist_kl_f4, one thread, 32 px):
# 6,400 steps in about 12 minutes reach 30.3 dB PSNR over 5,000 t10k images; 4,800 steps see 38,400 of the
# 60,000 training images, none twice.
DEFAULTS = {"steps": 4800, "batch_size": 8, "lr": 1e-3, "warmup_steps": 100, "decay": "cosine",
            "train_images": 60000, "eval_images": 1000}
CONTRACT_KEYS = ("psnr", "ssim", "rfid", "num_images", "resolution")


def reconstruction_json_path(export: Path) -> Path:
    """``X.safetensors`` -> ``X.reconstruction.json`` (the sweep report's input)."""
    return export.with_name(export.name.removesuffix(".safetensors") + ".reconstruction.json")


def _tars(folder: Path) -> str:
    """The shards of ``folder`` as a brace pattern, quoted for Hydra's override grammar."""
    tars = sorted(p.stem for p in folder.glob("*.tar"))
    if not tars:
        raise StageError(f"no .tar shards in {folder}: delete {folder} and run again to rewrite the data")
    return f"'{folder}/{{{tars[0]}..{tars[-1]}}}.tar'"


def _load_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _write_json(path: Path, obj: Any) -> None:
    from ldm_train.data.fsspec_io import write_text

    write_text(path, json.dumps(obj, indent=2) + "\n")


def check_inputs(presets: Sequence[str], steps: int, train_images: int, eval_images: int, root: str) -> list[Any]:
    """Refuse bad input before any work; returns the presets' typed FirstStageConfigs."""
    from ldm_train.app import CONF_DIR, compose
    from ldm_train.first_stage.config import AutoencoderAppConfig  # lighter to import than the eval's config

    if not presets:
        raise ValueError("--presets is empty: name at least one preset, e.g. --presets fmnist_kl_f4")
    for name, value, top in (("--steps", steps, None), ("--train-images", train_images, SPLIT_SIZES["train"]),
                             ("--eval-images", eval_images, SPLIT_SIZES["t10k"])):
        if value < 1 or (top is not None and value > top):
            raise ValueError(f"{name}={value}: use 1..{top or 'any'}")
    for split in SPLIT_SIZES:
        path = os.path.join(root, f"{split}-images-idx3-ubyte.gz")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: `apt-get install dataset-fashion-mnist` (Debian) puts "
                                    f"Fashion-MNIST in {DEFAULT_ROOT}, or pass --root DIR holding the *-ubyte.gz files")
    configs = []
    for name in presets:
        yaml = CONF_DIR / "first_stage" / f"{name}.yaml"
        if not yaml.is_file():
            known = ", ".join(sorted(p.stem for p in (CONF_DIR / "first_stage").glob("fmnist_*.yaml")))
            raise FileNotFoundError(f"--presets {name}: {yaml} does not exist; the family's presets are {known}")
        fs = compose("train_autoencoder", AutoencoderAppConfig, [f"first_stage={name}", "data.input=-"]).first_stage
        if fs.ddconfig.resolution != RESOLUTION or fs.kind != "kl":
            raise ValueError(f"{yaml}: kind {fs.kind}, ddconfig.resolution {fs.ddconfig.resolution}, but the family "
                             f"is KL first stages at {RESOLUTION} px: pick a fmnist_kl_f* preset")
        configs.append(fs)
    return configs


def prepare_data(out: Path, train_images: int, eval_images: int, root: str) -> dict[str, str]:
    """Write the train and t10k splits at 32 px once; returns {split: quoted brace pattern}.

    The train split must match the one the finished presets saw; the t10k split is rewritten when more
    eval images are asked for (sample i is always image i, so the first ones stay the same).
    """
    patterns = {}
    for split, n in (("train", train_images), ("t10k", eval_images)):
        folder = out / "raw" / split
        marker = folder / "_done.json"
        want = {"split": split, "images": n, "resolution": RESOLUTION, "root": root}
        done = _load_json(marker)
        if done is not None and split == "train" and done != want:
            raise StageError(f"{marker} says {done} but this run asks for {want}: pass --train-images "
                             f"{done['images']} (and --root {done['root']}) to continue this family, or use another --out")
        if done is None or (split == "t10k" and (done["images"] < n or done["root"] != root)):
            if folder.exists():
                shutil.rmtree(folder)
            # in this process: a subprocess would only add its start-up (torch import) to a few seconds of work
            print(f"==> [fashion_mnist_{split}] python -m data_prep.fashion_mnist output={folder} split={split} "
                  f"limit={n} resolution={RESOLUTION} shard_size=5000 root={root}", flush=True)
            t0 = time.time()
            write_fashion_mnist(str(folder), split, n, RESOLUTION, shard_size=5000, root=root)
            print(f"<== [fashion_mnist_{split}] {time.time() - t0:.0f} s", flush=True)
            _write_json(marker, want)
        patterns[split] = _tars(folder)
    return patterns


def train_preset(name: str, out: Path, train_tars: str, eval_tars: str, steps: int, batch_size: int, lr: float,
                 logger: str, logs: Path, env: dict[str, str], warmup_steps: int = DEFAULTS["warmup_steps"],
                 decay: str = DEFAULTS["decay"]) -> tuple[Path, float | None]:
    """Train ``name`` to ``steps`` steps unless its export already holds them; returns (export, wall s or None).

    A run stopped half-way resumes from its last checkpoint (the trainer does that for the same run name).
    """
    run_dir = out / "runs" / "autoencoder" / name
    export = run_dir / "export" / "first_stage.safetensors"
    info = _load_json(export.with_suffix(".json"))  # written after the weights: its presence means a whole export
    settings = _load_json(run_dir / "family_train.json") or {}
    changed = {k: settings[k] for k, v in (("batch_size", batch_size), ("lr", lr), ("warmup_steps", warmup_steps),
                                           ("decay", decay)) if settings.get(k, v) != v}
    if info is not None and changed:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items())
        raise StageError(f"{run_dir / 'family_train.json'}: {name} was trained with {flags}, not this run's "
                         f"settings: pass {flags} to continue this family, or use another --out")
    if info is not None and info.get("step") == steps:
        return export, None
    if info is not None and info.get("step", 0) > steps:
        raise StageError(f"{export} was trained for {info['step']} steps, more than --steps {steps}: pass --steps "
                         f"{info['step']} to reuse it, delete {run_dir} to retrain, or use another --out")
    every = str(steps)  # one eval, checkpoint and image grid, at the end
    wall = run_stage(f"train_{name}", [
        PY, "-m", "ldm_train.train_autoencoder", f"first_stage={name}", f"data.input={train_tars}",
        f"data.heldout={eval_tars}", f"runs_root={out / 'runs'}", "run_group=autoencoder", f"run_name={name}",
        f"train.max_steps={steps}", f"train.micro_batch={batch_size}", f"train.optim.base_lr={lr}",
        "train.optim.lr_scaling=none", f"train.optim.warmup_steps={warmup_steps}", f"train.optim.lr_decay={decay}",
        f"train.eval_every={every}", f"train.checkpoint.every_steps={every}", f"train.image_every={every}",
        "train.log_every=50", "train.checkpoint.keep_last=1", "data.num_workers=1", f"logger={logger}"], logs, env)
    info = _load_json(export.with_suffix(".json"))
    if info is None or info.get("step") != steps:
        raise StageError(f"train_{name} finished but {export.with_suffix('.json')} does not record step {steps}: "
                         f"see {logs / f'train_{name}.log'}")
    return export, wall


def evaluate_preset(name: str, export: Path, out: Path, eval_tars: str, eval_images: int, logs: Path,
                    env: dict[str, str]) -> dict[str, Any]:
    """PSNR / SSIM / rFID of ``export`` unless ``X.reconstruction.json`` already holds them for these images."""
    contract = reconstruction_json_path(export)
    done = _load_json(contract)
    if done is not None and done.get("num_images") == eval_images and contract.stat().st_mtime >= export.stat().st_mtime:
        return done
    eval_dir = out / "eval" / name
    if eval_dir.exists():
        # eval.reconstruction adds its PNGs to what the folder holds (rFID would read a larger earlier run's
        # leftovers) and caches the originals' statistics under a name that ignores which images they were
        shutil.rmtree(eval_dir)
    run_stage(f"reconstruction_{name}", [
        PY, "-m", "eval.reconstruction", f"first_stage={name}", f"first_stage.checkpoint={export}",
        f"images={eval_tars}", f"num_images={eval_images}", "lpips.enabled=false", f"output_dir={eval_dir}",
        "batch_size=50", "metrics.save_cpu_ram=true"], logs, env)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    row = {k: metrics.get(k) for k in CONTRACT_KEYS}
    bad = [k for k in CONTRACT_KEYS if not isinstance(row[k], (int, float)) or not math.isfinite(row[k])]
    if bad:
        raise StageError(f"{eval_dir / 'metrics.json'}: {', '.join(f'{k}={row[k]!r}' for k in bad)} is not a finite "
                         f"number; see {logs / f'reconstruction_{name}.log'}")
    if row["num_images"] != eval_images:
        raise StageError(f"{eval_dir / 'metrics.json'} read {row['num_images']} images, not --eval-images "
                         f"{eval_images}: rewrite {out / 'raw' / 't10k'} (delete it) and run again")
    _write_json(contract, row)
    return row


def mean_image_psnr(eval_tars: str, eval_images: int) -> float:
    """Mean PSNR of the eval images against their mean image ([0, 1], as eval.reconstruction measures):
    the floor a first stage must clear."""
    import torch

    from eval.reconstruction_metrics import psnr
    from ldm_train.data.readers import image_dataset

    samples = itertools.islice(image_dataset(eval_tars.strip("'"), RESOLUTION), eval_images)
    images = [s["image"] for s in samples]
    x = (torch.stack(images) + 1) / 2
    return float(psnr(x, x.mean(0, keepdim=True).expand_as(x)).mean())


def train_family(out_dir: str | Path, presets: Sequence[str] = PRESETS, steps: int = DEFAULTS["steps"], *,
                 train_images: int = DEFAULTS["train_images"], eval_images: int = DEFAULTS["eval_images"],
                 batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"], logger: str = "wandb",
                 root: str = DEFAULT_ROOT, warmup_steps: int = DEFAULTS["warmup_steps"],
                 decay: str = DEFAULTS["decay"]) -> list[dict[str, Any]]:
    """Train and evaluate each preset into ``out_dir`` (resumable); returns the rows of ``family.json``."""
    configs = check_inputs(presets, steps, train_images, eval_images, root)
    out, logs = output_dirs(out_dir)
    # One intra-op thread per process: a loader worker runs beside each stage; on the shared 2-core machine
    # 2 threads trained fmnist_kl_f4 at 5.6 samples/s against 30 with 1.
    env = {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1", "TOKENIZERS_PARALLELISM": "false"}
    tars = prepare_data(out, train_images, eval_images, root)
    baseline = mean_image_psnr(tars["t10k"], eval_images)
    rows = []
    for name, fs in zip(presets, configs, strict=True):
        export, wall = train_preset(name, out, tars["train"], tars["t10k"], steps, batch_size, lr, logger, logs, env,
                                    warmup_steps, decay)
        walls = out / "runs" / "autoencoder" / name / "family_train.json"
        if wall is not None:
            _write_json(walls, {"train_steps": steps, "train_wall_s": round(wall, 1), "batch_size": batch_size,
                                "lr": lr, "warmup_steps": warmup_steps, "decay": decay,
                                "train_images": train_images})
        trained = _load_json(walls) or {}
        metrics = evaluate_preset(name, export, out, tars["t10k"], eval_images, logs, env)
        side = RESOLUTION // fs.downsample_factor
        rows.append({"name": name, "f": fs.downsample_factor, "z_channels": fs.embed_dim,
                     "latent_shape": [fs.embed_dim, side, side], "checkpoint": str(export),
                     "psnr": metrics["psnr"], "ssim": metrics["ssim"], "rfid": metrics["rfid"],
                     "num_images": metrics["num_images"], "psnr_mean_image": baseline,
                     "train_steps": steps, "train_wall_s": trained.get("train_wall_s")})
    _write_json(out / "family.json", rows)
    (out / "family.md").write_text(family_markdown(rows, trained_with(out, presets)))
    return rows


def trained_with(out: Path, presets: Sequence[str]) -> dict[str, Any]:
    """Batch, lr and training images of the first preset (the family shares them)."""
    first = _load_json(out / "runs" / "autoencoder" / presets[0] / "family_train.json") or {}
    return {k: first.get(k) for k in ("batch_size", "lr", "warmup_steps", "decay", "train_images")}


def family_markdown(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| preset | f | latent | PSNR (dB) | SSIM | rFID | train steps | train wall (s) |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        latent = "x".join(str(d) for d in r["latent_shape"])
        lines.append(f"| {r['name']} | {r['f']} | {latent} | {num(r['psnr'], '.2f')} | {num(r['ssim'], '.3f')} | "
                     f"{num(r['rfid'], '.1f')} | {r['train_steps']} | {num(r['train_wall_s'], '.0f')} |")
    n = rows[0]["num_images"] if rows else 0
    lines += ["", f"Fashion-MNIST t10k, first {n} images at {RESOLUTION} px. Mean-image baseline PSNR: "
              f"{num(rows[0]['psnr_mean_image'] if rows else None, '.2f')} dB. rFID: the FID Inception (pool3) "
              f"over {n} images, a small-sample FID biased upwards: compare rows, not published numbers. "
              f"Training: batch {settings.get('batch_size')}, lr {settings.get('lr')} ({settings.get('warmup_steps')} "
              f"warm-up steps, {settings.get('decay')} decay), L1 + KL (no LPIPS, no GAN), "
              f"{settings.get('train_images')} train images; wall time on the machine that ran it."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def csv(text: str) -> list[str]:
        return [p.strip() for p in text.split(",") if p.strip()]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (re-runs resume in it)")
    p.add_argument("--presets", type=csv, default=list(PRESETS), help="comma-separated conf/first_stage presets")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps per preset")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="Adam learning rate (not scaled by the batch)")
    p.add_argument("--warmup-steps", type=int, default=DEFAULTS["warmup_steps"], help="linear lr warm-up steps")
    p.add_argument("--decay", default=DEFAULTS["decay"], choices=("constant", "cosine"), help="lr after warm-up")
    p.add_argument("--train-images", type=int, default=DEFAULTS["train_images"], help="Fashion-MNIST train images")
    p.add_argument("--eval-images", type=int, default=DEFAULTS["eval_images"], help="t10k images for PSNR/SSIM/rFID")
    p.add_argument("--logger", default="wandb", help="first-stage trainer logger: wandb (offline) | disabled")
    p.add_argument("--root", default=DEFAULT_ROOT, help="folder of the Fashion-MNIST *-ubyte.gz files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    a = parse_args(argv)
    t0 = time.time()
    try:
        rows = train_family(a.out, a.presets, a.steps, train_images=a.train_images, eval_images=a.eval_images,
                            batch_size=a.batch_size, lr=a.lr, logger=a.logger, root=a.root,
                            warmup_steps=a.warmup_steps, decay=a.decay)
    except (ValueError, FileNotFoundError, StageError) as e:
        sys.exit(f"studies.first_stage_family: {e}")
    out = Path(a.out).resolve()
    print("\n" + (out / "family.md").read_text())
    print(f"rows: {out / 'family.json'} ({time.time() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
