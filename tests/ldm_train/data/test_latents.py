"""Latent-shard loader: batch contract, determinism, resume continuation, topology change, dropout, manifest checks."""
from __future__ import annotations

import functools
import hashlib
import itertools
from pathlib import Path

import pytest
import torch

from ldm_train.config import FirstStageConfig, UNetConfig
from ldm_train.data.latents import (
    LatentDataConfig,
    LatentLoader,
    build_latent_loader,
    sample_latents,
)
from ldm_train.data.manifest import ManifestError, check_manifest, read_manifest, shard_list
from ldm_train.data.tokenizer import BatchTokenizer
from tests.ldm_train.data.helpers import write_latent_shards

pytestmark = pytest.mark.integration  # starts processes or servers


def make_loader(shards_dir: Path, rank: int = 0, world_size: int = 1, tokenize_fn=None, **kw) -> LatentLoader:
    cfg = LatentDataConfig(shards=str(shards_dir), **{"batch_size": 4, "num_workers": 0, "shuffle_buffer": 8,
                                                      "shards_per_block": 2, "caption_dropout": 0.0, **kw})
    manifest = read_manifest(str(shards_dir))
    return LatentLoader(cfg, shard_list(manifest), stored=manifest["stored"], tokenize_fn=tokenize_fn,
                        rank=rank, world_size=world_size, manifest=manifest)


def take(loader: LatentLoader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


def keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_batch_contract(latent_shards: Path) -> None:
    loader = make_loader(latent_shards, tokenize_fn=lambda caps: torch.full((len(caps), 5), len(caps)))
    (batch,) = take(loader, 1)
    assert batch["moments"].shape == (4, 6, 16, 16) and batch["moments"].dtype == torch.float32
    assert batch["tokens"].shape == (4, 5) and batch["tokens"].dtype == torch.int64
    assert batch["dropped"].dtype == torch.bool and not batch["dropped"].any()
    for key, caption, moments, meta in zip(batch["key"], batch["caption"], batch["moments"], batch["meta"],
                                           strict=True):
        i = int(key)
        assert caption.endswith(f"number {i}")  # caption belongs to its latent
        assert torch.all(moments == i)
        assert meta["source_key"] == f"src{i}"
    assert loader.scale_factor == 0.5  # from the manifest
    assert make_loader(latent_shards, scale_factor=0.18215).scale_factor == 0.18215


def test_one_pass_covers_every_sample_once(latent_shards: Path) -> None:
    # 91 samples = 13 batches of 7: one stream reads the first epoch's blocks, each sample exactly once
    got = keys(take(make_loader(latent_shards, batch_size=7), 13))
    assert sorted(got) == [f"{i:08d}" for i in range(91)]
    assert got != sorted(got)  # shuffled, not in file order


def test_order_is_a_function_of_the_seed(latent_shards: Path) -> None:
    a = keys(take(make_loader(latent_shards, num_workers=2, seed=3), 10))
    b = keys(take(make_loader(latent_shards, num_workers=2, seed=3), 10))
    c = keys(take(make_loader(latent_shards, num_workers=2, seed=4), 10))
    assert a == b
    assert a != c


def test_ranks_read_disjoint_samples(latent_shards: Path) -> None:
    r0 = keys(take(make_loader(latent_shards, rank=0, world_size=2), 5))
    r1 = keys(take(make_loader(latent_shards, rank=1, world_size=2), 5))
    assert not set(r0) & set(r1)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize(("num_workers", "head_batches"), [(0, 6), (2, 6), (2, 5), (3, 7)])
def test_resume_continues_the_uninterrupted_stream(latent_shards: Path, num_workers: int, head_batches: int) -> None:
    kw = dict(num_workers=num_workers, caption_dropout=0.3, seed=7)
    full = take(make_loader(latent_shards, **kw), 15)  # 60 samples: crosses block boundaries
    first = make_loader(latent_shards, **kw)
    head = take(first, head_batches)
    state = first.state_dict()
    assert state["samples_yielded"] == 4 * head_batches and state["batches_yielded"] == head_batches
    resumed = make_loader(latent_shards, **kw)
    resumed.load_state_dict(state)
    tail = take(resumed, 15 - head_batches)
    assert keys(head + tail) == keys(full)
    assert [c for b in head + tail for c in b["caption"]] == [c for b in full for c in b["caption"]]
    assert all(torch.equal(x["moments"], y["moments"]) for x, y in zip(head + tail, full, strict=True))
    assert resumed.state_dict()["batches_yielded"] == 15


def test_resume_at_another_world_size_repeats_nothing(latent_shards: Path) -> None:
    kw = dict(num_workers=2, shards_per_block=1)
    consumed: set[str] = set()
    states = []
    for rank in range(2):
        loader = make_loader(latent_shards, rank=rank, world_size=2, **kw)
        consumed |= set(keys(take(loader, 3)))
        states.append(loader.state_dict())
    assert states[0] == states[1]  # rank 0's copy in the checkpoint stands for every rank
    resumed = make_loader(latent_shards, rank=0, world_size=1, num_workers=1, shards_per_block=1)
    resumed.load_state_dict(states[0])
    assert resumed.base_block == 4  # streams 0..3 each began one block (one shard) of the first epoch
    after = keys(take(resumed, 7))  # 28 samples: still within the first epoch's unread shards
    assert not set(after) & consumed

    bigger_buffer = make_loader(latent_shards, rank=0, world_size=2, num_workers=2, shards_per_block=1,
                                shuffle_buffer=64)  # same topology, another shuffle: also past the begun blocks
    bigger_buffer.load_state_dict(states[0])
    assert bigger_buffer.base_block == 4 and bigger_buffer.batches_yielded == 0


def test_resume_on_other_shards_starts_afresh(latent_shards: Path, tmp_path: Path) -> None:
    loader = make_loader(latent_shards)
    take(loader, 3)
    write_latent_shards(tmp_path / "other", [10, 10])
    other = make_loader(tmp_path / "other")
    other.load_state_dict(loader.state_dict())
    assert (other.base_block, other.batches_yielded) == (0, 0)
    assert keys(take(other, 2)) == keys(take(make_loader(tmp_path / "other"), 2))


def test_caption_dropout_gives_the_empty_caption(latent_shards: Path) -> None:
    seen = []
    tok = functools.partial(lambda caps: torch.tensor([[len(c)] for c in caps]))
    for batch in take(make_loader(latent_shards, caption_dropout=0.5, batch_size=7, tokenize_fn=tok), 26):
        for caption, dropped, tokens in zip(batch["caption"], batch["dropped"], batch["tokens"], strict=True):
            assert (caption == "") == bool(dropped)
            assert (tokens.item() == 0) == bool(dropped)  # tokens were made from the dropped caption
            seen.append(bool(dropped))
    assert 0.35 < sum(seen) / len(seen) < 0.65


def test_sample_latents_draws_from_the_posterior() -> None:
    mean = torch.full((64, 3, 8, 8), 1.5)
    logvar = torch.full((64, 3, 8, 8), float(torch.log(torch.tensor(4.0))))
    moments = torch.cat([mean, logvar], dim=1)
    z = sample_latents(moments, 0.5, torch.Generator().manual_seed(0))
    assert z.shape == (64, 3, 8, 8)
    assert abs(z.mean().item() - 0.75) < 0.05  # 0.5 * 1.5
    assert abs(z.std().item() - 1.0) < 0.05  # 0.5 * sqrt(4)
    assert torch.equal(z, sample_latents(moments, 0.5, torch.Generator().manual_seed(0)))


def test_manifest_mismatch_is_refused_with_the_fix(latent_shards: Path) -> None:
    manifest = read_manifest(str(latent_shards))
    kl_f16 = FirstStageConfig(name="kl_f16", downsample_factor=16, embed_dim=16)
    with pytest.raises(ManifestError) as err:
        check_manifest(manifest, kl_f16)
    msg = str(err.value)
    assert "z_channels=3 but first_stage kl_f16 has 16" in msg
    assert "downsample_factor=4 but first_stage kl_f16 has 16" in msg
    assert "re-encode" in msg and "first_stage=tiny_kl_f4" in msg and "manifest.json" in msg

    tiny = FirstStageConfig(name="tiny_kl_f4", downsample_factor=4, embed_dim=3)
    check_manifest(manifest, tiny, UNetConfig(image_size=16, in_channels=3), resolution=64)  # fits
    with pytest.raises(ManifestError, match="latents of 16x16 but unet.image_size=32"):
        check_manifest(manifest, tiny, UNetConfig(image_size=32, in_channels=3))
    with pytest.raises(ManifestError, match="resolution=64 but data.resolution=128"):
        check_manifest(manifest, tiny, resolution=128)
    with pytest.raises(ManifestError, match="stored=moments but a vq first stage needs prequant"):
        check_manifest(manifest, FirstStageConfig(name="tiny_kl_f4", kind="vq", downsample_factor=4, embed_dim=3))
    ckpt = latent_shards.parent / "ae.safetensors"
    ckpt.write_bytes(b"weights v1")
    manifest["first_stage"]["sha256"] = hashlib.sha256(b"weights v1").hexdigest()
    tiny.checkpoint = str(ckpt)
    check_manifest(manifest, tiny, verify_checkpoint=True)  # the encoding checkpoint
    ckpt.write_bytes(b"weights v2")
    with pytest.raises(ManifestError, match="encoded with first stage .* but first_stage.checkpoint=.*ae.safetensors"):
        check_manifest(manifest, tiny, verify_checkpoint=True)
    with pytest.raises(ManifestError, match="no manifest at .*nowhere/manifest.json"):
        read_manifest(str(latent_shards.parent / "nowhere"))


def test_vq_shards_give_latents(tmp_path: Path) -> None:
    write_latent_shards(tmp_path / "vq", [5, 5], name="tiny_vq_f4", kind="vq")
    (batch,) = take(make_loader(tmp_path / "vq"), 1)
    assert "moments" not in batch and batch["latents"].shape == (4, 3, 16, 16)


def test_hydra_preset_follows_first_stage(latent_shards: Path) -> None:
    from hydra import compose, initialize_config_dir

    from ldm_train.config import register_configs, to_dataclass
    from ldm_train.trainer.config import register_trainer_configs

    register_configs()
    register_trainer_configs()
    conf_dir = str(Path(__file__).resolve().parents[3] / "conf")
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose("train", overrides=[f"data.latents_root={latent_shards.parent}", "data.num_workers=0"])
    assert cfg.data.shards == str(latent_shards)  # ${data.latents_root}/${first_stage.name}
    fs = to_dataclass(cfg.first_stage, FirstStageConfig)
    loader = build_latent_loader(cfg.data, fs, rank=0, world_size=1)
    assert len(take(loader, 1)[0]["key"]) == cfg.data.batch_size


def test_reads_shards_from_s3(latent_shards: Path, s3_server: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("latents-bucket")
    fs.put(str(latent_shards), "latents-bucket/latents/tiny_kl_f4", recursive=True)
    url = "s3://latents-bucket/latents/tiny_kl_f4"
    local = keys(take(make_loader(latent_shards, num_workers=2, caption_dropout=0.2), 8))
    remote_loader = make_loader(url, num_workers=2, caption_dropout=0.2)
    assert remote_loader.shards[0][0].startswith(url + "/shard-")
    assert keys(take(remote_loader, 8)) == local  # same stream from S3 as from disk


def test_batch_tokenizer_gives_the_ids_of_tokenize(tmp_path: Path) -> None:
    import pickle

    from ldm_train.data.tokenizer import tokenize, train_tokenizer

    corpus = [f"a {c} {s} on a plain background" for c in ("red", "green", "blue") for s in ("circle", "square")]
    tok = train_tokenizer(corpus * 20, 60, str(tmp_path / "tok"), max_len=12)
    captions = ["A RED circle", "", "a green square on a plain background " * 5, "ein grüner würfel", "blue"]
    fast = pickle.loads(pickle.dumps(BatchTokenizer(tok, 12)))  # as it reaches a loader worker
    ids = fast(captions)
    assert ids.dtype == torch.int64 and ids.shape == (5, 12)
    assert torch.equal(ids, tokenize(tok, captions, 12))
    assert torch.equal(tokenize(tok, ["blue"], 12), tokenize(tok, ["blue"], 12))  # the original is untouched


def _object_npy() -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _npy(array) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("latent, problem", [
    (lambda np: _npy(np.zeros((6, 8, 8), np.float16)), r"has shape \[6, 8, 8\] but the manifest's latent_shape is "
                                                       r"\[6, 16, 16\]"),
    (lambda np: _npy(np.zeros((6, 16, 16), np.int8)), "is int8, expected float16"),
    (lambda np: _npy(np.zeros((6, 16, 16), np.float64)), "is float64, expected float16"),
    (lambda np: _object_npy(), "does not decode .*allow_pickle"),
    (lambda np: None, "has no latent.npy"),
])
def test_a_bad_latent_names_the_shard_and_the_sample(tmp_path: Path, latent, problem: str) -> None:
    """A latent.npy of the wrong shape or dtype, an object array (never unpickled) or none at all: the error names
    the shard, the sample key and the repair, instead of a cast or a stack error without a name."""
    import io
    import tarfile

    import numpy as np

    root = tmp_path / "latents"
    write_latent_shards(root, [4])
    shard = root / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad = latent(np)
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == "00000002.latent.npy":
                if bad is None:
                    continue
                m.size, data = len(bad), bad
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(ValueError, match=rf"{shard}: sample 00000002.*{problem}.*repair it with"):
        take(make_loader(root, batch_size=4), 1)
