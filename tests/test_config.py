"""Configuration: defaults < YAML < command line, typed and checked, with helpful errors."""
import math

import pytest

from replknet_fn.config import DEFAULTS, Config, ConfigError, parse_config, save_config
from replknet_fn.device import resolve_amp_level
from replknet_fn.schedule import create_lr_schedule

from conftest import ROOT


def test_cli_overrides_yaml_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1.0e-3\nbatch_size: 16\n")
    config = parse_config(["--config", str(path), "--batch_size", "8"])
    assert config.lr == 1e-3 and config.batch_size == 8 and config.weight_decay == DEFAULTS["weight_decay"]


@pytest.mark.parametrize("argv, key, expected", [
    (["--jit", "False"], "jit", False),
    (["--jit", "true"], "jit", True),
    (["--distribute", "1"], "distribute", True),
    (["--scale", "0.5", "1.0"], "scale", (0.5, 1.0)),
    (["--scale", "0.5,1.0"], "scale", (0.5, 1.0)),
    (["--scale", "[0.5, 1.0]"], "scale", (0.5, 1.0)),
    (["--milestones", "10", "20"], "milestones", [10, 20]),
    (["--lr", "5e-4"], "lr", 5e-4),
    (["--auto_augment", ""], "auto_augment", ""),
])
def test_command_line_values_parse_to_the_keys_type(argv, key, expected):
    value = parse_config(argv)[key]
    assert value == expected and type(value) is type(expected)


def test_yaml_exponents_and_lists_parse(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 5e-4\nscale: [0.08, 1]\nmilestones: [30, 60]\n")
    config = parse_config(["--config", str(path)])
    assert config.lr == 5e-4 and config.scale == (0.08, 1.0) and config.milestones == [30, 60]


def test_unknown_key_lists_close_matches(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rat'.*the command line.*") as error:
        parse_config(["--learning_rat", "1"])
    path = tmp_path / "bad.yaml"
    path.write_text("weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'weight_decy' in .*bad.yaml; did you mean weight_decay"):
        parse_config(["--config", str(path)])
    assert "did you mean" in str(error.value) or "valid keys" in str(error.value)


@pytest.mark.parametrize("argv, message", [
    (["--hflip", "1.5"], r"hflip=1.5 is outside the allowed range \[0.0, 1.0\]"),
    (["--opt", "adam"], r"opt='adam' is not one of \['adamw', 'sgd', 'momentum', 'lion'\]"),
    (["--batch_size", "2.5"], r"bad value for 'batch_size'"),
    (["--jit", "maybe"], r"bad value for 'jit'"),
    (["--lr", "nan"], r"lr=nan must be finite"),
])
def test_bad_values_are_named_with_the_allowed_range(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        parse_config(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("name", sorted(path.stem for path in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    config = parse_config(["--config", str(ROOT / "configs" / f"{name}.yaml")])
    save_config(config, tmp_path / "saved.yaml")
    again = parse_config(["--config", str(tmp_path / "saved.yaml")])
    assert dict(again, config="") == dict(config, config="")


def test_31b_config_is_the_reference_recipe():
    config = parse_config(["--config", str(ROOT / "configs" / "replknet31_base.yaml")])
    recipe = dict(opt="adamw", lr=5e-4, batch_size=64, weight_decay=0.05, filter_bias_and_bn=True,
                  scheduler="cosine_decay", warmup_epochs=20, epoch_size=300, min_lr=1e-6, drop_path_rate=0.4,
                  scale=(0.08, 1.0), ratio=(0.75, 1.333), interpolation="bicubic", hflip=0.5,
                  auto_augment="randaug-m9-mstd0.5", color_jitter=0.4, re_prob=0.25, mixup=0.8, cutmix=1.0,
                  label_smoothing=0.1, amp_level="auto", loss_scale_type="dynamic", loss_scale=65536.0,
                  clip_grad=True, clip_value=5.0, crop_pct=0.875, image_resize=224, keep_checkpoint_max=10,
                  ckpt_save_policy="top_k", val_while_train=True, val_interval=1, model="replknet31_base")
    assert {key: config[key] for key in recipe} == recipe
    # auto is the recipe's AMP O2 where the recipe ran (Ascend; GPU too), fp32 on the CPU
    assert [resolve_amp_level(config.amp_level, target) for target in ("Ascend", "GPU", "CPU")] == ["O2", "O2", "O0"]


def schedule_config(**overrides):
    config = Config(DEFAULTS)
    config.update(lr=1.0, min_lr=0.01, warmup_epochs=2, decay_epochs=8, warmup_factor=0.0)
    config.update(overrides)
    return config


def test_cosine_schedule_matches_its_closed_form():
    lr_at = create_lr_schedule(schedule_config(), steps_per_epoch=10)
    assert lr_at(0) == 0.0 and lr_at(10) == pytest.approx(0.5) and lr_at(20) == pytest.approx(1.0)
    for step in (25, 40, 60, 99):
        progress = (step - 20) / 80
        assert lr_at(step) == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * progress)))
    assert lr_at(100) == pytest.approx(0.01) and lr_at(150) == pytest.approx(0.01)


def test_epoch_stair_holds_the_lr_within_an_epoch():
    lr_at = create_lr_schedule(schedule_config(lr_epoch_stair=True), steps_per_epoch=10)
    assert lr_at(30) == lr_at(39) == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * 10 / 80)))


def test_step_and_multistep_decay():
    step_decay = create_lr_schedule(schedule_config(scheduler="step_decay", warmup_epochs=0, decay_epochs=3,
                                                    decay_rate=0.5), steps_per_epoch=10)
    assert [step_decay(s) for s in (0, 29, 30, 60)] == [1.0, 1.0, 0.5, 0.25]
    multi = create_lr_schedule(schedule_config(scheduler="multi_step_decay", warmup_epochs=0, milestones=[2, 5],
                                               decay_rate=0.1), steps_per_epoch=10)
    assert [multi(s) for s in (19, 20, 49, 50)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
