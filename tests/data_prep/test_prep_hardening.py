"""Hardening of the encode job: what a fault-injection campaign found, each case with its exact outcome.

Huge-by-header images refused before decoding; a run whose every input is skipped fails; 16-bit PNGs scaled,
EXIF orientation applied, non-UTF-8 captions decided, all counted; a latent shard damaged after encoding is
detected (size on every re-run, sha256 with verify=true), re-encoded, and named by the trainer-side reader with
the command that repairs it; a failed job's job.json does not block the corrected one; the same task started
twice finishes in both processes with every key exactly once (local and s3:// outputs).
"""
from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import tarfile
import textwrap
import zlib

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep.encode_job import run_encode as run_encode_inproc
from data_prep.finalize import FinalizeError, finalize
from data_prep.synthetic import write_synthetic
from ldm_train.data import fsspec_io
from ldm_train.data.image_decode import _to_rgb, decode_image_checked
from ldm_train.data.input_shards import list_input_shards
from ldm_train.data.latents import LatentShardDataset
from ldm_train.data.manifest import read_manifest
from ldm_train.data.readers import Filters, Sample, Skip, iter_shard
from ldm_train.data.shard_reader import ShardFormatError, iter_samples
from tests.data_prep.helpers import REPO, encode_args, encode_cfg, read_all_shards, read_shard, run_encode

pytestmark = pytest.mark.integration  # starts processes or servers

FS = "tiny_kl_f4"


# ---------------------------------------------------------------- images of the campaign


def _png(w: int, h: int, bit_depth: int, colour_type: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand (any bit depth/colour type, a huge size in a few KB)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\0" + r for r in rows)  # filter type 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _huge_1bit_png() -> bytes:
    """12000 x 12000 1-bit black: 17 KB on disk, 144 M pixels (1.45 GB peak RSS when decoded to RGB)."""
    return _png(12000, 12000, 1, 0, [bytes(1500)] * 12000)


def _grey16(side: int = 48) -> tuple[bytes, np.ndarray]:
    """A 16-bit greyscale PNG of a horizontal ramp 0..65535; returns (png, the 16-bit values)."""
    ramp = np.linspace(0, 65535, side).round().astype(np.uint16)
    values = np.tile(ramp, (side, 1))
    return _png(side, side, 16, 0, [row.astype(">u2").tobytes() for row in values]), values


def _exif6_jpeg() -> bytes:
    """64 x 32 stored (left half blue, right half red), EXIF orientation 6: shown upright it is 32 x 64 with
    blue on top (rotate 90 degrees clockwise)."""
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _jpeg(size: tuple[int, int], colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def _records(path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for r in records:
            w.write(r)


def _report(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- huge image: bounded from the header


def test_huge_image_is_refused_from_its_header_before_decoding(tmp_path):
    _records(tmp_path / "000000.tar", [{"__key__": "huge", "png": _huge_1bit_png(), "txt": "a bomb"},
                                       {"__key__": "ok", "jpg": _jpeg((48, 40)), "txt": "fine"}])
    script = textwrap.dedent(f"""
        import json, resource
        from ldm_train.data.readers import Skip, iter_shard
        from ldm_train.data.input_shards import list_input_shards
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        recs = list(iter_shard(list_input_shards({str(tmp_path / "000000.tar")!r})[0], 32))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"recs": [[r.key, r.reason if isinstance(r, Skip) else "ok",
                                    getattr(r, "detail", "")] for r in recs], "grew_mb": (peak - before) / 1024}}))
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert [r[:2] for r in out["recs"]] == [["huge", "too_large"], ["ok", "ok"]]
    assert out["recs"][0][2] == "12000x12000 = 144000000 pixels > filter.max_pixels=64000000 (not decoded)"
    assert out["grew_mb"] < 100, out  # decoding it took ~1.4 GB more


def test_max_pixels_is_configurable_and_checked_on_the_header():
    data = _jpeg((200, 100))
    with pytest.raises(ValueError, match=r"200x100 = 20000 pixels > filter.max_pixels=19999"):
        decode_image_checked(data, max_pixels=19999)
    img, notes = decode_image_checked(data, max_pixels=20000)
    assert img.size == (200, 100) and notes == []


# ---------------------------------------------------------------- 16-bit, EXIF, captions: converted and counted


def test_16bit_png_is_scaled_not_clipped():
    png, values = _grey16()
    img, notes = decode_image_checked(png)
    got = np.asarray(img)
    want = np.round(values / 257.0).astype(np.uint8)  # 0..65535 -> 0..255
    assert notes == ["scaled_16bit"] and img.mode == "RGB"
    assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 1], want) and np.array_equal(got[..., 2], want)
    assert got[0, 0, 0] == 0 and got[0, -1, 0] == 255 and got[0, 24, 0] == round(values[0, 24] / 257)
    # big-endian and 32-bit integer images of 16-bit samples (other formats, other PIL versions): the same scale
    for img16 in (Image.frombytes("I;16B", (48, 48), values.astype(">u2").tobytes()),
                  Image.fromarray(values.astype(np.int32), "I")):
        notes16: list[str] = []
        assert np.array_equal(np.asarray(_to_rgb(img16, notes16))[..., 0], want) and notes16 == ["scaled_16bit"]
    # 48-bit RGB: PIL reduces it to 8 bits itself (the high byte), nothing clipped; counted as the grey one is
    rgb48 = np.zeros((4, 4, 3), dtype=">u2")
    rgb48[..., 0], rgb48[..., 1], rgb48[..., 2] = 1000, 40000, 65535
    img48, notes48 = decode_image_checked(_png(4, 4, 16, 2, [r.tobytes() for r in rgb48]))
    assert notes48 == ["scaled_16bit"] and np.asarray(img48)[0, 0].tolist() == [3, 156, 255]
    rgba64 = np.full((4, 4, 4), 65535, dtype=">u2")
    assert decode_image_checked(_png(4, 4, 16, 6, [r.tobytes() for r in rgba64]))[1] == ["scaled_16bit"]


def test_transparency_flattened_on_white_is_counted():
    """A kept sample whose transparent pixels were composited on white says so (the encode job counts it); an
    alpha channel that is opaque everywhere changed nothing and is not counted."""
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255
    assert decode_image_checked(_png(4, 4, 8, 6, [r.tobytes() for r in rgba]))[1] == []
    rgba[0, 0, 3] = 0
    img, notes = decode_image_checked(_png(4, 4, 8, 6, [r.tobytes() for r in rgba]))
    assert notes == ["alpha_flattened"] and np.asarray(img)[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(img)[1, 1].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied_and_counted():
    img, notes = decode_image_checked(_exif6_jpeg())
    assert notes == ["exif_transposed"] and img.size == (32, 64)  # portrait, as shown
    px = np.asarray(img).astype(int)
    top, bottom = px[8, 16], px[56, 16]
    assert top[2] > 200 and top[0] < 50 and bottom[0] > 200 and bottom[2] < 50  # blue on top, red below


def test_non_utf8_caption_skipped_or_decoded_with_the_fallback(tmp_path):
    _records(tmp_path / "000000.tar", [{"__key__": "latin1", "jpg": _jpeg((48, 40)), "txt": b"caf\xe9 au lait"},
                                       {"__key__": "utf8", "jpg": _jpeg((48, 40)), "txt": "caf\u00e9".encode()}])
    shard = list_input_shards(str(tmp_path / "000000.tar"))[0]
    recs = {r.key: r for r in iter_shard(shard, 32)}  # the default: skip, and say why
    assert isinstance(recs["latin1"], Skip) and recs["latin1"].reason == "caption_not_utf8"
    assert "filter.caption_fallback" in recs["latin1"].detail
    assert isinstance(recs["utf8"], Sample) and recs["utf8"].caption == "caf\u00e9" and recs["utf8"].conversions == ()
    fb = {r.key: r for r in iter_shard(shard, 32, Filters(caption_fallback="cp1252"))}
    assert fb["latin1"].caption == "caf\u00e9 au lait" and fb["latin1"].conversions == ("caption_fallback",)
    # images only (autoencoder data): the image is kept, the caption dropped
    ae = {r.key: r for r in iter_shard(shard, 32, Filters(require_caption=False))}
    assert ae["latin1"].caption == "" and ae["latin1"].conversions == ("caption_not_utf8_dropped",)


def test_encode_counts_conversions_and_skips_by_reason(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    grey16, values = _grey16()
    _records(inp / "000000.tar", [
        {"__key__": "ok", "jpg": _jpeg((48, 40)), "txt": "fine"},
        {"__key__": "grey16", "png": grey16, "txt": "a ramp"},
        {"__key__": "rotated", "jpg": _exif6_jpeg(), "txt": "a phone photo"},
        {"__key__": "latin1", "jpg": _jpeg((48, 40)), "txt": b"caf\xe9"},
        {"__key__": "big", "jpg": _jpeg((300, 200)), "txt": "large"},
    ])
    args = {"input": inp, "output": out, "resolution": 32, "allow_random_first_stage": "true",
            "filter.max_pixels": 50000}
    r = run_encode_inproc(encode_cfg(encode_args(**args)))
    assert r.ok and r.num_samples == 3
    assert r.skipped == {"caption_not_utf8": 1, "too_large": 1}
    assert r.converted == {"scaled_16bit": 1, "exif_transposed": 1}
    m = read_manifest(str(out / FS))
    assert m["skipped"] == {"caption_not_utf8": 1, "too_large": 1}
    assert m["converted"] == {"exif_transposed": 1, "scaled_16bit": 1} and m["num_samples"] == 3
    samples = {s["key"]: s for s in read_all_shards(out / FS)}
    assert sorted(samples) == ["grey16", "ok", "rotated"]
    assert (samples["rotated"]["json"]["original_width"], samples["rotated"]["json"]["original_height"]) == (32, 64)
    # with a fallback codec the latin-1 caption is kept, decoded, and counted
    r2 = run_encode_inproc(encode_cfg(encode_args(**{**args, "output": tmp_path / "out2",
                                                       "filter.caption_fallback": "cp1252"})))
    assert r2.num_samples == 4 and r2.converted["caption_fallback"] == 1
    assert {s["key"]: s["txt"] for s in read_all_shards(tmp_path / "out2" / FS)}["latin1"] == "caf\u00e9"


# ---------------------------------------------------------------- nothing written: a loud failure


def test_every_input_skipped_fails_loudly_without_a_manifest(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    _records(inp / "000000.tar", [{"__key__": f"small{i}", "jpg": _jpeg((20, 20)), "txt": f"tiny {i}"}
                                  for i in range(3)] + [{"__key__": "nocap", "jpg": _jpeg((48, 40))}])
    args = {"input": inp, "output": out, "resolution": 32, "allow_random_first_stage": "true"}
    p = run_encode(encode_args(**args), check=False)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    err = p.stderr
    assert "task 0/1 wrote no sample: all 4 records of its 1 input shard(s) were skipped" in err
    assert "no_caption: 1" in err and "too_small: 3" in err and str(inp / "000000.tar") in err
    assert "filter.min_size=<smaller>" in err and "filter.require_caption=false" in err and "overwrite=true" in err
    report = _report(p)
    assert report["samples"] == 0 and report["manifest"] is None and "wrote no sample" in report["error"]
    assert not (out / FS / "manifest.json").exists()
    # the same command again: nothing to encode, still no manifest of 0 samples, still a failure
    p2 = run_encode(encode_args(**args), check=False)
    assert p2.returncode == 1 and "none holds a sample" in p2.stderr and not (out / FS / "manifest.json").exists()
    # the fix the message names
    r = run_encode_inproc(encode_cfg(encode_args(**args, **{"filter.min_size": 16, "overwrite": "true"})))
    assert r.ok and r.num_samples == 3 and read_manifest(str(out / FS))["num_samples"] == 3


# ---------------------------------------------------------------- a latent shard damaged after encoding


def _three_shards(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_synthetic(str(inp), num_samples=24, resolution=32, shard_size=8)
    args = encode_args(input=inp, output=out, resolution=32, allow_random_first_stage="true")
    return args, out / FS


def test_truncated_latent_shard_is_named_detected_and_reencoded(tmp_path):
    args, shards = _three_shards(tmp_path)
    r = run_encode_inproc(encode_cfg(args))
    assert r.ok and r.num_samples == 24
    part = json.loads((shards / "_stats" / "part-000001.json").read_text())
    data = (shards / "shard-000001.tar").read_bytes()
    assert part["num_samples"] == 8 and part["size"] == len(data)
    assert part["sha256"] == fsspec_io.sha256(str(shards / "shard-000001.tar"))
    url = str(shards / "shard-000001.tar")

    # cut inside a member: the reader names the shard and the command that repairs it
    (shards / "shard-000001.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardFormatError) as e:
        list(iter_samples(url))
    msg = str(e.value)
    assert msg.startswith(f"{url}: truncated tar ")
    assert (f"python -m data_prep.encode input={tmp_path / 'in'} output={tmp_path / 'out'} first_stage={FS} "
            f"resolution=32 allow_random_first_stage=true") in msg and msg.split("`")[1].endswith("verify=true")
    # finalize refuses to merge it
    with pytest.raises(FinalizeError, match=r"shard-000001.tar: \d+ bytes, recorded"):
        finalize(str(shards))

    # the same command again finds it (size) and re-encodes only it
    r2 = run_encode_inproc(encode_cfg(args))
    assert r2.ok and list(r2.damaged) == [1] and "truncated or overwritten" in r2.damaged[1]
    assert r2.done == [1] and r2.already_done == [0, 2] and r2.num_samples == 8
    assert (shards / "shard-000001.tar").read_bytes() == data  # byte-reproducible
    assert read_manifest(str(shards))["num_samples"] == 24
    assert sorted(s["key"] for s in read_all_shards(shards)) == [f"{i:09d}" for i in range(24)]


def test_cut_at_a_member_boundary_the_loader_names_shard_and_repair(tmp_path):
    args, shards = _three_shards(tmp_path)
    assert run_encode_inproc(encode_cfg(args)).ok
    path = shards / "shard-000002.tar"
    with tarfile.open(path) as t:
        cut = t.getmembers()[15].offset  # the header of sample 5 of 8: five whole samples before it
    path.write_bytes(path.read_bytes()[:cut])
    assert len(list(iter_samples(str(path)))) == 5  # ends quietly between members
    ds = LatentShardDataset([(str(path), 8)], batch_size=8, shuffle_buffer=1)
    with pytest.raises(RuntimeError) as e:
        next(iter(ds))
    assert str(e.value).startswith(f"{path}: fewer samples than its manifest entry (8): the shard is damaged")
    assert "verify=true" in str(e.value) and "python -m data_prep.encode input=" in str(e.value)


def test_verify_rehashes_finished_shards_and_reencodes_a_corrupt_one(tmp_path):
    args, shards = _three_shards(tmp_path)
    assert run_encode_inproc(encode_cfg(args)).ok
    path = shards / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    data[2000:2008] = b"\xff" * 8  # same size, other bytes: only the hash sees it
    path.write_bytes(bytes(data))
    r = run_encode_inproc(encode_cfg(args))
    assert r.already_done == [0, 1, 2] and r.damaged == {}  # a plain re-run checks sizes only
    r2 = run_encode_inproc(encode_cfg([*args, "verify=true"]))
    assert list(r2.damaged) == [0] and "sha256" in r2.damaged[0] and r2.done == [0] and r2.already_done == [1, 2]
    assert r2.ok and read_manifest(str(shards))["num_samples"] == 24
    assert fsspec_io.sha256(str(path)) == json.loads((shards / "_stats" / "part-000000.json").read_text())["sha256"]
    assert sorted(s["key"] for s in read_all_shards(shards)) == [f"{i:09d}" for i in range(24)]


# ---------------------------------------------------------------- a failed job does not block the corrected one


def test_failed_encode_does_not_block_the_corrected_command(tmp_path):
    import torch
    from safetensors.torch import save_file

    inp, out = tmp_path / "in", tmp_path / "out"
    write_synthetic(str(inp), num_samples=8, resolution=32, shard_size=8)
    bad = tmp_path / "bad.safetensors"
    save_file({"not_a_first_stage": torch.zeros(2)}, str(bad))  # readable, but no first stage in it
    p = run_encode(encode_args(input=inp, output=out, resolution=32, **{"first_stage.checkpoint": bad}), check=False)
    assert p.returncode != 0 and (out / FS / "_stats" / "job.json").exists()
    assert not list((out / FS).glob("shard-*.tar"))
    fixed = encode_args(input=inp, output=out, resolution=32, allow_random_first_stage="true")
    p2 = run_encode(fixed, check=False)
    assert p2.returncode == 0, p2.stdout[-2000:] + p2.stderr[-2000:]
    assert "finished no shard: replacing it" in p2.stdout and _report(p2)["samples"] == 8
    # a job of other settings over finished shards is still refused
    with pytest.raises(SystemExit, match="already holds shards of another encode job"):
        run_encode_inproc(encode_cfg(encode_args(input=inp, output=out, resolution=16,
                                                 allow_random_first_stage="true")))


# ---------------------------------------------------------------- the same task started twice


def test_a_live_writers_temporary_is_not_deleted(tmp_path):
    """Deterministic form of the race: this process is "the first run", mid-way through shard 1 when the second
    run starts; the second must not delete its temporary, and the first then publishes the same bytes."""
    args, shards = _three_shards(tmp_path)
    shards.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname().replace("-", "_")
    stale = shards / f"shard-000002.tar.tmp-{host}-{int(dead.stdout)}-0badc0de"  # its process has exited
    stale.write_bytes(b"left by a killed run")
    first = fsspec_io.atomic_write(str(shards / "shard-000001.tar"))
    f = first.__enter__()
    live_tmp = [n for n in os.listdir(shards) if n.startswith("shard-000001.tar.tmp-")]
    assert len(live_tmp) == 1
    r = run_encode_inproc(encode_cfg(args))  # the second run
    assert r.ok and r.num_samples == 24
    assert (shards / live_tmp[0]).exists()  # still there for its writer
    assert not stale.exists()  # a dead process's temporary is cleaned
    f.write((shards / "shard-000001.tar").read_bytes())  # the first run's shard: the same input, the same bytes
    first.__exit__(None, None, None)  # publishing it works (it crashed with FileNotFoundError)
    assert read_manifest(str(shards))["num_samples"] == 24
    assert sorted(s["key"] for s in read_all_shards(shards)) == [f"{i:09d}" for i in range(24)]
    assert not [n for n in os.listdir(shards) if fsspec_io.TMP_MARK in n]


def test_temporaries_of_other_hosts_are_stale_only_when_old(tmp_path):
    for name in ("s.tar.tmp-otherhost-123-0badc0de", "s.tar.tmp-0badc0de"):  # another node's; an older name
        path = tmp_path / name
        path.write_bytes(b"x")
        assert not fsspec_io.tmp_is_stale(str(path))  # may be a live writer on a shared file system
        old = path.stat().st_mtime - fsspec_io.STALE_TMP_S - 60
        os.utime(path, (old, old))
        assert fsspec_io.tmp_is_stale(str(path))
    mine = fsspec_io.tmp_name(str(tmp_path / "s.tar"))
    open(mine, "wb").close()
    assert not fsspec_io.tmp_is_stale(mine)  # this process is alive


def _two_at_once(args: list[str], env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    cmd = [sys.executable, "-m", "data_prep.encode", *args]
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    return out


def test_same_task_started_twice_both_finish(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_synthetic(str(inp), num_samples=24, resolution=32, shard_size=4)  # 6 input shards
    args = encode_args(input=inp, output=out, resolution=32, allow_random_first_stage="true", num_workers=0,
                       batch_size=4)
    for p in _two_at_once(args):
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert read_manifest(str(out / FS))["num_samples"] == 24
    assert sorted(s["key"] for s in read_all_shards(out / FS)) == [f"{i:09d}" for i in range(24)]
    assert not [n for n in os.listdir(out / FS) if fsspec_io.TMP_MARK in n]
    r = run_encode_inproc(encode_cfg([*args, "verify=true"]))  # parts and shards agree, whoever wrote last
    assert r.damaged == {} and r.already_done == list(range(6))


def test_same_task_started_twice_on_s3(s3_server):
    import s3fs

    s3fs.S3FileSystem().mkdir("prep-twice")
    write_synthetic("s3://prep-twice/raw", num_samples=16, resolution=32, shard_size=4)
    args = encode_args(input="s3://prep-twice/raw", output="s3://prep-twice/lat", resolution=32,
                       allow_random_first_stage="true", num_workers=0, batch_size=4)
    for p in _two_at_once(args, env=s3_server):
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out = f"s3://prep-twice/lat/{FS}"
    m = read_manifest(out)
    keys = [s["key"] for sh in m["shards"] for s in read_shard(fsspec_io.read_bytes(f"{out}/{sh['name']}"))]
    assert m["num_samples"] == 16 and sorted(keys) == [f"{i:09d}" for i in range(16)]
    r = run_encode_inproc(encode_cfg([*args, "verify=true"]))
    assert r.damaged == {} and r.already_done == [0, 1, 2, 3]
