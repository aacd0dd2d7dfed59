"""Everything through S3: a moto server on 127.0.0.1 holds the input tars and receives the latent shards."""
from __future__ import annotations

import json

import pytest
import torch

from data_prep.encode_job import run_encode as run_encode_inproc
from data_prep.synthetic import write_synthetic
from ldm_train.data import fsspec_io
from ldm_train.data.manifest import read_manifest
from ldm_train.data.readers import image_dataset
from tests.data_prep.helpers import encode_args, encode_cfg, read_shard, run_encode

pytestmark = pytest.mark.integration  # starts processes or servers


@pytest.fixture(scope="module")
def bucket(s3_server):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("prep-test")
    write_synthetic("s3://prep-test/raw", num_samples=24, resolution=32, shard_size=8)  # 3 shards
    return "s3://prep-test"


def test_fsspec_io_on_s3(bucket):
    names = fsspec_io.ls(f"{bucket}/raw")  # each shard with its img2dataset-style _stats.json
    assert [n for n in names if n.endswith(".tar")] == ["000000.tar", "000001.tar", "000002.tar"]
    url = f"{bucket}/tmp/atomic.bin"
    with pytest.raises(RuntimeError):
        with fsspec_io.atomic_write(url) as f:
            f.write(b"half")
            raise RuntimeError("writer died")
    assert not fsspec_io.exists(url)  # an aborted upload leaves no object
    fsspec_io.write_bytes(url, b"whole")
    assert fsspec_io.read_bytes(url) == b"whole"
    with pytest.raises(RuntimeError):
        with fsspec_io.atomic_write(f"{bucket}/tmp/atomic.txt", "w") as f:
            f.write("half")
            raise RuntimeError("writer died")
    assert not fsspec_io.exists(f"{bucket}/tmp/atomic.txt")  # text mode aborts the same way
    fsspec_io.write_text(f"{bucket}/tmp/atomic.txt", "whole")
    assert fsspec_io.read_bytes(f"{bucket}/tmp/atomic.txt") == b"whole"


def test_readers_and_webdataset_over_s3(bucket):
    ds = image_dataset(f"{bucket}/raw/{{000000..000001}}.tar", 32)
    keys = [k for b in torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2) for k in b["key"]]
    assert sorted(keys) == [f"{i:09d}" for i in range(16)]
    import webdataset as wds

    fsspec_io.register_fsspec_schemes()
    samples = list(wds.WebDataset(f"{bucket}/raw/000002.tar", shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(16, 24)]


def test_encode_s3_to_s3(bucket, s3_server):
    args = encode_args(input=f"{bucket}/raw/{{000000..000002}}.tar", output=f"{bucket}/latents", resolution=32,
                       allow_random_first_stage="true")
    p = run_encode(args, env=s3_server)
    assert json.loads(p.stdout.strip().splitlines()[-1])["samples"] == 24
    out = f"{bucket}/latents/tiny_kl_f4"
    m = read_manifest(out)
    assert m["num_samples"] == 24 and [s["name"] for s in m["shards"]] == [f"shard-{j:06d}.tar" for j in range(3)]
    assert m["shards"][1]["input"] == f"{bucket}/raw/000001.tar"
    keys = [s["key"] for sh in m["shards"] for s in read_shard(fsspec_io.read_bytes(f"{out}/{sh['name']}"))]
    assert sorted(keys) == [f"{i:09d}" for i in range(24)]
    # resume sees the parts on S3 and redoes nothing (in-process: this process has the S3 env too)
    r2 = run_encode_inproc(encode_cfg(args))
    assert r2.already_done == [0, 1, 2] and r2.done == [] and r2.manifest == f"{out}/manifest.json"
