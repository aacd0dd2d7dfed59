"""Input shards: how image + caption inputs are cut into units of work, in a fixed order.

Inputs are cut into *input shards* (a tar, or a fixed-size block of files of a folder) listed in a
deterministic order; shard ``j`` is the unit of work of the encode job (input shard j -> output shard j).

- tars: ``dir/{000000..000099}.tar`` (brace pattern), one ``.tar`` URL, several joined with ``::``, or a
  directory / prefix holding ``*.tar``; local or any fsspec URL (``s3://bucket/laion/``).
- folder: images anywhere below a directory.
- imagenet: one sub-directory per class (sorted names -> class index); class names from ``LOC_synset_mapping.txt``
  / ``synset_words.txt`` / ``classes.txt`` at the root (``wnid name, alias, ...``) when present, else the
  directory name.

``fingerprint`` hashes the files of a spec (cache keys); ``ldm_train/data/readers.py`` reads the samples of a shard.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import fsspec

from ldm_train.data import fsspec_io
from ldm_train.data.config import INPUT_FORMATS

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_EXTS = ("txt", "caption")
CLASS_NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "classes.txt")


class InputShardError(RuntimeError):
    """An input shard could not be read (fully). ``salvaged`` is True when the samples before the damage were kept."""

    def __init__(self, message: str, salvaged: bool) -> None:
        super().__init__(message)
        self.salvaged = salvaged


@dataclass(frozen=True)
class InputShard:
    index: int
    url: str  # the tar, or the folder the files are in
    kind: str  # "tar" | "folder" | "imagenet"
    files: tuple[str, ...] = ()  # folder kinds: paths relative to url
    class_names: tuple[str, ...] = ()  # imagenet: all class names, by class index



def _expand(input: str | Sequence[str]) -> list[str]:
    import braceexpand

    parts = [input] if isinstance(input, str) else list(input)
    out: list[str] = []
    for p in parts:
        for q in str(p).split("::"):
            out.extend(braceexpand.braceexpand(q))
    return out


def _walk_files(root: str) -> list[str]:
    """All files below ``root`` as relative paths, sorted (local or fsspec)."""
    fs, path = fsspec.core.url_to_fs(root)
    base = path.rstrip("/") + "/"
    return sorted(p[len(base):] for p in fs.find(path) if p.startswith(base))


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _detect(input: str) -> str:
    if ".tar" in input or "{" in input or "::" in input:
        return "tar"
    names = fsspec_io.ls(input)
    if not names:
        raise FileNotFoundError(f"input {input!r} is empty or does not exist: give a tar pattern, an image folder or class folders")
    if any(n.endswith(".tar") for n in names):
        return "tar"
    if any(_ext(n) in IMAGE_EXTS for n in names):
        return "folder"
    return "imagenet"


def _class_names(root: str, dirs: list[str]) -> list[str]:
    for fname in CLASS_NAME_FILES:
        url = fsspec_io.join(root, fname)
        if fsspec_io.exists(url):
            mapping = {}
            for line in fsspec_io.read_bytes(url).decode().splitlines():
                wnid, _, names = line.strip().partition(" ")
                if wnid:
                    mapping[wnid] = names.split(",")[0].strip() or wnid
            return [mapping.get(d, d.replace("_", " ")) for d in dirs]
    return [d.replace("_", " ") for d in dirs]


def list_input_shards(input: str | Sequence[str], input_format: str = "auto", files_per_shard: int = 1000) -> list[InputShard]:
    """The input shards in their fixed order (the same on every task and every re-run)."""
    if not isinstance(input, str):
        input_format = "tar" if input_format == "auto" else input_format
    fmt = _detect(input) if input_format == "auto" else input_format
    if fmt == "tar":
        urls = _expand(input)
        if len(urls) == 1 and not urls[0].endswith(".tar"):  # a directory / prefix of tars
            urls = [fsspec_io.join(urls[0], n) for n in fsspec_io.ls(urls[0]) if n.endswith(".tar")]
        if not urls:
            raise FileNotFoundError(f"no .tar files found for input {input!r}")
        return [InputShard(j, u, "tar") for j, u in enumerate(urls)]
    if not isinstance(input, str):
        raise ValueError(f"input_format={fmt} takes one directory, got {input!r}")
    root = input.rstrip("/")
    if fmt == "folder":
        files = [f for f in _walk_files(root) if _ext(f) in IMAGE_EXTS]
        class_names: tuple[str, ...] = ()
    elif fmt == "imagenet":
        dirs = [d for d in fsspec_io.ls(root) if fsspec_io.isdir(fsspec_io.join(root, d))]
        files = [f for f in _walk_files(root) if "/" in f and f.split("/", 1)[0] in dirs and _ext(f) in IMAGE_EXTS]
        class_names = tuple(_class_names(root, dirs))
    else:
        raise ValueError(f"input_format={fmt!r}: use one of {', '.join(INPUT_FORMATS)}")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) found under {root!r}")
    return [
        InputShard(j, root, fmt, tuple(files[s : s + files_per_shard]), class_names)
        for j, s in enumerate(range(0, len(files), files_per_shard))
    ]


def fingerprint(spec: str | Sequence[str]) -> str:
    """A hash of every input file of ``spec`` (URL, size, modification time), from metadata only: keys caches
    of statistics computed from the files (eval's reference set, the trainer's in-training FID)."""
    import hashlib

    digest = hashlib.sha256()
    for shard in list_input_shards(spec):
        urls = [shard.url] if shard.kind == "tar" else [fsspec_io.join(shard.url, f) for f in shard.files]
        for url in urls:
            fs, fpath = fsspec.core.url_to_fs(url)
            info = fs.info(fpath)
            stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
            digest.update(f"{url}\0{info.get('size')}\0{stamp}\n".encode())
    return digest.hexdigest()[:16]
