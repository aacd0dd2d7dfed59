"""The caption grammar of the built-in captioned-shapes dataset, shared by the data writer and eval.

``data_prep.synthetic`` draws scenes and writes them with these captions; ``eval.adherence`` (and eval's
``adherence: auto`` check) parse prompts back into scenes. The vocabulary (colours, shapes, sizes, positions),
the held-out (colour, shape) pairs, :class:`Scene` and :func:`parse_caption` live here so that neither
stage imports the other.

A caption says exactly what is drawn: "a small red circle at the top left on a blue background".
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Far apart in RGB so the colour of a generated object is unambiguous. White is only a background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "purple": (130, 40, 170),
    "orange": (250, 140, 20),
    "cyan": (40, 210, 220),
    "black": (20, 20, 20),
}
BACKGROUND_WHITE: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
# Each colour and each shape still occurs in train with other partners, only these pairs are new.
HELDOUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("blue", "triangle"),
    ("yellow", "circle"),
    ("green", "square"),
)

_CAPTION_RE = re.compile(
    r"^a (?P<size>small|large) (?P<colour>[a-z]+) (?P<shape>circle|square|triangle|star) "
    r"(?:at the (?P<corner>top left|top right|bottom left|bottom right)|in the (?P<center>center)) "
    r"on a (?P<background>[a-z]+) background$"
)


@dataclass(frozen=True)
class Scene:
    """What one image shows; ``caption`` and ``parse_caption`` map it to text and back."""

    size: str
    colour: str
    shape: str
    position: str
    background: str  # "white" or a name in COLOURS

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where} on a {self.background} background"


def parse_caption(caption: str) -> Scene:
    """Caption of this dataset -> Scene(size, colour, shape, position, background); ValueError otherwise."""
    m = _CAPTION_RE.match(caption.strip().lower())
    if m is None or m["colour"] not in COLOURS or (m["background"] != "white" and m["background"] not in COLOURS):
        raise ValueError(
            f"caption {caption!r} is not of the synthetic form "
            "'a <small|large> <colour> <shape> <at the top left|...|in the center> on a <colour|white> background'"
        )
    return Scene(m["size"], m["colour"], m["shape"], m["corner"] or m["center"], m["background"])


def background_rgb(name: str) -> tuple[int, int, int]:
    return BACKGROUND_WHITE if name == "white" else COLOURS[name]
