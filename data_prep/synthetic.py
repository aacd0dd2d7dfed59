"""The built-in captioned-shapes dataset: the embedded default for the quickstart and the tests.

``python -m data_prep.synthetic output=DIR num_samples=N resolution=R [shard_size=1000 seed=0 split=train|heldout
quality=95 annotate=false]`` (root config ``conf/synthetic.yaml``, schema ``SyntheticConfig``) draws one shape
per image (circle, square, triangle, star; small or large; at one of five positions; in one of eight well separated
colours, on white or on another plain colour) and writes it as img2dataset lays out LAION: WebDataset tars
``000000.tar ...`` of ``<key>.jpg`` + ``<key>.txt`` (caption) + ``<key>.json`` (metadata), keys ``000000000``-style.
The caption says exactly what is drawn: "a small red circle at the top left on a blue background".

Every image is a pure function of (seed, split, index), so any shard size gives the same samples. The
(colour, shape) pairs in ``HELDOUT_COMBOS`` are never drawn in ``split=train`` and are the only ones drawn in
``split=heldout``: prompts for those test text conditioning on combinations the model never saw.
The caption grammar (vocabulary, ``Scene``, ``parse_caption`` which inverts the captions) lives in
``ldm_train.data.shapes_captions``, shared with eval; ``object_core_mask`` gives pixels that lie inside the
object for every jitter, for the quickstart's prompt-adherence metric (the object's colour in generated images).
"""
from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
from omegaconf import MISSING
from PIL import Image, ImageDraw

from data_prep.image_shards import write_image_shards
from ldm_train.app import hydra_app
from ldm_train.config_checks import bounded, one_of
from ldm_train.data.shapes_captions import (  # the caption grammar, shared with eval
    COLOURS,
    HELDOUT_COMBOS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    background_rgb,
)

SPLITS = ("train", "heldout")
SEG_CLASSES = ("white", *COLOURS)  # the segmentation classes of annotate=true: white, then the object colours

# Geometry as fractions of the image side. At 64 px a small object spans ~24 px, a large one ~41 px.
_RADIUS = {"small": 0.19, "large": 0.32}
_OFFSET = {"small": 0.27, "large": 0.36}  # centre distance from the image edge for the corner positions
_JITTER_POS = 0.015  # max centre shift
_JITTER_RADIUS = 0.1  # radius scale in [0.9, 1.1]
_JITTER_ROT = 15.0  # degrees
_JITTER_COLOUR = 12  # per channel
_STAR_INNER = 0.55  # inner/outer radius: fat arms so the star's core holds measurable colour
_SUPERSAMPLE = 4  # draw large then downsample: antialiased edges


def _nominal_centre(scene: Scene) -> tuple[float, float]:
    """(x, y) in fractions of the side, before jitter."""
    if scene.position == "center":
        return 0.5, 0.5
    off = _OFFSET[scene.size]
    vert, horiz = scene.position.split()
    return (off if horiz == "left" else 1 - off), (off if vert == "top" else 1 - off)


def object_core_mask(scene: Scene, resolution: int) -> np.ndarray:
    """Bool [R, R]: a disc around the nominal centre that lies inside the drawn object for any jitter.

    Radius = the smallest inscribed radius over shapes (the star's inner pentagon, 0.55*cos 36deg of r) at the
    smallest jittered size, minus the largest centre shift. At 64 px: ~3.7 px (small), ~7.5 px (large).
    """
    cx, cy = _nominal_centre(scene)
    r = _RADIUS[scene.size] * (1 - _JITTER_RADIUS) * _STAR_INNER * math.cos(math.radians(36))
    r = (r - _JITTER_POS) * resolution
    yy, xx = np.mgrid[0:resolution, 0:resolution] + 0.5
    return (xx - cx * resolution) ** 2 + (yy - cy * resolution) ** 2 <= max(r, 1.0) ** 2


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        angles, radii = [45 + 90 * k for k in range(4)], [r] * 4
    elif shape == "triangle":
        angles, radii = [-90 + 120 * k for k in range(3)], [r] * 3
    else:  # star: 5 outer points alternating with 5 inner ones
        angles = [-90 + 36 * k for k in range(10)]
        radii = [r if k % 2 == 0 else r * _STAR_INNER for k in range(10)]
    return [
        (cx + rr * math.cos(math.radians(a + rot)), cy + rr * math.sin(math.radians(a + rot)))
        for a, rr in zip(angles, radii, strict=True)
    ]


def render(scene: Scene, resolution: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` with small random jitter (position, size, rotation, colour) from ``rng``."""
    return render_with_mask(scene, resolution, rng)[0]


def render_with_mask(scene: Scene, resolution: int, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """``render``'s image and the object's mask (bool [R, R]: at least half of the pixel covered)."""
    side = resolution * _SUPERSAMPLE
    img = Image.new("RGB", (side, side), background_rgb(scene.background))
    mask = Image.new("L", (side, side), 0)
    draws = (ImageDraw.Draw(img), ImageDraw.Draw(mask))
    cx, cy = _nominal_centre(scene)
    cx = (cx + rng.uniform(-_JITTER_POS, _JITTER_POS)) * side
    cy = (cy + rng.uniform(-_JITTER_POS, _JITTER_POS)) * side
    r = _RADIUS[scene.size] * rng.uniform(1 - _JITTER_RADIUS, 1 + _JITTER_RADIUS) * side
    rot = rng.uniform(-_JITTER_ROT, _JITTER_ROT)
    base = np.array(COLOURS[scene.colour])
    fill = tuple(int(v) for v in np.clip(base + rng.integers(-_JITTER_COLOUR, _JITTER_COLOUR + 1, 3), 0, 255))
    for draw, colour in zip(draws, (fill, 255), strict=True):
        if scene.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.polygon(_polygon(scene.shape, cx, cy, r, rot), fill=colour)
    small = mask.resize((resolution, resolution), resample=Image.BOX)
    return img.resize((resolution, resolution), resample=Image.LANCZOS), np.asarray(small) >= 128


def annotations(scene: Scene, mask: np.ndarray) -> tuple[bytes, list[dict]]:
    """The segmentation map (``seg.png``: the colour class of every pixel, ``SEG_CLASSES``) and the object's box
    (``objects``: class = the shape's index in ``SHAPES``, box in fractions of the side) of a rendered scene."""
    seg = np.where(mask, SEG_CLASSES.index(scene.colour), SEG_CLASSES.index(scene.background)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(seg).save(buf, format="PNG")
    ys, xs = np.nonzero(mask)
    side = mask.shape[0]
    box = [xs.min() / side, ys.min() / side, (xs.max() + 1) / side, (ys.max() + 1) / side] if len(xs) else [0, 0, 0, 0]
    return buf.getvalue(), [{"class": SHAPES.index(scene.shape), "name": scene.shape, "box": [float(v) for v in box]}]


def allowed_combos(split: str) -> list[tuple[str, str]]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    held = set(HELDOUT_COMBOS)
    every = [(c, s) for c in COLOURS for s in SHAPES]
    return [cs for cs in every if (cs in held) == (split == "heldout")]


def sample_scene(seed: int, split: str, index: int) -> tuple[Scene, np.random.Generator]:
    """The scene of sample ``index`` and the generator to render it with (pure function of the arguments)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    combos = allowed_combos(split)
    colour, shape = combos[rng.integers(len(combos))]
    size = SIZES[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    others = [c for c in COLOURS if c != colour]
    # half on white; otherwise any other colour, so the object always contrasts with its background
    background = "white" if rng.random() < 0.5 else others[rng.integers(len(others))]
    return Scene(size, colour, shape, position, background), rng


@dataclass
class SyntheticConfig:
    """``python -m data_prep.synthetic``: the typed root config of ``conf/synthetic.yaml``."""

    output: str = MISSING  # folder or URL of the tars
    num_samples: int = bounded(1000, ge=1)
    resolution: int = bounded(64, ge=1)
    shard_size: int = bounded(1000, ge=1)  # samples per tar
    seed: int = 0
    split: str = one_of("train", SPLITS)  # heldout: only the (colour, shape) pairs of HELDOUT_COMBOS
    quality: int = bounded(95, ge=0, le=100)  # JPEG quality
    annotate: bool = False  # also seg.png (colour classes) and json objects (shape class + box)


def write_synthetic(
    output: str,
    num_samples: int,
    resolution: int = 64,
    shard_size: int = 1000,
    seed: int = 0,
    split: str = "train",
    quality: int = 95,
    annotate: bool = False,
) -> list[str]:
    """Write the dataset as img2dataset-style tars under ``output`` (path or URL); returns the shard URLs.

    ``annotate``: each sample also carries ``seg.png`` and its json ``objects`` (``annotations``): the inputs of
    semantic synthesis and layout-to-image."""
    if num_samples <= 0 or shard_size <= 0:
        raise ValueError(f"num_samples ({num_samples}) and shard_size ({shard_size}) must be positive")

    def records() -> Iterator[dict]:
        for index in range(num_samples):
            scene, rng = sample_scene(seed, split, index)
            buf = io.BytesIO()
            image, mask = render_with_mask(scene, resolution, rng)
            image.save(buf, format="PNG" if annotate else "JPEG", **({} if annotate else {"quality": quality}))
            key = f"{index:09d}"
            meta = {"key": key, "caption": scene.caption, "status": "success", "width": resolution,
                    "height": resolution, "original_width": resolution, "original_height": resolution,
                    "split": split, "scene": asdict(scene)}
            record = {"__key__": key, "png" if annotate else "jpg": buf.getvalue(), "txt": scene.caption, "json": meta}
            if annotate:  # lossless: the colours of a segment are exact
                record["seg.png"], meta["objects"] = annotations(scene, mask)
            yield record

    return write_image_shards(output, records(), shard_size)


def _run(cfg: SyntheticConfig) -> None:
    urls = write_synthetic(cfg.output, cfg.num_samples, cfg.resolution, cfg.shard_size, cfg.seed, cfg.split, cfg.quality,
                           cfg.annotate)
    print(json.dumps({"output": cfg.output, "split": cfg.split, "num_samples": cfg.num_samples, "shards": len(urls)}))


def main() -> None:
    hydra_app("synthetic", SyntheticConfig, _run,
              usage="python -m data_prep.synthetic output=DIR num_samples=N resolution=R [split=train]")


if __name__ == "__main__":
    main()
