"""Faults: SIGKILL / SIGTERM mid-run then resume, damaged inputs skipped and counted, a missing input shard retried."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import webdataset as wds
from PIL import Image

from data_prep.encode_job import run_encode as run_encode_inproc
from data_prep.synthetic import write_synthetic
from ldm_train.data.input_shards import InputShardError, list_input_shards
from ldm_train.data.manifest import read_manifest
from ldm_train.data.readers import iter_shard
from tests.data_prep.helpers import REPO, encode_args, encode_cfg, read_all_shards, run_encode

pytestmark = pytest.mark.integration  # starts processes or servers


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_signal_to_the_group_mid_run_then_resume(tmp_path, sig):
    """SIGKILL: a node failure. SIGTERM: scancel / preemption, sent to every process of the step (the DataLoader
    worker too): the job stops after the batch in hand, drops its open shard and says so, exit status 1."""
    inp, out = tmp_path / "in", tmp_path / "out"
    # 64 input shards: the rest of the run (~40 ms a shard) outlasts any delay between seeing the first shard done
    # and the signal on a loaded machine (with 8 the job could end first)
    shards = 64
    write_synthetic(str(inp), num_samples=4 * shards, resolution=32, shard_size=4)
    args = encode_args(input=inp, output=out, resolution=32, allow_random_first_stage="true", batch_size=4)
    stats = out / "tiny_kl_f4" / "_stats"
    log = tmp_path / "encode.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not a SLURM job: no requeue
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "data_prep.encode", *args], cwd=REPO, start_new_session=True,
                                stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 300
            while not (stats / "part-000000.json").exists():
                assert proc.poll() is None, "encode exited before the first shard was done"
                assert time.monotonic() < deadline, "no shard finished within 300 s"
                time.sleep(0.01)
        finally:
            os.killpg(proc.pid, sig)  # the job and its DataLoader worker
            rc = proc.wait(timeout=60)
    text = log.read_text()
    done_at_kill = sorted(p.name for p in stats.glob("part-*.json"))
    assert 1 <= len(done_at_kill) < shards, f"the signal was not mid-run: {done_at_kill}"
    assert not (out / "tiny_kl_f4" / "manifest.json").exists()
    if sig == signal.SIGTERM:
        assert rc == 1, text
        assert "stopped by SIGTERM" in text and "run the same command again" in text, text
        assert json.loads(text.strip().splitlines()[-1])["preempted"] == "SIGTERM"
        assert "DataLoader worker" not in text, text
        # the open shard was dropped, not left behind
        assert not [n for n in os.listdir(out / "tiny_kl_f4") if ".tmp-" in n]

    p = run_encode(args)
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["already_done"] == len(done_at_kill) and report["encoded_shards"] == shards - len(done_at_kill)
    keys = [s["key"] for s in read_all_shards(out / "tiny_kl_f4")]
    assert sorted(keys) == [f"{i:09d}" for i in range(4 * shards)]  # every sample exactly once
    assert read_manifest(str(out / "tiny_kl_f4"))["num_samples"] == 4 * shards
    assert not [n for n in os.listdir(out / "tiny_kl_f4") if ".tmp-" in n]  # the stopped run's temporaries are gone


def _jpeg(size, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_bad_inputs_skipped_counted_reported(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_synthetic(str(inp), num_samples=16, resolution=32, shard_size=8)  # 000000.tar, 000001.tar
    good = _jpeg((48, 40))
    with wds.TarWriter(str(inp / "000002.tar")) as w:
        for i in range(3):
            w.write({"__key__": f"mixed{i}", "jpg": good, "txt": f"good {i}"})
        w.write({"__key__": "badjpeg", "jpg": good[: len(good) // 2], "txt": "cut"})
        w.write({"__key__": "nocaption", "jpg": good})
        w.write({"__key__": "toosmall", "jpg": _jpeg((20, 20)), "txt": "small"})
    # 000001.tar cut in half: a download that died
    data = (inp / "000001.tar").read_bytes()
    (inp / "000001.tar").write_bytes(data[: len(data) // 2])
    salvage = []
    try:
        for r in iter_shard(list_input_shards(str(inp / "000001.tar"))[0], 32):
            salvage.append(r.key)
    except InputShardError:
        pass
    assert 0 < len(salvage) < 8

    p = run_encode(encode_args(input=inp, output=out, resolution=32, allow_random_first_stage="true"), check=False)
    assert p.returncode == 1, p.stdout + p.stderr  # something failed: the run says so
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert list(report["input_errors"]) == ["1"] and "000001.tar" in report["input_errors"]["1"]
    m = read_manifest(str(out / "tiny_kl_f4"))
    assert m["skipped"] == {"decode_error": 1, "no_caption": 1, "too_small": 1}
    assert len(m["input_errors"]) == 1 and "truncated" in m["input_errors"][0]
    keys = sorted(s["key"] for s in read_all_shards(out / "tiny_kl_f4"))
    want = sorted([f"{i:09d}" for i in range(8)] + salvage + ["mixed0", "mixed1", "mixed2"])
    assert keys == want and m["num_samples"] == len(want)  # nothing else lost
    part = json.loads((out / "tiny_kl_f4" / "_stats" / "part-000002.json").read_text())
    assert any(e.startswith("badjpeg: decode_error") for e in part["skip_examples"])


def test_unreadable_input_shard_fails_and_is_retried(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_synthetic(str(inp), num_samples=16, resolution=32, shard_size=8)
    pattern = f"{inp}/{{000000..000002}}.tar"  # 000002.tar does not exist (yet)

    def enc():
        return run_encode_inproc(encode_cfg(encode_args(input=pattern, output=out, resolution=32,
                                                        allow_random_first_stage="true")))

    r = enc()
    assert not r.ok and list(r.failed) == [2] and sorted(r.done) == [0, 1] and r.manifest is None
    assert not (out / "tiny_kl_f4" / "shard-000002.tar").exists()
    write_synthetic(str(tmp_path / "more"), num_samples=24, resolution=32, shard_size=8)
    os.replace(tmp_path / "more" / "000002.tar", inp / "000002.tar")
    r2 = enc()
    assert r2.ok and r2.done == [2] and r2.manifest and read_manifest(r2.manifest)["num_samples"] == 24


@pytest.mark.slow
def test_plain_bash_with_two_ranks(tmp_path):
    """`NPROC=2 bash slurm/prep_latents.sh`: two local processes split the shards by RANK/WORLD_SIZE."""
    raw = tmp_path / "raw"
    write_synthetic(str(raw), num_samples=24, resolution=32, shard_size=6)  # 4 input shards
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", "slurm/prep_latents.sh", f"input={raw}", f"output={tmp_path / 'lat'}",
                           "resolution=32", "allow_random_first_stage=true", "num_workers=0", "progress=false"],
                          cwd=REPO, env={**env, "NPROC": "2", "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"output"')]
    assert sorted((r["task"], r["encoded_shards"]) for r in reports) == [("0/2", 2), ("1/2", 2)]
    m = read_manifest(str(tmp_path / "lat" / "tiny_kl_f4"))  # written by whichever rank finished last
    assert m["num_samples"] == 24 and m["num_shards"] == 4
    assert sorted(s["key"] for s in read_all_shards(tmp_path / "lat" / "tiny_kl_f4")) == [f"{i:09d}" for i in range(24)]
