"""Image bytes -> 8-bit RGB, checked: the size refused from the header before decoding, EXIF orientation applied,
16-bit samples scaled, transparency composited on white; each decode says which ``CONVERSIONS`` it needed
(``ldm_train/data/readers.py`` counts them). ``decode_for_side`` decodes a large JPEG at a reduced scale."""
from __future__ import annotations

import io

from PIL import Image, ImageOps


class ImageTooLarge(ValueError):
    """The image header declares more pixels than the limit: nothing was decoded."""


_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """A decoded image as 8-bit RGB: 16-bit greyscale scaled (not clipped), transparency composited on white."""
    if img.mode in _16BIT_MODES:
        # PIL's convert("L") clips these at 255 (a 16-bit PNG came out ~all white): scale 0..65535 -> 0..255,
        # rounding to nearest (v * 255 / 65535 = v / 257). Mode "I" holds 16-bit samples too (PGM, TIFF, old PIL)
        import numpy as np

        arr = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8), "L")
        notes.append("scaled_16bit")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        if img.getchannel("A").getextrema()[0] < 255:  # an opaque alpha channel changes nothing: not counted
            notes.append("alpha_flattened")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def _reduced_16bit(img: Image.Image) -> bool:
    """True when PIL will read 16-bit samples into 8-bit channels itself (48/64-bit RGB(A), 16-bit grey+alpha):
    its raw mode says so before ``load``; the 16-bit greyscale modes are scaled by ``_to_rgb`` instead."""
    if img.mode in _16BIT_MODES:
        return False
    for tile in getattr(img, "tile", None) or []:
        args = tile[3]
        raw = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None
        if isinstance(raw, str) and ";16" in raw:
            return True
    return False


def decode_image_checked(data: bytes, max_pixels: int | None = None) -> tuple[Image.Image, list[str]]:
    """``decode_image`` that also returns what it had to do (of ``CONVERSIONS``) and refuses, from the header
    alone, an image of more than ``max_pixels`` pixels (``ImageTooLarge``, before any pixel is decoded)."""
    img, notes, _ = decode_for_side(data, None, max_pixels)
    return img, notes


def decode_for_side(data: bytes, min_side: int | None, max_pixels: int | None = None
                    ) -> tuple[Image.Image, list[str], tuple[int, int]]:
    """(RGB image, conversions, stored size upright) of ``data``. With ``min_side``, a JPEG is decoded in the DCT
    domain at the smallest 1/2, 1/4 or 1/8 scale whose shorter side stays at least ``2 * min_side`` (PIL's
    ``draft``): several times faster on large photos, and the antialiased resize to ``min_side`` that follows
    hides the difference. The returned size is the full stored size (after EXIF orientation), not the draft's."""
    notes: list[str] = []
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own limit (2 * MAX_IMAGE_PIXELS), also header-only
        raise ImageTooLarge(str(e)) from e
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLarge(f"{w}x{h} = {w * h} pixels > filter.max_pixels={max_pixels} (not decoded)")
    if min_side is not None and img.format == "JPEG" and min(w, h) >= 4 * min_side:
        keep = 2 * min_side / min(w, h)
        img.draft(img.mode, (max(1, int(w * keep + 0.999)), max(1, int(h * keep + 0.999))))
    if _reduced_16bit(img):
        notes.append("scaled_16bit")
    img.load()
    orientation = img.getexif().get(0x0112, 1)
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        img = ImageOps.exif_transpose(img)
        notes.append("exif_transposed")
        if orientation in (5, 6, 7, 8):
            w, h = h, w
    return _to_rgb(img, notes), notes, (w, h)


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Bytes -> RGB image, fully decoded (so truncated files fail here, not later), EXIF orientation applied
    (a phone photo stored sideways comes out upright), 16-bit greyscale scaled to 8 bits, alpha composited
    on white, greyscale to RGB. ``max_pixels``: see ``decode_image_checked``."""
    return decode_image_checked(data, max_pixels)[0]
