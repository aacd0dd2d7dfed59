"""Helpers of the data-prep tests: encode job arguments, running it, reading the shards it wrote."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def encode_args(**kw: object) -> list[str]:
    """Hydra overrides for data_prep.encode; small defaults suited to 2 shared CPU cores."""
    args = {"num_workers": 1, "batch_size": 8, "progress": "false", **kw}
    # Hydra's override grammar reads {..} as a dict: quote brace patterns
    return [f"{k}='{v}'" if "{" in str(v) else f"{k}={v}" for k, v in args.items()]


def encode_cfg(overrides: list[str]):
    """The typed conf/encode.yaml with overrides (for calling data_prep.encode_job.run_encode in-process)."""
    from data_prep.config import EncodeConfig
    from ldm_train.app import compose

    return compose("encode", EncodeConfig, overrides)


def run_encode(overrides: list[str], env: dict[str, str] | None = None, timeout: float = 240,
               check: bool = True) -> subprocess.CompletedProcess:
    """``python -m data_prep.encode`` in a subprocess (real Hydra app, real DataLoader workers)."""
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.encode", *overrides], cwd=REPO, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"encode failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def read_shard(data: bytes) -> list[dict]:
    """Samples of one latent shard: {key, latent (np.ndarray), txt, json}."""
    out: dict[str, dict] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m in t.getmembers():
            key, _, ext = m.name.partition(".")
            raw = t.extractfile(m).read()
            rec = out.setdefault(key, {"key": key})
            if ext == "latent.npy":
                rec["latent"] = np.load(io.BytesIO(raw), allow_pickle=False)
            elif ext == "txt":
                rec["txt"] = raw.decode()
            elif ext == "json":
                rec["json"] = json.loads(raw)
    return list(out.values())


def read_all_shards(shard_dir: Path) -> list[dict]:
    return [s for p in sorted(shard_dir.glob("shard-*.tar")) for s in read_shard(p.read_bytes())]


def tar_members(path) -> dict[str, dict[str, bytes]]:
    """A tar's members grouped by sample key: {key: {extension: bytes}}."""
    import tarfile

    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out
