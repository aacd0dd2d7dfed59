"""Scores of the inpainting, semantic-synthesis and layout-to-image kinds on held-out annotated shapes, on pixels.

``python -m eval.kinds checkpoint=RUN_DIR images=HELDOUT [num_images=32 steps=20 seed=0 untrained=false fid=true
output=DIR]``: ``images`` holds tars of ``python -m data_prep.synthetic annotate=true`` at the model's resolution
(image, ``seg.png``, json ``objects``); the condition of each held-out image is made from it as the training data
was, a sample is drawn (DDIM, seed ``seed + i``; layout guided by ``guidance_scale`` against the empty layout, the
concatenated kinds unguided) and decoded, and:

- inpaint: the hole is the paper's large mask of (``seed``, key); the sample is pasted into the known pixels, then
  ``psnr_masked`` (PSNR of the hole's pixels against the original, in [0, 1]) and, with ``fid``, ``fid`` of the
  inpainted images against the originals (the Inception FID network; few images: a noisy, relative number);
- semantic: ``segment_accuracy``: the share of the object's segment (the smallest class of its map) whose pixels'
  nearest palette colour (white + the shapes' colours, ``data_prep.synthetic.SEG_CLASSES``) is the segment's class,
  and ``pixel_accuracy`` over the whole map;
- layout: ``box_share``: the share of the image's object pixels (those far from the background, the border's median
  colour) that lie inside the object's box, and ``box_share_chance``: the same pixels' share inside the other held-out
  images' boxes, what a model that ignores the layout scores (about the mean box area: 0.2 on the 16 px shapes).
  The paper's task is "the object lies in its box", which is this share; IoU with the box (``box_iou``, beside the
  box's share covered, ``box_fill``) is no measure of it at small scale, since noise is "far from the background"
  everywhere and so covers the box best, while a barely trained model's faint object covers little of it.

``untrained=true`` scores the same model at its random initialisation: the baseline a trained model must beat.
Prints the scores as one JSON line; writes ``metrics.json`` (and ``samples.png``: originals above samples) under
``output`` when given. Root config ``conf/eval_kinds.yaml`` (schema ``KindsEvalConfig``); torch loads inside the
functions that use it, so ``--help`` answers without it.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import MISSING
from PIL import Image

from ldm_train.app import hydra_app
from ldm_train.config_checks import bounded
from ldm_train.data import fsspec_io
from ldm_train.data.shapes_captions import BACKGROUND_WHITE, COLOURS

if TYPE_CHECKING:
    import torch  # loaded by the functions that use it: --help answers without it

KINDS = ("inpaint", "semantic", "layout")
PALETTE = np.array([BACKGROUND_WHITE, *COLOURS.values()], np.float64)  # data_prep.synthetic.SEG_CLASSES' colours
FAR_FROM_BACKGROUND = 80.0  # RGB distance (eval.adherence's): the palette colours are >= ~100 apart


@dataclass
class KindsEvalConfig:
    """``python -m eval.kinds``: the typed root config of ``conf/eval_kinds.yaml``."""

    checkpoint: str = MISSING  # run dir, checkpoints dir or step dir of a cond.kind inpaint / semantic / layout run
    images: str = MISSING  # annotated held-out tars (a folder of *.tar or one tar) at the model's resolution
    num_images: int = bounded(32, ge=1)
    steps: int = bounded(20, ge=1)
    seed: int = 0  # sample i's noise seed is seed + i; inpainting masks are drawn from (seed, key)
    guidance_scale: float = bounded(1.0, ge=0.0)  # layout: classifier-free guidance against the empty layout
    batch_size: int = bounded(16, ge=1)
    untrained: bool = False  # score the same model at its random initialisation
    use_ema: bool = True
    fid: bool = True  # inpaint: FID of the inpainted images against the originals
    output: str | None = None
    device: str = "auto"


def heldout(path: str, resolution: int, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` annotated samples under ``path``: key, image [3, R, R] in [-1, 1], seg (uint8 [R, R] or
    None), objects."""
    import torch

    from ldm_train.data.shard_reader import iter_samples

    urls = [path] if path.endswith(".tar") else [fsspec_io.join(path, n) for n in fsspec_io.ls(path) if n.endswith(".tar")]
    out = []
    for url in urls:
        for s in iter_samples(url):
            blob = s.get("png", s.get("jpg"))
            if blob is None:
                continue
            with Image.open(io.BytesIO(blob)) as im:
                rgb = np.asarray(im.convert("RGB"))
            if rgb.shape[:2] != (resolution, resolution):
                raise ValueError(f"{url}: sample {s['__key__']} is {rgb.shape[1]}x{rgb.shape[0]} but the model makes "
                                 f"{resolution} px images: write the held-out set with resolution={resolution}")
            seg = None
            if "seg.png" in s:
                with Image.open(io.BytesIO(s["seg.png"])) as im:
                    seg = np.asarray(im.convert("L")).copy()
            meta = json.loads(s["json"]) if "json" in s else {}
            out.append({"key": s["__key__"].rsplit("/", 1)[-1], "seg": seg, "objects": meta.get("objects"),
                        "image": torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1})
            if len(out) == limit:
                return out
    if not out:
        raise ValueError(f"images={path} holds no image: python -m data_prep.synthetic output={path} annotate=true ...")
    return out


def _need(items: list[dict[str, Any]], field: str, kind: str, path: str) -> None:
    if any(it[field] is None for it in items):
        raise ValueError(f"cond.kind={kind} is scored on samples with their {field} but images={path} has none: "
                         "write it with python -m data_prep.synthetic annotate=true")


def conditions(model: Any, items: list[dict[str, Any]], cfg: KindsEvalConfig, device: torch.device) -> tuple[list, Any]:
    """The model's condition of each held-out sample, and what scoring needs beside the images (the masks)."""
    import torch

    from ldm_train.data.cond_inputs import inpaint_concat, one_hot
    from ldm_train.data.masks import sample_mask

    kind, side = model.cond.kind, model.resolution
    if kind == "inpaint":
        masks = torch.from_numpy(np.stack([sample_mask(cfg.seed, it["key"], side) for it in items]))[:, None].float()
        masked = torch.stack([it["image"] for it in items]) * (1 - masks)
        with torch.no_grad():
            z = model.first_stage.encode_moments(masked.to(device)).float()
        if str(model.config.first_stage.kind) == "kl":
            z = z.chunk(2, dim=1)[0]  # the posterior mean, as the trainer reads masked.npy
        return list(inpaint_concat(z * model.scale_factor, masks.to(device)).cpu()), masks
    if kind == "semantic":
        _need(items, "seg", kind, cfg.images)
        return list(one_hot(torch.from_numpy(np.stack([it["seg"] for it in items])), model.cond.num_classes)), None
    _need(items, "objects", kind, cfg.images)
    return [it["objects"] for it in items], None


def _nearest(pixels: np.ndarray) -> np.ndarray:
    """Index into PALETTE of the nearest colour of each RGB pixel [..., 3]."""
    return ((pixels[..., None, :].astype(np.float64) - PALETTE) ** 2).sum(-1).argmin(-1)


def semantic_scores(samples: np.ndarray, items: list[dict[str, Any]]) -> dict[str, float]:
    seg_acc, pix_acc = [], []
    for img, it in zip(samples, items, strict=True):
        seg, named = it["seg"], _nearest(img)
        classes, counts = np.unique(seg, return_counts=True)
        obj = seg == classes[counts.argmin()]
        seg_acc.append(float((named[obj] == seg[obj]).mean()))
        pix_acc.append(float((named == seg).mean()))
    return {"segment_accuracy": float(np.mean(seg_acc)), "pixel_accuracy": float(np.mean(pix_acc))}


def _object_and_boxes(img: np.ndarray, boxes: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of ``img`` [R, R, 3] far from its background (the border's median colour) and one bool [R, R] mask
    per box (fractions of the side)."""
    side = img.shape[0]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float64)
    far = np.sqrt(((img.astype(np.float64) - np.median(border, 0)) ** 2).sum(-1)) > FAR_FROM_BACKGROUND
    masks = np.zeros((len(boxes), side, side), bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
        m[round(y0 * side):round(y1 * side), round(x0 * side):round(x1 * side)] = True
    return far, masks


def layout_scores(samples: np.ndarray, items: list[dict[str, Any]]) -> dict[str, float]:
    boxes = [[float(v) for v in it["objects"][0]["box"]] for it in items]
    ious, fills, shares, chance = [], [], [], []
    for i, img in enumerate(samples):
        far, masks = _object_and_boxes(img, boxes)
        box, n = masks[i], max(1, int(far.sum()))  # an image with no object pixels has none in its box: share 0
        ious.append(float((far & box).sum() / max(1, (far | box).sum())))
        fills.append(float(far[box].mean()) if box.any() else 0.0)
        shares.append(float((far & box).sum() / n))
        others = [float((far & m).sum() / n) for j, m in enumerate(masks) if j != i]
        chance.append(float(np.mean(others)) if others else float(box.mean()))
    return {"box_share": float(np.mean(shares)), "box_share_chance": float(np.mean(chance)),
            "box_iou": float(np.mean(ious)), "box_fill": float(np.mean(fills))}


def inpaint_scores(samples: torch.Tensor, originals: torch.Tensor, masks: torch.Tensor, fid: bool) -> dict[str, float]:
    """``samples`` already pasted into the known pixels; all in [-1, 1]."""
    import torch

    err = ((samples - originals) / 2) ** 2 * masks
    mse = err.flatten(1).sum(1) / (masks.flatten(1).sum(1) * 3).clamp_min(1)
    out = {"psnr_masked": float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean()),
           "mask_coverage": float(masks.mean())}
    if fid:
        from ldm_train.metrics.fid import accumulate_stats, fid_from_stats, to_uint8
        from ldm_train.metrics.inception import FIDInception

        net = FIDInception().eval()
        out["fid"] = fid_from_stats(accumulate_stats(net, to_uint8(samples)), accumulate_stats(net, to_uint8(originals)))
    return out


def evaluate(cfg: KindsEvalConfig) -> dict[str, Any]:
    import torch

    from eval.checkpoint import load_sampling_model
    from ldm_train.build import build_ldm
    from ldm_train.runtime.distributed import device_for_rank
    from ldm_train.sampling import SamplerSettings, sample_images

    device = device_for_rank(cfg.device)
    model = load_sampling_model(cfg.checkpoint, use_ema=cfg.use_ema, device=device)
    if model.cond.kind not in KINDS:
        raise ValueError(f"{cfg.checkpoint} is a cond.kind={model.cond.kind} model: eval.kinds scores {', '.join(KINDS)} "
                         "(eval.run scores the others)")
    if cfg.untrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model.ldm.load_state_dict(build_ldm(model.config).state_dict())
    items = heldout(cfg.images, model.resolution, cfg.num_images)
    conds, masks = conditions(model, items, cfg, device)
    settings = SamplerSettings("ddim", cfg.steps, 0.0, cfg.guidance_scale, cfg.seed)
    parts = []
    for i in range(0, len(conds), cfg.batch_size):
        seeds = [cfg.seed + j for j in range(i, min(i + cfg.batch_size, len(conds)))]
        parts.append(sample_images(model.ldm, model.first_stage, model.tokenizer, conds[i:i + len(seeds)], seeds,
                                   settings, model.latent_shape, model.scale_factor, device).clamp(-1, 1).float().cpu())
    samples, originals = torch.cat(parts), torch.stack([it["image"] for it in items])
    kind = model.cond.kind
    if kind == "inpaint":
        samples = masks * samples + (1 - masks) * originals  # the known pixels are the original's
        scores = inpaint_scores(samples, originals, masks, cfg.fid)
    else:
        u8 = ((samples + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        scores = (semantic_scores if kind == "semantic" else layout_scores)(u8, items)
    report = {"kind": kind, "checkpoint": cfg.checkpoint, "untrained": cfg.untrained, "num_images": len(items),
              "steps": cfg.steps, "seed": cfg.seed, "guidance_scale": cfg.guidance_scale if kind == "layout" else 1.0,
              "first_stage": model.first_stage_file, **scores}
    if cfg.output:
        _write(cfg.output, report, originals, samples)
    return report


def _write(output: str, report: dict[str, Any], originals: torch.Tensor, samples: torch.Tensor) -> None:
    import torch

    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    rows = [torch.cat(list(x[:16]), dim=2) for x in (originals, samples)]  # originals above samples
    grid = ((torch.cat(rows, dim=1) + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    Image.fromarray(grid).save(os.path.join(output, "samples.png"))


def _run(cfg: KindsEvalConfig) -> dict[str, Any]:
    report = evaluate(cfg)
    print(json.dumps(report))
    return report


def main() -> None:
    hydra_app("eval_kinds", KindsEvalConfig, _run,
              usage="python -m eval.kinds checkpoint=RUN_DIR images=HELDOUT_TARS [num_images=32 steps=20 "
                    "untrained=false fid=true output=DIR]")


if __name__ == "__main__":
    main()
