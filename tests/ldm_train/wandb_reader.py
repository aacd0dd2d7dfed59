"""Read a W&B transaction log (``run-<id>.wandb``) with wandb's own protobuf schema.

wandb >= 0.2x no longer ships a Python reader; the file is a LevelDB-style log: a 7-byte header
(b":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks (crc32 u32, length u16, type u8, data),
types FULL=1 FIRST=2 MIDDLE=3 LAST=4; each reassembled record is a serialized ``wandb_internal_pb2.Record``.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B log"
    records, parts, pos = [], [], HEADER
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        if kind == 0 and length == 0:
            break  # zero-filled tail of a file still being written
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"bad checksum at byte {pos} of {path}"
        pos += HEADER + length
        parts.append(chunk)
        if kind in (FULL, LAST):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(b"".join(parts))
            records.append(rec)
            parts = []
    return records


def wait_for_run_record(path: str | Path, timeout_s: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The records of ``path`` once its run record is on disk. A run finished in this process is flushed by the
    wandb service, which may still be writing the file when ``run.finish()`` returns (seen on a loaded CI machine:
    the file held no record yet); a file whose run record never comes fails after ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = read_records(path)
        except AssertionError:  # a chunk still being written
            if time.monotonic() > deadline:
                raise
            records = []
        if any(r.WhichOneof("record_type") == "run" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def history(path: str | Path) -> dict[int, dict[str, Any]]:
    """step -> {key: value} of every ``run.log`` in the file (internal keys starting with "_" dropped)."""
    rows: dict[int, dict[str, Any]] = {}
    for rec in read_records(path):
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            if not key.startswith("_"):
                row[key] = json.loads(item.value_json)
        rows.setdefault(rec.history.step.num, {}).update(row)
    return rows


def config(path: str | Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rec in read_records(path):
        kind = rec.WhichOneof("record_type")
        if kind in ("config", "run"):  # the init config travels in the run record, later updates alone
            for item in (rec.config if kind == "config" else rec.run.config).update:
                key = item.key or "/".join(item.nested_key)
                out[key] = json.loads(item.value_json)
    return out


def run_ids(path: str | Path) -> list[str]:
    return [rec.run.run_id for rec in read_records(path) if rec.WhichOneof("record_type") == "run"]
