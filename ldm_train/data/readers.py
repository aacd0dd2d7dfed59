"""Image + caption inputs: img2dataset-style tars, image folders with sidecar captions, ImageNet class folders.

The samples of one input shard (``ldm_train/data/input_shards.py``: the input forms and their fixed order).
Tar members are grouped by key as WebDataset does (``<key>.jpg|png|webp`` + ``<key>.txt`` + ``<key>.json``);
a folder image's caption is ``<same name>.txt`` beside it; an ImageNet class folder's is
``caption_template.format(class_name=...)``.

``image_dataset(...)`` is the torch IterableDataset for the autoencoder trainer and eval reference sets.
``iter_shard(...)`` is the lower level the encode job uses: it also yields ``Skip`` records with their reason, and
each ``Sample`` says which ``CONVERSIONS`` it needed (``ldm_train/data/image_decode.py``: EXIF orientation applied,
a 16-bit image brought to 8 bits per channel, transparency composited on white; here: a non-UTF-8 caption decoded
with ``Filters.caption_fallback``, a tar member name that would leave the output folder renamed: ``safe_key``).
Images larger than ``Filters.max_pixels`` are refused from their header, before decoding (``too_large``).
"""
from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ldm_train.data import fsspec_io
from ldm_train.data.annotations import fit_annotations, read_annotations
from ldm_train.data.filters import (  # noqa: F401  (the readers' public names)
    CONVERSIONS,
    DEFAULT_MAX_PIXELS,
    SKIP_REASONS,
    SOURCE_FIELDS,
    Filters,
    Skip,
    metadata_skip,
    number,
)
from ldm_train.data.image_decode import ImageTooLarge, decode_for_side
from ldm_train.data.input_shards import (
    CAPTION_EXTS,
    IMAGE_EXTS,
    InputShard,
    InputShardError,
    list_input_shards,
)
from ldm_train.data.transforms import resize_center_crop, to_tensor

fsspec_io.register_fsspec_schemes()  # workers import this module: they can open s3:// through webdataset too

@dataclass
class Sample:
    key: str
    image: torch.Tensor  # [3, R, R] float in [-1, 1]
    caption: str
    # source_key, source_shard, original_width, original_height, label (class index, -1 if none)
    meta: dict[str, Any] = field(default_factory=dict)
    conversions: tuple[str, ...] = ()  # of CONVERSIONS: what decoding had to do to this sample
    annotations: dict[str, Any] = field(default_factory=dict)  # fitted to the crop (ldm_train.data.annotations)

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "image": self.image, "caption": self.caption, "meta": self.meta}



# ---------------------------------------------------------------- raw records of one shard


@dataclass
class _Raw:
    key: str
    image: bytes | None
    caption: str | bytes | None  # bytes: a caption file, decoded (and checked) in ``_decode``
    meta: dict[str, Any]  # the json sidecar (tars) or label/path (folders)
    annotations: dict[str, Any] = field(default_factory=dict)  # seg.png / objects (ldm_train.data.annotations)


def _tar_groups(url: str) -> Iterator[_Raw]:
    """Group tar members by key (the basename up to its first dot), streaming; damage -> InputShardError."""
    try:
        stream = fsspec_io.open_url(url, "rb")
    except Exception as e:  # missing file, no permission, network: nothing read, the shard is retried on re-run
        raise InputShardError(f"cannot open input tar {url}: {e!r}", salvaged=False) from e
    current: dict[str, bytes] = {}
    key = None
    tracked = _TailTracker(stream)
    try:
        with stream, tarfile.open(fileobj=tracked, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, _, base = member.name.rpartition("/")
                k, _, ext = base.partition(".")
                k = f"{dirname}/{k}" if dirname else k
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} truncated")
                if k != key and key is not None:
                    yield _group_to_raw(key, current)
                    current = {}
                key = k
                current[ext.lower()] = data
            tracked.read()  # the rest of the last record, so the tail check sees the real end
            # tarfile ends quietly when a file stops at a header boundary; a complete archive ends in zero blocks
            if tracked.tail.count(0) != len(tracked.tail) or len(tracked.tail) < _END_BYTES:
                raise tarfile.ReadError("no end-of-archive marker (file cut at a member boundary)")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        # the group in progress may be incomplete: drop it, keep everything before it
        raise InputShardError(f"input tar {url} is corrupt or truncated after {key!r}: {e}", salvaged=True) from e
    if key is not None:
        yield _group_to_raw(key, current)


_END_BYTES = 1024  # POSIX tar ends with two 512-byte zero blocks


class _TailTracker:
    """Read-only file wrapper remembering the last bytes read (to check the end-of-archive marker)."""

    def __init__(self, f: Any) -> None:
        self.f, self.tail = f, b""

    def read(self, n: int = -1) -> bytes:
        chunk = self.f.read() if n is None or n < 0 else self.f.read(n)
        if chunk:
            self.tail = (self.tail + chunk[-_END_BYTES:])[-_END_BYTES:]
        return chunk


def parquet_rows(tar_url: str) -> dict[str, dict[str, Any]]:
    """img2dataset's ``<shard>.parquet`` beside ``<shard>.tar``: {key: row} ({} when there is none)."""
    if not tar_url.endswith(".tar"):
        return {}
    url = tar_url[: -len(".tar")] + ".parquet"
    if not fsspec_io.exists(url):
        return {}
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise RuntimeError(f"{url}: reading img2dataset's parquet metadata needs pyarrow: pip install pyarrow") from e
    with fsspec_io.open_url(url, "rb") as f:
        table = pq.read_table(f)
    rows = table.to_pylist()
    if rows and "key" not in rows[0]:
        raise ValueError(f"{url} has no 'key' column (columns: {table.column_names}): it is not img2dataset's "
                         "metadata; move it away from the tar or rename it")
    return {str(r["key"]): r for r in rows}


def _group_to_raw(key: str, files: dict[str, bytes]) -> _Raw:
    image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    caption: str | bytes | None = next((files[e] for e in CAPTION_EXTS if e in files), None)
    meta: dict[str, Any] = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError:
            meta = {}
        if caption is None and isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            caption = meta["caption"]
    meta = meta if isinstance(meta, dict) else {}
    return _Raw(key, image, caption, meta, read_annotations(files, meta))


def _folder_raws(shard: InputShard, caption_template: str) -> Iterator[_Raw]:
    for rel in shard.files:
        stem = rel.rsplit(".", 1)[0]
        key = stem.replace("/", "__").replace(".", "_")  # webdataset splits keys at the first dot
        try:
            image = fsspec_io.read_bytes(fsspec_io.join(shard.url, rel))
        except OSError as e:
            raise InputShardError(f"cannot read {fsspec_io.join(shard.url, rel)}: {e!r}", salvaged=False) from e
        meta: dict[str, Any] = {"path": rel}
        if shard.kind == "imagenet":
            # class index over ALL class dirs of the root, not only those present in this shard
            label = _all_class_dirs(shard.url).index(rel.split("/", 1)[0])
            meta.update(label=label, class_name=shard.class_names[label])
            caption: str | bytes | None = caption_template.format(class_name=shard.class_names[label])
        else:
            txt = fsspec_io.join(shard.url, stem + ".txt")
            caption = fsspec_io.read_bytes(txt) if fsspec_io.exists(txt) else None
        yield _Raw(key, image, caption, meta)


_CLASS_DIR_CACHE: dict[str, list[str]] = {}


def _all_class_dirs(root: str) -> list[str]:
    if root not in _CLASS_DIR_CACHE:
        _CLASS_DIR_CACHE[root] = [d for d in fsspec_io.ls(root) if fsspec_io.isdir(fsspec_io.join(root, d))]
    return _CLASS_DIR_CACHE[root]


# ---------------------------------------------------------------- decode + filter



def _caption(raw: _Raw, filters: Filters, notes: list[str]) -> str | Skip | None:
    """The caption as text, or the Skip of a caption that is not UTF-8 (see ``Filters``)."""
    cap = raw.caption
    if isinstance(cap, bytes):
        try:
            cap = cap.decode("utf-8")
        except UnicodeDecodeError as e:
            if filters.caption_fallback:
                cap = cap.decode(filters.caption_fallback, "replace")
                notes.append("caption_fallback")
            elif filters.require_caption:
                return Skip(raw.key, "caption_not_utf8", f"{e}; filter.caption_fallback=<codec> decodes it")
            else:
                notes.append("caption_not_utf8_dropped")
                return None
    return (cap.strip() or None) if cap is not None else None


def _decode(raw: _Raw, shard: InputShard, resolution: int, filters: Filters) -> Sample | Skip:
    if raw.image is None:
        return Skip(raw.key, "no_image")
    notes: list[str] = []
    caption = _caption(raw, filters, notes)
    if isinstance(caption, Skip):
        return caption
    if filters.require_caption and not caption:
        return Skip(raw.key, "no_caption")
    skip = metadata_skip(raw.key, raw.meta, filters)
    if skip is not None:
        return skip
    try:
        img, decode_notes, (w, h) = decode_for_side(raw.image, resolution, filters.max_pixels)
    except ImageTooLarge as e:
        return Skip(raw.key, "too_large", str(e)[:200])
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...)
        return Skip(raw.key, "decode_error", repr(e)[:200])
    notes += decode_notes
    min_size = resolution if filters.min_size is None else filters.min_size
    if min(w, h) < min_size:
        return Skip(raw.key, "too_small", f"{w}x{h} < {min_size}")
    if filters.max_aspect is not None and max(w, h) / min(w, h) > filters.max_aspect:
        return Skip(raw.key, "bad_aspect", f"{w}x{h}")
    # uniform keys and no None values, so torch's default_collate batches it
    label = raw.meta.get("label", raw.meta.get("cls", -1))
    # img2dataset records the size it downloaded in original_width/height; the stored image may be resized
    ow, oh = number(raw.meta, "original_width"), number(raw.meta, "original_height")
    meta: dict[str, Any] = {
        "source_key": raw.key,
        "source_shard": shard.url,
        "original_width": int(ow) if ow is not None and oh is not None else w,
        "original_height": int(oh) if ow is not None and oh is not None else h,
        "label": int(label) if isinstance(label, int | str) and str(label).lstrip("-").isdigit() else -1,
        # a JSON string, not a dict: the keys present vary by sample and default_collate needs uniform ones
        "source": json.dumps({k: raw.meta[k] for k in SOURCE_FIELDS if k in raw.meta and raw.meta[k] is not None},
                             default=str),
    }
    key = safe_key(raw.key)
    if key != raw.key:
        notes.append("unsafe_key_renamed")  # meta's source_key keeps the name as it was
    try:
        annotations = fit_annotations(raw.annotations, w, h, resolution, raw.key) if raw.annotations else {}
    except (ValueError, OSError) as e:
        return Skip(raw.key, "decode_error", str(e)[:200])
    return Sample(key, to_tensor(resize_center_crop(img, resolution)), caption or "", meta, tuple(notes), annotations)


def safe_key(key: str) -> str:
    """``key`` as a member name that stays inside the folder an output tar is extracted to: an absolute path
    (``/abs/x``) loses its leading ``/``, a ``..`` component becomes ``__``, empty and ``.`` components go."""
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join("__" if p == ".." else p for p in parts) or "_"


def iter_shard(
    shard: InputShard,
    resolution: int,
    filters: Filters | None = None,
    caption_template: str = "a photo of a {class_name}",
) -> Iterator[Sample | Skip]:
    """Every record of one input shard, decoded and filtered, in shard order; InputShardError on damage."""
    filters = filters or Filters()
    raws = _tar_groups(shard.url) if shard.kind == "tar" else _folder_raws(shard, caption_template)
    rows = parquet_rows(shard.url) if shard.kind == "tar" else {}
    for raw in raws:
        row = rows.get(raw.key.rpartition("/")[2]) if rows else None
        if row:
            raw.meta = {**row, **raw.meta}  # the sample's own json wins
            if raw.caption is None and isinstance(row.get("caption"), str):
                raw.caption = row["caption"]
        yield _decode(raw, shard, resolution, filters)


# ---------------------------------------------------------------- torch dataset


class ImageDataset(torch.utils.data.IterableDataset):
    """Yields ``{"key", "image" [3,R,R] in [-1,1], "caption", "meta"}``; shards split over ranks and workers."""

    def __init__(
        self,
        shards: list[InputShard],
        resolution: int,
        filters: Filters,
        caption_template: str,
        split_by_rank: bool,
        shuffle_shards: bool,
        seed: int,
        repeat: bool,
    ) -> None:
        super().__init__()
        self.shards, self.resolution, self.filters = shards, resolution, filters
        self.caption_template, self.split_by_rank = caption_template, split_by_rank
        self.shuffle_shards, self.seed, self.repeat = shuffle_shards, seed, repeat
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_shards(self, epoch: int) -> list[InputShard]:
        shards = list(self.shards)
        if self.shuffle_shards:
            g = torch.Generator().manual_seed(self.seed + epoch)
            shards = [shards[i] for i in torch.randperm(len(shards), generator=g).tolist()]
        if self.split_by_rank:
            from ldm_train.runtime.distributed import get_rank, get_world_size

            shards = shards[get_rank() :: get_world_size()]
        info = torch.utils.data.get_worker_info()
        if info is not None:
            shards = shards[info.id :: info.num_workers]
        return shards

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        while True:
            for shard in self._my_shards(epoch):
                try:
                    for rec in iter_shard(shard, self.resolution, self.filters, self.caption_template):
                        if isinstance(rec, Sample):
                            yield rec.as_dict()
                except InputShardError as e:
                    # readers for training/eval keep going; the encode job is where damage is counted and fails the run
                    print(f"[readers] warning: {e}", flush=True)
            if not self.repeat:
                return
            epoch += 1



def image_dataset(
    input: str | Sequence[str],
    resolution: int,
    *,
    input_format: str = "auto",
    min_size: int | None = 0,
    max_aspect: float | None = None,
    require_caption: bool = False,
    caption_template: str = "a photo of a {class_name}",
    files_per_shard: int = 1000,
    split_by_rank: bool = False,
    shuffle_shards: bool = False,
    seed: int = 0,
    repeat: bool = False,
) -> ImageDataset:
    """A torch IterableDataset over images + captions (see module doc for the input forms).

    Input shards are split over DataLoader workers (and over distributed ranks with ``split_by_rank``),
    so use at most as many workers as there are shards. ``min_size`` 0 keeps (and upscales) small images;
    None drops images smaller than ``resolution``.
    """
    shards = list_input_shards(input, input_format, files_per_shard)
    filters = Filters(min_size=min_size, max_aspect=max_aspect, require_caption=require_caption)
    return ImageDataset(shards, resolution, filters, caption_template, split_by_rank, shuffle_shards, seed, repeat)

