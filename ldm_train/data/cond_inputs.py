"""The per-sample inputs of the inpainting, semantic-synthesis and layout kinds: read from the latent shards into a
batch (``CondInputs``, run in the loader workers), then made the diffusion model's conditioning (``model_cond``).

Members of a latent-shard sample (``data_prep.encode``):

- inpaint: ``mask.png`` (8-bit, 255 in the hole, at the image resolution) and ``masked.npy`` (the first-stage latent
  of the image with the hole set to 0, i.e. grey; the same format as ``latent.npy``). Batch: ``masked`` float32
  [B, C, h, w], ``mask`` float32 [B, 1, H, W] in {0, 1}.
- semantic: ``seg.png`` (8-bit class index per pixel, at the image resolution). Batch: ``seg`` int64 [B, H, W].
- layout: the json's ``objects`` (``[{"class", "box"}]``). Batch: ``tokens`` int64 [B, L] (``LayoutTokenizer``; the
  empty layout where the caption-dropout mask drops the sample).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ldm_train.data.layout import LayoutTokenizer

MASK_MEMBER, MASKED_MEMBER, SEG_MEMBER = "mask.png", "masked.npy", "seg.png"
ENCODE_HINT = {
    "inpaint": "encode the images with data_prep.encode inpaint_masks=true",
    "semantic": "write the images with their segmentation (python -m data_prep.synthetic annotate=true), then "
                "data_prep.encode them",
    "layout": "write the images with their boxes (python -m data_prep.synthetic annotate=true), then data_prep.encode "
              "them",
}


def _png(data: bytes | None, url: str, key: str, member: str, kind: str) -> np.ndarray:
    from PIL import Image

    if data is None:
        raise ValueError(f"shard {url}: sample {key} has no '{member}', which cond.kind={kind} reads: {ENCODE_HINT[kind]}")
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L")).copy()


def sample_objects(sample: dict[str, Any], url: str = "?") -> list[dict[str, Any]]:
    """The ``objects`` of a latent-shard sample's json, or a ValueError naming the shard and the fix."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    objects = meta.get("objects")
    if not isinstance(objects, list):
        raise ValueError(f"shard {url}: sample {sample.get('__key__')} has no 'objects' in its json, which "
                         f"cond.kind=layout reads: {ENCODE_HINT['layout']}")
    return objects


@dataclass(frozen=True)
class CondInputs:
    """What ``cond.kind`` (inpaint, semantic, layout) adds to a loader batch; picklable for the loader workers."""

    kind: str
    num_classes: int = 0
    layout: LayoutTokenizer | None = None

    def __call__(self, samples: list[dict[str, Any]], dropped: list[bool]) -> dict[str, torch.Tensor]:
        urls = [s.get("__url__", "?") for s in samples]
        keys = [s["__key__"].rsplit("/", 1)[-1] for s in samples]
        if self.kind == "inpaint":
            masks = [_png(s.get(MASK_MEMBER), u, k, MASK_MEMBER, "inpaint") for s, u, k in zip(samples, urls, keys, strict=True)]
            masked = []
            for s, u, k in zip(samples, urls, keys, strict=True):
                if MASKED_MEMBER not in s:
                    raise ValueError(f"shard {u}: sample {k} has no '{MASKED_MEMBER}': {ENCODE_HINT['inpaint']}")
                masked.append(np.load(io.BytesIO(s[MASKED_MEMBER]), allow_pickle=False))
            return {"masked": torch.from_numpy(np.stack(masked)).float(),
                    "mask": torch.from_numpy(np.stack(masks) > 127).float()[:, None]}
        if self.kind == "semantic":
            segs = np.stack([_png(s.get(SEG_MEMBER), u, k, SEG_MEMBER, "semantic")
                             for s, u, k in zip(samples, urls, keys, strict=True)])
            if int(segs.max()) >= self.num_classes:
                raise ValueError(f"a segmentation map of {urls[0]} holds class {int(segs.max())} but cond.num_classes="
                                 f"{self.num_classes}: set cond.num_classes to the data set's number of classes")
            return {"seg": torch.from_numpy(segs).long()}
        if self.kind == "layout":
            layouts = [[] if drop else sample_objects(s, u) for s, u, drop in zip(samples, urls, dropped, strict=True)]
            return {"tokens": self.layout.batch(layouts)}
        raise ValueError(f"CondInputs: cond.kind={self.kind!r} has no shard inputs")


def cond_inputs(cond: Any) -> CondInputs | None:
    """The loader's ``CondInputs`` of a ``CondConfig`` (None for the kinds the loader feeds itself)."""
    if cond.kind not in ("inpaint", "semantic", "layout"):
        return None
    return CondInputs(cond.kind, int(cond.num_classes), layout_tokenizer(cond) if cond.kind == "layout" else None)


def layout_tokenizer(cond: Any) -> LayoutTokenizer:
    return LayoutTokenizer(int(cond.num_classes), int(cond.layout_bins), int(cond.layout_max_objects))


def inpaint_concat(masked_z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[masked image latent (scaled), the mask on the latent grid] -> [B, z + 1, h, w] (CompVis inpainting: nearest
    downsampling of the mask)."""
    small = F.interpolate(mask.to(masked_z.dtype), size=tuple(masked_z.shape[-2:]), mode="nearest")
    return torch.cat([masked_z, small], dim=1)


def one_hot(seg: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class-index maps [B, H, W] -> float one-hot [B, num_classes, H, W] (the SpatialRescaler's input)."""
    return F.one_hot(seg.long(), num_classes).permute(0, 3, 1, 2).float()


def model_cond(kind: str, batch: dict[str, Any], stored: str, scale_factor: float, num_classes: int,
               device: torch.device) -> torch.Tensor:
    """The model's conditioning input of a loader batch: the inpainting concat [B, z + 1, h, w] (the masked latent's
    mean, scaled as z), the one-hot segmentation (semantic) or the layout tokens (layout)."""
    if kind == "inpaint":
        masked = batch["masked"].to(device, non_blocking=True).float()
        if stored == "moments":
            masked = masked.chunk(2, dim=1)[0]  # the posterior mean: the masked image's deterministic encoding
        return inpaint_concat(masked * scale_factor, batch["mask"].to(device, non_blocking=True))
    if kind == "semantic":
        return one_hot(batch["seg"].to(device, non_blocking=True), num_classes)
    return batch["tokens"].to(device, non_blocking=True)
