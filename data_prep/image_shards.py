"""Writing img2dataset-style image shards: ``000000.tar ...`` of ``<key>.<png|jpg>`` + ``<key>.txt`` + ``<key>.json``,
and img2dataset's ``000000_stats.json`` beside each (its sample count)."""
from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ldm_train.data import fsspec_io

STATS_SUFFIX = "_stats.json"  # img2dataset: 00000.tar -> 00000_stats.json


def stats_url(tar_url: str) -> str:
    """img2dataset's stats file of a tar (``successes``: the samples in it)."""
    return tar_url.removesuffix(".tar") + STATS_SUFFIX


def write_image_shards(output: str, records: Iterable[dict[str, Any]], shard_size: int) -> list[str]:
    """Write ``records`` (WebDataset samples: ``__key__``, an image member, ``txt``, ``json``) as tars of
    ``shard_size`` under ``output`` (path or URL), each written atomically; returns the shard URLs."""
    import webdataset as wds

    if shard_size <= 0:
        raise ValueError(f"shard_size ({shard_size}) must be positive")
    fsspec_io.makedirs(output)
    urls: list[str] = []
    records = iter(records)
    while True:
        first = next(records, None)
        if first is None:
            return urls
        url = fsspec_io.join(output, f"{len(urls):06d}.tar")
        with fsspec_io.atomic_write(url) as f:
            writer = wds.TarWriter(f)
            writer.write(first)
            count = 1
            for _ in range(shard_size - 1):
                rec = next(records, None)
                if rec is None:
                    break
                writer.write(rec)
                count += 1
            writer.close()
        # as img2dataset: how many samples the tar holds, so the encode job knows its total up front
        fsspec_io.write_bytes(stats_url(url), json.dumps({"count": count, "successes": count}).encode())
        urls.append(url)
