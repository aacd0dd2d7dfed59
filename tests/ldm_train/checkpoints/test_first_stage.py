"""First-stage checkpoint files: export and load round trip, released layouts, errors that name the fix, a
recorded architecture that refuses another one, and one read of the file per load."""
from __future__ import annotations

import hashlib
import sys

import pytest
import torch

from ldm_train.checkpoints.first_stage import export_first_stage, load_first_stage, read_first_stage_file
from ldm_train.models.autoencoder import build_first_stage
from tests.ldm_train.models.test_autoencoder import preset


def test_export_and_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    cfg = preset("tiny_kl_f4")
    model = build_first_stage(cfg)
    path = tmp_path / "first_stage.safetensors"
    json_path = export_first_stage(model, str(path), {"scale_factor": 1.5})
    assert json_path.endswith("first_stage.json")
    cfg.checkpoint = str(path)
    loaded = load_first_stage(cfg)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode_moments(x), model.eval().encode_moments(x))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_load_released_ckpt_layouts(tmp_path):
    """A Lightning model.ckpt with loss.* keys and a whole LDM with first_stage_model.* both load."""
    torch.manual_seed(0)
    cfg = preset("tiny_kl_f4")
    model = build_first_stage(cfg)
    sd = model.state_dict()
    torch.save({"state_dict": {**sd, "loss.logvar": torch.zeros(())}}, tmp_path / "model.ckpt")
    torch.save({"state_dict": {**{"first_stage_model." + k: v for k, v in sd.items()},
                               "model.diffusion_model.x": torch.zeros(1)}}, tmp_path / "ldm.ckpt")
    for name in ["model.ckpt", "ldm.ckpt"]:
        cfg.checkpoint = str(tmp_path / name)
        loaded = load_first_stage(cfg)
        assert torch.equal(loaded.encoder.conv_in.weight, model.encoder.conv_in.weight)


def test_load_errors_name_the_fix(tmp_path):
    cfg = preset("tiny_kl_f4")
    cfg.checkpoint = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="train_autoencoder"):
        load_first_stage(cfg)
    export_first_stage(build_first_stage(preset("tiny_kl_f8")), str(tmp_path / "f8.safetensors"))
    cfg.checkpoint = str(tmp_path / "f8.safetensors")
    with pytest.raises(ValueError, match="tiny_kl_f4"):
        load_first_stage(cfg)


def test_load_refuses_another_norm_groups(tmp_path):
    """GroupNorm groups change the function but no tensor shape: the export's recorded config catches it."""
    cfg = preset("tiny_kl_f4")
    assert cfg.ddconfig.norm_groups == 8
    export_first_stage(build_first_stage(cfg), str(tmp_path / "fs.safetensors"))
    cfg.checkpoint = str(tmp_path / "fs.safetensors")
    cfg.ddconfig.norm_groups = 32
    with pytest.raises(ValueError, match="norm_groups"):
        load_first_stage(cfg)


_OPENED: list[str] = []


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], str):
        _OPENED.append(args[0])


sys.addaudithook(_record_opens)  # audit hooks cannot be removed; this one only appends paths to a list


def opens_of(path: str, fn) -> tuple[object, int]:
    """``fn()``'s result and how many times the OS was asked to open ``path`` meanwhile."""
    _OPENED.clear()
    out = fn()
    return out, sum(1 for p in _OPENED if p == path)


def test_load_reads_the_file_once_and_hashes_the_same_bytes(tmp_path):
    cfg = preset("tiny_kl_f4")
    path = str(tmp_path / "fs.safetensors")
    export_first_stage(build_first_stage(cfg), path)
    cfg.checkpoint = path
    _, n = opens_of(path, lambda: load_first_stage(cfg))
    assert n == 1
    # the encode job's path: the sha256 for the manifest and the weights for the encoder from one read
    (weights, model), n = opens_of(path, lambda: (w := read_first_stage_file(cfg), load_first_stage(cfg, weights=w)))
    assert n == 1
    with open(path, "rb") as f:
        assert weights.sha256 == hashlib.sha256(f.read()).hexdigest()
    assert weights.metadata["format"] == "pt" and "first_stage" in weights.metadata
    assert torch.equal(model.encoder.conv_in.weight, weights.tensors["encoder.conv_in.weight"])


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_integer_or_bool_weights_are_refused_naming_the_file_and_the_key(tmp_path, dtype):
    """load_state_dict would cast them silently: the encode job would write latents of garbage weights."""
    import re

    from safetensors.torch import save_file

    cfg = preset("tiny_kl_f4")
    state = build_first_stage(cfg).state_dict()
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"].to(dtype)
    path = str(tmp_path / "quantized.safetensors")
    save_file(state, path)
    cfg.checkpoint = path
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=rf"first_stage\.checkpoint={re.escape(path)}: first stage tensor "
                                         rf"encoder\.conv_in\.weight is {name} but the model's is float32.*float32"):
        load_first_stage(cfg)


def test_float64_weights_are_cast_to_the_models_dtype_and_said(tmp_path, capsys):
    from safetensors.torch import save_file

    cfg = preset("tiny_kl_f4")
    state = build_first_stage(cfg).state_dict()
    path = str(tmp_path / "double.safetensors")
    save_file({k: v.double() for k, v in state.items()}, path)
    cfg.checkpoint = path
    loaded = load_first_stage(cfg)
    assert loaded.encoder.conv_in.weight.dtype == torch.float32
    assert torch.equal(loaded.encoder.conv_in.weight, state["encoder.conv_in.weight"])
    out = capsys.readouterr().out
    assert f"first_stage.checkpoint={path}: {len(state)} first stage tensors are float64" in out
    assert "cast to float32" in out
