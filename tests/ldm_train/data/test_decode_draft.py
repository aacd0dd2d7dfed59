"""DCT-domain JPEG decoding for the shared transform: a large JPEG is decoded at a reduced scale
that keeps at least twice the target side, reports its full stored size, and gives the full-decode path's pixels
within a small error (real photo: skimage's astronaut)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ldm_train.data.image_decode import decode_for_side
from ldm_train.data.transforms import resize_center_crop


def _jpeg(size: tuple[int, int]) -> bytes:
    data = pytest.importorskip("skimage.data")
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize(size, Image.LANCZOS).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_large_jpeg_is_drafted_and_matches_the_full_decode() -> None:
    blob = _jpeg((1024, 768))
    img, notes, size = decode_for_side(blob, 64)
    assert size == (1024, 768) and notes == []
    assert min(img.size) >= 128 and img.size[0] < 1024  # decoded at 1/2 .. 1/4 scale, never below 2x the target
    full = Image.open(io.BytesIO(blob)).convert("RGB")
    ref = np.asarray(full.resize((85, 64), Image.BICUBIC, reducing_gap=3.0).crop((10, 0, 74, 64)))
    ours = np.asarray(resize_center_crop(img, 64))
    assert ours.shape == (64, 64, 3)
    assert _psnr(ours, ref) > 35


def test_small_images_and_non_jpegs_are_decoded_in_full() -> None:
    blob = _jpeg((200, 150))
    img, _, size = decode_for_side(blob, 64)
    assert img.size == size == (200, 150)  # < 4x the target: no draft
    buf = io.BytesIO()
    Image.new("RGB", (600, 400), (10, 200, 30)).save(buf, format="PNG")
    img, _, size = decode_for_side(buf.getvalue(), 64)
    assert img.size == size == (600, 400)
