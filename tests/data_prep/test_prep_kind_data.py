"""The data of the inpainting, semantic and layout kinds: annotated synthetic shapes (segmentation map and box of
each object) and what the encode job stores from them (the map, the boxes, the inpainting mask and masked latent)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from data_prep.synthetic import SEG_CLASSES, write_synthetic
from ldm_train.data.masks import sample_mask
from ldm_train.data.shapes_captions import COLOURS, SHAPES
from tests.data_prep.helpers import encode_args, encode_cfg, tar_members

pytestmark = pytest.mark.integration  # starts processes or servers


def _rgb(blob: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def test_annotated_shapes_carry_a_segmentation_and_a_box_that_match_the_image(tmp_path) -> None:
    samples = tar_members(write_synthetic(str(tmp_path), num_samples=12, resolution=32, shard_size=12, annotate=True)[0])
    palette = np.array([(255, 255, 255), *COLOURS.values()])
    for s in samples.values():
        meta, image = json.loads(s["json"]), _rgb(s["png"])  # lossless: a segment's pixels keep their colour
        with Image.open(io.BytesIO(s["seg.png"])) as im:
            seg = np.asarray(im)
        scene = meta["scene"]
        assert set(np.unique(seg)) == {SEG_CLASSES.index(scene["colour"]), SEG_CLASSES.index(scene["background"])}
        # the map's class is the nearest palette colour of almost every pixel (edges are antialiased)
        nearest = ((image[:, :, None] - palette) ** 2).sum(-1).argmin(-1)
        assert (nearest == seg).mean() > 0.9
        (obj,) = meta["objects"]
        assert obj["class"] == SHAPES.index(scene["shape"]) and obj["name"] == scene["shape"]
        ys, xs = np.nonzero(seg == SEG_CLASSES.index(scene["colour"]))
        assert obj["box"] == [xs.min() / 32, ys.min() / 32, (xs.max() + 1) / 32, (ys.max() + 1) / 32]
    plain = tar_members(write_synthetic(str(tmp_path / "plain"), num_samples=2, resolution=32, shard_size=2)[0])
    assert set(plain["000000000"]) == {"jpg", "txt", "json"}  # annotate=false: the quickstart's data unchanged


def test_encode_stores_annotations_and_inpainting_inputs(tmp_path) -> None:
    from data_prep.encode_job import run_encode

    write_synthetic(str(tmp_path / "raw"), num_samples=6, resolution=16, shard_size=6, annotate=True)
    res = run_encode(encode_cfg(encode_args(input=tmp_path / "raw", output=tmp_path / "lat", resolution=16,
                                            first_stage="pixel", inpaint_masks="true", num_workers=0, seed=5)))
    assert res.ok and res.num_samples == 6
    manifest = json.loads((tmp_path / "lat" / "pixel" / "manifest.json").read_text())
    assert manifest["inpaint"] == {"masks": "large", "seed": 5}
    raw = tar_members(tmp_path / "raw" / "000000.tar")
    for key, s in tar_members(tmp_path / "lat" / "pixel" / "shard-000000.tar").items():
        assert s["seg.png"] == raw[key]["seg.png"]  # at the encoded resolution: passed through as written
        assert json.loads(s["json"])["objects"] == json.loads(raw[key]["json"])["objects"]
        with Image.open(io.BytesIO(s["mask.png"])) as im:
            mask = np.asarray(im) > 127
        assert np.array_equal(mask, sample_mask(5, key, 16))  # eval draws the same hole from (seed, key)
        # identity first stage: the masked latent is the image with the hole grey (0) and the rest unchanged
        image = np.load(io.BytesIO(s["latent.npy"])).astype(np.float32)
        masked = np.load(io.BytesIO(s["masked.npy"])).astype(np.float32)
        assert masked.shape == image.shape == (3, 16, 16)
        assert np.abs(masked[:, mask]).max() == 0
        assert np.allclose(masked[:, ~mask], image[:, ~mask], atol=1e-3)
