"""The encode job: shard contract, latent statistics, task split, finalize, refusal without weights."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from data_prep.encode_job import resolve_tasks
from data_prep.encode_job import run_encode as run_encode_inproc
from data_prep.encoding import load_encoder
from data_prep.finalize import FinalizeError, finalize
from data_prep.synthetic import write_synthetic
from ldm_train.data.input_shards import InputShard, list_input_shards
from ldm_train.data.manifest import check_manifest, read_manifest
from ldm_train.data.readers import iter_shard
from tests.data_prep.helpers import encode_args, encode_cfg, read_all_shards, run_encode

pytestmark = pytest.mark.integration  # starts processes or servers


@pytest.fixture(scope="module")
def six_shards(tmp_path_factory):
    """6 input shards of 8 synthetic 32 px images."""
    d = tmp_path_factory.mktemp("syn6")
    write_synthetic(str(d), num_samples=48, resolution=32, shard_size=8, seed=5)
    return d


def _encode_inproc(inp, out, **kw):
    args = {"input": inp, "output": out, "resolution": 32, "allow_random_first_stage": "true", **kw}
    return run_encode_inproc(encode_cfg(encode_args(**args)))


def test_kl_shards_follow_the_contract(six_shards, tmp_path):
    res = _encode_inproc(six_shards, tmp_path)
    assert res.ok and sorted(res.done) == list(range(6)) and res.num_samples == 48
    shard_dir = tmp_path / "tiny_kl_f4"
    assert sorted(p.name for p in shard_dir.glob("*.tar")) == [f"shard-{j:06d}.tar" for j in range(6)]
    m = read_manifest(str(shard_dir))
    check_manifest(m, {"name": "tiny_kl_f4", "kind": "kl", "downsample_factor": 4, "embed_dim": 3}, resolution=32)
    assert m["stored"] == "moments" and m["latent_shape"] == [6, 8, 8] and m["stats_of"] == "sampled_z"
    assert m["num_samples"] == 48 and m["num_shards"] == 6 and [s["num_samples"] for s in m["shards"]] == [8] * 6
    assert m["first_stage"]["random_weights"] is True and m["skipped"] == {}

    samples = read_all_shards(shard_dir)
    keys = [s["key"] for s in samples]
    assert sorted(keys) == [f"{i:09d}" for i in range(48)]  # unique and complete, the source keys
    for s in samples:
        assert s["latent"].dtype == np.float16 and s["latent"].shape == (6, 8, 8)
        assert s["json"]["source_key"] == s["key"] and s["json"]["original_width"] == 32
        assert s["txt"].startswith("a ") and "label" not in s["json"]
    # the statistics are of sampled z = mean + std * eps: var(z) = var(mean) + E[exp(logvar)]
    lat = np.stack([s["latent"] for s in samples]).astype(np.float64)
    mean, logvar = lat[:, :3], lat[:, 3:]
    want_mean = mean.mean(axis=(0, 2, 3))
    want_std = np.sqrt(mean.var(axis=(0, 2, 3)) + np.exp(logvar).mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(m["mean"], want_mean, atol=0.08)
    np.testing.assert_allclose(m["std"], want_std, rtol=0.08)
    assert m["scale_factor"] == pytest.approx(1 / m["overall_std"])

    # the stored moments are the first stage's, of this very image (same weights: load_encoder seeds them)
    fs_cfg = encode_cfg(encode_args(input="x")).first_stage
    model = load_encoder(fs_cfg, allow_random=True)
    images = {r.key: r.image for sh in list_input_shards(str(six_shards)) for r in iter_shard(sh, 32)}
    by_key = {s["key"]: s["latent"] for s in samples}
    keys8 = sorted(by_key)[::6]
    with torch.no_grad():
        want = model.encode_moments(torch.stack([images[k] for k in keys8]))
    want[:, 3:] = want[:, 3:].clamp(-30, 20)
    got = torch.from_numpy(np.stack([by_key[k] for k in keys8])).float()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # float16 storage
    all_std = math.sqrt(np.mean(np.array(m["std"]) ** 2 + (np.array(m["mean"]) - np.mean(m["mean"])) ** 2))
    assert m["overall_std"] == pytest.approx(all_std, rel=1e-6)


def test_vq_stores_prequant(six_shards, tmp_path):
    res = _encode_inproc(f"{six_shards}/{{000000..000001}}.tar", tmp_path, first_stage="tiny_vq_f4")
    assert res.ok and res.num_samples == 16
    m = read_manifest(str(tmp_path / "tiny_vq_f4"))
    assert m["stored"] == "prequant" and m["latent_shape"] == [3, 8, 8] and m["stats_of"] == "prequant"
    lat = np.stack([s["latent"] for s in read_all_shards(tmp_path / "tiny_vq_f4")]).astype(np.float64)
    assert lat.shape == (16, 3, 8, 8)
    # stats of the stored latent itself (up to its float16 rounding)
    np.testing.assert_allclose(m["mean"], lat.mean(axis=(0, 2, 3)), atol=2e-3)
    np.testing.assert_allclose(m["std"], lat.std(axis=(0, 2, 3)), rtol=2e-3)


def test_task_split_gives_the_same_manifest(six_shards, tmp_path):
    one = _encode_inproc(six_shards, tmp_path / "one")
    parts = []
    for i in range(3):  # the i-th of 3 tasks takes shards j % 3 == i
        r = _encode_inproc(six_shards, tmp_path / "three", task_index=i, num_tasks=3)
        parts.append(sorted(r.done))
        assert (r.manifest is not None) == (i == 2)  # only the last task finds every part and finalizes
    assert parts == [[0, 3], [1, 4], [2, 5]] and one.manifest
    a = read_manifest(str(tmp_path / "one" / "tiny_kl_f4"))
    b = read_manifest(str(tmp_path / "three" / "tiny_kl_f4"))
    for k in ("shards", "num_samples", "skipped", "latent_shape", "first_stage"):
        assert a[k] == b[k], k
    np.testing.assert_allclose(a["std"], b["std"], rtol=1e-4)
    ka = sorted(s["key"] for s in read_all_shards(tmp_path / "one" / "tiny_kl_f4"))
    kb = sorted(s["key"] for s in read_all_shards(tmp_path / "three" / "tiny_kl_f4"))
    assert ka == kb and len(ka) == 48


def test_resolve_tasks_from_env(monkeypatch):
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert resolve_tasks(None, None) == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_tasks(None, None) == (1, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert resolve_tasks(None, None) == (2, 3)  # the array wins over ranks, offset by its first id
    assert resolve_tasks(0, 2) == (0, 2)
    with pytest.raises(ValueError, match="task_index"):
        resolve_tasks(3, 2)


def test_finalize_lists_missing_shards(six_shards, tmp_path):
    r = _encode_inproc(six_shards, tmp_path, task_index=0, num_tasks=2)
    assert r.manifest is None and sorted(r.done) == [0, 2, 4]
    with pytest.raises(FinalizeError) as e:
        finalize(str(tmp_path / "tiny_kl_f4"))
    msg = str(e.value)
    assert "3 of 6 input shards" in msg and "000001.tar" in msg and "000005.tar" in msg and "000002.tar" not in msg
    assert not (tmp_path / "tiny_kl_f4" / "manifest.json").exists()


def test_cli_refuses_random_weights_without_flag(six_shards, tmp_path):
    p = run_encode([f"input={six_shards}/000000.tar", f"output={tmp_path}", "resolution=32"], check=False)
    assert p.returncode != 0 and "allow_random_first_stage=true" in (p.stdout + p.stderr)
    assert not (tmp_path / "tiny_kl_f4" / "shard-000000.tar").exists()


def test_cli_runs_and_reports_json(six_shards, tmp_path):
    p = run_encode(encode_args(input=f"{six_shards}/{{000000..000002}}.tar", output=tmp_path, resolution=32,
                               allow_random_first_stage="true"))
    assert "RANDOMLY INITIALISED" in p.stdout
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["samples"] == 24 and report["encoded_shards"] == 3 and report["failed"] == {}
    # a second run finds every shard complete and redoes nothing
    r2 = _encode_inproc(f"{six_shards}/{{000000..000002}}.tar", tmp_path)
    assert r2.already_done == [0, 1, 2] and r2.done == [] and r2.manifest


def test_progress_shows_images_of_the_known_total(six_shards, tmp_path, capsys):
    # the synthetic tars carry img2dataset's <shard>_stats.json: the total (6 x 8 images) is known up front
    _encode_inproc(f"{six_shards}/{{000000..000005}}.tar", tmp_path, progress="true")
    final = capsys.readouterr().out.split("\r")[-1]
    assert "100%" in final and "48/48 images" in final and "shards=6/6" in final, final


def test_progress_total_comes_from_stats_files_or_folder_listings(six_shards, tmp_path):
    from data_prep.progress import EncodeProgress, known_total

    tars = list_input_shards(str(six_shards))
    assert known_total(tars) == 48
    bare = tmp_path / "bare"  # tars without stats files (not from img2dataset): images only, ETA from shards
    bare.mkdir()
    for shard in tars:
        shutil.copy(shard.url, bare)
    bare_shards = list_input_shards(str(bare))
    assert known_total(bare_shards) is None
    folder = [InputShard(j, "/images", "folder", tuple(f"{j}/{i}.png" for i in range(1000))) for j in range(60)]
    progress = EncodeProgress(folder, task_index=0)
    progress.batch(1000)
    progress.shard_done(skipped=24, filtered=24)
    assert "1,024/60,000 images" in str(progress.bar) and "shards=1/60" in str(progress.bar)
    progress.close()
    progress = EncodeProgress(bare_shards, task_index=0)
    progress.batch(8)
    progress.shard_done(skipped=0, filtered=0)
    assert "8 images" in str(progress.bar) and "shards=1/6" in str(progress.bar) and "eta=" in str(progress.bar)
    progress.close()
