"""``eval.kinds``' layout score on hand-made samples: an object drawn in its box, one drawn elsewhere, noise."""
from __future__ import annotations

import numpy as np
import pytest

from eval.kinds import layout_scores

BOXES = ([0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5])  # the 4 quadrants


def _items() -> list[dict]:
    return [{"objects": [{"class": 0, "box": b}]} for b in BOXES]


def _drawn(in_own_box: bool) -> np.ndarray:
    """One white 16 px image per box with a red square inside that box (or inside the next one)."""
    imgs = np.full((len(BOXES), 16, 16, 3), 255, np.uint8)
    for i in range(len(BOXES)):
        x0, y0, _, _ = (int(v * 16) for v in BOXES[i if in_own_box else (i + 1) % len(BOXES)])
        imgs[i, y0 + 2:y0 + 6, x0 + 2:x0 + 6] = (220, 30, 30)
    return imgs


def test_an_object_in_its_box_scores_one_and_the_other_boxes_give_the_chance_level() -> None:
    scores = layout_scores(_drawn(True), _items())
    assert scores["box_share"] == 1.0 and scores["box_share_chance"] == 0.0
    assert scores["box_iou"] == pytest.approx(16 / 64)


def test_an_object_in_the_wrong_box_and_noise_score_no_better_than_chance() -> None:
    wrong = layout_scores(_drawn(False), _items())
    assert wrong["box_share"] == 0.0 and wrong["box_share_chance"] == pytest.approx(1 / 3)
    noise = layout_scores(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8), _items())
    assert noise["box_share"] == pytest.approx(noise["box_share_chance"], abs=0.1)
    assert noise["box_iou"] > layout_scores(_drawn(True), _items())["box_iou"] - 0.1  # what IoU gets wrong
