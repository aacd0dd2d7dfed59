"""Class labels from the latent shards' json (``cond.kind=class``): the batch's ``label``, label dropout to the null
class at the caption-dropout rate, and clear errors for shards without labels."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from ldm_train.config import FirstStageConfig
from ldm_train.data.latent_conds import LabelSpec
from ldm_train.data.latents import LatentDataConfig, build_latent_loader
from tests.latent_shards import write_class_shards

FS = FirstStageConfig(name="fmnist_kl_f4", kind="kl", downsample_factor=4, embed_dim=3)


def _loader(shards: Path, labels: LabelSpec | None, dropout: float = 0.0, **kw):
    cfg = LatentDataConfig(**{"shards": str(shards), "resolution": 32, "batch_size": 16, "num_workers": 0,
                              "shuffle_buffer": 32, "shards_per_block": 2, "caption_dropout": dropout, **kw})
    return build_latent_loader(cfg, FS, labels=labels, rank=0, world_size=1)


def test_labels_follow_the_json_and_dropout_sends_them_to_the_null_class(tmp_path: Path) -> None:
    shards = tmp_path / "fmnist_kl_f4"
    write_class_shards(shards, 400, shard_size=100)
    loader = _loader(shards, LabelSpec("label", 10, null_label=10), dropout=0.25)
    labels, dropped = [], []
    for batch in itertools.islice(iter(loader), 100):  # 1,600 samples: four passes over the 400
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (16,)
        for key, label, drop in zip(batch["key"], batch["label"].tolist(), batch["dropped"].tolist(), strict=True):
            assert label == (10 if drop else int(key) % 10)  # the json's label, or the null class where dropped
            labels.append(label)
            dropped.append(drop)
    rate = sum(lab == 10 for lab in labels) / len(labels)
    assert rate == sum(dropped) / len(dropped)
    assert abs(rate - 0.25) < 0.04, rate  # binomial sd at n=1600: 0.011
    assert "tokens" not in batch  # no tokenizer for class conditioning
    assert set(labels) == set(range(11))

    no_drop = next(iter(_loader(shards, LabelSpec("label", 10, null_label=10))))
    assert 10 not in no_drop["label"].tolist()


def test_shards_without_labels_fail_at_start_naming_the_shard_and_the_fix(tmp_path: Path) -> None:
    shards = tmp_path / "fmnist_kl_f4"
    write_class_shards(shards, 20, shard_size=10, with_label=False)
    with pytest.raises(ValueError) as err:
        _loader(shards, LabelSpec("label", 10, null_label=10))
    msg = str(err.value)
    assert f"shard {shards}/shard-000000.tar" in msg and "sample 000000000 has no 'label'" in msg
    assert "data_prep.fashion_mnist" in msg and "cond.label_key" in msg and "cond.kind=text or none" in msg
    # the same shards train fine without labels (text / none)
    assert "label" not in next(iter(_loader(shards, None)))


def test_a_label_missing_later_or_out_of_range_is_named_by_the_loader(tmp_path: Path) -> None:
    import numpy as np

    from tests.latent_shards import write_latent_shards

    shards = tmp_path / "fmnist_kl_f4"

    def make(i: int):
        meta = {"label": 3} if i < 5 else {}  # the first shard is labelled, the second is not
        return f"{i:09d}", np.zeros((6, 8, 8)), "x", meta

    write_latent_shards(shards, [5, 5], make, name="fmnist_kl_f4", z_channels=3, resolution=32)
    loader = _loader(shards, LabelSpec("label", 10, null_label=10), shards_per_block=1)  # passes the start check
    with pytest.raises(ValueError, match=r"shard .*shard-000001\.tar: sample 00000000\d has no 'label'"):
        list(itertools.islice(iter(loader), 4))
    with pytest.raises(ValueError, match=r"label=3 but cond.num_classes=3"):
        _loader(shards, LabelSpec("label", 3, null_label=3))


def test_label_dropout_without_a_null_class_is_refused(tmp_path: Path) -> None:
    shards = tmp_path / "fmnist_kl_f4"
    write_class_shards(shards, 20, shard_size=10)
    loader = _loader(shards, LabelSpec("label", 10, null_label=None), dropout=0.1)
    with pytest.raises(ValueError, match="needs a null class"):
        next(iter(loader))
