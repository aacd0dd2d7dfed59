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
import tarfile

from eval.adherence import adherence_of_folder

FIELDS = ("colour", "shape", "position", "background")


def captions(tar_path: str) -> list[str]:
    """The ``.txt`` captions of one tar shard, in the tar's order."""
    with tarfile.open(tar_path) as tar:
        return [tar.extractfile(m).read().decode().strip() for m in tar.getmembers()  # type: ignore[union-attr]
                if m.isfile() and m.name.endswith(".txt")]


def readability(reconstruction_dir: str, tar_path: str) -> dict[str, dict[str, float]]:
    caps = captions(tar_path)
    n = min(len(caps), len([f for f in os.listdir(os.path.join(reconstruction_dir, "originals")) if f.endswith(".png")]))
    if n == 0:
        raise SystemExit(f"no captions in {tar_path} or no PNGs under {reconstruction_dir}/originals")
    out: dict[str, dict[str, float]] = {}
    for sub in ("originals", "reconstructions"):
        scores = adherence_of_folder(os.path.join(reconstruction_dir, sub), caps[:n])
        out[sub] = {f: round(scores[f"all_{f}_accuracy"], 4) for f in FIELDS}
    out["num_images"] = n  # type: ignore[assignment]
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
