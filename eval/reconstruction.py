"""Reconstruction quality of a first stage (the paper's Tab. 8 columns): PSNR, SSIM, LPIPS, rFID.

    python -m eval.reconstruction first_stage=kl_f8 first_stage.checkpoint=PATH images=HELD_OUT num_images=N

Root config ``conf/eval_reconstruction.yaml`` (schema ``eval.config.ReconstructionConfig``); the work is in
``eval.reconstruction_metrics``. Writes ``<output_dir>/originals/``, ``reconstructions/`` (PNG) and ``metrics.json``.
"""
from __future__ import annotations

from typing import Any

from eval.config import ReconstructionConfig
from ldm_train.app import hydra_app


def _run(cfg: ReconstructionConfig) -> dict[str, Any]:
    # torch and lpips load here, after parsing: --help stays fast
    from eval.reconstruction_metrics import run

    return run(cfg)


def main() -> None:
    hydra_app("eval_reconstruction", ReconstructionConfig, _run)


if __name__ == "__main__":
    main()
