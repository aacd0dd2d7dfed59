"""Which input samples are kept: the skip reasons, the ``Filters`` of the encode job and the image readers, and the
img2dataset metadata filter checked before an image is decoded (``ldm_train.data.readers`` applies them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SKIP_REASONS = ("no_image", "decode_error", "no_caption", "caption_not_utf8", "too_large", "too_small", "bad_aspect",
                "low_similarity", "unsafe", "watermark", "low_aesthetic", "small_original")
# img2dataset / LAION fields kept from the source's json (or parquet row) in each latent sample's json ``source``
SOURCE_FIELDS = ("url", "similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE", "aesthetic", "LICENSE", "NSFW",
                 "original_width", "original_height", "width", "height", "sha256")
# what was done to a kept sample to make it usable (counted by the encode job, beside the skip reasons)
CONVERSIONS = ("exif_transposed", "scaled_16bit", "alpha_flattened", "caption_fallback", "caption_not_utf8_dropped",
               "unsafe_key_renamed")
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000: decoding one image of this size takes ~200 MB as RGB


@dataclass
class Filters:
    """Which decoded samples to keep. ``min_size`` None means the target resolution (never upscale).

    ``max_pixels`` is checked on the size in the image header, before anything is decoded (a 17 KB PNG can
    declare 12000 x 12000 pixels); None: no limit of ours (PIL still refuses above 2 * Image.MAX_IMAGE_PIXELS).
    A caption that is not UTF-8 skips the sample (``caption_not_utf8``) unless ``caption_fallback`` names a
    codec to decode it with (e.g. ``cp1252``; undecodable bytes become U+FFFD); without a fallback and with
    ``require_caption`` false the image is kept with an empty caption.
    """

    min_size: int | None = None
    max_aspect: float | None = None  # long side / short side; None: any
    require_caption: bool = True
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    caption_fallback: str | None = None
    # img2dataset metadata (the sample's json, else the shard's parquet row); None: no filter. A sample without
    # the field passes its filter.
    min_similarity: float | None = None  # CLIP image-text similarity below this: low_similarity
    max_punsafe: float | None = None  # punsafe above this: unsafe
    max_pwatermark: float | None = None  # pwatermark above this: watermark
    min_aesthetic: float | None = None  # AESTHETIC_SCORE (or aesthetic) below this: low_aesthetic
    min_original_size: int | None = None  # shorter side of original_width/height below this: small_original


def number(meta: dict[str, Any], *names: str) -> float | None:
    for name in names:
        value = meta.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value == value:  # not NaN
            return float(value)
    return None


def metadata_skip(key: str, meta: dict[str, Any], filters: Filters) -> Skip | None:
    """The Skip of a sample whose img2dataset metadata fails a filter (checked before the image is decoded)."""
    checks = (
        ("low_similarity", number(meta, "similarity"), filters.min_similarity, lambda v, t: v < t),
        ("unsafe", number(meta, "punsafe"), filters.max_punsafe, lambda v, t: v > t),
        ("watermark", number(meta, "pwatermark"), filters.max_pwatermark, lambda v, t: v > t),
        ("low_aesthetic", number(meta, "AESTHETIC_SCORE", "aesthetic"), filters.min_aesthetic, lambda v, t: v < t),
    )
    for reason, value, threshold, fails in checks:
        if threshold is not None and value is not None and fails(value, threshold):
            return Skip(key, reason, f"{value:g} vs filter {threshold:g}")
    if filters.min_original_size is not None:
        w, h = number(meta, "original_width"), number(meta, "original_height")
        if w is not None and h is not None and min(w, h) < filters.min_original_size:
            return Skip(key, "small_original", f"{w:g}x{h:g} < {filters.min_original_size}")
    return None


@dataclass
class Skip:
    key: str
    reason: str  # one of SKIP_REASONS
    detail: str = ""
