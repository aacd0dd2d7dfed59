"""Fashion-MNIST (Debian's ``dataset-fashion-mnist``) as captioned image shards, the input the stages read.

    python -m data_prep.fashion_mnist output=DIR split=train|t10k [limit=N resolution=28 shard_size=1000 root=...]

Root config ``conf/fashion_mnist.yaml`` (schema ``FashionMNISTConfig``).
Reads the IDX files ``<root>/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (60,000 + 10,000 greyscale 28x28
images in 10 classes; ``apt-get install dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist)
and writes img2dataset-style tars ``000000.tar ...`` of ``<key>.png`` (lossless, the grey value copied to R, G
and B: the first stages take 3 channels), ``<key>.txt`` ("a photo of a {class name}") and ``<key>.json``
(``label``, ``class_name``, ``split``, ``index``). Sample i of a split is always image i of the IDX file.
A ``resolution`` other than 28 resizes the whole image, bicubic: 28 -> 32 (the fmnist_kl_f* presets) keeps the
garments sharp, where zero-padding would keep the pixels but shrink the garment within the frame.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from omegaconf import MISSING
from PIL import Image

from data_prep.image_shards import write_image_shards
from ldm_train.app import hydra_app
from ldm_train.config_checks import bounded, one_of

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
SPLITS = ("train", "t10k")
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
_MAGIC = {2051: "images", 2049: "labels"}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip or plain) as a uint8 array: images [N, 28, 28] or labels [N]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: `apt-get install dataset-fashion-mnist` (Debian) puts the "
                                f"Fashion-MNIST files in {DEFAULT_ROOT}, or pass root=DIR holding *-ubyte.gz")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic not in _MAGIC:
        raise ValueError(f"{path}: magic {magic} is neither 2051 (images) nor 2049 (labels): not an IDX file")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} ({int(np.prod(shape))} bytes) but holds {body.size}: "
                         "the file is truncated; reinstall dataset-fashion-mnist")
    return body.reshape(shape)


def load_split(split: str, root: str = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of ``train`` or ``t10k``."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    images = read_idx(os.path.join(root, f"{split}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(root, f"{split}-labels-idx1-ubyte.gz"))
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


def caption(label: int) -> str:
    return f"a photo of a {CLASS_NAMES[label]}"


def records(images: np.ndarray, labels: np.ndarray, split: str, resolution: int) -> Iterator[dict]:
    for index, (grey, label) in enumerate(zip(images, labels, strict=True)):
        img = Image.fromarray(grey, mode="L").convert("RGB")
        if resolution != img.width:
            img = img.resize((resolution, resolution), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        key = f"{split}-{index:06d}"
        meta = {"key": key, "label": int(label), "class_name": CLASS_NAMES[label], "split": split, "index": index,
                "caption": caption(int(label)), "width": resolution, "height": resolution}
        yield {"__key__": key, "png": buf.getvalue(), "txt": caption(int(label)), "json": meta}


def write_fashion_mnist(output: str, split: str = "train", limit: int | None = None, resolution: int = 28,
                        shard_size: int = 1000, root: str = DEFAULT_ROOT) -> list[str]:
    """Write the first ``limit`` images of ``split`` (all when None) as image shards; returns the shard URLs."""
    images, labels = load_split(split, root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return write_image_shards(output, records(images, labels, split, resolution), shard_size)


@dataclass
class FashionMNISTConfig:
    """``python -m data_prep.fashion_mnist``: the typed root config of ``conf/fashion_mnist.yaml``."""

    output: str = MISSING  # folder or URL of the tars
    split: str = one_of("train", SPLITS)
    limit: int | None = bounded(None, ge=0)  # the first N images of the split; None: all
    resolution: int = bounded(28, ge=1)  # 28: as stored; another side resizes, bicubic
    shard_size: int = bounded(1000, ge=1)  # samples per tar
    root: str = DEFAULT_ROOT  # folder of the IDX files *-ubyte.gz


def _run(cfg: FashionMNISTConfig) -> None:
    urls = write_fashion_mnist(cfg.output, cfg.split, cfg.limit, cfg.resolution, cfg.shard_size, cfg.root)
    print(json.dumps({"output": cfg.output, "split": cfg.split, "shards": len(urls)}))


def main() -> None:
    hydra_app("fashion_mnist", FashionMNISTConfig, _run,
              usage="python -m data_prep.fashion_mnist output=DIR split=train|t10k [limit=N]")


if __name__ == "__main__":
    main()
