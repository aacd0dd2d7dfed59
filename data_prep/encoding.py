"""The pieces of the encode job: DataLoader workers that batch whole input shards, the first stage,
``encode_batch`` and the writer of one output shard. ``data_prep.encode_job`` runs them.

Per sample: ``__key__`` = the source key, ``latent.npy`` float16 ``[2z, h, w]`` (KL: mean then logvar) or
``[z, h, w]`` (VQ: pre-quantization latent), ``txt`` caption, ``json`` {source_key, source_shard,
original_width, original_height, label (when there is one), objects (when the input had boxes)}; with
``lowres_factor`` N > 0 also ``lowres.png``, the encoded image downsampled N times (bicubic, antialiased; 8-bit RGB),
for super-resolution training; ``seg.png`` when the input had a segmentation map; with ``inpaint_masks`` also
``mask.png`` and ``masked.npy`` (``ldm_train.data.cond_inputs``).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from data_prep import manifest as mf
from ldm_train.checkpoints.compvis import WeightsFile
from ldm_train.config import FirstStageConfig
from ldm_train.data import fsspec_io
from ldm_train.data.input_shards import InputShard, InputShardError
from ldm_train.data.readers import Filters, Sample, Skip, iter_shard
from ldm_train.models.autoencoder import DiagonalGaussian
from ldm_train.runtime.distributed import device_for_rank
from ldm_train.runtime.precision import precision_dtype

# ---------------------------------------------------------------- workers: decode + batch whole shards


class ShardBatches(torch.utils.data.IterableDataset):
    """Yields ``{"kind": "batch", ...}`` dicts of up to ``batch_size`` decoded images, all from one input shard,
    then one ``{"kind": "end", ...}`` per shard with its skip counts, conversion counts and any input error."""

    def __init__(self, shards: list[InputShard], resolution: int, filters: Filters, caption_template: str,
                 batch_size: int) -> None:
        super().__init__()
        self.shards, self.resolution, self.filters = shards, resolution, filters
        self.caption_template, self.batch_size = caption_template, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for shard in mine:
            yield from self._one(shard)

    def _one(self, shard: InputShard) -> Iterator[dict[str, Any]]:
        skipped: Counter[str] = Counter()
        converted: Counter[str] = Counter()
        examples: list[str] = []
        buf: list[Sample] = []
        error, salvaged = None, True
        try:
            for rec in iter_shard(shard, self.resolution, self.filters, self.caption_template):
                if isinstance(rec, Skip):
                    skipped[rec.reason] += 1
                    if len(examples) < 5:
                        examples.append(f"{rec.key}: {rec.reason} {rec.detail}".strip())
                    continue
                converted.update(rec.conversions)
                buf.append(rec)
                if len(buf) == self.batch_size:
                    yield _batch(shard.index, buf)
                    buf = []
        except InputShardError as e:
            error, salvaged = str(e), e.salvaged
        if buf:
            yield _batch(shard.index, buf)
        yield {"kind": "end", "shard": shard.index, "skipped": dict(skipped), "skip_examples": examples,
               "converted": dict(converted), "error": error, "salvaged": salvaged}


def _batch(index: int, samples: list[Sample]) -> dict[str, Any]:
    return {"kind": "batch", "shard": index, "keys": [s.key for s in samples],
            "images": torch.stack([s.image for s in samples]), "captions": [s.caption for s in samples],
            "metas": [s.meta for s in samples], "annotations": [s.annotations for s in samples]}


# ---------------------------------------------------------------- first stage


def load_encoder(fs_cfg: FirstStageConfig, allow_random: bool, weights: WeightsFile | None = None) -> torch.nn.Module:
    from ldm_train.checkpoints.first_stage import is_loadable, load_first_stage
    from ldm_train.models.autoencoder import build_first_stage

    if is_loadable(fs_cfg):
        return load_first_stage(fs_cfg, weights=weights)
    if not allow_random:
        raise SystemExit(
            f"first_stage {fs_cfg.name} has no checkpoint: pass first_stage.checkpoint=PATH (a file from "
            f"`python -m ldm_train.train_autoencoder first_stage={fs_cfg.name}` or a released CompVis model.ckpt), "
            f"or allow_random_first_stage=true to test the plumbing with random weights"
        )
    banner = "!" * 78
    print(f"{banner}\n!! ENCODING WITH A RANDOMLY INITIALISED FIRST STAGE ({fs_cfg.name}): latents are "
          f"meaningless.\n!! allow_random_first_stage=true is for plumbing tests only.\n{banner}", flush=True)
    torch.manual_seed(0)  # the same random weights in every task
    return build_first_stage(fs_cfg).eval().requires_grad_(False)


def device_and_autocast(device: str, precision: str) -> tuple[torch.device, torch.dtype | None]:
    """The device (``device_for_rank``) and the autocast dtype (None: fp32) of ``precision`` on it."""
    dev = device_for_rank(device)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    dtype = precision_dtype(precision)
    return dev, None if dtype == torch.float32 else dtype


@torch.no_grad()
def encode_batch(model: torch.nn.Module, x: torch.Tensor, kind: str, autocast: torch.dtype | None,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored float16 latents, z for the statistics) of images ``x`` in [-1, 1]."""
    with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        m = model.encode_moments(x)
    m = m.float()
    if kind != "kl":
        return m.half(), m
    posterior = DiagonalGaussian(m)  # stored with its logvar clamped, as the trainer reads it
    # CPU generator: the same noise on any device and in any task split
    return torch.cat([posterior.mean, posterior.logvar], 1).half(), posterior.sample(generator)


# ---------------------------------------------------------------- one output shard being written


class _Digest:
    """Write-through wrapper of a binary file: counts the bytes and hashes them (sha256) as they are written."""

    def __init__(self, f: Any) -> None:
        self.f, self.size, self.sha = f, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class OpenShard:
    """Output shard ``index`` being written under a temporary name: ``commit`` publishes it, ``discard`` drops it.

    The tar is byte-reproducible (fixed member mtime): two processes encoding the same input shard write the
    same file, and ``size`` / ``sha256`` (known after ``commit``) identify it in its stats part."""

    def __init__(self, output: str, index: int, input_url: str, channels: int, seed: int) -> None:
        import webdataset as wds

        self.index, self.input_url, self.count, self.nonfinite = index, input_url, 0, 0
        self.url = fsspec_io.join(output, mf.shard_name(index))
        self._cm = fsspec_io.atomic_write(self.url)
        self._f = _Digest(self._cm.__enter__())
        self._tar = wds.TarWriter(self._f, encoder=False, mtime=0)
        self.size: int | None = None
        self.sha256: str | None = None
        self.stats = mf.LatentStats(channels)
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + index)

    def write(self, keys: list[str], latents: np.ndarray, captions: list[str], metas: list[dict],
              extras: list[dict[str, Any]] | None = None) -> None:
        """``extras[i]``: sample i's further members (name -> bytes) and its json ``objects``."""
        for i, (key, lat, cap, meta) in enumerate(zip(keys, latents, captions, metas, strict=True)):
            info = {k: meta[k] for k in ("source_key", "source_shard", "original_width", "original_height")}
            if meta.get("label", -1) >= 0:
                info["label"] = meta["label"]
            source = json.loads(meta.get("source") or "{}")
            if source:  # img2dataset / LAION fields of the input sample (url, similarity, punsafe, ...)
                info["source"] = source
            members = dict(extras[i]) if extras is not None else {}
            if "objects" in members:  # the boxes of cond.kind=layout
                info["objects"] = members.pop("objects")
            sample = {"__key__": key, "latent.npy": _npy(lat), "txt": cap.encode("utf-8"),
                      "json": json.dumps(info).encode(), **members}
            self._tar.write(sample)
            self.count += 1

    def commit(self) -> None:
        self._tar.close()  # closes only the tar stream: TarWriter does not own the file
        self._cm.__exit__(None, None, None)
        self.size, self.sha256 = self._f.size, self._f.sha.hexdigest()

    def discard(self, exc: BaseException) -> None:
        with contextlib.suppress(BaseException):
            self._cm.__exit__(type(exc), exc, exc.__traceback__)


def lowres_pngs(images: torch.Tensor, factor: int) -> list[bytes]:
    """[-1, 1] images [B, 3, H, W] downsampled ``factor`` times (bicubic, antialiased), as 8-bit RGB PNGs."""
    from PIL import Image

    from ldm_train.data.latent_conds import downsample_u8

    out = []
    for a in downsample_u8(images, factor).transpose(0, 2, 3, 1):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode_into(model: torch.nn.Module, item: dict[str, Any], shard: OpenShard, kind: str,
                autocast: torch.dtype | None, device: torch.device, lowres_factor: int = 0,
                inpaint_seed: int | None = None) -> None:
    """Encode one ``ShardBatches`` batch and write its finite latents to ``shard`` (statistics included), with
    each image's low-resolution copy when ``lowres_factor`` > 0, its annotations (``seg.png``, ``objects``), and
    with ``inpaint_seed`` its inpainting mask and the latent of the image with the hole set to 0 (grey)."""
    from ldm_train.data.cond_inputs import MASK_MEMBER, MASKED_MEMBER
    from ldm_train.data.masks import sample_mask

    images = item["images"]
    stored, z = encode_batch(model, images.to(device, non_blocking=True), kind, autocast, shard.generator)
    finite = torch.isfinite(stored).flatten(1).all(1)
    if inpaint_seed is not None:
        masks = np.stack([sample_mask(inpaint_seed, k, images.shape[-1]) for k in item["keys"]])
        hole = torch.from_numpy(masks)[:, None].to(images.dtype)
        masked, _ = encode_batch(model, (images * (1 - hole)).to(device, non_blocking=True), kind, autocast,
                                 shard.generator)
        finite &= torch.isfinite(masked).flatten(1).all(1)
    keep = finite.nonzero().flatten().tolist()
    shard.nonfinite += len(finite) - len(keep)  # fp16 overflow: such a latent would poison training
    shard.stats.update(z[finite])
    lat = stored[finite].cpu().numpy()
    extras: list[dict[str, Any]] = [dict(item.get("annotations", [{}] * len(item["keys"]))[i]) for i in keep]
    if lowres_factor:
        for extra, png in zip(extras, lowres_pngs(images[keep], lowres_factor), strict=True):
            extra["lowres.png"] = png
    if inpaint_seed is not None:
        for extra, i in zip(extras, keep, strict=True):
            extra[MASK_MEMBER] = _png(masks[i].astype(np.uint8) * 255)
            extra[MASKED_MEMBER] = _npy(masked[i].cpu().numpy())
    shard.write([item["keys"][i] for i in keep], lat, [item["captions"][i] for i in keep],
                [item["metas"][i] for i in keep], extras)
