"""Reconstruction quality of a first stage (the paper's Tab. 8 columns): PSNR, SSIM, LPIPS, rFID.

    python -m eval.reconstruction first_stage=kl_f8 first_stage.checkpoint=PATH images=HELD_OUT num_images=N

Root config ``conf/eval_reconstruction.yaml`` (schema ``eval.config.ReconstructionConfig``); the work is in
``eval.reconstruction_metrics``. Writes ``<output_dir>/originals/``, ``reconstructions/`` (PNG) and ``metrics.json``.
"""
from __future__ import annotations

from eval.config import ReconstructionConfig
from ldm_train.app import hydra_app


def main() -> None:
    from eval.reconstruction_metrics import run

    hydra_app("eval_reconstruction", ReconstructionConfig, run)


if __name__ == "__main__":
    main()
