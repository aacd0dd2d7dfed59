"""What a latent sample carries besides its latent, for conditioning: the class label in its json
(``cond.kind=class``) and its low-resolution image (``cond.kind=concat``), each read with an error that names
the shard, the sample and the fix; ``downsample_u8`` makes that image (the encode job) and eval's inputs."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ldm_train.data.shard_reader import iter_samples


@dataclass
class LabelSpec:
    """Class labels for ``cond.kind=class``: ``json[key]`` of each sample, in ``0..num_classes-1``; a dropped sample
    (the caption-dropout mask) gets ``null_label``."""

    key: str = "label"
    num_classes: int = 1000
    null_label: int | None = None


def label_fix_hint(key: str) -> str:
    return (f"cond.kind=class reads the class label from each sample's json ('{key}'): encode labelled images "
            "(data_prep.fashion_mnist shards, or ImageNet-style class folders <root>/<class>/<image>) with "
            f"data_prep.encode, set cond.label_key to the key your json uses, or train with cond.kind=text or none")


def sample_label(meta: dict[str, Any], spec: LabelSpec, url: str, key: str) -> int:
    """The class label of one sample, or a ValueError naming the shard, the sample and the fix."""
    value = meta.get(spec.key)
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        got = "has no" if value is None else f"has {spec.key}={value!r}, not a class index, as"
        raise ValueError(f"shard {url}: sample {key} {got} '{spec.key}' in its json. {label_fix_hint(spec.key)}")
    if value >= spec.num_classes:
        raise ValueError(f"shard {url}: sample {key} has {spec.key}={value} but cond.num_classes={spec.num_classes}: "
                         f"set cond.num_classes to the number of classes of the data set (labels 0..N-1)")
    return value


def check_first_label(shards: list[tuple[str, int]], spec: LabelSpec) -> None:
    """Read the first sample of the first non-empty shard and check it carries a label (a fast start-up check; the
    loader checks every sample)."""
    for url, n in shards:
        if n:
            for sample in iter_samples(url):
                meta = json.loads(sample["json"]) if "json" in sample else {}
                sample_label(meta, spec, url, sample["__key__"].rsplit("/", 1)[-1])
                return


def downsample_u8(images: torch.Tensor, factor: int) -> np.ndarray:
    """[-1, 1] images [B, 3, H, W] -> uint8 [B, 3, H/factor, W/factor] (bicubic, antialiased): the low-resolution
    copy ``data_prep.encode lowres_factor`` stores and eval feeds a super-resolution model."""
    h, w = images.shape[-2] // factor, images.shape[-1] // factor
    small = torch.nn.functional.interpolate(images.float().cpu(), size=(h, w), mode="bicubic", align_corners=False,
                                            antialias=True)
    return ((small.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def lowres_fix_hint(key: str) -> str:
    return (f"cond.kind=concat reads each sample's low-resolution image ('{key}'): encode the images with "
            "data_prep.encode lowres_factor=N (N = the super-resolution factor, e.g. 4 as CompVis bsr_sr), "
            "or train with cond.kind=text, class or none")


def decode_lowres(data: bytes | None, url: str, key: str, member: str) -> np.ndarray:
    """One sample's low-resolution image as uint8 [3, h, w], or a ValueError naming the shard, sample and fix."""
    from PIL import Image

    if data is None:
        raise ValueError(f"shard {url}: sample {key} has no '{member}'. {lowres_fix_hint(member)}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB")).transpose(2, 0, 1).copy()
    except Exception as err:
        raise ValueError(f"shard {url}: sample {key} has an unreadable '{member}' ({err}): re-encode the shard "
                         "with data_prep.encode verify=true overwrite=true") from err


def first_lowres(shards: list[tuple[str, int]], member: str, n: int) -> tuple[list[torch.Tensor], list[str]]:
    """The low-resolution images ([3, h, w] in [-1, 1]) and keys of the first ``n`` samples, in shard order (the
    super-resolution inputs of the training sample grid)."""
    images: list[torch.Tensor] = []
    keys: list[str] = []
    for url, count in shards:
        if not count:
            continue
        for sample in iter_samples(url):
            key = sample["__key__"].rsplit("/", 1)[-1]
            images.append(torch.from_numpy(decode_lowres(sample.get(member), url, key, member)).float() / 127.5 - 1)
            keys.append(key)
            if len(images) == n:
                return images, keys
    return images, keys
