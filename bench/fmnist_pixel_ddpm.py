"""The pixel-space peer baseline: a class-conditional DDPM on Fashion-MNIST built only from diffusers' classes.

    python bench/fmnist_pixel_ddpm.py train --data 'data/fmnist/raw/train' --out DIR --budget-s 2700 [--threads 1]
    python bench/fmnist_pixel_ddpm.py sample --out DIR [--snapshot NAME] --num-samples 5000 --steps 50 \
        --guidance-scale 2.0 --images DIR/samples

The recipe of diffusers' unconditional / class-conditional training examples at 32 px: ``UNet2DModel`` with a class
embedding (``num_class_embeds``; one extra row is the null class, so 10% label dropout gives classifier-free
guidance as the latent model has), ``DDPMScheduler`` (1000 steps, the DDPM linear betas, epsilon prediction),
AdamW with linear warm-up, ``EMAModel`` (warm-up, power 3/4), MSE on the noise. It reads the same image shards
the latent model's data came from (the PNGs ``data_prep.fashion_mnist`` writes; one grey channel is modelled and
written back as RGB), and uses none of ldm_train's model code. Training runs for a budget of training-step
seconds (``--budget-s``; time in snapshots and checkpoints is not counted) and keeps the EMA weights at
``--snapshot-every-s`` intervals under ``DIR/snapshots/`` for an FID-against-wall-time curve. It resumes from
``DIR/state.pt`` (written at each snapshot), so a killed run loses at most one interval.
``sample`` draws sample i of class i % 10 from seed ``--seed + i`` with ``DDIMScheduler`` (the same number of steps
and guidance scale as the latent model's eval), as PNG files that ``python -m eval.fid`` scores.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm_train.checkpoints.safe_load import load_weights_only
from ldm_train.data.fsspec_io import atomic_write

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the label-dropout row: the unconditional input of classifier-free guidance


def build_unet(width: int = 32):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        num_class_embeds=NUM_CLASSES + 1, norm_num_groups=8)


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")


def load_images(folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``<key>.png`` of the folder's tars as grey [N, 1, 32, 32] in [-1, 1], labels from ``<key>.json``."""
    tars = sorted(Path(folder).glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no .tar shards in {folder}: write them with python -m data_prep.fashion_mnist")
    images, labels = [], []
    for path in tars:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile():
                    key, ext = m.name.rsplit(".", 1)
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key in sorted(members):
            parts = members[key]
            grey = np.asarray(Image.open(io.BytesIO(parts["png"])).convert("L"))
            images.append(grey)
            labels.append(int(json.loads(parts["json"])["label"]))
    x = torch.from_numpy(np.stack(images)).float().div(127.5).sub(1).unsqueeze(1)
    return x, torch.tensor(labels)


def _save_state(out: Path, unet, ema, opt, step: int, wall: float, epoch_pos: tuple[int, int], gen) -> None:
    state = {"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
             "wall": wall, "epoch": epoch_pos[0], "pos": epoch_pos[1], "rng": gen.get_state()}
    with atomic_write(out / "state.pt") as f:
        torch.save(state, f)


def _snapshot(out: Path, unet, ema, step: int, samples: int, wall: float) -> None:
    from safetensors.torch import save_file

    snap = out / "snapshots"
    snap.mkdir(exist_ok=True)
    weights = {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
    ema_model = {n: p.detach().clone() for (n, _), p in zip(unet.named_parameters(), ema.shadow_params, strict=True)}
    weights.update(ema_model)  # the EMA of every parameter (buffers: none in this UNet)
    name = f"wall{int(round(wall)):05d}"
    save_file(weights, str(snap / f"{name}.safetensors"),
              {"step": str(step), "samples": str(samples), "train_wall_s": f"{wall:.1f}"})
    with open(out / "snapshots.jsonl", "a") as f:
        f.write(json.dumps({"name": name, "step": step, "samples": samples, "train_wall_s": round(wall, 1),
                            "width": unet.config.block_out_channels[0]}) + "\n")


def train(args: argparse.Namespace) -> None:
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as ldm_train does on CPU: subnormal floats are many times slower on x86
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    unet, sched = build_unet(args.width), build_scheduler()
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=args.warmup_steps)
    x, y = load_images(args.data)
    n = len(x)
    gen = torch.Generator().manual_seed(args.seed)
    step, wall, epoch, pos = 0, 0.0, 0, 0
    if (out / "state.pt").exists():
        state = load_weights_only(out / "state.pt", "the baseline's resume state")
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, wall, epoch, pos = state["step"], state["wall"], state["epoch"], state["pos"]
        gen.set_state(state["rng"])
        for _ in range(step):
            lr_sched.step()
        print(f"[baseline] resumed at step {step}, {wall:.0f} s of training", flush=True)
    params = sum(p.numel() for p in unet.parameters())
    print(f"[baseline] UNet2DModel {params:,} params, {n} images, batch {args.batch_size}, lr {args.lr}, "
          f"budget {args.budget_s} s, {args.threads} threads", flush=True)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + epoch))
    next_snap = (int(wall // args.snapshot_every_s) + 1) * args.snapshot_every_s
    loss_sum, loss_n, t_log = 0.0, 0, time.perf_counter()
    unet.train()
    while wall < args.budget_s:
        t0 = time.perf_counter()
        if pos + args.batch_size > n:
            epoch, pos = epoch + 1, 0
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + epoch))
        idx = perm[pos: pos + args.batch_size]
        pos += args.batch_size
        clean, labels = x[idx], y[idx].clone()
        labels[torch.rand(len(idx), generator=gen) < args.label_dropout] = NULL_CLASS
        noise = torch.randn(clean.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = sched.add_noise(clean, noise, t)
        loss = F.mse_loss(unet(noisy, t, class_labels=labels).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        step += 1
        wall += time.perf_counter() - t0
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        if step % 100 == 0:
            rate = loss_n * args.batch_size / (time.perf_counter() - t_log)
            print(f"[baseline] step {step} loss {loss_sum / loss_n:.4f} | {rate:.1f} samples/s | "
                  f"{wall:.0f}/{args.budget_s} s", flush=True)
            loss_sum, loss_n, t_log = 0.0, 0, time.perf_counter()
        if wall >= next_snap or wall >= args.budget_s:
            _snapshot(out, unet, ema, step, step * args.batch_size, wall)
            _save_state(out, unet, ema, opt, step, wall, (epoch, pos), gen)
            next_snap += args.snapshot_every_s
            t_log = time.perf_counter()
    print(f"[baseline] done: {step} steps, {step * args.batch_size} samples, {wall:.0f} s of training", flush=True)


@torch.no_grad()
def sample(args: argparse.Namespace) -> None:
    from diffusers import DDIMScheduler
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    snaps = [json.loads(line) for line in (out / "snapshots.jsonl").read_text().splitlines()]
    name = args.snapshot or snaps[-1]["name"]
    unet = build_unet(_snapshot_width(snaps, name, args.width, out))
    unet.load_state_dict(load_file(str(out / "snapshots" / f"{name}.safetensors")))
    unet.eval()
    ddim = DDIMScheduler.from_config(build_scheduler().config)
    ddim.set_timesteps(args.steps)
    images_dir = Path(args.images)
    images_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    for start in range(0, args.num_samples, args.batch_size):
        idx = list(range(start, min(start + args.batch_size, args.num_samples)))
        if all((images_dir / f"{i:06d}.png").exists() for i in idx):
            continue  # resumable: a finished batch is not drawn again
        labels = torch.tensor([i % NUM_CLASSES for i in idx])
        xt = torch.stack([torch.randn((1, 32, 32), generator=torch.Generator().manual_seed(args.seed + i))
                          for i in idx])
        for t in ddim.timesteps:
            inp = torch.cat([xt, xt])
            lab = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
            eps_c, eps_u = unet(inp, t, class_labels=lab).sample.chunk(2)
            eps = eps_u + args.guidance_scale * (eps_c - eps_u)
            xt = ddim.step(eps, t, xt, eta=0.0).prev_sample
        grey = ((xt.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
        for i, g in zip(idx, grey, strict=True):
            Image.fromarray(np.stack([g, g, g], -1)).save(images_dir / f"{i:06d}.png")
    print(json.dumps({"snapshot": name, "images": str(images_dir), "num_samples": args.num_samples,
                      "steps": args.steps, "guidance_scale": args.guidance_scale,
                      "wall_s": round(time.perf_counter() - t_start, 1)}), flush=True)


def _snapshot_width(snaps: list[dict], name: str, asked: int | None, out: Path) -> int:
    """The UNet width a snapshot was trained with (snapshots.jsonl; rows written before it was recorded: --width,
    else the default 32)."""
    rows = [r for r in snaps if r["name"] == name]
    if not rows:
        raise SystemExit(f"{out}/snapshots.jsonl has no snapshot {name!r}: choose one of {[r['name'] for r in snaps]}")
    if "width" not in rows[-1]:
        return asked or 32
    width = int(rows[-1]["width"])
    if asked is not None and asked != width:
        raise SystemExit(f"--width {asked}: snapshot {name!r} in {out} was trained with --width {width}; "
                         "drop --width or pass that one")
    return width


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("train", "sample"):
        s = sub.add_parser(name)
        s.add_argument("--out", required=True, help="the run folder (state, snapshots)")
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--width", type=int, default=None if name == "sample" else 32,
                       help="channels of the first level (then x2, x4); sample: the snapshot's")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--batch-size", type=int, default=64)
    t = sub.choices["train"]
    t.add_argument("--data", required=True, help="folder of Fashion-MNIST tars (python -m data_prep.fashion_mnist)")
    t.add_argument("--budget-s", type=float, required=True, help="seconds of training steps")
    t.add_argument("--snapshot-every-s", type=float, default=540.0)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--warmup-steps", type=int, default=500)
    t.add_argument("--label-dropout", type=float, default=0.1)
    s = sub.choices["sample"]
    s.add_argument("--snapshot", default=None, help="a snapshots/ name (default: the last)")
    s.add_argument("--num-samples", type=int, default=5000)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--guidance-scale", type=float, default=2.0)
    s.add_argument("--images", required=True, help="folder for the PNGs")
    args = p.parse_args(argv)
    (train if args.cmd == "train" else sample)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
