"""Fixtures of the autoencoder tests: small synthetic image sets and the composed trainer config."""
from __future__ import annotations

import pytest

from tests.ldm_train.first_stage.helpers import REPO, ae_cfg, stats  # noqa: F401


@pytest.fixture(scope="session")
def shapes32(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The built-in synthetic dataset at 32 px: 96 training images in 4 shards, 16 held-out images."""
    from data_prep.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("shapes32")
    write_synthetic(str(root / "train"), 96, resolution=32, shard_size=24, seed=0)
    write_synthetic(str(root / "heldout"), 16, resolution=32, shard_size=16, seed=1)
    return {"train": str(root / "train"), "heldout": str(root / "heldout")}
