"""Merge the per-shard stats parts of an encode job into ``manifest.json``.

    python -m data_prep.finalize output=<latents root> first_stage=<name>    (or output=<the shard folder>)

Root config ``conf/finalize.yaml`` (schema ``FinalizeConfig``): ``first_stage=<name>`` selects the first-stage preset
the encode job used, whose shard folder is ``<output>/<first_stage.name>``. Checks that every input shard has its output shard and part, and fails listing the missing ones (re-run the
encode job: it redoes exactly those). The encode job calls this itself when its last task finishes
(``finalize=auto``), so running it by hand is only needed after ``finalize=false``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from data_prep import manifest as mf
from ldm_train.app import hydra_app
from ldm_train.config import FirstStageConfig
from ldm_train.data import fsspec_io


@dataclass
class FinalizeConfig:
    """``python -m data_prep.finalize``: the typed root config of ``conf/finalize.yaml``."""

    output: str = MISSING  # the latents root (with first_stage) or the shard folder itself
    # first_stage=<preset>: the shard folder is <output>/<first_stage.name> (unless output holds the job itself)
    first_stage: FirstStageConfig | None = None


class FinalizeError(RuntimeError):
    """Some input shards have no complete output yet (or a finished one is damaged)."""


class NoSamplesError(FinalizeError):
    """Every input shard is done but none holds a sample: no manifest is written."""


def _missing_urls(job: dict[str, Any], missing: list[int]) -> list[str]:
    """Input URLs of the missing shard indices (re-lists the input; falls back to the index)."""
    try:
        from ldm_train.data.input_shards import list_input_shards

        spec = job["input"]["spec"]
        shards = list_input_shards(spec, job["input"]["format"], int(job["encode"].get("files_per_shard", 1000)))
        return [f"{j}: {shards[j].url}" for j in missing]
    except Exception:  # listing the input is only for the message
        return [str(j) for j in missing]


def finalize(output: str) -> dict[str, Any]:
    """Merge ``<output>/_stats/part-*.json`` into ``<output>/manifest.json``; returns the manifest (with ``_url``)."""
    job_url = mf.job_url(output)
    if not fsspec_io.exists(job_url):
        raise FinalizeError(
            f"{job_url} not found: {output} is not the shard folder of an encode job "
            f"(pass output=<latents root> first_stage=<name>, or output=<root>/<name>)"
        )
    job = mf.read_json(job_url)
    stats_dir = fsspec_io.join(output, mf.STATS_DIR)
    names = set(fsspec_io.ls(stats_dir))
    shard_names = set(fsspec_io.ls(output))
    n = int(job["input"]["num_shards"])
    missing = [j for j in range(n) if f"part-{j:06d}.json" not in names or mf.shard_name(j) not in shard_names]
    if missing:
        listed = _missing_urls(job, missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise FinalizeError(
            f"{len(missing)} of {n} input shards have no complete output under {output}:\n  "
            + "\n  ".join(listed)
            + more
            + "\nre-run the encode job (it redoes only the missing shards) or fix/remove those inputs"
        )
    parts = [mf.read_json(fsspec_io.join(stats_dir, f"part-{j:06d}.json")) for j in range(n)]
    # a shard cut (or replaced) after its part was written: its recorded size no longer matches
    sizes = fsspec_io.sizes(output)
    damaged = [f"{fsspec_io.join(output, p['name'])}: {sizes.get(p['name'])} bytes, recorded {p['size']}"
               for p in parts if p.get("size") is not None and sizes.get(p["name"]) != int(p["size"])]
    if damaged:
        raise FinalizeError(
            f"{len(damaged)} finished shard(s) under {output} are damaged:\n  " + "\n  ".join(damaged[:20])
            + "\nre-run the encode job: it re-checks every finished shard and re-encodes the damaged ones "
            "(verify=true also compares their sha256)"
        )
    if sum(int(p["num_samples"]) for p in parts) == 0:
        skipped: dict[str, int] = {}
        for p in parts:
            for reason, k in p["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + int(k)
        raise NoSamplesError(
            f"every one of the {n} input shards is done but none holds a sample (skipped: {skipped}; input: "
            f"{job['input']['spec']}): no manifest written. Fix the input or the encode job's filter and re-run "
            f"it with overwrite=true"
        )
    manifest = mf.build_manifest(job, parts)
    manifest["_url"] = mf.write_manifest(output, manifest)
    if manifest["input_errors"]:
        print(f"[finalize] warning: {len(manifest['input_errors'])} damaged input shard(s), their readable samples "
              f"were kept: {manifest['input_errors'][:3]}", flush=True)
    return manifest


def _run(cfg: FinalizeConfig) -> int:
    output = cfg.output
    if cfg.first_stage is not None and not fsspec_io.exists(mf.job_url(output)):
        output = fsspec_io.join(output, cfg.first_stage.name)
    try:
        m = finalize(output)
    except FinalizeError as e:  # NoSamplesError included
        print(f"[finalize] {e}", file=sys.stderr, flush=True)
        return 1
    print(f"[finalize] {m['_url']}: {m['num_samples']} samples in {m['num_shards']} shards, "
          f"scale_factor={m['scale_factor']}, skipped={m['skipped']}", flush=True)
    return 0


def main() -> None:
    hydra_app("finalize", FinalizeConfig, _run,
              usage="python -m data_prep.finalize output=<latents root> first_stage=<name>")


if __name__ == "__main__":
    main()
