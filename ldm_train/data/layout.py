"""Bounding-box layouts as token sequences for the layout-to-image model (``cond.kind=layout``, the paper's Sec. 4.3).

As the reference implementation's object-bounding-box builder (taming-transformers, used by CompVis layout2img):
each object is three tokens, its class id, then the quantised top-left and bottom-right corners, each corner one
token ``y_bin * bins + x_bin`` with ``x_bin = round(x * (bins - 1))`` for a coordinate in [0, 1]. Class ids and
corner tokens share the range ``0 .. max(bins ** 2, num_classes) - 1`` (the position in the sequence tells them
apart), and the last id of the vocabulary pads the sequence to ``max_objects`` objects. The all-padding sequence is
the empty layout: the unconditional input of classifier-free guidance.

An object is ``{"class": int, "box": [x0, y0, x1, y1]}`` with coordinates in [0, 1] (the json ``objects`` of
``data_prep.synthetic annotate=true``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LayoutTokenizer:
    num_classes: int
    bins: int = 16
    max_objects: int = 8

    def __post_init__(self) -> None:
        if self.bins < 2 or self.max_objects < 1 or self.num_classes < 1:
            raise ValueError(f"layout tokens need cond.layout_bins >= 2 (got {self.bins}), cond.layout_max_objects >= 1 "
                             f"(got {self.max_objects}) and cond.num_classes >= 1 (got {self.num_classes})")

    @property
    def vocab_size(self) -> int:
        return max(self.bins**2, self.num_classes) + 1

    @property
    def pad(self) -> int:
        return self.vocab_size - 1

    @property
    def length(self) -> int:
        return 3 * self.max_objects

    def corner(self, x: float, y: float) -> int:
        if not (0 <= x <= 1 and 0 <= y <= 1):
            raise ValueError(f"layout box corner ({x}, {y}) lies outside [0, 1]: boxes are fractions of the image side")
        return round(y * (self.bins - 1)) * self.bins + round(x * (self.bins - 1))

    def corner_xy(self, token: int) -> tuple[float, float]:
        """The grid point of a corner token, as (x, y) in [0, 1]."""
        return (token % self.bins) / (self.bins - 1), (token // self.bins) / (self.bins - 1)

    def encode(self, objects: Sequence[dict[str, Any]]) -> list[int]:
        """The token ids of one layout (the first ``max_objects`` objects), padded to ``length``."""
        tokens: list[int] = []
        for obj in list(objects)[: self.max_objects]:
            cls, box = int(obj["class"]), [float(v) for v in obj["box"]]
            if not 0 <= cls < self.num_classes:
                raise ValueError(f"layout object class {cls} is outside 0..{self.num_classes - 1}: set cond.num_classes")
            if len(box) != 4 or box[2] < box[0] or box[3] < box[1]:
                raise ValueError(f"layout box {box} is not [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1")
            tokens += [cls, self.corner(box[0], box[1]), self.corner(box[2], box[3])]
        return tokens + [self.pad] * (self.length - len(tokens))

    def decode(self, tokens: Sequence[int]) -> list[dict[str, Any]]:
        """The objects of a token sequence (boxes on the quantisation grid): ``encode``'s inverse up to rounding."""
        out = []
        for i in range(0, len(tokens) - 2, 3):
            cls, a, b = (int(t) for t in tokens[i : i + 3])
            if cls == self.pad:
                break
            out.append({"class": cls, "box": [*self.corner_xy(a), *self.corner_xy(b)]})
        return out

    def batch(self, layouts: Sequence[Sequence[dict[str, Any]]]) -> torch.Tensor:
        """LongTensor [B, length] of ``layouts`` (an empty layout is the unconditional input)."""
        return torch.tensor([self.encode(objs) for objs in layouts], dtype=torch.long)
