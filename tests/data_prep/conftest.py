"""Fixtures for the data_prep tests: encode-job runner, shard reader, an S3 server (moto) on loopback."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.data_prep.helpers import REPO, encode_args, encode_cfg, read_all_shards, read_shard, run_encode  # noqa: F401
from tests.s3_server import moto_server


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 (its own process, stopped by PID); yields the AWS env to use."""
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # this process (fsspec/s3fs) talks to it too
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # instances made before the env was set would miss the endpoint
        try:
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            s3fs.S3FileSystem.clear_instance_cache()
