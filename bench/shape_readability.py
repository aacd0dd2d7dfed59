"""How much of a captioned-shapes image survives a first stage (prints JSON): the quickstart's pixel analyser
(``eval.adherence``) reads colour, shape, position and background from the originals and from their
reconstructions, against the captions.

    python -m eval.reconstruction first_stage=tiny_kl_f4 first_stage.checkpoint=EXPORT images=HELDOUT.tar \\
        num_images=400 output_dir=REC lpips.enabled=false metrics.fid=false
    python bench/shape_readability.py --reconstruction REC --images HELDOUT.tar

``eval.reconstruction`` reads ``--images`` in tar order and writes ``originals/`` and ``reconstructions/`` as
``000000.png``...; this pairs the i-th PNG with the i-th caption of the tar. A latent diffusion model decoded
through that first stage can draw no more readable shapes than its reconstructions hold.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from eval.adherence import adherence_of_folder
from ldm_train.data.shard_reader import shard_captions

FIELDS = ("colour", "shape", "position", "background")


def readability(reconstruction_dir: str, tar_path: str) -> dict[str, Any]:
    """Accuracies per field of the originals and of the reconstructions, and the number of images scored."""
    caps = shard_captions([tar_path])
    n = min(len(caps), len([f for f in os.listdir(os.path.join(reconstruction_dir, "originals")) if f.endswith(".png")]))
    if n == 0:
        raise SystemExit(f"no captions in {tar_path} or no PNGs under {reconstruction_dir}/originals")
    out: dict[str, Any] = {"num_images": n}
    for sub in ("originals", "reconstructions"):
        scores = adherence_of_folder(os.path.join(reconstruction_dir, sub), caps[:n])
        out[sub] = {f: round(scores[f"all_{f}_accuracy"], 4) for f in FIELDS}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reconstruction", required=True, help="output_dir of eval.reconstruction")
    p.add_argument("--images", required=True, help="the one held-out tar eval.reconstruction read")
    a = p.parse_args()
    print(json.dumps({"bench": "shape_readability", "reconstruction": a.reconstruction, "images": a.images,
                      **readability(a.reconstruction, a.images)}))


if __name__ == "__main__":
    main()
