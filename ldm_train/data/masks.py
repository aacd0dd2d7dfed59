"""Inpainting masks as the LDM paper trains and evaluates them (Sec. 4.5, after LaMa's "large" masks): thick random
strokes and random boxes, at any image side.

LaMa's large-mask recipe at 256 px: 1-5 irregular strokes (each up to 5 segments of up to 200 px, angle changes up
to 4 rad, width up to 100 px) and 1-4 boxes (30-150 px sides, 10 px from the border); here every length is scaled by
``side / 256`` and a mask is the strokes, the boxes or both (a third each). Holes covering 10-60% of the image are
kept (redrawn otherwise, as the paper's "large" split). ``sample_mask(seed, key, side)`` is a pure function of its
arguments: the encode job and eval draw the same mask for a sample from its key.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
from PIL import Image, ImageDraw

MIN_COVER, MAX_COVER = 0.10, 0.60  # share of the image a hole covers (the "large" masks)


def _strokes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, side: int) -> None:
    s = side / 256
    for _ in range(int(rng.integers(1, 6))):
        x, y = float(rng.uniform(0, side)), float(rng.uniform(0, side))
        width = max(2, int(rng.integers(int(10 * s) + 1, int(100 * s) + 2)))
        for _ in range(int(rng.integers(1, 6))):
            angle = float(rng.uniform(0, 2 * math.pi)) + float(rng.uniform(-4, 4)) * 0.1
            length = float(rng.uniform(10 * s, 200 * s))
            nx = min(max(x + length * math.cos(angle), 0), side - 1)
            ny = min(max(y + length * math.sin(angle), 0), side - 1)
            draw.line((x, y, nx, ny), fill=255, width=width)
            r = width / 2  # round joints, as the stroke of a brush
            draw.ellipse((nx - r, ny - r, nx + r, ny + r), fill=255)
            x, y = nx, ny


def _boxes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, side: int) -> None:
    s = side / 256
    margin = int(10 * s)
    lo, hi = max(1, int(30 * s)), max(2, int(150 * s))
    for _ in range(int(rng.integers(1, 5))):
        w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        x0 = int(rng.integers(margin, max(margin + 1, side - margin - w + 1)))
        y0 = int(rng.integers(margin, max(margin + 1, side - margin - h + 1)))
        draw.rectangle((x0, y0, x0 + w - 1, y0 + h - 1), fill=255)


def large_mask(rng: np.random.Generator, side: int, max_tries: int = 50) -> np.ndarray:
    """Bool [side, side], True in the hole: strokes, boxes or both, covering MIN_COVER..MAX_COVER of the image."""
    if side < 4:
        raise ValueError(f"an inpainting mask needs an image side of at least 4 px, got {side}")
    mask = np.zeros((side, side), dtype=bool)
    for _ in range(max_tries):
        img = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(img)
        kind = int(rng.integers(3))  # 0 strokes, 1 boxes, 2 both
        if kind != 1:
            _strokes(draw, rng, side)
        if kind != 0:
            _boxes(draw, rng, side)
        mask = np.asarray(img) > 127
        if MIN_COVER <= mask.mean() <= MAX_COVER:
            return mask
    return mask  # the last draw: a rare side where no draw falls in range still gets a mask


def sample_mask(seed: int, key: str, side: int) -> np.ndarray:
    """The mask of the sample ``key`` (bool [side, side], True = to inpaint): the same for a key at every call."""
    return large_mask(np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))]), side)
