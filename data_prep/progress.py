"""The encode job's progress line: images read of the total when it is known, the input shards finished, the ETA.

    encode task 0:  17%|##        | 10,240/60,000 images [01:40<08:06, 102.4img/s, skipped=12, shards=10/60]
    encode task 0: 10,240 images [01:40, 102.4img/s, skipped=12, shards=10/60, eta=0:08:20]

The total is known for folder inputs (the files listed) and for img2dataset tars, whose ``<shard>_stats.json``
says how many samples each tar holds (``successes``); without it (other tars) the ETA comes from the input
shards finished. Images counts every sample read: encoded or skipped by a filter.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from data_prep.image_shards import stats_url
from ldm_train.data import fsspec_io
from ldm_train.data.readers import InputShard

KNOWN = "{desc}: {percentage:3.0f}%|{bar:10}| {n:,}/{total:,} images [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
UNKNOWN = "{desc}: {n:,} images [{elapsed}, {rate_fmt}{postfix}]"


def _tar_count(tar_url: str) -> int | None:
    if not tar_url.endswith(".tar"):  # e.g. a pipe: command
        return None
    try:
        count = json.loads(fsspec_io.read_bytes(stats_url(tar_url)))["successes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return count if isinstance(count, int) and count >= 0 else None


def known_total(shards: Sequence[InputShard]) -> int | None:
    """The images in ``shards``, or None when a tar has no img2dataset stats (asked of the first tar alone first,
    so tars without them cost one look-up; the others are read 16 at a time: one round trip each on S3)."""
    if not shards:
        return None
    if all(s.kind != "tar" for s in shards):
        return sum(len(s.files) for s in shards)
    if _tar_count(shards[0].url) is None:
        return None
    with ThreadPoolExecutor(16) as pool:
        counts = list(pool.map(_tar_count, [s.url for s in shards]))
    return None if None in counts else sum(counts)  # type: ignore[arg-type]


class EncodeProgress:
    """tqdm bar of one encode task (``enabled`` false: silent, still counting shards)."""

    def __init__(self, shards: Sequence[InputShard], task_index: int, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.total = known_total(shards) if enabled else None
        self.num_shards, self.shards_done, self.skipped = len(shards), 0, 0
        self._started = time.perf_counter()
        # in a batch log (no tty) a redraw every 30 s keeps the file readable
        self.bar = tqdm(desc=f"encode task {task_index}", unit="img", disable=not enabled, total=self.total,
                        bar_format=KNOWN if self.total is not None else UNKNOWN,
                        mininterval=2.0 if sys.stdout.isatty() else 30.0, smoothing=0.05, file=sys.stdout)

    def _postfix(self) -> dict[str, Any]:
        out: dict[str, Any] = {"skipped": self.skipped, "shards": f"{self.shards_done}/{self.num_shards}"}
        if self.total is None and self.shards_done:
            left = (time.perf_counter() - self._started) / self.shards_done * (self.num_shards - self.shards_done)
            out["eta"] = f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
        return out

    def batch(self, images: int) -> None:
        """``images`` encoded."""
        self.bar.update(images)
        self.bar.set_postfix(self._postfix(), refresh=False)

    def shard_done(self, skipped: int, filtered: int) -> None:
        """An input shard finished: ``skipped`` of its samples are not in the output, ``filtered`` of those were
        dropped before encoding (the others, e.g. non-finite latents, were counted as encoded)."""
        self.shards_done += 1
        self.skipped += skipped
        self.bar.update(filtered)
        self.bar.set_postfix(self._postfix(), refresh=self.shards_done == self.num_shards)

    def close(self) -> None:
        self.bar.close()
