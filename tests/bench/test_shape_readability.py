"""bench/shape_readability.py pairs eval.reconstruction's PNGs with the tar's captions in order."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_prep.synthetic import write_synthetic

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration  # starts the bench script


def test_originals_read_as_drawn_and_a_blank_reconstruction_reads_as_nothing(tmp_path: Path) -> None:
    tar = write_synthetic(str(tmp_path / "raw"), 12, 64, 100, split="heldout")[0]
    rec = tmp_path / "rec"
    (rec / "originals").mkdir(parents=True)
    (rec / "reconstructions").mkdir()
    with tarfile.open(tar) as t:  # as eval.reconstruction writes them: i-th image of the tar -> 00000i.png
        jpgs = [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".jpg")]
    for i, data in enumerate(jpgs):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        img.save(rec / "originals" / f"{i:06d}.png")
        Image.new("RGB", img.size, (255, 255, 255)).save(rec / "reconstructions" / f"{i:06d}.png")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "shape_readability.py"), "--reconstruction", str(rec),
                          "--images", tar], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout)
    assert row["num_images"] == 12
    assert row["originals"]["colour"] == 1.0 and row["originals"]["position"] == 1.0
    # a white image has no object: no colour, shape or position read; the background is right only on white ones
    assert row["reconstructions"]["colour"] == row["reconstructions"]["shape"] == 0.0
    assert row["reconstructions"]["position"] == 0.0
    assert row["reconstructions"]["background"] < 1.0
