"""A Fashion-MNIST classifier that judges prompt adherence: is sample i of the prompted class?

    python -m eval.fmnist_judge train --out judge.safetensors [--epochs 3] [--train-images 60000]
    python -m eval.fmnist_judge score --weights judge.safetensors --images DIR [--classes-cycle 10]

``train`` fits a small CNN on the train split at 32 px (the images as ``data_prep.fashion_mnist`` writes them:
bicubic 28 -> 32) and stores its accuracy on all 10,000 t10k images in the file's metadata. ``score`` classifies
every PNG of a folder, in name order, and counts the share whose class is the prompted one: image i was drawn for
class ``i % 10`` (the eval's and the baseline's prompt order), so the prompted class needs no side file.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

NUM_CLASSES = 10


def build_judge() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),    # 16
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),   # 8
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),  # 4
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 16, 256), nn.ReLU(), nn.Linear(256, NUM_CLASSES))


def fmnist32(split: str, limit: int | None = None, root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 grey [N, 32, 32] and labels of a split, resized as the shards hold them (bicubic 28 -> 32)."""
    from PIL import Image

    from data_prep.fashion_mnist import DEFAULT_ROOT, load_split

    images, labels = load_split(split, root or DEFAULT_ROOT)
    images, labels = images[:limit], labels[:limit]
    out = np.stack([np.asarray(Image.fromarray(g, mode="L").convert("RGB").resize((32, 32), Image.BICUBIC))[..., 0]
                    for g in images])
    return out, labels.astype(np.int64)


def to_input(grey: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(grey), dtype=torch.float32)
    return (x / 127.5 - 1.0).unsqueeze(1)


@torch.no_grad()
def classify(net: nn.Module, grey: np.ndarray) -> torch.Tensor:
    net.eval()
    x = to_input(grey)
    return torch.cat([net(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])


def train_judge(epochs: int = 3, train_images: int | None = None, seed: int = 0) -> tuple[nn.Module, float]:
    """The CNN trained on the train split (random shifts of up to 2 px); returns it and its t10k accuracy."""
    x_train, y_train = fmnist32("train", train_images)
    x_test, y_test = fmnist32("t10k")
    torch.manual_seed(seed)
    net = build_judge()
    steps = epochs * (len(x_train) // 128)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1))
    x, y = to_input(x_train), torch.as_tensor(y_train)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x) - 127, 128):
            idx = order[start:start + 128]
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            batch = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(net(batch), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    acc = float((classify(net, x_test) == torch.as_tensor(y_test)).float().mean())
    return net, acc


def load_judge(path: str) -> tuple[nn.Module, dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"judge weights {path} not found: train them with "
                                f"python -m eval.fmnist_judge train --out {path}")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    net = build_judge()
    net.load_state_dict(load_file(path))
    return net.eval(), meta


def read_folder(images: str) -> np.ndarray:
    """Every PNG of the folder, in name order, as uint8 grey [N, H, W] (the mean of R, G and B)."""
    from PIL import Image

    files = sorted(Path(images).glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no .png images in {images}")
    return np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).mean(-1).round().astype(np.uint8)
                     for f in files])


def adherence(net: nn.Module, grey: np.ndarray, cycle: int = NUM_CLASSES) -> dict[str, object]:
    """Share of images i classified as class i % cycle, overall and per class."""
    prompted = torch.arange(len(grey)) % cycle
    hit = (classify(net, grey) == prompted).float()
    per = [round(float(hit[prompted == c].mean()), 4) for c in range(cycle)]
    return {"prompt_adherence": round(float(hit.mean()), 4), "per_class": per, "num_images": len(grey)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--train-images", type=int, default=None)
    s = sub.add_parser("score")
    s.add_argument("--weights", required=True)
    s.add_argument("--images", required=True)
    s.add_argument("--classes-cycle", type=int, default=NUM_CLASSES)
    args = p.parse_args(argv)
    if args.cmd == "train":
        from safetensors.torch import save_file

        t0 = time.time()
        net, acc = train_judge(args.epochs, args.train_images)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, args.out,
                  {"t10k_accuracy": f"{acc:.4f}", "epochs": str(args.epochs)})
        print(json.dumps({"weights": args.out, "t10k_accuracy": round(acc, 4), "wall_s": round(time.time() - t0, 1)}))
        return 0
    net, meta = load_judge(args.weights)
    out = adherence(net, read_folder(args.images), args.classes_cycle)
    out["judge_t10k_accuracy"] = float(meta.get("t10k_accuracy", "nan"))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
