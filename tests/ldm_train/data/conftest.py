"""Fixtures of the trainer-io tests: tiny latent shards + manifest following DESIGN.md "Latent shards"."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ldm_train.data.helpers import COLOURS, SHAPES, write_latent_shards  # noqa: F401
from tests.s3_server import moto_server


@pytest.fixture
def latent_shards(tmp_path: Path) -> Path:
    """Seven shards of uneven sizes (10..16 samples, 91 in all) of a tiny_kl_f4 first stage."""
    root = tmp_path / "latents" / "tiny_kl_f4"
    write_latent_shards(root, [10, 11, 12, 13, 14, 15, 16])
    return root


@pytest.fixture
def s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (own process, stopped by PID); the AWS env points at it. Yields its URL."""
    with moto_server(tmp_path / "moto.log") as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)  # loader workers fork with it
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # an instance made before would miss the endpoint
        yield env["AWS_ENDPOINT_URL"]
        s3fs.S3FileSystem.clear_instance_cache()
