"""The encode job's entry point: images + captions -> first-stage latents as WebDataset shards + manifest.json.

    python -m data_prep.encode input=URL output=URL first_stage=NAME first_stage.checkpoint=PATH

Root config ``conf/encode.yaml`` (schema ``data_prep.config.EncodeConfig``). The work is in
``data_prep.encode_job`` (task split, resume, finalize) and ``data_prep.encoding`` (workers, first stage,
shard writer). The exit status is 1 when an input shard failed or was damaged, else 0.
"""
from __future__ import annotations

from data_prep.config import EncodeConfig
from ldm_train.app import hydra_app


def _run(cfg: EncodeConfig) -> int:
    # torch loads here, after parsing: --help stays fast
    from data_prep.encode_job import run

    return run(cfg)


def main() -> None:
    hydra_app("encode", EncodeConfig, _run)


if __name__ == "__main__":
    main()
