"""Readers: img2dataset tars (brace patterns, workers), image folders, ImageNet class folders, bad inputs."""
from __future__ import annotations

import io
import os

import pytest
import torch
from PIL import Image

from data_prep.synthetic import write_synthetic
from ldm_train.data.input_shards import InputShardError, list_input_shards
from ldm_train.data.readers import Filters, Sample, Skip, image_dataset, iter_shard
from ldm_train.data.transforms import resize_center_crop, to_pil, to_tensor


def test_resize_center_crop_protocol():
    # left third red, middle green, right blue: the centre crop of a 3:1 image is the green third
    img = Image.new("RGB", (300, 100))
    for i, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        img.paste(c, (100 * i, 0, 100 * (i + 1), 100))
    out = resize_center_crop(img, 32)
    assert out.size == (32, 32)
    r, g, b = (int(v) for v in out.getpixel((16, 16)))
    assert g > 200 and r < 40 and b < 40
    tall = resize_center_crop(Image.new("RGB", (50, 201), (9, 9, 9)), 40)
    assert tall.size == (40, 40)
    x = to_tensor(out)
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert to_pil(x).tobytes() == out.tobytes()


def test_tar_dataset_workers_brace_and_dir(tmp_path):
    write_synthetic(str(tmp_path), num_samples=30, resolution=32, shard_size=10)
    assert len(list_input_shards(str(tmp_path))) == 3
    assert [s.url for s in list_input_shards(f"{tmp_path}/{{000001..000002}}.tar")] == [
        f"{tmp_path}/000001.tar",
        f"{tmp_path}/000002.tar",
    ]
    ds = image_dataset(f"{tmp_path}/{{000000..000002}}.tar", 16)
    keys, caps = [], []
    for batch in torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2):
        assert batch["image"].shape[1:] == (3, 16, 16)
        assert batch["image"].dtype == torch.float32
        keys += batch["key"]
        caps += batch["caption"]
        assert batch["meta"]["original_width"].tolist() == [32] * len(batch["key"])
    assert sorted(keys) == [f"{i:09d}" for i in range(30)]  # each sample exactly once over 2 workers
    assert all(c.startswith("a ") for c in caps)


def _jpeg(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_image_folder_with_sidecar_captions(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jpg").write_bytes(_jpeg((255, 0, 0)))
    (tmp_path / "a.txt").write_text("a red thing\n")
    (tmp_path / "sub" / "b.v2.png").write_bytes(_jpeg((0, 0, 255)))  # PIL sniffs the format, not the extension
    (tmp_path / "sub" / "b.v2.txt").write_text("a blue thing")
    (tmp_path / "c.jpg").write_bytes(_jpeg((0, 255, 0)))  # no caption
    recs = [r for s in list_input_shards(str(tmp_path)) for r in iter_shard(s, 24, Filters(min_size=0))]
    got = {r.key: r for r in recs}
    assert isinstance(got["a"], Sample) and got["a"].caption == "a red thing"
    assert got["a"].image.shape == (3, 24, 24) and got["a"].image[0].mean() > 0.9
    assert isinstance(got["sub__b_v2"], Sample) and got["sub__b_v2"].caption == "a blue thing"
    assert isinstance(got["c"], Skip) and got["c"].reason == "no_caption"
    ds = image_dataset(str(tmp_path), 24)  # require_caption=False: c is kept with an empty caption
    assert sorted(d["key"] for d in ds) == ["a", "c", "sub__b_v2"]


def test_imagenet_class_folders(tmp_path):
    for wnid, colour in [("n02", (0, 255, 0)), ("n01", (255, 0, 0))]:
        os.makedirs(tmp_path / wnid)
        for i in range(3):
            (tmp_path / wnid / f"{wnid}_{i}.JPEG").write_bytes(_jpeg(colour))
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01 goldfish, Carassius auratus\nn02 tiger shark\n")
    shards = list_input_shards(str(tmp_path), files_per_shard=4)
    assert [len(s.files) for s in shards] == [4, 2]
    recs = [r for s in shards for r in iter_shard(s, 16, Filters(min_size=0))]
    assert len(recs) == 6 and all(isinstance(r, Sample) for r in recs)
    by_label = {r.meta["label"]: r.caption for r in recs}
    assert by_label == {0: "a photo of a goldfish", 1: "a photo of a tiger shark"}
    # the class index is global even in a shard that holds only class 1
    assert {r.meta["label"] for r in iter_shard(shards[1], 16, Filters(min_size=0))} == {1}


def test_bad_inputs_are_skipped_with_reason(tmp_path):
    import webdataset as wds

    good = _jpeg((10, 200, 10), (64, 64))
    path = tmp_path / "000000.tar"
    with wds.TarWriter(str(path)) as w:
        w.write({"__key__": "ok1", "jpg": good, "txt": "fine"})
        w.write({"__key__": "corrupt", "jpg": good[: len(good) // 3], "txt": "cut jpeg"})
        w.write({"__key__": "garbage", "jpg": b"not an image at all", "txt": "x"})
        w.write({"__key__": "nocap", "jpg": good})
        w.write({"__key__": "small", "jpg": _jpeg((1, 2, 3), (20, 90)), "txt": "tiny"})
        w.write({"__key__": "wide", "jpg": _jpeg((1, 2, 3), (400, 64)), "txt": "panorama"})
        w.write({"__key__": "jsoncap", "png": _png(), "json": {"caption": "from json", "label": 7}})
    recs = list(iter_shard(list_input_shards(str(path))[0], 32, Filters(min_size=32, max_aspect=3.0)))
    kinds = {r.key: (r.reason if isinstance(r, Skip) else "ok") for r in recs}
    assert kinds == {
        "ok1": "ok",
        "corrupt": "decode_error",
        "garbage": "decode_error",
        "nocap": "no_caption",
        "small": "too_small",
        "wide": "bad_aspect",
        "jsoncap": "ok",
    }
    js = next(r for r in recs if r.key == "jsoncap")
    assert js.caption == "from json" and js.meta["label"] == 7


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(buf, format="PNG")  # transparent -> composited on white
    return buf.getvalue()


def test_truncated_tar_salvages_complete_samples(tmp_path):
    write_synthetic(str(tmp_path), num_samples=20, resolution=32, shard_size=20)
    path = tmp_path / "000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    got = []
    with pytest.raises(InputShardError) as e:
        for r in iter_shard(list_input_shards(str(path))[0], 32):
            got.append(r.key)
    assert e.value.salvaged and "000000.tar" in str(e.value)
    assert 5 <= len(got) < 20 and got == [f"{i:09d}" for i in range(len(got))]
    with pytest.raises(InputShardError) as e2:
        list(iter_shard(list_input_shards(str(tmp_path / "missing.tar"))[0], 32))
    assert not e2.value.salvaged


def test_tar_member_names_that_leave_the_folder_become_safe_keys_and_are_counted(tmp_path):
    """``../../x.jpg`` or ``/abs/y.jpg`` in an input tar would be copied into the output shard's member names."""
    import tarfile

    path = tmp_path / "000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("../../x.jpg", _jpeg((1, 2, 3), (64, 64))), ("../../x.txt", b"up"),
                           ("/abs/y.jpg", _jpeg((1, 2, 3), (64, 64))), ("/abs/y.txt", b"absolute"),
                           ("ok/z.jpg", _jpeg((1, 2, 3), (64, 64))), ("ok/z.txt", b"fine")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    recs = list(iter_shard(list_input_shards(str(path))[0], 32))
    assert [(r.key, r.meta["source_key"], r.conversions) for r in recs] == [
        ("__/__/x", "../../x", ("unsafe_key_renamed",)), ("abs/y", "/abs/y", ("unsafe_key_renamed",)),
        ("ok/z", "ok/z", ())]
