"""The tar/npy fast path reads what tarfile and np.load read, and names the shard when it is broken."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ldm_train.data.shard_reader import NpyDecoder, ShardFormatError, iter_samples


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], fmt: int) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_samples_group_by_key_in_every_tar_format(tmp_path: Path, fmt: int) -> None:
    deep = "d" * 60 + "/" + "e" * 60  # over 100 chars: ustar prefix, PAX path or GNU long name
    members = [
        (f"{deep}/000.latent.npy", npy(np.arange(6, dtype=np.float16).reshape(2, 3))),
        (f"{deep}/000.txt", b"a red circle"),
        ("__meta__.json", b"{}"),  # not a sample file
        ("dir/001.latent.npy", npy(np.ones((2, 3), np.float16))),
        ("dir/001.TXT", "ein grüner Würfel".encode()),
    ]
    write_tar(tmp_path / "s.tar", members, fmt)
    samples = list(iter_samples(str(tmp_path / "s.tar")))
    assert [s["__key__"] for s in samples] == [f"{deep}/000", "dir/001"]
    assert samples[0]["txt"] == b"a red circle" and samples[1]["txt"].decode() == "ein grüner Würfel"
    assert samples[1]["__url__"] == str(tmp_path / "s.tar")
    decode = NpyDecoder()
    assert np.array_equal(decode(samples[0]["latent.npy"]), np.arange(6).reshape(2, 3))
    assert np.array_equal(decode(samples[1]["latent.npy"]), np.ones((2, 3)))  # the cached-header path


def test_npy_decoder_matches_np_load_for_changing_shapes() -> None:
    decode = NpyDecoder()
    for array in (np.zeros((4, 2), np.float16), np.arange(12, dtype=np.float32).reshape(3, 4),
                  np.arange(12, dtype=np.float32).reshape(3, 4) * 2, np.asfortranarray(np.eye(3))):
        out = decode(npy(array))
        assert out.dtype == array.dtype and np.array_equal(out, array)


def test_truncated_shard_names_the_file(tmp_path: Path) -> None:
    write_tar(tmp_path / "s.tar", [("000.latent.npy", npy(np.zeros((64, 64))))], tarfile.PAX_FORMAT)
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:3000])
    with pytest.raises(ShardFormatError, match=r"cut.tar: truncated tar member"):
        list(iter_samples(str(tmp_path / "cut.tar")))
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ShardFormatError, match="junk.tar: bad tar header"):
        list(iter_samples(str(tmp_path / "junk.tar")))
