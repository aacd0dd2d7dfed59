"""CompVis-layout weights: a Lightning-style .ckpt loads strictly (EMA too), exports round-trip, pickles with
code are refused, fsspec URLs read."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm_train.checkpoints.compvis import (
    UNET_PREFIX,
    ema_key,
    export_safetensors,
    load_compvis,
    load_state_dict_file,
    main,
    split_compvis,
)
from ldm_train.config import TextEncoderConfig, UNetConfig
from ldm_train.models.text_encoder import BERTEmbedder
from ldm_train.models.unet import UNetModel


class NotData:
    """A class in a pickle: loading it would import and run code named by the file."""

    def __init__(self) -> None:
        self.x = 1


def _models(unet_cfg: UNetConfig, text_cfg: TextEncoderConfig, randomize, seed: int) -> tuple:
    return randomize(UNetModel(unet_cfg), seed=seed), randomize(BERTEmbedder(text_cfg), seed=seed + 1)


def _lightning_ckpt(path: Path, unet: UNetModel, text: BERTEmbedder, ema_offset: float | None = None) -> None:
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd |= {"cond_stage_model." + k: v for k, v in text.state_dict().items()}
    sd |= {"betas": torch.linspace(1e-4, 2e-2, 1000), "scale_factor": torch.tensor(0.18215)}
    if ema_offset is not None:  # LitEma's flattened buffer names
        sd |= {ema_key(k): v + ema_offset for k, v in unet.state_dict().items()}
        sd |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)}
    torch.save({"state_dict": sd, "global_step": 1234, "epoch": 3}, path)


def test_lightning_ckpt_loads_strictly_with_ema(small_unet_cfg, small_text_cfg, randomize, tmp_path: Path) -> None:
    src_unet, src_text = _models(small_unet_cfg, small_text_cfg, randomize, seed=1)
    ckpt = tmp_path / "last.ckpt"
    _lightning_ckpt(ckpt, src_unet, src_text, ema_offset=0.5)
    assert ema_key("input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"

    unet, text = _models(small_unet_cfg, small_text_cfg, randomize, seed=7)
    report = load_compvis(str(ckpt), unet=unet, text_encoder=text)
    assert report.loaded == {"unet": len(src_unet.state_dict()), "text_encoder": len(src_text.state_dict())}
    assert report.ignored == ["ema"] and not report.ema
    for k, v in src_unet.state_dict().items():
        assert torch.equal(unet.state_dict()[k], v), k
    for k, v in src_text.state_dict().items():
        assert torch.equal(text.state_dict()[k], v), k

    ema_unet = UNetModel(small_unet_cfg)
    report = load_compvis(str(ckpt), unet=ema_unet, use_ema=True)
    assert report.ema
    for k, v in src_unet.state_dict().items():
        assert torch.equal(ema_unet.state_dict()[k], v + 0.5), k

    groups = split_compvis(load_state_dict_file(str(ckpt)))
    assert set(groups["other"]) == {"betas", "scale_factor"}  # global_step/epoch are not tensors: dropped
    assert "decay" in groups["ema"]


def test_mismatch_fails_and_missing_to_logits_is_reported(small_unet_cfg, small_text_cfg, randomize, tmp_path) -> None:
    unet, text = _models(small_unet_cfg, small_text_cfg, randomize, seed=1)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd |= {"cond_stage_model." + k: v for k, v in text.state_dict().items() if "to_logits" not in k}
    report = load_compvis(sd, text_encoder=BERTEmbedder(small_text_cfg))
    assert report.unused_missing == ["transformer.to_logits.weight", "transformer.to_logits.bias"]
    assert "unused" in str(report)

    del sd["model.diffusion_model.out.2.bias"]
    with pytest.raises(ValueError, match=r"1 missing .*out\.2\.bias"):
        load_compvis(sd, unet=UNetModel(small_unet_cfg))
    wider = UNetModel(UNetConfig(**{**small_unet_cfg.__dict__, "model_channels": 64}))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_compvis({"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}, unet=wider)


def test_export_round_trip_and_fsspec(small_unet_cfg, small_text_cfg, randomize, tmp_path: Path, capsys) -> None:
    unet, text = _models(small_unet_cfg, small_text_cfg, randomize, seed=2)
    for path in (str(tmp_path / "export" / "model.safetensors"), "memory://ldm-weights-test/model.safetensors"):
        written = export_safetensors(path, {"model.diffusion_model": unet, "cond_stage_model.": text}, {"step": 5})
        loaded = load_state_dict_file(path)
        assert loaded.keys() == written.keys()
        assert all(torch.equal(loaded[k], written[k]) for k in loaded)
        fresh_unet, fresh_text = UNetModel(small_unet_cfg), BERTEmbedder(small_text_cfg)
        load_compvis(path, unet=fresh_unet, text_encoder=fresh_text)
        x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([10]), fresh_text(torch.tensor([[1, 2, 3]]))
        with torch.no_grad():
            torch.testing.assert_close(fresh_unet(x, t, ctx), unet(x, t, text(torch.tensor([[1, 2, 3]]))))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "compvis-ldm", "step": "5"}
    main([str(tmp_path / "export" / "model.safetensors")])
    summary = json.loads(capsys.readouterr().out)
    assert summary["unet"]["elements"] == sum(p.numel() for p in unet.parameters())


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callback": NotData()}, path)
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.ckpt.*NotData"):
        load_state_dict_file(str(path))
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_state_dict_file(str(tmp_path / "nope.ckpt"))


@pytest.mark.parametrize("length", [10**6, 2**63])
def test_a_safetensors_header_longer_than_the_file_is_named(tmp_path: Path, length: int) -> None:
    from safetensors.torch import save_file

    from ldm_train.checkpoints.export import LazySafetensors

    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(3)}, str(path))
    data = path.read_bytes()
    path.write_bytes(length.to_bytes(8, "little") + data[8:])
    message = rf"{path} is not a readable safetensors file: its {len(data)} bytes cannot hold the {length}-byte header"
    with pytest.raises(ValueError, match=message):
        load_state_dict_file(str(path))
    with pytest.raises(ValueError, match=message):
        LazySafetensors(path)


def test_a_compvis_class_model_checkpoint_loads_strictly_cond_stage_included(tmp_path: Path) -> None:
    """A Lightning .ckpt of a class-conditional LDM in the released cin256 layout (UNet, LitEma,
    ``cond_stage_model.embedding.weight``, first stage, schedule buffers) loads into our class model: the UNet from
    the EMA weights, the ClassEmbedder's table exactly; an embedding table of another size is refused by name."""
    from ldm_train.build import build_ldm
    from ldm_train.summary import compose_config
    from ldm_train.trainer.init_from import InitSource, load_into

    cfg = compose_config(["experiment=fmnist_class"])
    torch.manual_seed(0)
    src, dst = build_ldm(cfg), build_ldm(cfg)
    assert dst.cond_kind == "class"
    table = torch.randn_like(src.cond_stage_model.embedding.weight)
    sd = {"model.diffusion_model." + k: v for k, v in src.unet.state_dict().items()}
    sd |= {ema_key(k): v + 0.25 for k, v in src.unet.state_dict().items()}
    sd |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}
    sd |= {"cond_stage_model.embedding.weight": table, "betas": torch.linspace(1e-4, 2e-2, 1000),
           "first_stage_model.quant_conv.weight": torch.zeros(6, 6, 1, 1), "scale_factor": torch.tensor(1.0)}
    ckpt = tmp_path / "cin.ckpt"
    torch.save({"state_dict": sd, "global_step": 5}, ckpt)

    line = load_into(dst, InitSource(str(ckpt), None, True, False), use_ema=True)
    assert "UNet from EMA weights" in line and "class embedder: 1 tensors" in line
    assert torch.equal(dst.cond_stage_model.embedding.weight, table)
    for k, v in src.unet.state_dict().items():
        assert torch.equal(dst.unet.state_dict()[k], v + 0.25), k

    sd["cond_stage_model.embedding.weight"] = torch.zeros(table.shape[0] - 1, table.shape[1])  # no null-class row
    torch.save({"state_dict": sd}, ckpt)
    with pytest.raises(ValueError, match=r"cin\.ckpt: class embedder weights do not match.*embedding\.weight"):
        load_into(build_ldm(cfg), InitSource(str(ckpt), None, True, False), use_ema=True)


def test_cli_on_a_folder_reads_its_export_or_names_what_to_pass(tmp_path) -> None:
    """``python -m ldm_train.checkpoints DIR``: a step dir's weights are read; a folder without an export is refused
    with what to pass (it used to fail with a bare IsADirectoryError)."""
    from safetensors.torch import save_file

    from ldm_train.checkpoints.compvis import main

    with pytest.raises(SystemExit, match="folder without an exported checkpoint"):
        main([str(tmp_path)])
    step = tmp_path / "step_0000001"
    step.mkdir()
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(3)}, str(step / "model_ema.safetensors"))
    main([str(step)])


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_init_from_integer_or_bool_weights_are_refused_naming_the_file_and_the_key(small_unet_cfg, tmp_path: Path,
                                                                                   dtype) -> None:
    """``train.init_from`` with a quantized or damaged file: refused by file, setting and key, not cast silently."""
    from types import SimpleNamespace

    from ldm_train.trainer.init_from import InitSource, load_into

    sd = {UNET_PREFIX + k: v for k, v in UNetModel(small_unet_cfg).state_dict().items()}
    sd[UNET_PREFIX + "out.2.weight"] = sd[UNET_PREFIX + "out.2.weight"].to(dtype)
    path = tmp_path / "int.safetensors"
    save_file(sd, str(path))
    model = SimpleNamespace(unet=UNetModel(small_unet_cfg), cond_stage_model=None)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=rf"train\.init_from={path}: UNet tensor out\.2\.weight is {name} but the "
                                         r"model's is float32"):
        load_into(model, InitSource(str(path), None, False, False, has_cond_stage=False), use_ema=False)


def test_float64_weights_load_cast_and_said(small_unet_cfg, randomize, tmp_path: Path, capsys) -> None:
    src = randomize(UNetModel(small_unet_cfg), seed=3)
    path = tmp_path / "double.safetensors"
    save_file({UNET_PREFIX + k: v.double() for k, v in src.state_dict().items()}, str(path))
    dst = UNetModel(small_unet_cfg)
    load_compvis(str(path), unet=dst, setting="train.init_from")
    assert all(v.dtype == torch.float32 and torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())
    assert f"train.init_from={path}: {len(src.state_dict())} UNet tensors are float64" in capsys.readouterr().out
