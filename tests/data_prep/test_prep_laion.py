"""img2dataset / LAION metadata: the source json's fields are kept in each latent sample's json,
filters on similarity, punsafe, pwatermark, aesthetic score and original size skip and count by reason, the
shard's parquet is used when a sample has no json, and an orientation-6 JPEG is stored upright."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.encode_job import run_encode as run_encode_inproc
from ldm_train.data.manifest import read_manifest
from tests.data_prep.helpers import encode_args, encode_cfg, read_all_shards
from tests.data_prep.test_prep_hardening import FS, _exif6_jpeg, _jpeg, _records

pytestmark = pytest.mark.integration  # starts processes or servers


def _meta(url: str, **fields: float) -> bytes:
    base = {"url": url, "similarity": 0.33, "punsafe": 0.01, "pwatermark": 0.05, "AESTHETIC_SCORE": 6.1,
            "original_width": 512, "original_height": 384, "status": "success", "caption": "ignored: txt wins"}
    return json.dumps({**base, **fields}).encode()


def _shard(tmp_path):
    inp = tmp_path / "in"
    _records(inp / "000000.tar", [
        {"__key__": "000000000", "jpg": _jpeg((64, 48)), "txt": "a kept photo", "json": _meta("http://a/0.jpg")},
        {"__key__": "000000001", "jpg": _jpeg((64, 48)), "txt": "unsafe", "json": _meta("http://a/1.jpg", punsafe=0.9)},
        {"__key__": "000000002", "jpg": _jpeg((64, 48)), "txt": "watermarked",
         "json": _meta("http://a/2.jpg", pwatermark=0.95)},
        {"__key__": "000000003", "jpg": _jpeg((64, 48)), "txt": "ugly", "json": _meta("http://a/3.jpg",
                                                                                   AESTHETIC_SCORE=4.0)},
        {"__key__": "000000004", "jpg": _jpeg((64, 48)), "txt": "off-topic",
         "json": _meta("http://a/4.jpg", similarity=0.1)},
        {"__key__": "000000005", "jpg": _jpeg((64, 48)), "txt": "thumbnail",
         "json": _meta("http://a/5.jpg", original_width=100, original_height=80)},
        {"__key__": "000000006", "jpg": _exif6_jpeg(), "txt": "a phone photo", "json": _meta("http://a/6.jpg")},
        # no json: its metadata comes from the parquet (unsafe there)
        {"__key__": "000000007", "jpg": _jpeg((64, 48)), "txt": "parquet says unsafe"},
        {"__key__": "000000008", "jpg": _jpeg((64, 48)), "txt": "parquet only"},
    ])
    rows = [{"key": f"{i:09d}", "url": f"http://a/{i}.jpg", "caption": "c", "similarity": 0.3,
             "punsafe": 0.01, "pwatermark": 0.05, "AESTHETIC_SCORE": 6.0, "original_width": 640,
             "original_height": 480, "status": "success"} for i in range(9)]
    rows[7]["punsafe"] = 0.97
    pq.write_table(pa.Table.from_pylist(rows), str(inp / "000000.parquet"))
    return inp


def test_laion_metadata_is_kept_filtered_and_counted(tmp_path) -> None:
    inp, out = _shard(tmp_path), tmp_path / "out"
    filters = {"filter.max_punsafe": 0.5, "filter.max_pwatermark": 0.8, "filter.min_aesthetic": 5.0,
               "filter.min_similarity": 0.28, "filter.min_original_size": 256}
    r = run_encode_inproc(encode_cfg(encode_args(input=inp, output=out, resolution=32,
                                                 allow_random_first_stage="true", **filters)))
    expected = {"unsafe": 2, "watermark": 1, "low_aesthetic": 1, "low_similarity": 1, "small_original": 1}
    assert r.ok and r.num_samples == 3 and r.skipped == expected
    assert read_manifest(str(out / FS))["skipped"] == dict(sorted(expected.items()))
    samples = {s["key"]: s for s in read_all_shards(out / FS)}
    assert sorted(samples) == ["000000000", "000000006", "000000008"]
    kept = samples["000000000"]["json"]
    assert kept["source"] == {"url": "http://a/0.jpg", "similarity": 0.33, "punsafe": 0.01, "pwatermark": 0.05,
                              "AESTHETIC_SCORE": 6.1, "original_width": 512, "original_height": 384}
    # img2dataset's original size, not the stored 64 x 48
    assert (kept["original_width"], kept["original_height"]) == (512, 384)
    assert samples["000000000"]["txt"] == "a kept photo"
    assert samples["000000008"]["json"]["source"]["url"] == "http://a/8.jpg"  # from the parquet
    assert samples["000000008"]["json"]["original_width"] == 640


def test_without_filters_everything_is_kept_and_exif_is_upright(tmp_path) -> None:
    from ldm_train.data.input_shards import list_input_shards
    from ldm_train.data.readers import Filters, iter_shard

    inp = _shard(tmp_path)
    records = list(iter_shard(list_input_shards(str(inp))[0], 32, Filters()))
    assert [type(r).__name__ for r in records] == ["Sample"] * 9
    rotated = next(r for r in records if r.key == "000000006")
    assert "exif_transposed" in rotated.conversions
    img = rotated.image  # [3, 32, 32] in [-1, 1]; upright: blue on top, red at the bottom
    top, bottom = img[:, :8].mean(dim=(1, 2)).numpy(), img[:, -8:].mean(dim=(1, 2)).numpy()
    assert top[2] > 0.5 and top[0] < -0.5 and bottom[0] > 0.5 and bottom[2] < -0.5
    assert np.isfinite(img.numpy()).all()


def test_encode_progress_ends_with_every_shard_counted(tmp_path) -> None:
    """The bar's last state reads every image of the known total and shards=2/2 (it stopped at 1/2 before)."""
    from data_prep.synthetic import write_synthetic
    from tests.data_prep.helpers import run_encode

    write_synthetic(str(tmp_path / "raw"), num_samples=16, resolution=32, shard_size=8, split="train", seed=0)
    proc = run_encode(encode_args(input=str(tmp_path / "raw" / "{000000..000001}.tar"), output=tmp_path / "out",
                                  resolution=32, allow_random_first_stage="true", progress="true"))
    assert "16/16 images" in proc.stdout and "shards=2/2" in proc.stdout, proc.stdout[-2000:]
