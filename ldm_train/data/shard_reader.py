"""Fast sequential reading of WebDataset tar shards (local or any fsspec URL) and of their .npy members.

WebDataset's convention: members ``<key>.<ext>`` that share a key, in order, form one sample
``{"__key__": key, "<ext>": bytes, ...}`` (the key is the path up to the first dot of the file name).
Python's ``tarfile`` spends ~100 us per member building TarInfo objects and parsing the PAX header that
``webdataset.TarWriter`` puts before every file; this reader parses the 512-byte headers itself (ustar,
PAX ``path``, GNU long names) and is several times faster, which is what keeps a loader worker above
a few thousand samples/s.
"""
from __future__ import annotations

import io
import json
import shlex
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from ldm_train.data.fsspec_io import open_url

BLOCK = 512
_READ_BUFFER = 1 << 20


class ShardFormatError(ValueError):
    """A shard is truncated or not a tar file. The message names the shard and the command that repairs it."""


def repair_command(shard_url: str) -> str:
    """The encode command that re-checks the finished shards of ``shard_url``'s folder and re-encodes the
    damaged ones (``verify=true``), rebuilt from the ``manifest.json`` beside it (a generic one without it)."""
    folder = shard_url.rsplit("/", 1)[0] if "/" in shard_url else "."
    generic = f"python -m data_prep.encode <the encode job's options> verify=true  (it wrote {folder})"
    try:
        with open_url(f"{folder}/manifest.json", "rb") as f:
            m = json.load(f)
        fs, inp = m["first_stage"], m["input"]
        spec = inp["spec"] if isinstance(inp["spec"], str) else "::".join(inp["spec"])
        root, _, leaf = folder.rpartition("/")
        args = {"input": spec, "output": root if leaf == fs["name"] and root else folder,
                "first_stage": fs["name"], "resolution": m["resolution"]}
        if fs.get("checkpoint"):
            args["first_stage.checkpoint"] = fs["checkpoint"]
        if fs.get("random_weights"):
            args["allow_random_first_stage"] = "true"
        enc = m.get("encode") or {}
        if inp.get("format") != "tar":
            args["input_format"] = inp.get("format")
            args["files_per_shard"] = enc.get("files_per_shard")
        for k, v in (enc.get("filter") or {}).items():
            args[f"filter.{k}"] = "null" if v is None else str(v).lower() if isinstance(v, bool) else v
        args["verify"] = "true"
    except Exception:  # only for the message: any problem with the manifest gives the generic command
        return generic
    return "python -m data_prep.encode " + " ".join(_override(k, v) for k, v in args.items())


def _override(key: str, value: object) -> str:
    """``key=value`` as one shell word that Hydra reads back as that string (brace patterns quoted for Hydra)."""
    v = str(value)
    if any(c in v for c in "{}[](),= '\""):
        v = "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    word = f"{key}={v}"
    if not any(c in word for c in "$`\"!\\ ") and "'" in word:
        return f'"{word}"'
    return shlex.quote(word)


def damaged_shard_message(url: str, problem: str) -> str:
    """``<url>: <problem>: the shard is damaged; repair it with <command>``."""
    return (f"{url}: {problem}: the shard is damaged (cut or overwritten after encoding); repair it with "
            f"`{repair_command(url)}`, which re-checks every finished shard and re-encodes the damaged ones")


def open_shard(url: str) -> IO[bytes]:
    """Open a shard for sequential reading (local path or fsspec URL)."""
    stream = open_url(url, "rb")
    if isinstance(stream, io.RawIOBase):
        stream = io.BufferedReader(stream, _READ_BUFFER)
    return stream


def _octal(field: bytes, url: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError as err:
        raise ShardFormatError(damaged_shard_message(url, f"bad tar header field {field!r}: not a tar file or corrupt")) from err


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a PAX extended header (records are ``"<len> <key>=<value>\\n"``)."""
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


def iter_tar(stream: IO[bytes], url: str = "<stream>") -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file in a tar stream, in order."""
    long_name: str | None = None
    while True:
        header = stream.read(BLOCK)
        if not header or header.count(0) == BLOCK:
            return  # end-of-archive blocks (or a stream that simply ends between members)
        if len(header) < BLOCK:
            raise ShardFormatError(damaged_shard_message(url, "truncated tar header"))
        size = _octal(header[124:136], url)
        kind = header[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        data = stream.read(padded)
        if len(data) < padded:
            raise ShardFormatError(damaged_shard_message(url, f"truncated tar member (wanted {size} bytes)"))
        data = data[:size]
        if kind == b"x":  # PAX header of the next member: may carry its full path
            long_name = _pax_path(data) or long_name
            continue
        if kind == b"L":  # GNU long name
            long_name = data.rstrip(b"\0").decode("utf-8")
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None  # directories, links, global headers: not sample files
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
                name = f"{prefix}/{name}" if prefix else name
        yield name, data


def iter_samples(url: str) -> Iterator[dict[str, Any]]:
    """WebDataset samples of one shard: ``{"__key__", "__url__", "<ext>": bytes ...}``."""
    sample: dict[str, Any] | None = None
    with open_shard(url) as stream:
        for name, data in iter_tar(stream, url):
            slash = name.rfind("/") + 1
            dot = name.find(".", slash)
            if dot < 0 or name[slash:].startswith("__"):
                continue  # no extension, or webdataset's own __meta__ files
            key, ext = name[:dot], name[dot + 1 :].lower()
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            sample[ext] = data
        if sample is not None:
            yield sample


class NpyDecoder:
    """``np.load`` for many .npy blobs of one shape and dtype: the header is parsed once, then reused.

    A blob whose header bytes differ from the cached one (another shape/dtype) goes through ``np.load``.
    """

    def __init__(self) -> None:
        self._header: bytes | None = None
        self._dtype: np.dtype | None = None
        self._shape: tuple[int, ...] = ()

    def __call__(self, blob: bytes) -> np.ndarray:
        if self._header is not None and blob.startswith(self._header):
            return np.frombuffer(blob, self._dtype, offset=len(self._header)).reshape(self._shape)
        array = np.load(io.BytesIO(blob), allow_pickle=False)
        if not array.dtype.hasobject and array.flags.c_contiguous:
            # the header is everything before the data: magic, version, length, dict, padding
            self._header = blob[: len(blob) - array.nbytes]
            self._dtype, self._shape = array.dtype, array.shape
        return array


def shard_captions(urls: list[str], limit: int | None = None) -> list[str]:
    """The ``.txt`` captions of tar shards (latent or image shards), in order, up to ``limit``; streamed, so
    ``s3://`` shards need no local copy."""
    captions: list[str] = []
    for url in urls:
        with open_shard(url) as stream:
            for name, data in iter_tar(stream, url):
                if name.endswith(".txt"):
                    captions.append(data.decode("utf-8").strip())
                    if limit is not None and len(captions) >= limit:
                        return captions
    return captions
