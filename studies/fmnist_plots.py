"""Pictures for the results pages: FID-against-time curves and sample grids (PNG)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def curves_png(ldm: list[dict[str, Any]], baseline: list[dict[str, Any]], floor: float | None, path: Path) -> None:
    """FID against training seconds (left) and samples seen (right), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for rows, label, style in ((ldm, "LDM-4 (ours, text)", "o-"), (baseline, "pixel DDPM (diffusers, class)", "s--")):
        wall = [r["train_wall_s"] / 60 for r in rows]
        samples = [r["samples"] / 1000 for r in rows]
        fid = [r["fid"] for r in rows]
        axes[0].plot(wall, fid, style, label=label)
        axes[1].plot(samples, fid, style, label=label)
    for ax, xlabel in zip(axes, ("training time (minutes, one CPU core)", "samples seen (thousands)"), strict=True):
        if floor is not None:
            ax.axhline(floor, color="grey", lw=0.8, ls=":", label="real train images (same count)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FID vs t10k")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    n = ldm[-1].get("fid_samples")
    fig.suptitle(f"Fashion-MNIST 32 px: FID of {n} samples (fixed seeds) against the 10,000 t10k images", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def sample_grid_png(folder: str, path: Path, rows: int, cols: int, second: str | None = None,
                    scale: int = 2) -> None:
    """Image i of the folder (name order) at row i % rows, column i // rows: with sample i prompted with class
    i % 10 and rows=10 each row is one class. With ``second``, rows alternate between the two folders (originals
    over reconstructions), ``cols`` images each."""
    def load(f: Path) -> np.ndarray:
        return np.asarray(Image.open(f).convert("RGB"))

    files = sorted(Path(folder).glob("*.png"))
    if second is None:
        need = rows * cols
        if len(files) < need:
            raise ValueError(f"{folder} holds {len(files)} images, the grid needs {need}")
        grid = [[load(files[c * rows + r]) for c in range(cols)] for r in range(rows)]
    else:
        others = sorted(Path(second).glob("*.png"))
        grid = []
        for r in range(rows // 2):
            grid.append([load(files[r * cols + c]) for c in range(cols)])
            grid.append([load(others[r * cols + c]) for c in range(cols)])
    h, w = grid[0][0].shape[:2]
    pad = 2
    canvas = np.full((len(grid) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(grid):
        for c, im in enumerate(row):
            canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    img = Image.fromarray(canvas)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
