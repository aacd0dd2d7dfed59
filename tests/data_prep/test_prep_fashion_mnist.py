"""Fashion-MNIST from Debian's dataset-fashion-mnist as captioned image shards, read back by the stages' reader."""
from __future__ import annotations

import gzip
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from data_prep.fashion_mnist import CLASS_NAMES, DEFAULT_ROOT, load_split, read_idx, write_fashion_mnist
from ldm_train.data.readers import image_dataset

pytestmark = pytest.mark.skipif(not os.path.isfile(f"{DEFAULT_ROOT}/t10k-images-idx3-ubyte.gz"),
                                reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist (.ci/run does)")


def test_shards_hold_the_idx_images_as_rgb_with_class_captions(tmp_path) -> None:
    images, labels = load_split("train", DEFAULT_ROOT)
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
    urls = write_fashion_mnist(str(tmp_path / "fm"), "train", limit=25, shard_size=10)
    assert [u.rsplit("/", 1)[1] for u in urls] == ["000000.tar", "000001.tar", "000002.tar"]
    with tarfile.open(urls[0]) as tar:
        names = sorted(m.name for m in tar.getmembers())
        meta = json.loads(tar.extractfile("train-000003.json").read())
    assert names[:3] == ["train-000000.json", "train-000000.png", "train-000000.txt"]
    assert meta["label"] == labels[3] and meta["class_name"] == CLASS_NAMES[labels[3]] and meta["index"] == 3
    recs = list(image_dataset(str(tmp_path / "fm"), 28))
    assert len(recs) == 25
    for i, rec in enumerate(recs):
        assert rec["caption"] == f"a photo of a {CLASS_NAMES[labels[i]]}"
        pixels = ((rec["image"] + 1) * 127.5).round().to(torch.uint8)  # [3, 28, 28]: grey copied to R, G, B
        assert torch.equal(pixels[0], torch.from_numpy(images[i])) and torch.equal(pixels[0], pixels[2])


def test_missing_or_truncated_idx_names_the_file_and_fix(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        read_idx(str(tmp_path / "train-images-idx3-ubyte.gz"))
    with gzip.open(f"{DEFAULT_ROOT}/t10k-images-idx3-ubyte.gz", "rb") as f:
        head = f.read(16 + 28 * 28 * 3)
    short = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(short, "wb") as f:
        f.write(head)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(short))
