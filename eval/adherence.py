"""Prompt adherence on the synthetic captioned-shapes dataset: does the image show what the prompt says?

For each generated image and its prompt (parsed with ``ldm_train.data.shapes_captions.parse_caption``):

- background: the median colour of the image border, named by the nearest entry of the palette (+ white);
- object colour: pixels far from that background colour form the object mask; their median colour is
  named by the nearest palette colour (a wrong or missing object counts as wrong);
- shape: two rotation-invariant measures of the object mask. Solidity, area / area of its convex hull, tells
  the star (0.68 for the dataset's star, inner radius 0.55 of the outer) from the convex shapes (1.0); among
  those, compactness area / (max radius from the centroid)^2 (triangle 1.30, square 2.00, circle 3.14). Each
  cut is the midpoint between the ideal values. (Compactness alone, with the star's 1.62 between the triangle's
  and the square's, read slightly rounded tips as the next shape: triangles as stars, stars as squares.)
- position: the object's centroid in the quadrant / centre the prompt names.

Accuracies are reported overall and split into prompts of train combos vs ``HELDOUT_COMBOS`` (colour,
shape pairs never seen in training: compositional generalisation).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image

from ldm_train.data.shapes_captions import BACKGROUND_WHITE, COLOURS, HELDOUT_COMBOS, parse_caption

# midpoints between the ideal values: solidity of the star (0.68) and of a convex shape (1.0), then the
# compactness of triangle, square and circle
_STAR_SOLIDITY = 0.84
_SHAPE_EDGES = ((1.65, "triangle"), (2.57, "square"), (float("inf"), "circle"))
_FAR_FROM_BACKGROUND = 80.0  # RGB distance: the palette colours are >= ~100 apart
_MIN_OBJECT_FRACTION = 0.005  # fewer object pixels than this: no object drawn


def nearest_colour(rgb: np.ndarray, with_white: bool = False) -> str:
    names = list(COLOURS) + (["white"] if with_white else [])
    table = np.array([COLOURS[n] for n in COLOURS] + ([BACKGROUND_WHITE] if with_white else []), np.float64)
    return names[int(np.argmin(((table - np.asarray(rgb, np.float64)) ** 2).sum(1)))]


def _position(cx: float, cy: float, side: int) -> str:
    # centre if the centroid is within the middle band on both axes, else the quadrant
    lo, hi = side * 0.4, side * 0.6
    if lo <= cx <= hi and lo <= cy <= hi:
        return "center"
    return f"{'top' if cy < side / 2 else 'bottom'} {'left' if cx < side / 2 else 'right'}"


def _solidity(ys: np.ndarray, xs: np.ndarray) -> float:
    """Area of the mask pixels (rows ``ys``, columns ``xs``) over the area of the convex hull of their corners."""
    from scipy.spatial import ConvexHull

    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(np.float64)
    return float(len(ys) / ConvexHull(corners).volume)  # in 2-D, ``volume`` is the area


def analyse_image(image: np.ndarray) -> dict[str, Any]:
    """uint8 [H, W, 3] -> {"background", "colour", "shape", "position"} as named by this module."""
    img = image.astype(np.float64)
    h, w = img.shape[:2]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    mask = np.sqrt(((img - bg) ** 2).sum(-1)) > _FAR_FROM_BACKGROUND
    out: dict[str, Any] = {"background": nearest_colour(bg, with_white=True), "object_fraction": float(mask.mean())}
    if mask.mean() < _MIN_OBJECT_FRACTION:
        return {**out, "colour": None, "shape": None, "position": None}
    out["colour"] = nearest_colour(np.median(img[mask], axis=0))
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    r_max = np.sqrt((ys + 0.5 - cy) ** 2 + (xs + 0.5 - cx) ** 2).max() + 0.5
    compactness = mask.sum() / max(r_max**2, 1.0)
    out["compactness"] = float(compactness)
    out["solidity"] = solidity = _solidity(ys, xs)
    out["shape"] = "star" if solidity < _STAR_SOLIDITY else next(
        name for edge, name in _SHAPE_EDGES if compactness < edge)
    out["position"] = _position(cx, cy, min(h, w))
    return out


def adherence(images: Iterable[np.ndarray], prompts: Iterable[str]) -> dict[str, Any]:
    """Accuracies of colour / shape / position / background over (image, prompt) pairs."""
    fields = ("colour", "shape", "position", "background")
    hits: dict[str, dict[str, list[bool]]] = {g: {f: [] for f in fields} for g in ("all", "train_combos",
                                                                                  "heldout_combos")}
    held = set(HELDOUT_COMBOS)
    for image, prompt in zip(images, prompts, strict=True):
        scene = parse_caption(prompt)
        got = analyse_image(np.asarray(image))
        group = "heldout_combos" if (scene.colour, scene.shape) in held else "train_combos"
        for f in fields:
            ok = got[f] == getattr(scene, f)
            hits["all"][f].append(ok)
            hits[group][f].append(ok)
    out: dict[str, Any] = {}
    for group, per in hits.items():
        n = len(per["colour"])
        out[f"{group}_count"] = n
        for f in fields:
            out[f"{group}_{f}_accuracy"] = float(np.mean(per[f])) if n else None
    # the headline number: object colour correct (what the quickstart tracks)
    out["colour_accuracy"] = out["all_colour_accuracy"]
    return out


def adherence_of_folder(folder: str, prompts: list[str]) -> dict[str, Any]:
    """Read ``folder/{i:06d}.png`` for i < len(prompts) (eval's sample layout) and score them."""
    def load(i: int) -> np.ndarray:
        with Image.open(os.path.join(folder, f"{i:06d}.png")) as im:
            return np.asarray(im.convert("RGB"))

    return adherence((load(i) for i in range(len(prompts))), prompts)
