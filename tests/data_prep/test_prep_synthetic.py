"""The built-in captioned-shapes dataset: determinism, held-out combos, captions that say what is drawn."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import synthetic
from data_prep.synthetic import object_core_mask, write_synthetic
from ldm_train.data.shapes_captions import COLOURS, HELDOUT_COMBOS, Scene, parse_caption
from tests.data_prep.helpers import tar_members

REPO = Path(__file__).resolve().parents[2]


def test_layout_and_determinism(tmp_path):
    a = write_synthetic(str(tmp_path / "a"), num_samples=25, resolution=32, shard_size=10, seed=3)
    b = write_synthetic(str(tmp_path / "b"), num_samples=25, resolution=32, shard_size=25, seed=3)
    assert [p.rsplit("/", 1)[-1] for p in a] == ["000000.tar", "000001.tar", "000002.tar"]
    sa = {k: v for p in a for k, v in tar_members(p).items()}
    sb = tar_members(b[0])
    assert sorted(sa) == [f"{i:09d}" for i in range(25)]
    # the same sample whatever the shard size
    assert all(sa[k]["jpg"] == sb[k]["jpg"] and sa[k]["txt"] == sb[k]["txt"] for k in sa)
    meta = json.loads(sa["000000007"]["json"])
    assert meta["key"] == "000000007" and meta["caption"] == sa["000000007"]["txt"].decode()
    assert (meta["width"], meta["height"]) == (32, 32)
    c = write_synthetic(str(tmp_path / "c"), num_samples=5, resolution=32, shard_size=5, seed=4)
    assert tar_members(c[0])["000000000"]["jpg"] != sa["000000000"]["jpg"]


def test_heldout_combos_never_in_train(tmp_path):
    held = set(HELDOUT_COMBOS)
    train = [synthetic.sample_scene(0, "train", i)[0] for i in range(600)]
    heldout = [synthetic.sample_scene(0, "heldout", i)[0] for i in range(100)]
    assert not any((s.colour, s.shape) in held for s in train)
    assert all((s.colour, s.shape) in held for s in heldout)
    # every colour and every shape of the held-out pairs still appears in train
    assert {c for c, _ in held} <= {s.colour for s in train}
    assert {sh for _, sh in held} <= {s.shape for s in train}
    assert all(s.background != s.colour for s in train + heldout)


def test_caption_roundtrip_and_errors():
    for i in range(50):
        scene, _ = synthetic.sample_scene(1, "train", i)
        assert parse_caption(scene.caption) == scene
    s = parse_caption("a small red circle at the top left on a blue background")
    assert s == Scene("small", "red", "circle", "top left", "blue")
    assert parse_caption("A large black star in the center on a white background").position == "center"
    with pytest.raises(ValueError, match="not of the synthetic form"):
        parse_caption("a photo of a cat")
    with pytest.raises(ValueError):
        parse_caption("a small pink circle at the top left on a blue background")


@pytest.mark.parametrize("size", ["small", "large"])
def test_object_colour_measurable_at_64px(tmp_path, size):
    """The core mask lies inside the drawn object: its mean colour is the caption's colour (after JPEG)."""
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=float)
    hits, n = 0, 0
    for i in range(200):
        scene, rng = synthetic.sample_scene(0, "train", i)
        if scene.size != size:
            continue
        buf = io.BytesIO()
        synthetic.render(scene, 64, rng).save(buf, format="JPEG", quality=95)
        img = np.asarray(Image.open(buf), dtype=float)
        mask = object_core_mask(scene, 64)
        assert mask.sum() >= (30 if size == "small" else 150)
        mean = img[mask].mean(0)
        nearest = names[int(np.argmin(((palette - mean) ** 2).sum(1)))]
        hits += nearest == scene.colour
        n += 1
    assert n > 50 and hits == n


@pytest.mark.integration  # starts a process
def test_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "data_prep.synthetic", f"output={tmp_path}", "num_samples=3",
                           "resolution=16", "split=heldout", "seed=2"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {"output": str(tmp_path), "split": "heldout", "num_samples": 3, "shards": 1}
    caps = [v["txt"].decode() for v in tar_members(tmp_path / "000000.tar").values()]
    assert len(caps) == 3 and all((parse_caption(c).colour, parse_caption(c).shape) in HELDOUT_COMBOS for c in caps)
