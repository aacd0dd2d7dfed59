"""Per-image annotations an input sample may carry beside its image, kept through ``data_prep.encode``: a
segmentation map (``seg.png``, 8-bit class index per pixel: ``cond.kind=semantic``) and object boxes (the json's
``objects``, ``[{"class": int, "box": [x0, y0, x1, y1]}]`` in fractions of the image side: ``cond.kind=layout``).

``fit_annotations`` applies the image's resize and centre crop (``ldm_train.data.transforms.resize_center_crop``)
to them: the map with nearest-neighbour resampling, the boxes clipped to the crop.
"""
from __future__ import annotations

import io
from typing import Any

from PIL import Image

SEG_EXT = "seg.png"


def read_annotations(files: dict[str, bytes], meta: dict[str, Any]) -> dict[str, Any]:
    """The annotations of one input sample: its ``seg.png`` member and its json's ``objects`` ({} when neither)."""
    out: dict[str, Any] = {}
    if SEG_EXT in files:
        out[SEG_EXT] = files[SEG_EXT]
    if isinstance(meta.get("objects"), list):
        out["objects"] = meta["objects"]
    return out


def _crop_box(w: int, h: int, resolution: int) -> tuple[float, float, float]:
    """(scale, left, top) of the resize + centre crop, in the resized image's pixels."""
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    return scale, (new_w - resolution) // 2, (new_h - resolution) // 2


def fit_annotations(ann: dict[str, Any], w: int, h: int, resolution: int, key: str) -> dict[str, Any]:
    """``ann`` of a ``w`` x ``h`` image, for its ``resolution`` square crop (``ValueError`` naming ``key`` when the
    map's size differs from the image's)."""
    out = dict(ann)
    scale, left, top = _crop_box(w, h, resolution)
    if SEG_EXT in ann:
        with Image.open(io.BytesIO(ann[SEG_EXT])) as seg:
            if seg.size != (w, h):
                raise ValueError(f"sample {key}: {SEG_EXT} is {seg.size[0]}x{seg.size[1]} but its image is {w}x{h}: "
                                 "a segmentation map has the image's size")
            seg = seg.convert("L")
            new = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
            seg = seg if new == (w, h) else seg.resize(new, Image.NEAREST)
            seg = seg.crop((left, top, left + resolution, top + resolution))
            buf = io.BytesIO()
            seg.save(buf, format="PNG")
            out[SEG_EXT] = buf.getvalue()
    if "objects" in ann:
        objects = []
        for obj in ann["objects"]:
            x0, y0, x1, y1 = (float(v) for v in obj["box"])
            # fractions of the source -> pixels of the resized image -> fractions of the crop, clipped
            box = [(x0 * w * scale - left) / resolution, (y0 * h * scale - top) / resolution,
                   (x1 * w * scale - left) / resolution, (y1 * h * scale - top) / resolution]
            box = [min(max(v, 0.0), 1.0) for v in box]
            if box[2] > box[0] and box[3] > box[1]:  # a box cropped away entirely is dropped
                objects.append({**obj, "box": box})
        out["objects"] = objects
    return out
