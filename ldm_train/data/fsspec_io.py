"""Local paths and fsspec URLs (``s3://``, ``file://``, ...) behind one small API.

Every stage reads and writes through these helpers so that nothing assumes one machine:
``open_url`` / ``atomic_write`` (``write_bytes`` / ``write_text``) / ``exists`` / ``ls`` / ``join``, and ``register_fsspec_schemes()``
which teaches WebDataset's ``gopen`` to open ``s3://`` (and other fsspec protocols) URLs.
WebDataset has no S3 opener of its own; DataLoader workers import this module (through the readers)
so the registration also happens in every worker process.

S3 endpoints and credentials come from the usual AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), which botocore and s3fs honour.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
import time
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec

# Protocols that WebDataset handles itself (or that are local); everything else goes through fsspec.
_WDS_NATIVE = {"", "file", "pipe", "http", "https", "ais", "sftp", "ftps", "scp", "gs", "htgs", "hf"}
_FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "memory")


def protocol_of(url: str) -> str:
    """``"s3"`` for ``s3://b/k``, ``""`` for a plain local path."""
    return url.split("://", 1)[0] if "://" in url else ""


def is_local(url: str) -> bool:
    return protocol_of(url) in ("", "file")


def local_path(url: str) -> str:
    """The filesystem path of a local URL (``file:///x`` -> ``/x``)."""
    return url[len("file://"):] if url.startswith("file://") else url


def join(url: str, *parts: str) -> str:
    """Join path components onto a local path or URL with ``/`` (never the OS separator on URLs)."""
    out = url.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """WebDataset ``gopen`` handler: open any fsspec URL as a binary stream."""
    del bufsize, kw  # fsspec manages its own block size
    return fsspec.open(url, mode).open()


def register_fsspec_schemes(schemes: tuple[str, ...] = _FSSPEC_SCHEMES) -> None:
    """Make ``webdataset`` open ``s3://`` (and the other given fsspec protocols) URLs through fsspec.

    Idempotent; call it in every process that builds a WebDataset pipeline over remote URLs
    (importing ``ldm_train.data.readers`` or this module's users does it at import time).
    """
    import importlib

    gopen_mod = importlib.import_module("webdataset.gopen")  # `webdataset.gopen` the attribute is the function
    for s in schemes:
        if s not in _WDS_NATIVE:
            gopen_mod.gopen_schemes[s] = _gopen_fsspec


def open_url(url: str, mode: str = "rb") -> IO:
    """Open a local path or fsspec URL. Parent directories of local files are created for writing."""
    if is_local(url) and ("w" in mode or "a" in mode):
        parent = os.path.dirname(local_path(url))
        if parent:
            os.makedirs(parent, exist_ok=True)
    return fsspec.open(url, mode).open()


def exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    """Create a directory (a no-op on object stores, where prefixes need not exist)."""
    if is_local(url):
        os.makedirs(local_path(url), exist_ok=True)


def ls(url: str) -> list[str]:
    """Names (not full paths) of the entries directly under ``url``, sorted; [] if it does not exist."""
    fs, path = _fs(url)
    if not fs.exists(path):
        return []
    # refresh: an S3 listing may be cached from before another process wrote
    entries = fs.ls(path, detail=False, refresh=True) if not is_local(url) else fs.ls(path, detail=False)
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def sizes(url: str) -> dict[str, int]:
    """{name: size in bytes} of the files directly under ``url`` (one listing); {} if it does not exist."""
    fs, path = _fs(url)
    if not fs.exists(path):
        return {}
    entries = fs.ls(path, detail=True, refresh=True) if not is_local(url) else fs.ls(path, detail=True)
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries
            if e.get("type") != "directory"}


def isdir(url: str) -> bool:
    fs, path = _fs(url)
    return fs.isdir(path)


def rm(url: str, missing_ok: bool = True) -> None:
    fs, path = _fs(url)
    try:
        fs.rm(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def read_bytes(url: str) -> bytes:
    with open_url(url, "rb") as f:
        return f.read()


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    """``data`` as the whole of ``url``, atomically (``atomic_write``)."""
    with atomic_write(url) as f:
        f.write(data)


def write_text(url: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8) as the whole of ``url``, atomically (``atomic_write``)."""
    write_bytes(url, text.encode())


TMP_MARK = ".tmp-"
STALE_TMP_S = 3600.0  # a temporary of another host (or an unknown owner) untouched this long is abandoned


def tmp_name(final: str) -> str:
    """``<final>.tmp-<host>-<pid>-<random>``: unique per process, and says which process writes it."""
    host = socket.gethostname().replace("-", "_") or "host"
    return f"{final}{TMP_MARK}{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def tmp_is_stale(path: str) -> bool:
    """True when the local temporary ``path`` (named by ``tmp_name``) belongs to no live writer: its process
    on this host is gone, or (another host's, or an older name without owner) it was not written to for
    ``STALE_TMP_S`` seconds. A live writer's temporary is never stale: deleting it would crash that writer."""
    owner = path.rsplit(TMP_MARK, 1)[-1].split("-")
    if len(owner) == 3 and owner[1].isdigit() and owner[0] == socket.gethostname().replace("-", "_"):
        return not _pid_alive(int(owner[1]))
    try:
        return time.time() - os.path.getmtime(path) > STALE_TMP_S
    except FileNotFoundError:
        return False  # just published or removed by its writer


@contextlib.contextmanager
def atomic_write(url: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write ``url`` so readers see either nothing or the whole file (``mode`` "wb", or "w" for text).

    The one way the project writes a file a reader may open at any time (manifests, checkpoints' small files,
    statistics, reports, samples); libraries that want a path get ``f`` (``torch.save``, ``np.savez``, PIL).

    Local: write ``tmp_name(url)`` (``<url>.tmp-<host>-<pid>-<random>``, never shared by two processes) then
    ``os.replace`` (atomic on POSIX; of two writers of the same file the last one wins, whole). Object
    stores: the upload only becomes visible when the multipart/put completes, which is atomic by nature; on
    an exception the partial upload is aborted (fsspec discards it) so no half object appears.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write({url!r}, mode={mode!r}): use 'wb' (bytes) or 'w' (text)")
    url = os.fspath(url)
    if is_local(url):
        final = local_path(url)
        parent = os.path.dirname(final)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = tmp_name(final)
        try:
            with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fs, path = _fs(url)
    raw = fs.open(path, "wb")
    f = raw if mode == "wb" else io.TextIOWrapper(raw, encoding="utf-8")
    try:
        yield f
    except BaseException:
        # s3fs: discard() aborts the multipart upload; close() would publish the partial object
        discard = getattr(raw, "discard", None)
        if discard is not None:
            discard()
            with contextlib.suppress(AttributeError):  # read-only on in-memory files, which have nothing to flush
                raw.closed = True  # else __del__ -> close() would try to flush the discarded buffer
        raise
    f.close()


def sha256(url: str) -> str:
    """sha256 of a local file or fsspec URL, streamed."""
    digest = hashlib.sha256()
    with open_url(url, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
