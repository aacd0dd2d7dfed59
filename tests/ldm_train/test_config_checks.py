"""What every Hydra app refuses at composition: a key given twice, a key no setting reads, a renamed key, a
non-finite or out-of-range number, a string setting outside its choices (``ldm_train.config_checks``, wired into
``ldm_train.app``)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_train.app import compose

pytestmark = pytest.mark.integration  # starts processes or servers

REPO = Path(__file__).resolve().parents[2]

# every app: (module, config name, schema, overrides that compose)
APPS = {
    "ldm_train.train": ("train", "ldm_train.trainer.config:TrainAppConfig", ["experiment=tiny"]),
    "ldm_train.train_autoencoder": ("train_autoencoder", "ldm_train.first_stage.config:AutoencoderAppConfig",
                                    ["data.input=raw"]),
    "data_prep.encode": ("encode", "data_prep.config:EncodeConfig", ["input=raw", "first_stage=tiny_kl_f4"]),
    "data_prep.finalize": ("finalize", "data_prep.finalize:FinalizeConfig", ["output=latents", "first_stage=tiny_kl_f4"]),
    "data_prep.synthetic": ("synthetic", "data_prep.synthetic:SyntheticConfig", ["output=raw"]),
    "data_prep.fashion_mnist": ("fashion_mnist", "data_prep.fashion_mnist:FashionMNISTConfig", ["output=raw"]),
    "eval.run": ("eval", "eval.config:EvalConfig", ["checkpoint=run"]),
    "eval.reconstruction": ("eval_reconstruction", "eval.config:ReconstructionConfig", ["images=raw"]),
    "eval.kinds": ("eval_kinds", "eval.kinds:KindsEvalConfig", ["checkpoint=run", "images=raw"]),
}


def _schema(spec: str) -> type:
    module, name = spec.split(":")
    return getattr(__import__(module, fromlist=[name]), name)


def _compose(module: str, *extra: str):
    config_name, schema, base = APPS[module]
    return compose(config_name, _schema(schema), [*base, *extra])


@pytest.mark.parametrize("module", sorted(APPS))
def test_every_app_composes_its_defaults(module: str) -> None:
    assert _compose(module) is not None


@pytest.mark.parametrize("module", sorted(APPS))
def test_a_key_no_setting_reads_is_refused(module: str) -> None:
    key = {"ldm_train.train": "train.totl_samples", "ldm_train.train_autoencoder": "train.max_stesp",
           "data_prep.encode": "batch_sise", "data_prep.finalize": "outptu", "data_prep.synthetic": "num_sampels",
           "data_prep.fashion_mnist": "limt", "eval.run": "num_sampels", "eval.reconstruction": "num_imgaes",
           "eval.kinds": "num_imgaes"}[module]
    with pytest.raises(ValueError, match=re.escape(key) + r": no setting of \w+ reads this key.*did you mean"):
        _compose(module, f"+{key}=16")


# the commands whose required keys, left unset, are named with the command's usage line
REQUIRED = {"data_prep.finalize": ["output"], "data_prep.synthetic": ["output"], "data_prep.fashion_mnist": ["output"],
            "eval.kinds": ["checkpoint", "images"]}


@pytest.mark.parametrize("module", sorted(REQUIRED))
def test_the_command_line_names_a_missing_required_key_and_an_unknown_key(module: str) -> None:
    def run(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", module, *overrides], cwd=REPO, capture_output=True, text=True,
                              timeout=300)

    keys = REQUIRED[module]
    missing = run()
    assert missing.returncode != 0
    assert f"required key{'s' if len(keys) > 1 else ''} not set: {', '.join(keys)}" in missing.stderr
    assert f"usage: python -m {module} " in missing.stderr
    unknown = run(*(f"{key}=x" for key in keys), "num_sampels=3")
    assert unknown.returncode != 0
    assert "Could not override 'num_sampels'" in unknown.stderr


def test_the_hint_names_the_key_meant() -> None:
    with pytest.raises(ValueError, match=r"did you mean train\.total_samples\?"):
        _compose("ldm_train.train", "+train.totl_samples=16")


@pytest.mark.parametrize("override, new", [
    ("optim.batch_size=4", "train.micro_batch"),
    ("optim.base_lr=1e-3", "train.optim.base_lr"),
    ("optim.scale_lr=false", "train.optim.lr_scaling (true: compvis, false: none)"),
    ("optim.warmup_steps=100", "train.optim.warmup_steps"),
    ("optim.decay=cosine", "train.optim.lr_decay"),
    ("optim.min_lr_ratio=0.1", "train.optim.min_lr_ratio"),
    ("optim.betas=[0.9,0.99]", "train.optim.betas"),
    ("optim.grad_clip=1.0", "train.optim.grad_clip"),
    ("train.checkpoint_every=100", "train.checkpoint.every_steps"),
    ("train.keep_checkpoints=1", "train.checkpoint.keep_last"),
    ("train.export_every_checkpoint=false", "train.checkpoint.export_weights"),
    ("+optim.base_lr=1e-3", "train.optim.base_lr"),  # added, forced or deleted: the same key
    ("~train.keep_checkpoints", "train.checkpoint.keep_last"),
])
def test_a_renamed_first_stage_key_is_refused_naming_its_new_one(override: str, new: str) -> None:
    old = override.lstrip("+~").split("=")[0]
    with pytest.raises(ValueError, match=f"^{re.escape(old)} was renamed {re.escape(new)}"):
        _compose("ldm_train.train_autoencoder", override)


def test_the_first_stage_settings_keep_their_defaults_under_the_names_of_the_ldm_trainer() -> None:
    train = _compose("ldm_train.train_autoencoder").train
    assert train.micro_batch == 8 and train.max_steps == 1000
    assert vars(train.optim) == {"base_lr": 4.5e-6, "lr_scaling": "compvis", "warmup_steps": 0,
                                 "lr_decay": "constant", "min_lr_ratio": 0.0, "betas": [0.5, 0.9], "grad_clip": 0.0}
    assert vars(train.checkpoint) == {"every_steps": 500, "keep_last": 2, "export_weights": True}
    renamed = _compose("ldm_train.train_autoencoder", "train.micro_batch=4", "train.optim.lr_scaling=none",
                       "train.optim.lr_decay=cosine", "train.checkpoint.keep_last=1").train
    assert (renamed.micro_batch, renamed.optim.lr_scaling, renamed.optim.lr_decay, renamed.checkpoint.keep_last) == (
        4, "none", "cosine", 1)


def test_a_renamed_key_in_the_typed_config_and_on_the_command_line_names_its_new_one(tmp_path) -> None:
    from ldm_train.config_checks import unknown_keys
    from ldm_train.first_stage.config import RENAMED_KEYS, AutoencoderAppConfig

    cfg = AutoencoderAppConfig()
    cfg.train.checkpoint_every = 5  # what ``+train.checkpoint_every=5`` leaves on the typed object
    renamed = unknown_keys(cfg, renamed=RENAMED_KEYS)
    assert renamed == ["train.checkpoint_every was renamed train.checkpoint.every_steps"]
    assert "did you mean" in unknown_keys(cfg)[0]  # no table: the usual hint
    cmd = [sys.executable, "-m", "ldm_train.train_autoencoder", "data.input=raw", "optim.base_lr=1e-3",
           "train.keep_checkpoints=1", f"hydra.run.dir={tmp_path}/h"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("[train_autoencoder] optim.base_lr was renamed train.optim.base_lr; train.keep_checkpoints was renamed "
            "train.checkpoint.keep_last: set the new key instead") in proc.stderr
    assert not (tmp_path / "h").exists()  # refused before Hydra made its output dir or the app started


@pytest.mark.parametrize("override, message", [
    ("train.optim.base_lr=inf", r"train\.optim\.base_lr=inf: must be a finite number"),
    ("train.optim.base_lr=nan", r"train\.optim\.base_lr=nan: must be a finite number"),
    ("train.optim.base_lr=-1", r"train\.optim\.base_lr=-1\.0: must be >= 0"),
    ("train.total_samples=-5", r"train\.total_samples=-5: must be >= 1"),
    ("train.caption_dropout=1.5", r"train\.caption_dropout=1\.5: must be >= 0 and <= 1"),
    ("data.shuffle_buffer=-1", r"data\.shuffle_buffer=-1: must be >= 0"),
    ("train.ema.decay=2", r"train\.ema\.decay=2\.0: must be >= 0 and <= 1"),
    ("train.sampling.guidance_scale=inf", r"train\.sampling\.guidance_scale=inf: must be a finite number"),
    ("train.optim.betas=[0.9,nan]", r"train\.optim\.betas\[1\]=nan: must be a finite number"),
    # the loader's copy of a train setting (interpolated from train.*) cannot be set to disagree with it
    ("data.batch_size=4", r"data\.batch_size=4 differs from train\.micro_batch=\d+: .* set train\.micro_batch=4"),
    ("data.caption_dropout=0.3", r"set train\.caption_dropout=0\.3 instead of data\.caption_dropout"),
    ("data.seed=7", r"set train\.seed=7 instead of data\.seed"),
])
def test_bad_numbers_and_disagreeing_copies_are_refused_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _compose("ldm_train.train", override)


@pytest.mark.parametrize("module, override, message", [
    ("ldm_train.train_autoencoder", "train.optim.base_lr=nan", r"train\.optim\.base_lr=nan: must be a finite"),
    ("ldm_train.train_autoencoder", "train.log_every=0", r"train\.log_every=0: must be >= 1"),
    ("data_prep.encode", "batch_size=0", r"batch_size=0: must be >= 1"),
    ("eval.run", "guidance_scale=[1.0,inf]", r"guidance_scale\[1\]=inf: must be a finite"),
    ("eval.reconstruction", "num_images=-1", r"num_images=-1: must be >= 0"),
    # a string setting outside its choices (``one_of``): the error names the allowed values
    ("ldm_train.train", "train.diffusion.loss_type=l3", r"train\.diffusion\.loss_type=l3: must be one of l2, l1"),
    ("ldm_train.train", "train.diffusion.beta_schedule=linear",
     r"beta_schedule=linear: must be one of scaled_linear, sqrt_linear, sqrt, cosine; .*'linear' is ambiguous"),
    ("ldm_train.train", "train.optim.lr_decay=linear", r"train\.optim\.lr_decay=linear: must be one of constant, cosine"),
    ("ldm_train.train", "train.precision=fp64", r"train\.precision=fp64: must be one of fp32, bf16, fp16"),
    ("ldm_train.train", "cond.kind=txt", r"cond\.kind=txt: must be one of text, class, none, concat, inpaint, "),
    ("ldm_train.train", "first_stage.scale_factor_from=std",
     r"first_stage\.scale_factor_from=std: must be one of manifest, first_batch"),
    ("ldm_train.train", "train.fid.timestep_spacing=linspace",
     r"train\.fid\.timestep_spacing=linspace: must be one of leading, trailing, uniform_compvis"),
    ("ldm_train.train", "logger.mode=cloud", r"logger\.mode=cloud: must be one of online, offline, disabled"),
    ("ldm_train.train_autoencoder", "train.precision=fp16", r"train\.precision=fp16: must be one of fp32, bf16"),
    ("ldm_train.train_autoencoder", "first_stage.ddconfig.attn_type=linear",
     r"first_stage\.ddconfig\.attn_type=linear: must be one of vanilla, none"),
    ("eval.run", "sampler=euler", r"sampler=euler: must be one of ddim, plms, ddpm"),
    ("eval.run", "metrics.prc_features=clip", r"metrics\.prc_features=clip: must be one of inception, vgg16"),
    ("eval.run", "stage=train", r"stage=train: must be one of all, sample, metrics"),
    ("eval.run", "adherence=maybe", r"adherence=maybe: must be one of auto, true, false"),
    ("data_prep.encode", "input_format=zip", r"input_format=zip: must be one of auto, tar, folder, imagenet"),
    ("data_prep.encode", "precision=fp64", r"precision=fp64: must be one of auto, fp32, bf16, fp16"),
    ("eval.reconstruction", "metrics.extractor=clip", r"metrics\.extractor=clip: must be one of pretrained, random-init"),
])
def test_every_app_refuses_numbers_out_of_range_and_strings_outside_their_choices(module: str, override: str,
                                                                                 message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _compose(module, override)


def test_one_of_takes_the_allowed_values_and_none_only_as_the_default() -> None:
    import dataclasses

    from ldm_train.config_checks import bad_values, one_of

    @dataclasses.dataclass
    class Node:
        kind: str = one_of("a", ("a", "b"))
        optional: str | None = one_of(None, ("x",))
        flag: bool | str = one_of("auto", ("auto", True, False))

    assert bad_values(Node()) == bad_values(Node("b", "x", True)) == []
    assert bad_values(Node(None, None, 1), "n.") == ["n.kind=null: must be one of a, b",
                                                     "n.flag=1: must be one of auto, true, false"]
    with pytest.raises(ValueError, match="default 'c' is not one of"):
        one_of("c", ("a", "b"))


def test_every_preset_passes_the_checks() -> None:
    from ldm_train.app import CONF_DIR
    from ldm_train.trainer.config import TrainAppConfig

    for preset in sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")):
        assert compose("train", TrainAppConfig, [f"experiment={preset}"]) is not None, preset


@pytest.mark.parametrize("group", ["first_stage", "logger"])
def test_every_first_stage_and_logger_preset_passes_the_checks(group: str) -> None:
    from ldm_train.app import CONF_DIR

    for preset in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        assert _compose("ldm_train.train_autoencoder", f"{group}={preset}") is not None, preset


def test_a_key_given_twice_is_found_whatever_its_prefix() -> None:
    from ldm_train.config_checks import duplicate_overrides

    assert duplicate_overrides(["input=a", "output=b", "first_stage=kl_f8", "first_stage.name=x"]) is None
    error = duplicate_overrides(["input=raw/000000.tar", "+input=raw/000001.tar", "x=1", "++x=2", "x=3"])
    assert error.startswith("the same key is given more than once on the command line: input 2 times "
                            "(input=raw/000000.tar, +input=raw/000001.tar); x 3 times (x=1, ++x=2, x=3)")
    assert "quote the pattern" in error


@pytest.mark.parametrize("module", sorted(APPS))
def test_an_unquoted_brace_pattern_is_refused_on_every_command_line(module: str, tmp_path) -> None:
    """bash turns ``input=raw/{000000..000001}.tar`` into two arguments; Hydra would keep the last one."""
    key = {"ldm_train.train": "data.shards", "ldm_train.train_autoencoder": "data.input",
           "data_prep.encode": "input", "data_prep.finalize": "output", "data_prep.synthetic": "output",
           "data_prep.fashion_mnist": "output", "eval.run": "reference.path", "eval.reconstruction": "images",
           "eval.kinds": "images"}[module]
    cmd = f"{sys.executable} -m {module} {key}={tmp_path}/raw/{{000000..000001}}.tar hydra.run.dir={tmp_path}/h"
    proc = subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{key} 2 times ({key}={tmp_path}/raw/000000.tar, {key}={tmp_path}/raw/000001.tar)" in proc.stderr
    assert "quote the pattern" in proc.stderr
    assert not (tmp_path / "h").exists()  # refused before Hydra made its output dir or the app started
