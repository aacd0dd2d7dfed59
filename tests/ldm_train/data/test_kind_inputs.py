"""The inputs of the inpainting and layout kinds: the large-mask generator and the layout tokeniser."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_train.data.cond_inputs import inpaint_concat, one_hot
from ldm_train.data.layout import LayoutTokenizer
from ldm_train.data.masks import MAX_COVER, MIN_COVER, large_mask, sample_mask


@pytest.mark.parametrize("side", [16, 64, 256])
def test_large_masks_cover_their_range_and_vary(side: int) -> None:
    masks = [sample_mask(0, f"{i:09d}", side) for i in range(40)]
    cover = np.array([m.mean() for m in masks])
    assert all(m.shape == (side, side) and m.dtype == bool for m in masks)
    assert (cover >= MIN_COVER).all() and (cover <= MAX_COVER).all()
    assert len({m.tobytes() for m in masks}) == len(masks)  # every key its own mask
    # holes are thick (strokes and boxes, not scattered pixels): most hole pixels have all 4 neighbours in the hole
    inner = [m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:] for m in masks]
    share = np.mean([i.sum() / m.sum() for i, m in zip(inner, masks, strict=True)])
    assert share > (0.3 if side == 16 else 0.6), share


def test_a_mask_is_a_function_of_seed_and_key() -> None:
    assert np.array_equal(sample_mask(3, "a", 32), sample_mask(3, "a", 32))
    assert not np.array_equal(sample_mask(3, "a", 32), sample_mask(4, "a", 32))
    with pytest.raises(ValueError, match="at least 4 px"):
        large_mask(np.random.default_rng(0), 2)


def test_layout_tokens_follow_the_reference_builder() -> None:
    tok = LayoutTokenizer(num_classes=4, bins=16, max_objects=3)
    assert (tok.vocab_size, tok.pad, tok.length) == (257, 256, 9)
    objects = [{"class": 2, "box": [0.0, 0.0, 1.0, 1.0]}, {"class": 1, "box": [0.2, 0.4, 0.6, 0.8]}]
    ids = tok.encode(objects)
    # class, then y_bin * bins + x_bin of the top-left and of the bottom-right corner (x_bin = round(x * 15))
    assert ids[:3] == [2, 0, 255]
    assert ids[3:6] == [1, round(0.4 * 15) * 16 + round(0.2 * 15), round(0.8 * 15) * 16 + round(0.6 * 15)]
    assert ids[6:] == [256] * 3  # padded to max_objects with the last vocabulary id
    back = tok.decode(ids)
    assert [o["class"] for o in back] == [2, 1]
    assert np.allclose(back[1]["box"], objects[1]["box"], atol=0.5 / 15)
    assert tok.batch([objects, []]).tolist()[1] == [256] * 9  # the empty layout: the unconditional input
    assert len(tok.encode(objects * 3)) == 9  # more objects than max_objects: the first ones are kept


@pytest.mark.parametrize("bad, match", [({"class": 4, "box": [0, 0, 1, 1]}, "outside 0..3"),
                                        ({"class": 0, "box": [0.5, 0, 0.2, 1]}, "x0 <= x1"),
                                        ({"class": 0, "box": [0, 0, 1.5, 1]}, "outside \\[0, 1\\]")])
def test_layout_tokens_refuse_bad_objects(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LayoutTokenizer(num_classes=4).encode([bad])


def test_inpaint_concat_puts_the_mask_on_the_latent_grid() -> None:
    z = torch.randn(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :8] = 1  # the top half
    c = inpaint_concat(z, mask)
    assert c.shape == (2, 4, 4, 4) and torch.equal(c[:, :3], z)
    assert c[:, 3, :2].eq(1).all() and c[:, 3, 2:].eq(0).all()
    seg = torch.tensor([[[0, 2], [1, 2]]])
    assert one_hot(seg, 3)[0].argmax(0).tolist() == seg[0].tolist()
